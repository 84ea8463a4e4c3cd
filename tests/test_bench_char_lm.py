"""bench/char_lm.py: its corpus split, its causal model and the JSON of a ``--smoke`` run.

The corpus here is the GPL-3 text of Debian's ``base-files`` (always installed), not the benchmark's fortunes.
"""
from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
TEXT = Path("/usr/share/common-licenses/GPL-3")


@pytest.fixture
def char_lm(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    for name in ("common", "char_lm"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    yield importlib.import_module("char_lm")
    for name in ("common", "char_lm"):
        sys.modules.pop(name, None)


def test_documents_are_cut_at_percent_lines_else_at_blank_lines(char_lm):
    assert char_lm.split_documents("one\nline\n%\ntwo\n\nparagraphs\n%\n%\nthree\n") == [
        "one\nline", "two\n\nparagraphs", "three"]
    assert char_lm.split_documents("first\nparagraph\n\n \nsecond\n\n\nthird") == [
        "first\nparagraph", "second", "third"]


def test_split_is_disjoint_deterministic_and_one_tenth(char_lm, tmp_path):
    """Every tenth document is validation, none is in both halves (duplicates dropped), same split twice."""
    corpus = tmp_path / "fortunes"
    corpus.write_text("".join(f"fortune {i}\nsays {i * i}\n%\n" for i in range(40)) + "fortune 3\nsays 9\n%\n")
    documents, dropped = char_lm.read_documents([corpus])
    assert dropped == 1 and len(documents) == 40
    train, val = char_lm.split_corpus(documents)
    assert (train, val) == char_lm.split_corpus(char_lm.read_documents([corpus])[0])
    train_docs, val_docs = set(char_lm.split_documents(train)), set(char_lm.split_documents(val))
    assert val_docs == {f"fortune {i}\nsays {i * i}" for i in range(9, 40, 10)}
    assert not train_docs & val_docs and train_docs | val_docs == set(documents)


def test_split_of_a_real_text_file(char_lm):
    documents, _ = char_lm.read_documents([TEXT])
    train, val = char_lm.split_corpus(documents)
    assert 0.05 < len(val) / (len(train) + len(val)) < 0.2
    assert not set(char_lm.split_documents(train)) & set(char_lm.split_documents(val))
    ids = char_lm.encode(train)
    assert ids.dtype == torch.int64 and int(ids.max()) < len(char_lm.VOCAB)
    assert "".join(char_lm.VOCAB[i] for i in ids[:200]) == train[:200]


def test_windows_are_seeded_and_shifted_by_one(char_lm):
    ids = torch.arange(1000) % 97
    first = list(char_lm.RandomWindows(ids, 16, 4, 3, seed=5))
    assert len(first) == 3 and all(x.shape == y.shape == (4, 16) for x, y in first)
    assert all(torch.equal(x[:, 1:], y[:, :-1]) for x, y in first)
    again = char_lm.RandomWindows(ids, 16, 4, 3, seed=5)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, iter(again)))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, iter(again)))  # the next epoch differs


@pytest.mark.parametrize("training", [True, False])
def test_model_is_causal(char_lm, training):
    """Changing a character changes no logit before its position (and the ones from it on do change)."""
    torch.manual_seed(0)
    model = char_lm.CharTransformer(len(char_lm.VOCAB), dim=32, layers=2, heads=2, ffn=64, context=24).train(training)
    ids = torch.randint(0, len(char_lm.VOCAB), (3, 24))
    changed = ids.clone()
    changed[:, 10] = (changed[:, 10] + 1) % len(char_lm.VOCAB)
    with torch.no_grad():
        before, after = model(ids), model(changed)
    assert torch.allclose(before[:, :10], after[:, :10], atol=1e-6)
    assert not torch.allclose(before[:, 10:], after[:, 10:], atol=1e-4)


def test_every_weight_matrix_is_a_parameter_of_two_dimensions(char_lm):
    model = char_lm.CharTransformer(len(char_lm.VOCAB), dim=32, layers=1, heads=2, ffn=64, context=24)
    assert sorted(char_lm.weight_matrices(model)) == sorted([
        "embed.weight", "position", "encoder.layers.0.self_attn.in_proj_weight",
        "encoder.layers.0.self_attn.out_proj.weight", "encoder.layers.0.linear1.weight",
        "encoder.layers.0.linear2.weight", "head.weight"])


def test_a_weight_matrix_left_in_float_is_an_error(char_lm):
    model = char_lm.CharTransformer(len(char_lm.VOCAB), dim=32, layers=1, heads=2, ffn=64, context=24)
    layers = {name: SimpleNamespace(param=p) for name, p in char_lm.weight_matrices(model).items()
              if name != "position"}
    with pytest.raises(RuntimeError, match=r"left weight matrices in float: \['position'\]"):
        char_lm.check_all_quantized(model, SimpleNamespace(layers=layers, float_layers={}))


def test_smoke_run_writes_its_json(char_lm, tmp_path):
    out = tmp_path / "char_lm.json"
    record = char_lm.main(["--smoke", "--corpus", str(TEXT), "--out", str(out), "--targets", "1", "0.7"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(record))
    for key in ("command", "date", "hardware", "threads", "git_commit", "corpus", "model", "num_weights", "float",
                "alq", "wall_seconds"):
        assert key in record, key
    assert record["corpus"]["files"] == [str(TEXT)] and record["corpus"]["bytes"] == TEXT.stat().st_size
    assert record["float"]["val_loss"] > 0 and record["float"]["perplexity"] > 1
    assert record["float_continued"]["val_loss"] > 0 and record["float_continued"]["epochs"] == 5
    assert [r["target_bits"] for r in record["alq"]] == [1.0, 0.7]
    for run in record["alq"]:
        assert run["avg_bits"] <= run["target_bits"] + 1e-9
        assert run["val_loss"] > 0 and run["perplexity"] == pytest.approx(torch.tensor(run["val_loss"]).exp().item())
        assert run["quantized_weights"] == record["num_weights"]
        assert run["quantized_parameters"] == record["num_matrices"] and run["float_parameters"] > 0
        assert run["alq_log"] and run["seconds"] >= 0


def test_quantized_inputs_of_the_char_transformer(char_lm, tmp_path, caplog):
    """``ALQCallback(act_bits=2)`` on a tiny model for a few steps: attention's ``out_proj`` is named as a float
    input; the counted inputs are those of the quantizers whose hooks ran, all fitted; evaluation quantizes them
    (outputs differ from float inputs) and the packed file gives the same outputs."""
    from alq_lightning import ALQCallback, bit_summary, export_packed, load_packed

    ids = char_lm.encode(TEXT.read_text()[:20000])
    torch.manual_seed(0)
    model = char_lm.CharTransformer(len(char_lm.VOCAB), dim=32, layers=1, heads=2, ffn=64, context=16)
    module = char_lm.CharLM(model, lr=1e-3)
    alq = ALQCallback(target_bits=1.0, max_bits=3, rounds=1, basis_epochs=1, coordinate_epochs=1, pruning_epochs=1,
                      ste_epochs=1, final_coordinate_epochs=1, act_bits=2)
    windows = char_lm.RandomWindows(ids, 16, batch_size=8, batches=3, seed=0)
    with caplog.at_level("INFO"):
        char_lm.trainer(alq.total_epochs, [alq]).fit(module, torch.utils.data.DataLoader(windows, batch_size=None))
    assert ("encoder.layers.0.self_attn.out_proj (read directly by nn.MultiheadAttention: its forward, and an "
            "input hook, never runs)") in caplog.text
    counted = {row.name for row in bit_summary(module).act_rows}  # linear1 is the first Linear: float input
    assert counted == {"model.encoder.layers.0.linear2", "model.head"} == set(alq.activations.layers)
    assert all(layer.ready for layer in alq.activations.layers.values())
    alq.activations._enable_fitted()
    assert all(layer.enabled for layer in alq.activations.layers.values())
    x = ids[:64].view(4, 16)
    module.eval()
    with torch.no_grad():
        quantized = module(x)
        export_packed(model, tmp_path / "m.alq")
        fresh = char_lm.CharTransformer(len(char_lm.VOCAB), dim=32, layers=1, heads=2, ffn=64, context=16)
        assert torch.equal(load_packed(tmp_path / "m.alq", fresh).eval()(x), quantized)
        alq.activations._enable(False)
        assert not torch.allclose(module(x), quantized, atol=1e-3)


@pytest.mark.slow
def test_the_char_transformer_quantized_by_fsdp2_on_two_processes_equals_the_single_process_run(char_lm, tmp_path):
    """``--fsdp2``: every weight matrix (the raw position table and attention's raw ``in_proj_weight`` among them)
    sharded on rows over 2 processes, each taking half of every batch; the packed file the fit ends with holds the
    single-process run's bits per layer and, up to float rounding of the half-batch gradient sums, its loss."""
    arguments = ["--smoke", "--no-control", "--corpus", str(TEXT), "--targets", "1", "0.7"]
    single = char_lm.main([*arguments, "--out", str(tmp_path / "single.json")])
    sharded = char_lm.main([*arguments, "--fsdp2", "--out", str(tmp_path / "sharded.json")])
    assert sharded["fsdp2"] and not single["fsdp2"]
    for one, two in zip(single["alq"], sharded["alq"]):
        assert two["quantized_parameters"] == 7 and two["quantized_names"] == one["quantized_names"]
        assert two["avg_bits"] == one["avg_bits"] <= one["target_bits"]
        assert [layer["avg_bits"] for layer in two["layers"]] == [layer["avg_bits"] for layer in one["layers"]]
        assert two["packed_file_bytes"] > two["storage_bytes"] > 0
        assert two["val_loss"] == pytest.approx(one["val_loss"], abs=1e-4)
