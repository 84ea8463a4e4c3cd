"""ALQ side by side with the peers a user would pick: torchao's PARQ and Brevitas, at equal start, data and epochs.

    pip install -c constraints-cpu.txt -e ".[peers]"             # torchao and brevitas (optional extra)
    python bench/peers.py --threads 1                            # the char-level LM, every method
    python bench/peers.py --batches 25 --lrs 3e-4 1e-3 3e-3      # shorter epochs (the same for every method)
    python bench/peers.py --batches 12 --targets 1 2 --per-bit-targets --alq-lrs 1e-3 3e-3   # some ALQ rows only

Network: the causal character-level transformer of ``bench/char_lm.py`` on the same corpus and split. Every method
starts from the same float model (trained once by ``char_lm.py``'s float recipe and cached under
``bench/runs/peers/``), sees the same batches (the same seeded windows, batch size and epochs as ``char_lm.py``'s
ALQ schedule, ``--batches`` per epoch) and quantizes the same weights: every parameter of two or more dimensions
(character and position embeddings, attention and feed-forward matrices, the output head); biases and norms stay
float for all. Methods: ALQ (default, and ``per_bit=True``) at each ``--targets`` and each learning rate of
``--alq-lrs`` (``lr`` and ``ste_lr`` alike, the final coordinate epochs following STE's rate; the best one on
validation is the point of each target, as for the peers); each peer of :func:`peer_methods.peers` at each
learning rate of ``--lrs`` (the best one on validation is the peer's point); a float control trained as long.
Each peer run is checked quantized: before its last step and after training, no group of the weights the forward
uses takes more than its 2^bits values (:func:`peer_methods.check_quantized`).

Per run: validation loss (nats/char; the learning rates of the peers are chosen on the same validation text, which
can only favour the peers), bytes as stored (:mod:`peer_bytes`), bits per quantized weight counted both ways and
the median training step relative to a float step timed just before in the same process. Runs are appended to
the JSON as they finish; a rerun with the same settings skips them. Writes ``bench/results/peers_char_lm.json``,
``bench/results/peers_char_lm.png`` (loss vs model bytes) and the README section "Side by side with the peers".
"""
from __future__ import annotations

import argparse
import copy
import datetime
import itertools
import json
import os
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch

import char_lm
from common import git_state, hardware, write_section
from peer_bytes import CodedTensor, alq_storage, best_run, groups_of, peer_storage, remainder_bytes

HERE = Path(__file__).resolve().parent
CACHE = HERE / "runs" / "peers"
README = HERE.parent / "README.md"
FLOAT_STEPS = 15  # float steps timed before each run; the first 3 are dropped


def float_start(seed: int, model_config: dict, float_config: dict, train_ids: torch.Tensor,
                val_ids: torch.Tensor) -> tuple[char_lm.CharTransformer, dict]:
    """The cached float model of ``seed`` (trained and saved when absent or made with other settings)."""
    path = CACHE / f"char_lm_float_seed{seed}.pt"
    settings = {"model": model_config, "float": float_config, "seed": seed, "train_chars": len(train_ids)}
    torch.manual_seed(seed)
    model = char_lm.CharTransformer(len(char_lm.VOCAB), **model_config)
    if path.exists():
        saved = torch.load(path, weights_only=False)
        if saved["settings"] == settings:
            model.load_state_dict(saved["state"])
            return model, saved["record"]
    module, seconds = char_lm.train_float(model, train_ids, float_config, seed)
    record = {"val_loss": char_lm.evaluate(module.model, val_ids), "seconds": seconds, "cache": str(path)}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"settings": settings, "state": module.model.state_dict(), "record": record}, path)
    return module.model, record


def fit(module: L.LightningModule, train_ids: torch.Tensor, context: int, config: dict, seed: int,
        callbacks: Sequence[L.Callback], epochs: int | None = None, max_steps: int = -1) -> float:
    data = char_lm.RandomWindows(train_ids, context, config["batch_size"], config["batches"], seed)
    trainer = L.Trainer(max_epochs=epochs or 1, max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=list(callbacks), num_sanity_val_steps=0)
    start = time.perf_counter()
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=None))
    return time.perf_counter() - start


def float_step(model: char_lm.CharTransformer, train_ids: torch.Tensor, config: dict, seed: int) -> float:
    """Median seconds of a float AdamW training step of a copy of ``model`` (the reference of the step ratios)."""
    from peer_methods import StepTimer

    timer = StepTimer()
    module = char_lm.CharLM(copy.deepcopy(model), config["float_lr"])
    fit(module, train_ids, model.context, config, seed, [timer], epochs=-(-FLOAT_STEPS // config["batches"]),
        max_steps=FLOAT_STEPS)
    return statistics.median(timer.times[3:])


def timing(times: list[float], reference: float, seconds: float) -> dict:
    median = statistics.median(times)
    return {"step_seconds_median": median, "float_step_seconds_median": reference,
            "step_ratio": median / reference, "fit_seconds": seconds, "steps": len(times)}


def run_alq(model, train_ids, val_ids, target: float, config: dict, seed: int, per_bit: bool, lr: float) -> dict:
    """ALQ at ``target`` bits with ``lr`` for the basis, coordinate and pruning epochs and ``ste_lr = lr`` for STE
    (the final coordinate epochs continue from STE's last rate, ALQ's default)."""
    from alq_lightning import bit_summary

    from peer_methods import StepTimer

    reference = float_step(model, train_ids, config, seed)
    timer = StepTimer()
    result = char_lm.quantize(model, train_ids, target, {**config, "lr": lr}, seed, callbacks=[timer],
                              per_bit=per_bit, ste_lr=lr)
    module = result.pop("module")
    return {"method": "ALQ per_bit" if per_bit else "ALQ", "target_bits": target, "lr": lr,
            "val_loss": char_lm.evaluate(module.model, val_ids), **alq_storage(bit_summary(module)),
            **timing(timer.times, reference, result["seconds"]),
            "layers": result["layers"], "float_names": result["float_names"]}


def run_peer(model, names: list[str], train_ids, val_ids, peer, lr: float, config: dict, seed: int,
             remainder: int) -> dict:
    from peer_methods import ForwardCheck, PeerLM, StepTimer, check_quantized

    reference = float_step(model, train_ids, config, seed)
    epochs = char_lm.alq_epochs(config)
    total = epochs * config["batches"]
    torch.manual_seed(seed)
    module = PeerLM(copy.deepcopy(model), peer, names, lr, total)
    timer, check = StepTimer(), ForwardCheck(names, peer, total - 1)
    seconds = fit(module, train_ids, model.context, config, seed, [timer, check], epochs=epochs)
    if check.levels is None:
        raise RuntimeError(f"{peer.name}: the last training step was never reached ({len(timer.times)} steps)")
    levels = check_quantized(module.model, names, peer)
    shapes = {name: p.shape for name, p in model.named_parameters()}
    coded = [CodedTensor(name, shapes[name].numel(), groups_of(shapes[name], peer.block), peer.bits, peer.scales)
             for name in names]
    return {"method": peer.name, "lr": lr, "settings": peer.settings(),
            "val_loss": char_lm.evaluate(module.model, val_ids), **peer_storage(coded, remainder),
            **timing(timer.times, reference, seconds),
            "max_levels_last_step": check.levels, "max_levels_after": levels}


def run_control(model, train_ids, val_ids, config: dict, seed: int) -> dict:
    from peer_methods import StepTimer

    timer = StepTimer()
    module = char_lm.CharLM(copy.deepcopy(model), config["float_lr"])
    seconds = fit(module, train_ids, model.context, config, seed, [timer], epochs=char_lm.alq_epochs(config))
    numel = sum(p.numel() for p in model.parameters())
    return {"method": "float control", "val_loss": char_lm.evaluate(module.model, val_ids),
            "model_bytes": 4 * numel, "fit_seconds": seconds, "step_seconds_median": statistics.median(timer.times)}


def swept(runs: list[dict]) -> dict[tuple[str, float | None], list[dict]]:
    """The runs of each learning-rate sweep (every run but the float control), keyed by ``(method, ALQ's
    target_bits or None)``, in the order first met."""
    sweeps: dict[tuple[str, float | None], list[dict]] = {}
    for run in runs:
        if "lr" in run:
            sweeps.setdefault((run["method"], run.get("target_bits")), []).append(run)
    return sweeps


def best_points(runs: list[dict]) -> list[dict]:
    """Per peer and per ALQ method and target, its run of lowest validation loss over the learning rates."""
    return [best_run(group, "val_loss") for group in swept(runs).values()]


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    markers = {"ALQ": "o", "ALQ per_bit": "s", "torchao": "^", "brevitas": "D"}
    colors = plt.get_cmap("tab20").colors
    for index, point in enumerate(best_points(record["runs"])):
        family = point["settings"]["library"] if "settings" in point else point["method"]
        label = point["method"] + (f" (target {point['target_bits']:g}, " if "target_bits" in point else " (") + \
            f"lr {point['lr']:g})"
        ax.scatter(point["model_bytes"] / 1024, point["val_loss"], marker=markers[family], label=label, s=40,
                   color=colors[index % len(colors)])
    for run in record["runs"]:
        if run["method"] == "float control":
            ax.axhline(run["val_loss"], color="gray", linestyle="--", label=f"float control ({run['val_loss']:.3f})")
    ax.set_xlabel("whole model as stored (KiB)")
    ax.set_ylabel("validation loss (nats/char)")
    ax.set_title(f"Char-level LM: ALQ vs peers, {record['config']['epochs']} epochs x "
                 f"{record['config']['batches']} batches, seed {record['seed']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(record: dict) -> str:
    config, points = record["config"], best_points(record["runs"])
    control = next((r for r in record["runs"] if r["method"] == "float control"), None)
    commit = ", ".join(dict.fromkeys((r.get("git_commit") or "unknown")[:7] + (" with uncommitted changes"
                                                                               if r.get("git_dirty") else "")
                                     for r in record["runs"]))
    commands = " && ".join(dict.fromkeys(record["commands"]))
    lines = [f"`{commands}` (bench at `{(record['bench_git_commit'] or 'unknown')[:7]}`, runs with alq_lightning at "
             f"`{commit}`), {record['hardware']}, {record['threads']} thread, "
             f"{record['date'][:10]}; JSON `bench/results/peers_char_lm.json`, plot "
             f"`bench/results/peers_char_lm.png`. The char-level LM of `bench/char_lm.py` (float start: validation "
             f"loss {record['float']['val_loss']:.4f}), "
             f"seed {record['seed']}, every method {config['epochs']} epochs × {config['batches']} batches of "
             f"{config['batch_size']}" + (" (shortened from 100 batches per epoch, for every method alike)"
                                          if config["batches"] != 100 else "") +
             f"; all {record['quantized_weights']} weights of the {len(record['quantized_names'])} parameters of two "
             f"or more dimensions quantized by every method, biases and norms ({record['remainder_bytes']} B) "
             f"float. Peers: best of learning rates {', '.join(f'{lr:g}' for lr in record['lrs'])} on validation "
             f"(the loss reported is on the same text, which can only favour them); ALQ: best on validation of "
             f"the learning rates listed below for each target (`lr` and `ste_lr` alike).", "",
             "| method | val loss | model bytes | code bits / weight | stored bits / weight | step time vs float |",
             "|---|---|---|---|---|---|"]
    if control:
        lines.append(f"| float control | {control['val_loss']:.4f} | {control['model_bytes']} | 32 | 32 | 1 |")
    for p in sorted(points, key=lambda p: p["model_bytes"]):
        name = p["method"] + (f", target {p['target_bits']:g}" if "target_bits" in p else "") + f", lr {p['lr']:g}"
        lines.append(f"| {name} | {p['val_loss']:.4f} | {p['model_bytes']} | {p['code_bits']:.3f} | "
                     f"{p['stored_bits']:.3f} | {p['step_ratio']:.2f}× |")
    sweeps = swept(record["runs"])
    if sweeps:
        lines += ["", "Every run (validation loss at each learning rate; for a peer, the most distinct values in a "
                  "row or block of the forward weights before the last step / after training):", ""]
        for (method, target), group in sweeps.items():
            tried = ", ".join(f"{r['lr']:g}: {r['val_loss']:.4f}" + (
                f" ({r['max_levels_last_step']}/{r['max_levels_after']})" if "max_levels_after" in r else "")
                for r in sorted(group, key=lambda r: r["lr"]))
            lines.append(f"- {method}" + (f", target {target:g}" if target is not None else "") + f": {tried}")
    return "\n".join(lines)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batches", type=int, default=100, help="batches per epoch, every method (default 100)")
    parser.add_argument("--targets", type=float, nargs="+", default=[1.0, 0.7, 0.5], help="ALQ target bits")
    parser.add_argument("--per-bit-targets", type=float, nargs="*", default=[1.0], help="ALQ per_bit targets")
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3], help="peer learning rates")
    parser.add_argument("--alq-lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3],
                        help="ALQ learning rates (lr and ste_lr alike), the same sweep as the peers' by default")
    parser.add_argument("--methods", nargs="*", default=None, help="only these peers (names of peer_methods.peers)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "peers_char_lm.json")
    parser.add_argument("--readme", type=Path, default=README)
    args = parser.parse_args(argv)
    for name in ("threads", "batches"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}={getattr(args, name)} must be >= 1")
    for name in ("lrs", "alq_lrs"):
        bad = [lr for lr in getattr(args, name) if not lr > 0]
        if bad:
            parser.error(f"--{name.replace('_', '-')}={bad} must be > 0")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse(argv)
    from peer_methods import peers

    chosen = [p for p in peers() if args.methods is None or p.name in args.methods]
    unknown = set(args.methods or ()) - {p.name for p in chosen}
    if unknown:
        raise SystemExit(f"--methods: unknown {sorted(unknown)}; known: {[p.name for p in peers()]}")
    warnings.filterwarnings("ignore", message=r".*IterableDataset. has .__len__. defined")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    config = {**char_lm.FULL["alq"], "batches": args.batches}
    train_text, val_text = char_lm.split_corpus(char_lm.read_documents(char_lm.corpus_files())[0])
    train_ids, val_ids = char_lm.encode(train_text), char_lm.encode(val_text)
    model, float_record = float_start(args.seed, char_lm.FULL["model"], char_lm.FULL["float"], train_ids, val_ids)
    names = list(char_lm.weight_matrices(model))
    remainder = remainder_bytes(model.state_dict(), names)
    data_seed = args.seed + 1  # as char_lm.py's ALQ runs and its control

    import alq_lightning

    settings = {"seed": args.seed, "config": {**config, "epochs": char_lm.alq_epochs(config)},
                "model": char_lm.FULL["model"], "float_config": char_lm.FULL["float"], "threads": args.threads}
    record = json.loads(args.out.read_text()) if args.out.exists() else {}
    if {k: record.get(k) for k in settings} != settings:
        record = {**settings, "runs": []}
    for run in record["runs"]:  # runs of an earlier invocation keep the commit they ran at
        run.setdefault("git_commit", record["git_commit"])
        run.setdefault("git_dirty", record["git_dirty"])
        if run["method"].startswith("ALQ"):  # recorded before the ALQ sweep: ALQ's default lr = ste_lr = 1e-3
            run.setdefault("lr", config["lr"])
    command = "python bench/peers.py " + " ".join(sys.argv[1:] if argv is None else argv)
    record["commands"] = [*record.get("commands", []), command]  # a rerun skips the runs already recorded
    record.update(command=command,
                  date=datetime.datetime.now().isoformat(timespec="seconds"), hardware=hardware(),
                  torch=torch.__version__, lightning=L.__version__,
                  **git_state(Path(alq_lightning.__file__).resolve().parent),
                  bench_git_commit=git_state(HERE)["git_commit"], float=float_record,
                  quantized_names=names, remainder_bytes=remainder, lrs=args.lrs,
                  quantized_weights=sum(p.numel() for n, p in model.named_parameters() if n in names),
                  float_names=[n for n, _ in model.named_parameters() if n not in names])
    done = {(r["method"], r.get("target_bits"), r.get("lr")) for r in record["runs"]}

    def save(run: dict) -> None:
        record["runs"].append({**run, "git_commit": record["git_commit"], "git_dirty": record["git_dirty"]})
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n")
        print(f"{run['method']} {run.get('target_bits', '')} {run.get('lr', '')}: val loss {run['val_loss']:.4f}, "
              f"{run['model_bytes']} B", flush=True)

    if ("float control", None, None) not in done:
        save(run_control(model, train_ids, val_ids, config, data_seed))
    for per_bit, targets in ((False, args.targets), (True, args.per_bit_targets)):
        for target, lr in itertools.product(targets, args.alq_lrs):
            if ("ALQ per_bit" if per_bit else "ALQ", target, lr) not in done:
                save(run_alq(model, train_ids, val_ids, target, config, data_seed, per_bit, lr))
    for peer in chosen:
        for lr in args.lrs:
            if (peer.name, None, lr) not in done:
                save(run_peer(model, names, train_ids, val_ids, peer, lr, config, data_seed, remainder))
    plot(record, args.out.with_suffix(".png"))
    write_section(args.readme, "peers", markdown(record))
    return record


if __name__ == "__main__":
    main()
