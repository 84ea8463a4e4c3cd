"""``experiment=smoke`` end to end in-process: real Fashion-MNIST slices for LeNet5, synthetic data for the
other models; results.json complete and consistent, pretraining cached and reused."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from alq_lightning import bit_summary
from alq_lightning.app import REQUIRED_KEYS, ConfigError, ExportError
from alq_lightning.app import train as app_train
from alq_lightning.data.idx import IDX_FILES
from alq_lightning.models import build_model
from alq_lightning.packed.cli import export_main
from alq_lightning.packed.io import load_packed, read_packed

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from train import train  # noqa: E402

FMNIST = "/usr/share/datasets/fashion-mnist"
STAGES = ("pretrain", "float_test", "init", "basis", "coordinate", "pruning", "ste", "final_coordinate", "validate",
          "test")
SYNTHETIC = ["data=synthetic", "data.input_size=8", "data.train_size=64", "data.val_size=32", "data.test_size=64",
             "data.batch_size=32", "data.eval_batch_size=64", "logger=csv"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    torch.set_num_threads(1)


def run(tmp_path: Path, overrides: list[str], name: str = "run") -> tuple[dict, Path]:
    out = tmp_path / name
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=smoke", f"paths.output_dir={out}",
                                           f"pretrain.cache_dir={tmp_path / 'cache'}",
                                           "trainer.enable_progress_bar=false", "extras.print_config=false",
                                           *overrides])
    returned = train(cfg)
    return returned, out


def check_results(results: dict, out: Path, rounds: int) -> None:
    on_disk = json.loads((out / "results.json").read_text())
    assert set(REQUIRED_KEYS) <= set(on_disk)
    assert on_disk["test_acc"] == pytest.approx(results["test_acc"])
    assert on_disk["optimized_metric"] == {"name": "val/acc", "value": on_disk["val_acc"]}
    for key in ("float_test_acc", "test_acc", "val_acc"):
        assert 0.0 <= on_disk[key] <= 1.0
    assert 0 < on_disk["avg_bits"] <= on_disk["target_bits"]
    storage = on_disk["storage_bytes"]
    assert 0 < storage["binary"] <= storage["coords16"] <= storage["coords32"] < storage["float32"]
    assert on_disk["float_tensors"] == {}, "every weight matrix of the model is quantized"
    assert storage["model_coords32"] > storage["coords32"] and on_disk["compression"]["model_coords32"] > 1
    assert on_disk["layer_bits"] and all(0 <= bits <= 8 for bits in on_disk["layer_bits"].values())
    assert [r["round"] for r in on_disk["rounds"]] == list(range(1, rounds + 1))
    assert on_disk["rounds"][-1]["avg_bits"] <= on_disk["target_bits"]
    assert set(STAGES) <= set(on_disk["timings_s"]) and min(on_disk["timings_s"].values()) >= 0
    assert on_disk["config"]["alq"]["target_bits"] == on_disk["target_bits"]
    assert on_disk["hardware"]["torch"] == torch.__version__
    assert (out / "layer_bits.png").is_file() and (out / "accuracy_vs_bits.png").is_file()
    assert not list(out.glob(".results.json*")), "temporary file left behind"
    packed = out / "model.alq"
    assert on_disk["packed_file"] == {"name": "model.alq", "bytes": packed.stat().st_size,
                                      "avg_bits": pytest.approx(on_disk["avg_bits"])}
    layers = {f"model.{entry['name']}" for entry in read_packed(packed).header["layers"]}  # the network, unwrapped
    assert layers == set(on_disk["layer_bits"])


def test_lenet5_on_fashion_mnist_slices_then_cache_reuse(tmp_path):
    results, out = run(tmp_path, ["alq.rounds=2"])
    check_results(results, out, rounds=2)
    assert results["pretrained"]["source"] == "trained"
    assert sorted(results["data_files"]) == sorted(f"{FMNIST}/{stem}.gz" for stem in IDX_FILES)
    media = next((out / "wandb").glob("offline-run-*")) / "files" / "media"
    assert list(media.glob("table/alq/bit_summary_*.table.json")) and list(media.glob("table/alq/rounds_*"))
    assert {p.name.split("_")[0] for p in media.glob("images/plots/*.png")} == {"layer", "accuracy"}
    root = tmp_path / "fmnist"
    root.mkdir()
    for stem in IDX_FILES:
        (root / f"{stem}.gz").symlink_to(f"{FMNIST}/{stem}.gz")
    again, out2 = run(tmp_path, ["alq.rounds=2", "logger=none", f"data.root={root}"], name="again")
    read = json.loads((out2 / "results.json").read_text())["data_files"]
    assert sorted(read) == sorted(f"{root}/{stem}.gz" for stem in IDX_FILES)
    assert again["pretrained"] == {**results["pretrained"], "source": "cache"}
    assert again["float_test_acc"] == results["float_test_acc"]
    assert again["test_acc"] == pytest.approx(results["test_acc"], abs=0.02)


def test_quantized_inputs_through_the_app_reach_results_the_packed_file_and_wandb(tmp_path):
    """``alq.act_bits=2``: every quantized layer's input but the first at 2 bits; results.json records the BOPs
    the bit summary counts, model.alq is a version-2 file carrying the quantizers, W&B's table has the columns."""
    results, out = run(tmp_path, ["alq.rounds=1", "alq.act_bits=2"])
    check_results(results, out, rounds=1)
    acts = results["activations"]
    assert acts["act_bits"] == {"model.conv2": 2, "model.fc1": 2, "model.fc2": 2} and acts["bops"] > 0
    layers = {row["layer"]: row for row in results["layers"]}
    assert layers["model.conv1"]["act_bits"] == 0 and acts["bops"] == sum(row["BOPs"] for row in layers.values())
    header = read_packed(out / "model.alq").header
    assert [bool(entry.get("activations")) for entry in header["layers"]] == [False, True, True, True]
    media = next((out / "wandb").glob("offline-run-*")) / "files" / "media"
    table = json.loads(next(media.glob("table/alq/bit_summary_*.table.json")).read_text())
    assert table["columns"][-2:] == ["act_bits", "BOPs"]


@pytest.mark.parametrize("model,extra", [
    ("vgg_small", ["model.net.width=0.25"]),
    ("resnet20", ["model.net.width=4"]),
    ("resnet34", ["alq.max_bits=2", "data.batch_size=64"]),
    ("vit_tiny", ["model.net.depth=1", "model.net.patch_size=2"]),  # raw Parameters and in_proj_weight quantized too
])
def test_other_models_on_synthetic_data(model, extra, tmp_path):
    results, out = run(tmp_path, [f"model={model}", *SYNTHETIC, *extra])
    check_results(results, out, rounds=1)
    assert list((out / "csv").glob("version_*/metrics.csv"))


def test_vit_with_quantized_inputs_leaves_attention_out_proj_float_and_writes_results_and_model(tmp_path, caplog):
    """``model=vit_tiny alq.act_bits=2``: each attention's ``out_proj`` (read directly by nn.MultiheadAttention, so
    its input hook never runs) is named in the log as a float input and counted nowhere; results.json and model.alq
    are written and hold the same quantized inputs."""
    synthetic = [override for override in SYNTHETIC if not override.startswith("logger=")]
    with caplog.at_level("INFO"):
        results, out = run(tmp_path, ["model=vit_tiny", *synthetic, "model.net.depth=2", "model.net.patch_size=2",
                                      "logger=none", "alq.act_bits=2"])
    check_results(results, out, rounds=1)
    expected = {f"model.encoder.layers.{i}.{name}": 2 for i in (0, 1) for name in ("linear1", "linear2")}
    expected["model.head"] = 2
    assert results["activations"]["act_bits"] == expected
    layers = {row["layer"]: row for row in results["layers"]}
    for i in (0, 1):
        out_proj = f"model.encoder.layers.{i}.self_attn.out_proj"
        assert (layers[out_proj]["act_bits"], layers[out_proj]["BOPs"]) == (0, 0)
        assert f"{out_proj} (read directly by nn.MultiheadAttention: its forward, and an input hook, never runs)" in (
            caplog.text)
    assert results["activations"]["bops"] == sum(row["BOPs"] for row in layers.values()) > 0
    header = read_packed(out / "model.alq").header
    assert {f"model.{entry['name']}": entry["activations"]["act_bits"] for entry in header["layers"]
            if "activations" in entry} == expected


def test_a_failed_export_keeps_the_results_and_says_what_failed(tmp_path, monkeypatch):
    """results.json is written before the packed export; when the export fails it records the failure and the run
    ends with an error naming both."""
    def export_fails(model, path, coord_bits=32):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(app_train, "export_packed", export_fails)
    with pytest.raises(ExportError, match=r"the run finished but its packed export failed \(OSError: \[Errno 28\] No "
                                          r"space left on device\); its results are in .*results.json, under "
                                          r"packed_file.error"):
        run(tmp_path, ["data=synthetic", "data.input_size=16", "data.train_size=64", "data.val_size=32",
                       "data.test_size=64", "logger=none"])
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(REQUIRED_KEYS) <= set(on_disk) and 0 <= on_disk["test_acc"] <= 1
    assert on_disk["packed_file"] == {"error": "OSError: [Errno 28] No space left on device"}
    assert not (tmp_path / "run" / "model.alq").exists()


def test_pretrain_checkpoint_is_loaded(tmp_path):
    checkpoint = tmp_path / "float.pt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in build_model("lenet5", 3, 10, 8 * 2).state_dict().items()}},
               checkpoint)
    overrides = ["data=synthetic", "data.input_size=16", "data.train_size=64", "data.val_size=32",
                 "data.test_size=64", "logger=none", f"pretrain.checkpoint={checkpoint}"]
    results, out = run(tmp_path, overrides)
    assert results["pretrained"]["source"] == "checkpoint" and results["data_files"] == []
    written = (out / "results.json").read_text()
    with pytest.raises(ConfigError, match="results.json exists already: a run never overwrites"):
        run(tmp_path, overrides)
    assert (out / "results.json").read_text() == written


def test_readme_export_command_on_a_train_py_checkpoint(tmp_path, capsys):
    results, out = run(tmp_path, ["data=synthetic", "data.input_size=16", "data.train_size=64", "data.val_size=32",
                                  "data.test_size=64", "logger=csv"])
    assert [p.name for p in out.rglob("*.ckpt")] == ["last.ckpt"], "the run's checkpoint, written by default"
    checkpoint = out / "last.ckpt"
    assert export_main([str(checkpoint), str(tmp_path / "model.alq"), "--model", "lenet5"]) == 0, \
        capsys.readouterr().err
    model = load_packed(tmp_path / "model.alq", build_model("lenet5", 3, 10, 16))
    assert bit_summary(model).avg_bits == pytest.approx(results["avg_bits"])
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    assert all(torch.equal(state[f"model.{key}"], value) for key, value in model.state_dict().items())


@pytest.mark.parametrize("overrides,message", [
    (["model.net._target_=alq_lightning.models.AlexNet"],
     "model.net._target_='alq_lightning.models.AlexNet' cannot be imported"),
    (["model.optimizer.lr=-1"],
     "(<class 'torch.optim.adam.Adam'>, lr=-1) cannot build an optimizer: Invalid learning rate: -1"),
    (["pretrain.optimizer._target_=torch.optim.Sideways"], "pretrain.optimizer: "),
    (["optimized_metric=test/acc"], "optimized_metric='test/acc' must be a validation metric (val/...)"),
    (["ckpt_path=/nowhere/last.ckpt"], "ckpt_path='/nowhere/last.ckpt' does not exist or is not a file"),
    (["+callbacks.stop._target_=lightning.pytorch.callbacks.EarlyStop"], "callbacks.stop: "),
    (["extras.enforce_tags=true"], "tags=[] while extras.enforce_tags=true"),
    (["alq.target_bits=6"], "target_bits=6 must be a number in (0, max_bits=6)"),
    (["model=resnet18", "alq.max_bits=null", "alq.target_bits=9"], "max_bits=8"),
    (["alq.pruning=sideways"], "pruning='sideways' is not allowed"),
    (["+alq.colour=blue"], "alq.colour is not an ALQCallback argument"),
])
def test_bad_config_fails_before_training(overrides, message, tmp_path):
    with pytest.raises(ConfigError) as error:
        run(tmp_path, overrides)
    assert message in str(error.value)
    assert not (tmp_path / "run").exists(), "nothing written for a config that cannot run"


def test_mismatching_checkpoint_names_both_shapes(tmp_path):
    checkpoint = tmp_path / "rgb_lenet5.pt"
    torch.save(build_model("lenet5", 3, 10, 28).state_dict(), checkpoint)
    with pytest.raises(ConfigError) as error:
        run(tmp_path, [f"pretrain.checkpoint={checkpoint}"])
    assert "conv1.weight is [20, 3, 5, 5] in the checkpoint but [20, 1, 5, 5] in the model" in str(error.value)
    assert "model=LeNet5 for data=FashionMNISTDataModule (1 channel(s), 28x28 inputs, 10 classes)" in str(error.value)
    assert not (tmp_path / "run").exists()
