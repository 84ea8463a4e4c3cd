"""Why ALQ trails the 1-bit peers on the char-level LM of ``bench/peers.py``: ALQ variants at one epoch budget.

    python bench/levers.py --threads 1 --lr 3e-3                      # every variant at target 1
    python bench/levers.py --threads 1 --lr 3e-3 --variants default "rounds 1"

The protocol of ``bench/peers.py`` (its cached float start, its seeded batches, ``--batches`` per epoch, the same
validation text), every variant 12 epochs in all, so that each sees the batches every peer saw. A variant changes
one thing of the default (``peers.py``'s ALQ: ``max_bits`` 4, 3 rounds × (1 basis + 1 coordinate + 1 pruning
epoch), 2 STE + 1 final coordinate epochs): the shape of the schedule (fewer rounds, the epochs moved to STE),
``max_bits``, and a 1-bit start (``max_bits=1`` and ``target_bits=0.999``, so that pruning has almost nothing to
do: the binary network of ALQ's initialisation refitted by its basis, coordinate and STE stages), and a floor of
one live basis per group (pruning never empties a row: a prototype of a library option, patched in here by
ranking the most important live slot of each group as never removable). Each run also records the share of empty groups
(rows whose every slot was pruned, so that the layer outputs only its bias there) per matrix. ``lr`` is
ALQ's ``lr`` and ``ste_lr`` alike (``--lr``, the best of the peers' sweep for ALQ at 1 bit). Runs are appended to
``bench/results/levers_char_lm.json`` as they finish; a rerun skips the variants recorded at the same settings.
Writes the table of every run into the section "levers" of ``bench/RESULTS.md``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from unittest import mock

import lightning as L
import peers
import torch

import char_lm
from common import git_state, hardware, write_section
from peer_bytes import alq_storage

HERE = Path(__file__).resolve().parent
EPOCHS = 12
# name: (target_bits, schedule and max_bits overrides of peers.py's ALQ config, floor of one basis per group)
VARIANTS = {
    "default": (1.0, {}, False),
    "rounds 2, 5 STE": (1.0, {"rounds": 2, "ste_epochs": 5}, False),
    "rounds 1, 8 STE": (1.0, {"rounds": 1, "ste_epochs": 8}, False),
    "rounds 3 without coordinate epochs, 5 STE": (1.0, {"coordinate_epochs": 0, "ste_epochs": 5}, False),
    "max_bits 2": (1.0, {"max_bits": 2}, False),
    "max_bits 2, rounds 1, 8 STE": (1.0, {"max_bits": 2, "rounds": 1, "ste_epochs": 8}, False),
    "1-bit start, rounds 1, 8 STE": (0.999, {"max_bits": 1, "rounds": 1, "ste_epochs": 8}, False),
    "1-bit start": (0.999, {"max_bits": 1}, False),
    "floor of one basis per group": (1.0, {}, True),
    "floor of one basis per group, rounds 1, 8 STE": (1.0, {"rounds": 1, "ste_epochs": 8}, True),
    "rounds 1, 9 STE, no final coordinate epoch": (1.0, {"rounds": 1, "ste_epochs": 9,
                                                         "final_coordinate_epochs": 0}, False),
    "rounds 1 without coordinate epochs, 9 STE": (1.0, {"rounds": 1, "coordinate_epochs": 0, "ste_epochs": 9},
                                                  False),
    "target 2": (2.0, {}, False),
    "target 2, rounds 1, 8 STE": (2.0, {"rounds": 1, "ste_epochs": 8}, False),
    "target 0.7": (0.7, {}, False),
    "target 0.7, rounds 1, 8 STE": (0.7, {"rounds": 1, "ste_epochs": 8}, False),
    "target 0.97 (the 1-bit peers' bytes), rounds 1 without coordinate epochs, 9 STE": (
        0.97, {"rounds": 1, "coordinate_epochs": 0, "ste_epochs": 9}, False),
    "target 0.7, rounds 1 without coordinate epochs, 9 STE": (
        0.7, {"rounds": 1, "coordinate_epochs": 0, "ste_epochs": 9}, False),
    "target 2, rounds 1 without coordinate epochs, 9 STE": (
        2.0, {"rounds": 1, "coordinate_epochs": 0, "ste_epochs": 9}, False),
}


def floored(importance):
    """``importance`` (``alq_lightning.network.slot_importance``, ``[G, K]``) with the most important live slot of
    each group ranked ``+inf`` (never removed, whatever else one selection removes): pruning keeps at least one
    basis per group."""

    def slot_importance(state, p, h):
        scores = importance(state, p, h)
        best = torch.where(state.mask, scores, -torch.inf).argmax(dim=1, keepdim=True)
        kept = torch.zeros_like(state.mask).scatter_(1, best, True) & state.mask
        return torch.where(kept, torch.inf, scores)

    return slot_importance


class EmptyGroups(L.Callback):
    """At the end of the fit: ``shares {layer: fraction of its groups with no live slot}`` of the ALQ network."""

    def __init__(self) -> None:
        self.shares: dict[str, float] = {}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from alq_lightning import ALQCallback

        network = next(c for c in trainer.callbacks if isinstance(c, ALQCallback)).network
        self.shares = {name.removeprefix("model."): float((~layer.state.mask.any(dim=1)).double().mean())
                       for name, layer in network.layers.items()}


def run(name: str, model, train_ids, val_ids, config: dict, lr: float, seed: int) -> dict:
    """Variant ``name`` of :data:`VARIANTS` from ``model``: validation loss, bits, bytes and bits per matrix."""
    import alq_lightning.network
    from alq_lightning import bit_summary

    target, overrides, floor = VARIANTS[name]
    settings = {**config, **overrides, "lr": lr}
    if char_lm.alq_epochs(settings) != EPOCHS:
        raise ValueError(f"variant {name!r} takes {char_lm.alq_epochs(settings)} epochs, not {EPOCHS}")
    empty = EmptyGroups()
    importance = alq_lightning.network.slot_importance
    with mock.patch.object(alq_lightning.network, "slot_importance", floored(importance) if floor else importance):
        result = char_lm.quantize(model, train_ids, target, settings, seed, callbacks=[empty], ste_lr=lr)
    module = result.pop("module")
    return {"variant": name, "target_bits": target, "overrides": overrides, "floor": floor, "lr": lr,
            "val_loss": char_lm.evaluate(module.model, val_ids), **alq_storage(bit_summary(module)),
            "fit_seconds": result["seconds"],
            "layer_bits": {row["name"].removeprefix("model."): row["avg_bits"] for row in result["layers"]},
            "empty_groups": empty.shares}


def schedule(run: dict, config: dict) -> str:
    s = {**config, **run["overrides"]}
    return (f"{s['rounds']} × ({s['basis_epochs']} + {s['coordinate_epochs']} + {s['pruning_epochs']}), "
            f"{s['ste_epochs']} STE, {s['final_coordinate_epochs']} final")


def markdown(record: dict) -> str:
    """The RESULTS.md section: every run, by target then validation loss."""
    commits = ", ".join(dict.fromkeys(r["git_commit"][:7] + (" with uncommitted changes" if r["git_dirty"] else "")
                                      for r in record["runs"]))
    lines = [f"### ALQ levers on the char-level LM (`bench/levers.py`) — {record['hardware']}, {record['threads']} "
             f"thread, {record['date'][:10]}", "",
             f"`{' && '.join(dict.fromkeys(record['commands']))}`; runs with alq_lightning at `{commits}`; JSON "
             f"`bench/results/levers_char_lm.json`. The protocol of `bench/peers.py` (seed {record['seed']}, "
             f"{EPOCHS} epochs × {record['config']['batches']} batches of {record['config']['batch_size']}, the "
             f"same float start, batches and validation text); schedule: rounds × (basis + coordinate + pruning "
             f"epochs), STE epochs, final coordinate epochs; `lr` = `ste_lr`. Empty groups: the largest share of "
             f"the rows of one matrix left without a basis (— where not recorded).", "",
             "| variant | target | max_bits | schedule | floor | lr | val loss | model bytes | stored bits / weight | "
             "most emptied matrix |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(record["runs"], key=lambda r: (-r["target_bits"], r["val_loss"])):
        empty = max(r["empty_groups"].items(), key=lambda item: item[1]) if "empty_groups" in r else None
        max_bits = r["overrides"].get("max_bits", record["config"]["max_bits"])
        lines.append(f"| {r['variant']} | {r['target_bits']:g} | {max_bits} | {schedule(r, record['config'])} | "
                     f"{'yes' if r.get('floor') else 'no'} | {r['lr']:g} | {r['val_loss']:.4f} | {r['model_bytes']} | "
                     f"{r['stored_bits']:.3f} | " + (f"{empty[0]} {empty[1]:.0%}" if empty else "—") + " |")
    return "\n".join(lines)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batches", type=int, default=12, help="batches per epoch (default 12, as in the README)")
    parser.add_argument("--lr", type=float, default=3e-3, help="ALQ's lr and ste_lr (default 3e-3)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), help=f"of {list(VARIANTS)}")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "levers_char_lm.json")
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; known: {list(VARIANTS)}")
    for name in ("threads", "batches"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}={getattr(args, name)} must be >= 1")
    if not args.lr > 0:
        parser.error(f"--lr={args.lr} must be > 0")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse(argv)
    warnings.filterwarnings("ignore", message=r".*IterableDataset. has .__len__. defined")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    config = {**char_lm.FULL["alq"], "batches": args.batches}
    train_text, val_text = char_lm.split_corpus(char_lm.read_documents(char_lm.corpus_files())[0])
    train_ids, val_ids = char_lm.encode(train_text), char_lm.encode(val_text)
    model, float_record = peers.float_start(args.seed, char_lm.FULL["model"], char_lm.FULL["float"], train_ids,
                                            val_ids)

    import alq_lightning

    settings = {"seed": args.seed, "config": config, "model": char_lm.FULL["model"], "threads": args.threads}
    record = json.loads(args.out.read_text()) if args.out.exists() else {}
    if {k: record.get(k) for k in settings} != settings:
        record = {**settings, "runs": []}
    command = "python bench/levers.py " + " ".join(f'"{a}"' if " " in a else a
                                                   for a in (sys.argv[1:] if argv is None else argv))
    record["commands"] = [*record.get("commands", []), command]
    record.update(date=datetime.datetime.now().isoformat(timespec="seconds"), hardware=hardware(),
                  torch=torch.__version__, lightning=L.__version__, float=float_record,
                  bench_git_commit=git_state(HERE)["git_commit"])
    state = git_state(Path(alq_lightning.__file__).resolve().parent)
    done = {(r["variant"], r["lr"]) for r in record["runs"]}
    for name in args.variants:
        if (name, args.lr) in done:
            continue
        result = run(name, model, train_ids, val_ids, config, args.lr, args.seed + 1)  # the data seed of peers.py
        record["runs"].append({**result, "command": command, **state})
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n")
        print(f"{name} (lr {args.lr:g}): val loss {result['val_loss']:.4f}, {result['code_bits']:.3f} bits, "
              f"{result['model_bytes']} B", flush=True)
    write_section(HERE / "RESULTS.md", "levers", markdown(record))
    return record


if __name__ == "__main__":
    main()
