"""Checkpoints: exact resume from any stage, loading with and without the callback, weights_only safety."""
from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from alq_lightning import ALQCallback, bit_summary
from alq_lightning.core import MultiBitState
from alq_lightning.data.tensor_loader import TensorLoader

from tiny import TinyModule, build, loader, make_data, small_cnn, trainer


def schedule() -> ALQCallback:
    return ALQCallback(0.8, max_bits=3, rounds=2, basis_epochs=1, coordinate_epochs=1, ste_epochs=1,
                       final_coordinate_epochs=1)


def resumable_loader() -> TensorLoader:
    x, y = make_data("image").tensors
    return TensorLoader(x, y, 32, shuffle=True, seed=1)


def final_state(alq: ALQCallback) -> dict[str, tuple[torch.Tensor, ...]]:
    return {name: (layer.state.codes.clone(), layer.state.coords.clone(), layer.state.mask.clone(),
                   layer.buffer("weight_vmax").clone())
            for name, layer in alq.network.layers.items()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """A full run that saves a checkpoint every 5 of its 64 optimizer steps."""
    directory = tmp_path_factory.mktemp("ckpt")
    alq = schedule()
    saver = ModelCheckpoint(dirpath=directory, every_n_train_steps=5, save_top_k=-1, filename="{step}")
    torch.set_num_threads(1)
    trainer([alq, saver], alq.total_epochs, enable_checkpointing=True).fit(build("cnn"), resumable_loader())
    return final_state(alq), directory, alq


# 8 steps per epoch; epochs: 0 basis, 1 coordinate, 2 pruning, 3 basis, 4 coordinate, 5 pruning, 6 STE, 7 final.
@pytest.mark.parametrize("step", [5, 10, 20, 25, 35, 40, 45, 50, 60])
def test_resume_from_any_stage_ends_exactly_like_an_uninterrupted_run(uninterrupted, step):
    reference, directory, _ = uninterrupted
    alq = schedule()
    trainer([alq], alq.total_epochs).fit(build("cnn"), resumable_loader(), ckpt_path=directory / f"step={step}.ckpt")
    resumed = final_state(alq)
    for name, tensors in reference.items():
        for expected, actual in zip(tensors, resumed[name]):
            assert torch.equal(expected, actual), name


def test_checkpoint_loads_with_weights_only_and_holds_scalars_only_in_callback_state(uninterrupted):
    _, directory, alq = uninterrupted
    checkpoint = torch.load(directory / "step=60.ckpt", weights_only=True)
    (state,) = [v for k, v in checkpoint["callbacks"].items() if k.startswith("ALQCallback")]
    scalars = [state["init"], *state["stages"]]
    assert all(isinstance(v, (int, float, bool, type(None))) for s in scalars for v in s.values())
    assert set(checkpoint["alq"]) == set(alq.network.layers)
    assert not any(key.split(".")[-1].startswith("alq_") for key in checkpoint["state_dict"])


def test_plain_load_from_checkpoint_gives_the_quantized_weights(uninterrupted):
    reference, directory, alq = uninterrupted
    path = directory / "step=60.ckpt"
    plain = TinyModule.load_from_checkpoint(path, net=small_cnn())
    tensors = torch.load(path, weights_only=True)["alq"]
    for name, layer in alq.network.layers.items():
        weight = plain.get_submodule(name).weight
        codes, coords, mask = (tensors[name][k] for k in ("codes", "coords", "mask"))
        expected = layer.layout.from_groups(MultiBitState(codes, coords, mask).reconstruct())
        assert torch.equal(weight.detach(), expected), name


@pytest.mark.parametrize("with_callback", [True, False])
def test_trainer_test_from_checkpoint_with_and_without_the_callback(uninterrupted, with_callback):
    _, directory, _ = uninterrupted
    path = directory / "step=60.ckpt"
    module = build("cnn", seed=123)
    callbacks = [schedule()] if with_callback else []
    (metrics,) = trainer(callbacks, 1).test(module, loader(), ckpt_path=path)
    reference = TinyModule.load_from_checkpoint(path, net=small_cnn())
    (expected,) = trainer([], 1).test(reference, loader())
    assert metrics["test/acc"] == expected["test/acc"]
    if with_callback:
        assert bit_summary(module).avg_bits == pytest.approx(callbacks[0].network.avg_bits)
        assert callbacks[0].network.avg_bits <= 0.8


def test_resuming_a_checkpoint_without_multibit_state_is_refused(tmp_path):
    module = build("cnn")
    saver = ModelCheckpoint(dirpath=tmp_path, filename="float")
    trainer([saver], 1, enable_checkpointing=True).fit(module, loader())
    alq = schedule()
    with pytest.raises(ValueError, match="no ALQ multi-bit state"):
        trainer([alq], alq.total_epochs).fit(build("cnn"), loader(), ckpt_path=tmp_path / "float.ckpt")


def test_transformer_resumes_exactly_from_pruning_and_ste(tmp_path):
    """Every weight matrix of a transformer (embedding, raw position embedding, attention's in_proj_weight)
    resumes exactly: a run restarted mid-pruning and mid-STE ends like the uninterrupted one."""
    def run(ckpt_path=None, callbacks=()):
        alq = ALQCallback(0.8, max_bits=3, rounds=1, basis_epochs=1, coordinate_epochs=1, ste_epochs=1,
                          final_coordinate_epochs=0)
        x, y = make_data("tokens").tensors
        trainer([alq, *callbacks], alq.total_epochs, enable_checkpointing=bool(callbacks)).fit(
            build("transformer"), TensorLoader(x, y, 32, shuffle=True, seed=1), ckpt_path=ckpt_path)
        return alq

    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=5, save_top_k=-1, filename="{step}")
    reference = final_state(run(callbacks=[saver]))
    assert {"net.embed", "net.position", "net.encoder.self_attn.in_proj_weight"} <= set(reference)
    for step in (20, 30):  # 8 steps per epoch: 0 basis, 1 coordinate, 2 pruning, 3 STE
        resumed = final_state(run(ckpt_path=tmp_path / f"step={step}.ckpt"))
        for name, tensors in reference.items():
            for expected, actual in zip(tensors, resumed[name]):
                assert torch.equal(expected, actual), f"{name} from step {step}"
