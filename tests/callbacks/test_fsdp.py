"""ALQ under FSDP2 (``ModelParallelStrategy`` with ``fully_shard``) on two CPU processes equals the single-process fit
of the same seed and batches: masks and codes exactly, coordinates and weights within float rounding."""
from __future__ import annotations

import re
import socket

import pytest
import torch
import torch.multiprocessing as mp
from fsdp_jobs import build, fit, refusal_job, resume_job, sharded_job
from torch.distributed.checkpoint import FileSystemReader

from alq_lightning import export_packed
from alq_lightning.activations import attach_activations
from alq_lightning.consolidate import consolidate_main
from alq_lightning.layers import LayerSelection, attach
from alq_lightning.network import MultiBitNetwork
from alq_lightning.packed.checkpoint import read_checkpoint
from alq_lightning.sharded import SHARDED_KEY, checkpoint_key

SCHEDULE = dict(target_bits=0.8, max_bits=3, rounds=2, basis_epochs=1, coordinate_epochs=1, ste_epochs=1,
                final_coordinate_epochs=1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_sharded(kind: str, options: dict, directory, world: int = 2, sharded: bool = True,
                prefix: str = "rank") -> list[dict]:
    """Fit on ``world`` spawned processes under FSDP2 (or DDP, not ``sharded``); what each saves, ``<prefix><r>.pt``."""
    mp.spawn(sharded_job, args=(world, free_port(), kind, options, directory, sharded), nprocs=world)
    return [torch.load(directory / f"{prefix}{rank}.pt", weights_only=True) for rank in range(world)]


def whole(ranks: list[dict], name: str, key: str) -> torch.Tensor:
    """The layer's tensor ``key`` of the whole weight: the ranks' groups in rank order (latent: none or all)."""
    offsets = [saved["offsets"][name] for saved in ranks]
    assert offsets == sorted(offsets) and offsets[0] == 0
    return torch.cat([saved["state"][name][key] for saved in ranks])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mlp", "cnn", "transformer"])
def test_sharded_fit_equals_single_process_fit(tmp_path, kind):
    options = dict(SCHEDULE, exclude=["net.position"] if kind == "transformer" else [])
    fit(kind, options, tmp_path / "single.pt", sharded=False)
    single = torch.load(tmp_path / "single.pt", weights_only=True)
    ranks = run_sharded(kind, options, tmp_path)
    assert set(ranks[0]["state"]) == set(ranks[1]["state"]) == set(single["state"])
    assert any(not bool(state["mask"].all()) for state in single["state"].values()), "pruning must have happened"
    assert ranks[0]["avg_bits"] == ranks[1]["avg_bits"] == single["avg_bits"]
    assert ranks[1]["gathered"] == {}, "the first process saves the checkpoint"
    for name, state in single["state"].items():
        for key, tensor in ranks[0]["gathered"][name].items():
            assert torch.equal(tensor, ranks[0]["state"][name][key] if key == "steps" else whole(ranks, name, key))
        for key in ("codes", "mask"):
            assert torch.equal(whole(ranks, name, key), state[key]), f"{name}.{key}"
        # The gradient is the mean of two half-batch float32 sums (the Conv backward picks its reduction per batch
        # size) instead of one full-batch sum; a few ulps per step, which AMSGrad's and the biases' Adam's m / sqrt(v)
        # magnify where a gradient is near zero, over the 64 steps of the fit. Seen: ≤ 1e-7 (MLP, transformer),
        # ≤ 4.3e-5 (CNN) on coordinates of about 0.1; ALQ's math itself is per group and identical.
        for key in ("coords", "weight_m", "coord_vmax"):
            torch.testing.assert_close(whole(ranks, name, key), state[key], rtol=1e-4, atol=1e-4, msg=f"{name}.{key}")
        for saved in ranks:
            torch.testing.assert_close(saved["weights"][name], single["weights"][name], rtol=1e-4, atol=1e-4)
    copy = unsharded_copy(kind, ranks, options["exclude"])
    assert export_packed(copy, tmp_path / "copy.alq").file_bytes == ranks[0]["file_bytes"] == ranks[1]["file_bytes"]
    assert (tmp_path / "copy.alq").read_bytes() == (tmp_path / "rank.alq").read_bytes()


def unsharded_copy(kind: str, ranks: list[dict], exclude: list[str]):
    """A single-process model holding the sharded fit's whole weights and multi-bit state."""
    model = build(kind, sharded=False)
    model.load_state_dict(ranks[0]["model"])
    layers, float_layers = attach(model, LayerSelection(max_bits=SCHEDULE["max_bits"], exclude=exclude))
    network = MultiBitNetwork(layers, float_layers)
    network.load_state_tensors({name: {key: ranks[0]["state"][name]["steps"] if key == "steps" else
                                       whole(ranks, name, key) for key in ranks[0]["state"][name]}
                                for name in layers})
    for name, layer in layers.items():  # ŵ of the whole state is the weight the shards held
        assert torch.equal(layer.param.detach(), ranks[0]["weights"][name]), name
    return model


def test_layers_fsdp2_cannot_serve_by_rows_are_refused_by_name(tmp_path):
    mp.spawn(refusal_job, args=(2, free_port(), tmp_path), nprocs=2)
    for rank in range(2):
        messages = torch.load(tmp_path / f"refusals{rank}.pt")
        assert re.search(r"layer .1.: structure columnwise\(1\).*straddle.*.subchannelwise.", messages["columnwise"])
        assert re.search(r"layer '1' has 1 rows, split over 2 processes as \[1, 0\].*exclude=\['1'\]",
                         messages["too_few_rows"])
        assert re.search(r"layer '0' is not sharded on dim 0.*fully_shard", messages["not_sharded"])


@pytest.mark.slow
def test_resume_from_a_sharded_checkpoint_is_exact_and_its_consolidation_resumes_in_one_process(tmp_path):
    """The ALQ state travels in the model's shards, each process writing its own rows (nothing in ``meta.pt`` but
    which layers held latent weights); consolidated to one file, a single process resumes from it."""
    options = dict(SCHEDULE, exclude=[], ste_epochs=2, structures={"net.1": "subchannelwise(2)"})  # 2 groups a row
    mp.spawn(resume_job, args=(2, free_port(), "mlp", options, tmp_path, 6), nprocs=2)  # from within STE
    for rank in range(2):
        full, resumed = (torch.load(tmp_path / f"{run}{rank}.pt", weights_only=True) for run in ("full", "resumed"))
        assert full["avg_bits"] == resumed["avg_bits"]
        for name, state in full["state"].items():
            for key, tensor in state.items():
                assert torch.equal(resumed["state"][name][key], tensor), f"rank {rank}: {name}.{key}"
        for key, tensor in full["model"].items():
            assert torch.equal(resumed["model"][key], tensor), f"rank {rank}: {key}"
    folder = tmp_path / "ckpt" / "epoch=6.ckpt"
    held = {epoch: torch.load(tmp_path / "ckpt" / f"epoch={epoch}.ckpt" / "meta.pt", weights_only=True)["alq"]
            for epoch in range(9)}
    assert held[6] == {SHARDED_KEY: {"net.1": True, "net.3": True}}  # the latent weights of STE's first epoch
    assert all(held[epoch] == {SHARDED_KEY: {"net.1": False, "net.3": False}} for epoch in range(9) if epoch != 6)
    chunks = FileSystemReader(folder).read_metadata().state_dict_metadata
    for name, rows in (("net.1", 32), ("net.3", 4)):
        for key in ("codes", "coords", "mask", "weight_m", "coord_vmax", "latent"):
            offsets = [chunk.offsets[0] for chunk in chunks[f"state_dict.{checkpoint_key(name, key)}"].chunks]
            assert sorted(offsets) == [0, rows // 2], f"{name}.{key}: one shard of rows per process"
    consolidated = tmp_path / "epoch6.ckpt"
    assert consolidate_main([str(folder), str(consolidated)]) == 0
    whole_state = torch.load(consolidated, weights_only=True)["alq"]
    assert whole_state["net.1"]["latent"].shape == (64, 32) and whole_state["net.3"]["codes"].shape == (4, 32)
    assert not any(key.startswith("alq/") for key in torch.load(consolidated, weights_only=True)["state_dict"])
    assert torch.equal(read_checkpoint(str(folder))["alq"]["net.1"]["coords"], whole_state["net.1"]["coords"])
    fit("mlp", options, tmp_path / "single.pt", sharded=False, ckpt_path=consolidated)
    single = torch.load(tmp_path / "single.pt", weights_only=True)
    ranks = [torch.load(tmp_path / f"full{rank}.pt", weights_only=True) for rank in range(2)]
    for name, state in single["state"].items():
        for key in ("codes", "mask"):
            assert torch.equal(whole(ranks, name, key), state[key]), f"{name}.{key}"
        # as in the fit test: half-batch against full-batch gradient sums, over the last 3 epochs
        torch.testing.assert_close(whole(ranks, name, "coords"), state["coords"], rtol=1e-4, atol=1e-4)



@pytest.mark.slow
def test_resume_with_multibit_inputs_from_a_sharded_checkpoint_is_exact(tmp_path):
    """The input quantizers (replicated) travel in the sharded checkpoint's metadata and resume exactly."""
    options = dict(SCHEDULE, exclude=[], act_bits=2)
    mp.spawn(resume_job, args=(2, free_port(), "mlp", options, tmp_path), nprocs=2)
    meta = torch.load(tmp_path / "ckpt" / "epoch=3.ckpt" / "meta.pt", weights_only=True)
    assert set(meta["alq_activations"]) == {"net.3"}
    for rank in range(2):
        full, resumed = (torch.load(tmp_path / f"{run}{rank}.pt", weights_only=True) for run in ("full", "resumed"))
        assert set(full["inputs"]) == {"net.3"}
        for name, tensors in full["inputs"].items():
            for key, tensor in tensors.items():
                assert torch.equal(resumed["inputs"][name][key], tensor), f"rank {rank}: input of {name}.{key}"
        for name, state in full["state"].items():
            for key, tensor in state.items():
                assert torch.equal(resumed["state"][name][key], tensor), f"rank {rank}: {name}.{key}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["mlp", "cnn", "transformer"])
def test_sharded_fit_on_one_gpu_equals_the_plain_fit(tmp_path, kind):
    """The sharded path on CUDA (DTensor weights, state on the card, reductions over NCCL) with one process: the same
    state as the plain fit of the same batches."""
    options = dict(SCHEDULE, exclude=["net.position"] if kind == "transformer" else [])
    fit(kind, options, tmp_path / "single.pt", sharded=False, accelerator="gpu")
    fit(kind, options, tmp_path / "rank0.pt", sharded=True, accelerator="gpu")
    single, sharded = (torch.load(tmp_path / name, weights_only=True) for name in ("single.pt", "rank0.pt"))
    assert sharded["avg_bits"] == single["avg_bits"]
    for name, state in single["state"].items():
        for key in ("codes", "mask"):
            assert torch.equal(sharded["state"][name][key].cpu(), state[key].cpu()), f"{name}.{key}"
        # one process: the same gradients up to the kernels cuBLAS/cuDNN pick for the sharded module's all-gathered
        # weights; seen equal or within rounding
        torch.testing.assert_close(sharded["state"][name]["coords"].cpu(), state["coords"].cpu(), rtol=1e-4, atol=1e-4)
    assert (tmp_path / "rank.alq").stat().st_size == (tmp_path / "single.alq").stat().st_size


@pytest.mark.slow
def test_sharded_fit_with_multibit_inputs_equals_the_ddp_fit(tmp_path):
    """Under FSDP2 each input quantizer is refit per batch and averaged over the processes as under DDP: the same
    input coordinates and weight state as a DDP fit of the same per-rank batches (a single process, which refits on
    the whole batch instead of averaging two half-batch refits, is no oracle here), and the export is the file a
    single process writes from the sharded fit's weights, state and input quantizers."""
    options = dict(SCHEDULE, exclude=[], act_bits=2)
    ranks = run_sharded("mlp", options, tmp_path)
    ddp = run_sharded("mlp", options, tmp_path, sharded=False, prefix="ddp")
    assert set(ranks[0]["inputs"]) == set(ddp[0]["inputs"]) == {"net.3"}  # net.1: the raw image
    for name, expected in ddp[0]["inputs"].items():
        assert bool(expected["ready"])
        for saved in ranks:  # replicated: each process holds the result of the same all-reduce
            assert torch.equal(saved["inputs"][name]["coords"], ranks[0]["inputs"][name]["coords"]), name
            assert torch.equal(saved["inputs"][name]["signed"], expected["signed"]), name
        # The refits average the same all-reduce as under DDP, but on inputs computed from weights whose gradients
        # FSDP2 reduce-scatters while DDP all-reduces them in buckets (a float32 sum in another order): float
        # rounding apart (seen: one ulp, 6e-8 on coordinates of about 0.7).
        torch.testing.assert_close(ranks[0]["inputs"][name]["coords"], expected["coords"], rtol=1e-5, atol=1e-6,
                                   msg=lambda m, n=name: f"{n}: {m}")
    assert any(not bool(state["mask"].all()) for state in ddp[0]["state"].values()), "pruning must have happened"
    for name, state in ddp[0]["state"].items():
        for key in ("codes", "mask"):
            assert torch.equal(whole(ranks, name, key), state[key]), f"{name}.{key}"
        torch.testing.assert_close(whole(ranks, name, "coords"), state["coords"], rtol=1e-4, atol=1e-4)
    copy = unsharded_copy("mlp", ranks, options["exclude"])
    quantizers = attach_activations({name: dict(copy.named_modules())[name] for name in ranks[0]["inputs"]}, 2)
    for name, layer in quantizers.items():
        layer.load(ranks[0]["inputs"][name])
    assert export_packed(copy, tmp_path / "copy.alq").file_bytes == ranks[0]["file_bytes"] == ranks[1]["file_bytes"]
    assert (tmp_path / "copy.alq").read_bytes() == (tmp_path / "rank.alq").read_bytes()
