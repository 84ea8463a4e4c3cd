"""Schedule oracle: the whole per-step trace of ALQCallback against a table written from the documented schedule.

The expected table follows ALGORITHM.md §5 and the ALQCallback docstring, written out here (not taken from the
package): per round, basis / coordinate / pruning epochs with ``lr · lr_decay^e`` (``e`` counted from the
round's first epoch); STE epochs with ``ste_lr · ste_lr_decay^e``; final coordinate epochs continuing from
where STE ended (or from ``final_lr``) with ``final_lr_decay``; the bit budget after round ``r`` is
``b0 · (target/b0)^(r/R)`` (``target`` for ``r = R``), spread linearly over the pruning window's optimizer
steps. Step counters follow ``MultiBitNetwork``: basis/STE steps count ``weight_step`` and set
``coord_step`` to it; coordinate steps and pruning observations count ``coord_step``.
"""
from __future__ import annotations

import math

import pytest

from alq_lightning import ALQCallback

from tiny import Recorder, build, loader, record_core_calls, trainer

SCHEDULE = dict(target_bits=1.0, max_bits=3, rounds=2, basis_epochs=2, coordinate_epochs=1, pruning_epochs=1,
                ste_epochs=2, final_coordinate_epochs=2, lr=1e-2, lr_decay=0.5, ste_lr=3e-3, ste_lr_decay=0.7,
                final_lr=None, final_lr_decay=0.6, pruning="coordinates", per_bit=False, start_epoch=0)
CASES = {  # name: (module, samples, batch size, accumulate_grad_batches, schedule changes)
    "mlp-two-rounds": ("mlp", 64, 16, 1, {}),
    "cnn-three-rounds-late-start-per-bit-final-lr": (
        "cnn", 64, 16, 1,
        dict(target_bits=0.6, max_bits=2, rounds=3, basis_epochs=1, coordinate_epochs=2, pruning_epochs=2,
             ste_epochs=1, final_coordinate_epochs=1, lr=2e-3, lr_decay=0.8, final_lr=5e-3, final_lr_decay=0.5,
             per_bit=True, start_epoch=2)),
    "cnn-groups-no-coordinate-no-ste": (
        "cnn", 48, 16, 1,
        dict(target_bits=1.2, rounds=2, coordinate_epochs=0, ste_epochs=0, lr=5e-3, lr_decay=0.9, ste_lr=4e-3,
             pruning="groups", start_epoch=1)),
    "mlp-accumulate-two-odd-batches": (
        "mlp", 80, 16, 2,
        dict(target_bits=0.5, max_bits=2, rounds=1, basis_epochs=2, pruning_epochs=2, ste_epochs=1,
             final_coordinate_epochs=1, lr_decay=0.7)),
    "float-parts-tokens": (
        "float_parts", 64, 16, 1,
        dict(target_bits=0.9, rounds=2, basis_epochs=1, ste_epochs=1, final_coordinate_epochs=0, start_epoch=1)),
}


def documented_epochs(c: dict) -> list[tuple[str, float, int]]:
    """Per epoch: (stage, learning rate, round), from the documented schedule."""
    table = [("idle", 0.0, 0)] * c["start_epoch"]
    for r in range(1, c["rounds"] + 1):
        stages = (["basis"] * c["basis_epochs"] + ["coordinate"] * c["coordinate_epochs"]
                  + ["pruning"] * c["pruning_epochs"])
        table += [(stage, c["lr"] * c["lr_decay"] ** e, r) for e, stage in enumerate(stages)]
    table += [("ste", c["ste_lr"] * c["ste_lr_decay"] ** e, 0) for e in range(c["ste_epochs"])]
    final = c["ste_lr"] * c["ste_lr_decay"] ** c["ste_epochs"] if c["final_lr"] is None else c["final_lr"]
    table += [("coordinate", final * c["final_lr_decay"] ** e, 0) for e in range(c["final_coordinate_epochs"])]
    return table


def documented_budget(b0: float, target: float, r: int, rounds: int, s: int, steps: int) -> float:
    """Average-bits budget after step ``s`` (0-based) of the ``steps``-step pruning window of round ``r``."""
    def after_round(i: int) -> float:
        return target if i == rounds else b0 * (target / b0) ** (i / rounds)

    start, end = after_round(r - 1), after_round(r)
    return end if s == steps - 1 else start + (end - start) * (s + 1) / steps


def observed_row(step) -> tuple[tuple, float]:
    """((epoch, core functions called, step argument, number of calls), lr argument) of one optimizer step."""
    keyed = [call for call in step.calls if call.step is not None]
    steps, lrs = sorted({c.step for c in keyed}), sorted({c.lr for c in keyed if c.lr is not None})
    names = "+".join(sorted({call.name for call in step.calls})) or "idle"
    counter = steps[0] if len(steps) == 1 else tuple(steps) or None
    lr = lrs[0] if len(lrs) == 1 else (math.nan if lrs else 0.0)
    return (step.epoch, names, counter, len(step.calls)), lr


@pytest.mark.parametrize("case", CASES)
def test_trace_follows_the_documented_schedule(monkeypatch, case):
    """Every optimizer step's stage, lr and step counter equal the table; every bucket is stepped once and leaves
    that counter on all its groups (so every quantized layer stepped);
    pruning steps prune exactly when the bits exceed the documented budget and land on it within one slot;
    epochs before ``start_epoch`` make no core call and leave the quantized weights alone (floats still train);
    the run ends at or below ``target_bits`` by less than one slot."""
    kind, samples, batch_size, accumulate, changes = CASES[case]
    c = {**SCHEDULE, **changes}
    alq = ALQCallback(**c)
    recorder = Recorder(alq)
    record_core_calls(monkeypatch, recorder)
    data = loader("tokens" if kind == "float_parts" else "image", n=samples, batch_size=batch_size)
    trainer([alq, recorder], alq.total_epochs, accumulate_grad_batches=accumulate).fit(build(kind), data)

    epochs = documented_epochs(c)
    assert alq.total_epochs == len(epochs)
    assert recorder.stray == [], "core calls between optimizer steps"
    network = alq.network
    layers, buckets = len(network.layers), len(network.buckets)
    numel = sum(layer.param.numel() for layer in network.layers.values())
    sizes = [layer.layout.group_size * (layer.state.max_bits if c["pruning"] == "groups" else 1)
             for layer in network.layers.values()]
    slot = max(sizes)
    per_epoch = math.ceil(math.ceil(samples / batch_size) / accumulate)
    window = c["pruning_epochs"] * per_epoch
    steps = recorder.steps

    expected, budget_errors = [], []
    weight_step = coord_step = 0
    for index in range(len(epochs) * per_epoch):
        epoch = index // per_epoch
        stage, lr, round_index = epochs[epoch]
        if stage == "idle":
            expected.append(((epoch, "idle", None, 0), 0.0))
        elif stage in ("basis", "ste"):
            weight_step += 1
            coord_step = weight_step
            expected.append(((epoch, f"{stage}_step", weight_step, buckets), lr))
        elif stage == "coordinate":
            coord_step += 1
            expected.append(((epoch, "coordinate_step", coord_step, buckets), lr))
        else:
            coord_step += 1
            s = index - next(i for i, e in enumerate(epochs) if e[0] == "pruning" and e[2] == round_index) * per_epoch
            budget = documented_budget(recorder.initial_bits, c["target_bits"], round_index, c["rounds"], s, window)
            before = steps[index - 1].binary_bits if 0 < index <= len(steps) else recorder.initial_binary
            after = steps[index].binary_bits if index < len(steps) else math.nan
            prune = before > budget * numel
            if abs(before - budget * numel) < 1e-9 * numel and index < len(steps):  # a tie up to rounding
                prune = any(call.name == "quadratic_model" for call in steps[index].calls)
            if prune:
                expected.append(((epoch, "observe+quadratic_model", coord_step, buckets + layers), lr))
                if not budget * numel - slot < after <= budget * numel:
                    budget_errors.append((index, before, after, budget * numel))
            else:
                expected.append(((epoch, "observe", coord_step, buckets), 0.0))
                if after != before:
                    budget_errors.append((index, before, after, budget * numel))
    observed = [observed_row(step) for step in steps]
    assert [row for row, _ in observed] == [row for row, _ in expected]
    assert [lr for _, lr in observed] == pytest.approx([lr for _, lr in expected], rel=1e-12, abs=0)
    assert budget_errors == [], "(step, bits before, bits after, budget in bits)"

    for step in steps:
        assert step.avg_bits == pytest.approx(step.binary_bits / numel, rel=1e-12)
        if step.epoch < c["start_epoch"]:
            assert not step.weights_changed and step.floats_changed
    assert c["target_bits"] - slot / numel < network.avg_bits <= c["target_bits"]

