"""Character-level causal language model on real English text: float vs ALQ, every weight matrix quantized.

    apt-get install fortunes                           # the corpus: Debian's fortune cookies (once)
    python bench/char_lm.py --threads 1                # float training, then ALQ at 1 and 0.7 bits
    python bench/char_lm.py --smoke --out /tmp/s.json  # tiny sizes, a few seconds (no RESULTS.md section)
    python bench/char_lm.py --fsdp2 --no-control       # each ALQ fit sharded by FSDP2 on 2 CPU processes

Corpus: the English fortune cookies of Debian's ``fortunes`` package (which pulls in ``fortunes-min``), every
file of ``/usr/share/games/fortunes`` (about 2.5 MB of quotations, jokes, poems and literature), read in name
order and cut into documents at the ``%`` lines; exact duplicates are dropped, every tenth document goes to
validation (the split is deterministic and disjoint, and both halves mix every file). Characters outside
printable ASCII, newline and tab map to one unknown token. ``--corpus FILE...`` reads other text files (split
into documents at ``%`` lines, else at blank lines).

Model: a tiny pre-norm causal transformer made of PyTorch modules (``nn.Embedding`` for characters, a learned
position table as a raw ``nn.Parameter``, ``nn.TransformerEncoder`` of ``nn.TransformerEncoderLayer`` with
``batch_first=True, norm_first=True`` and a causal mask, whose ``nn.MultiheadAttention`` holds Q/K/V in the raw
Parameter ``in_proj_weight``; a final LayerNorm and a Linear head). Training draws random windows of the
training text from a seeded generator, a fixed number of batches per epoch; AdamW (decay on matrices only)
with warm-up and cosine decay. Validation: loss in nats per character over the whole validation text in
non-overlapping windows (each character predicted once, from the characters before it in its window).

For each target bit width a fresh copy of the float model is quantized by ``ALQCallback`` with a short schedule,
every parameter of two or more dimensions included; the script stops with an error if ALQ left any of them in
float. Writes ``bench/results/char_lm.json`` and a section of ``bench/RESULTS.md``.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import logging
import math
import os
import re
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from common import git_state, hardware, write_section

HERE = Path(__file__).resolve().parent
FORTUNES = Path("/usr/share/games/fortunes")
INSTALL = "apt-get install fortunes"
UNKNOWN = "\x00"
VOCAB = "\n\t" + "".join(chr(c) for c in range(32, 127)) + UNKNOWN  # 98 tokens; the last one is unknown
VALIDATION_EVERY = 10

FULL = {
    "model": {"dim": 128, "layers": 2, "heads": 4, "ffn": 512, "context": 128},
    "float": {"epochs": 6, "batches": 200, "batch_size": 32, "lr": 3e-3, "weight_decay": 0.1, "warmup": 100},
    "alq": {"max_bits": 4, "rounds": 3, "basis_epochs": 1, "coordinate_epochs": 1, "pruning_epochs": 1,
            "ste_epochs": 2, "final_coordinate_epochs": 1, "lr": 1e-3, "batches": 100, "batch_size": 32,
            "float_lr": 1e-3},
}
SMOKE = {
    "model": {"dim": 32, "layers": 1, "heads": 2, "ffn": 64, "context": 32},
    "float": {"epochs": 1, "batches": 4, "batch_size": 8, "lr": 3e-3, "weight_decay": 0.1, "warmup": 1},
    "alq": {"max_bits": 3, "rounds": 1, "basis_epochs": 1, "coordinate_epochs": 1, "pruning_epochs": 1,
            "ste_epochs": 1, "final_coordinate_epochs": 1, "lr": 1e-3, "batches": 4, "batch_size": 8,
            "float_lr": 1e-3},
}


# ---------------------------------------------------------------------------------------------- corpus


def corpus_files(root: Path = FORTUNES) -> list[Path]:
    """The fortune files of ``root`` in name order: regular files, not the ``.dat`` indexes or ``.u8`` links."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root} does not exist: install the corpus with `{INSTALL}` (Debian's fortunes "
                                f"package), or pass --corpus FILE...")
    files = sorted(p for p in root.iterdir()
                   if p.is_file() and not p.is_symlink() and p.suffix not in (".dat", ".u8"))
    if not files:
        raise FileNotFoundError(f"{root} holds no fortune file: install them with `{INSTALL}`")
    return files


def split_documents(text: str) -> list[str]:
    """Documents of ``text``: the pieces between lines that are a single ``%`` (fortune files), else between
    blank lines; each stripped of surrounding newlines, empty ones dropped."""
    separator = r"^%\n" if re.search(r"^%$", text, flags=re.M) else r"\n(?:[ \t]*\n)+"
    return [d.strip("\n") for d in re.split(separator, text, flags=re.M) if d.strip()]


def read_documents(paths: Sequence[Path]) -> tuple[list[str], int]:
    """Documents of every file in order, exact duplicates dropped (first kept); also the number dropped."""
    seen: dict[str, None] = {}
    total = 0
    for path in paths:
        for document in split_documents(Path(path).read_text(encoding="utf-8", errors="replace")):
            total += 1
            seen.setdefault(document, None)
    return list(seen), total - len(seen)


def split_corpus(documents: Sequence[str], every: int = VALIDATION_EVERY) -> tuple[str, str]:
    """``(train text, validation text)``: document ``i`` goes to validation when ``i % every == every - 1``;
    each document is followed by a blank line."""
    train = [d for i, d in enumerate(documents) if i % every != every - 1]
    val = [d for i, d in enumerate(documents) if i % every == every - 1]
    return "".join(d + "\n\n" for d in train), "".join(d + "\n\n" for d in val)


def encode(text: str) -> torch.Tensor:
    """``[len(text)]`` int64 token ids in :data:`VOCAB`; characters outside it become the unknown token."""
    index = {c: i for i, c in enumerate(VOCAB)}
    unknown = index[UNKNOWN]
    return torch.tensor([index.get(c, unknown) for c in text], dtype=torch.int64)


class RandomWindows(torch.utils.data.IterableDataset):
    """``batches`` batches of ``(x, y)`` ``[batch_size, context]`` windows at random offsets of ``ids``, ``y``
    shifted by one. Epoch ``e`` (the ``e``-th iteration) draws from a generator seeded by ``(seed, e)``."""

    def __init__(self, ids: torch.Tensor, context: int, batch_size: int, batches: int, seed: int) -> None:
        if len(ids) <= context + 1:
            raise ValueError(f"the training text has {len(ids)} characters, fewer than context + 2 = {context + 2}")
        self.ids, self.context, self.batch_size, self.batches, self.seed = ids, context, batch_size, batches, seed
        self.epoch = 0

    def __len__(self) -> int:
        return self.batches

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        self.epoch += 1
        offsets = torch.arange(self.context + 1)
        for _ in range(self.batches):
            starts = torch.randint(0, len(self.ids) - self.context, (self.batch_size,), generator=generator)
            windows = self.ids[starts[:, None] + offsets]
            yield windows[:, :-1], windows[:, 1:]


# ---------------------------------------------------------------------------------------------- model


class CharTransformer(nn.Module):
    """Causal pre-norm transformer over characters: ``[B, T]`` token ids -> ``[B, T, vocab]`` logits, T <= context."""

    def __init__(self, vocab: int, dim: int, layers: int, heads: int, ffn: int, context: int) -> None:
        super().__init__()
        self.context = context
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(0.02 * torch.randn(context, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, ffn, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        length = ids.shape[1]
        if length > self.context:
            raise ValueError(f"input of {length} characters is longer than the context {self.context}")
        x = self.embed(ids) + self.position[:length]
        x = self.encoder(x, mask=self.mask[:length, :length], is_causal=True)
        return self.head(self.norm(x))


class CharLM(L.LightningModule):
    """Next-character cross-entropy of a :class:`CharTransformer`, trained by AdamW (weight decay on parameters of
    two or more dimensions only) with ``warmup`` linear warm-up steps, then cosine decay to 10 % over
    ``total_steps`` (constant after the warm-up when ``total_steps`` is 0)."""

    def __init__(self, model: CharTransformer, lr: float, weight_decay: float = 0.0, warmup: int = 0,
                 total_steps: int = 0) -> None:
        super().__init__()
        self.model = model
        self.lr, self.weight_decay, self.warmup, self.total_steps = lr, weight_decay, warmup, total_steps

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x).flatten(0, 1), y.flatten())
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": self.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(groups, lr=self.lr)

        def factor(step: int) -> float:
            if step < self.warmup:
                return (step + 1) / self.warmup
            if not self.total_steps:
                return 1.0
            progress = min(1.0, (step - self.warmup) / max(1, self.total_steps - self.warmup))
            return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


@torch.no_grad()
def evaluate(model: CharTransformer, ids: torch.Tensor, batch_size: int = 64) -> float:
    """Mean next-character loss (nats/char) over ``ids`` in non-overlapping windows of the model's context:
    every character but the first is predicted exactly once."""
    was_training = model.training
    model.eval()
    context, total, count = model.context, 0.0, 0
    starts = list(range(0, len(ids) - 1, context))
    full = [s for s in starts if s + context + 1 <= len(ids)]
    for i in range(0, len(full), batch_size):
        windows = torch.stack([ids[s:s + context + 1] for s in full[i:i + batch_size]])
        logits = model(windows[:, :-1])
        total += F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten(), reduction="sum").item()
        count += windows[:, 1:].numel()
    for s in starts[len(full):]:  # the tail, shorter than the context
        window = ids[s:][None]
        total += F.cross_entropy(model(window[:, :-1]).flatten(0, 1), window[0, 1:], reduction="sum").item()
        count += window.shape[1] - 1
    model.train(was_training)
    return total / count


# ---------------------------------------------------------------------------------------------- runs


def trainer(epochs: int, callbacks: Sequence[L.Callback] = ()) -> L.Trainer:
    return L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks),
                     num_sanity_val_steps=0)


def weight_matrices(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every floating-point parameter of two or more dimensions, by name (a shared one once)."""
    return {name: p for name, p in model.named_parameters() if p.dim() >= 2 and p.is_floating_point()}


def quantized_parameters(network) -> dict[str, nn.Parameter]:
    """``{layer name: Parameter}`` that the ALQ network (``ALQCallback.network``) quantizes."""
    return {name: layer.param for name, layer in network.layers.items()}


def check_all_quantized(module: nn.Module, network) -> dict:
    """Raise unless ALQ quantizes exactly the parameters of two or more dimensions of ``module``; the counts."""
    from alq_lightning import bit_summary

    matrices = weight_matrices(module)
    quantized = quantized_parameters(network)
    ids = {id(p) for p in quantized.values()}
    left = [name for name, p in matrices.items() if id(p) not in ids]
    if left:
        raise RuntimeError(f"ALQ left weight matrices in float: {left} (its float list: {network.float_layers}); "
                           f"every parameter of two or more dimensions must be quantized")
    summary = bit_summary(module)
    expected = sum(p.numel() for p in matrices.values())
    if summary.numel != expected:
        raise RuntimeError(f"bit_summary counts {summary.numel} quantized weights, the model has {expected} in "
                           f"parameters of two or more dimensions ({', '.join(matrices)})")
    floats = {name: p for name, p in module.named_parameters() if id(p) not in ids}
    return {"quantized_parameters": len(quantized), "quantized_weights": summary.numel,
            "quantized_names": list(quantized),
            "float_parameters": len(floats), "float_weights": sum(p.numel() for p in floats.values()),
            "float_names": list(floats), "alq_float_list": dict(network.float_layers)}


class LogCapture(logging.Handler):
    """Collects the messages of Lightning's rank-zero logger that start with ``prefix``."""

    def __init__(self, prefix: str = "ALQ quantizes") -> None:
        super().__init__()
        self.prefix, self.messages = prefix, []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith(self.prefix):
            self.messages.append(message)


def train_float(model: CharTransformer, train_ids: torch.Tensor, config: dict, seed: int) -> tuple[CharLM, float]:
    data = RandomWindows(train_ids, model.context, config["batch_size"], config["batches"], seed)
    module = CharLM(model, config["lr"], config["weight_decay"], config["warmup"],
                    config["epochs"] * config["batches"])
    start = time.perf_counter()
    trainer(config["epochs"]).fit(module, torch.utils.data.DataLoader(data, batch_size=None))
    return module, time.perf_counter() - start


def alq_epochs(config: dict) -> int:
    """Length of the ALQ schedule of ``config`` in epochs (as ``ALQCallback.total_epochs``)."""
    per_round = config["basis_epochs"] + config["coordinate_epochs"] + config["pruning_epochs"]
    return config["rounds"] * per_round + config["ste_epochs"] + config["final_coordinate_epochs"]


def continue_float(model: CharTransformer, train_ids: torch.Tensor, config: dict, weight_decay: float,
                   seed: int) -> tuple[CharTransformer, float]:
    """The control: a copy of ``model`` trained in float on the batches an ALQ run sees (AdamW at ALQ's
    ``float_lr``, constant, for as many epochs as the ALQ schedule)."""
    data = RandomWindows(train_ids, model.context, config["batch_size"], config["batches"], seed)
    module = CharLM(copy.deepcopy(model), config["float_lr"], weight_decay)
    start = time.perf_counter()
    trainer(alq_epochs(config)).fit(module, torch.utils.data.DataLoader(data, batch_size=None))
    return module.model, time.perf_counter() - start


def quantize(model: CharTransformer, train_ids: torch.Tensor, target: float, config: dict, seed: int,
             callbacks: Sequence[L.Callback] = (), **options) -> dict:
    """ALQ of a copy of ``model`` to ``target`` bits (``options``: further ``ALQCallback`` arguments, e.g.
    ``per_bit``; ``callbacks`` join the fit); returns the copy, bits, counts and times."""
    from alq_lightning import ALQCallback, bit_summary

    keys = ("max_bits", "rounds", "basis_epochs", "coordinate_epochs", "pruning_epochs", "ste_epochs",
            "final_coordinate_epochs", "lr")
    alq = ALQCallback(target_bits=target, **{k: config[k] for k in keys}, **options)
    data = RandomWindows(train_ids, model.context, config["batch_size"], config["batches"], seed)
    module = CharLM(copy.deepcopy(model), config["float_lr"])
    capture = LogCapture()
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    logger.addHandler(capture)
    level = logger.level
    logger.setLevel(logging.INFO)
    start = time.perf_counter()
    try:
        trainer(alq.total_epochs, [alq, *callbacks]).fit(module, torch.utils.data.DataLoader(data, batch_size=None))
    finally:
        logger.removeHandler(capture)
        logger.setLevel(level)
    seconds = time.perf_counter() - start
    counts = check_all_quantized(module, alq.network)
    summary = bit_summary(module)
    return {"module": module, "avg_bits": summary.avg_bits, "storage_bytes": summary.storage_bytes,
            "binary_bytes": summary.binary_bytes, "float_remainder_bytes": summary.remainder_bytes,
            "model_bytes": summary.model_bytes, "total_epochs": alq.total_epochs, "seconds": seconds,
            "layers": [{"name": r.name, "shape": list(r.shape), "structure": r.structure,
                        "avg_bits": r.avg_bits} for r in summary.rows],
            "alq_log": capture.messages, **counts}


def perplexity(loss: float) -> float:
    return math.exp(loss)


def markdown(record: dict) -> str:
    """The RESULTS.md section of a run."""
    corpus, model, fl, alq = record["corpus"], record["model"], record["float"], record["alq_config"]
    commit = (record["git_commit"] or "unknown")[:7] + (" with uncommitted changes" if record["git_dirty"] else "")
    lines = [f"### Character-level language model (`bench/char_lm.py`) — {record['hardware']}, "
             f"{record['threads']} thread(s), {record['date'][:10]}", "",
             f"`{record['command']}`, alq_lightning at commit `{commit}`. Corpus: {corpus['description']} "
             f"({corpus['bytes'] / 1e6:.2f} MB, {corpus['documents']} distinct documents; every "
             f"{corpus['validation_every']}th is validation: {corpus['val_chars']} characters, against "
             f"{corpus['train_chars']} for training). Model: width {model['dim']}, {model['layers']} layers, "
             f"{model['heads']} heads, context {model['context']}; {record['num_weights']} weights in "
             f"{record['num_matrices']} parameters of two or more dimensions, all quantized by ALQ, and "
             f"{record['num_other']} in 1-D parameters, left in float. Float training: {fl['epochs']} × "
             f"{fl['batches']} batches of {fl['batch_size']} windows ({fl['seconds'] / 60:.1f} min). ALQ: "
             f"max_bits {alq['max_bits']}, {alq['rounds']} rounds × ({alq['basis_epochs']} basis + "
             f"{alq['coordinate_epochs']} coordinate + {alq['pruning_epochs']} pruning epochs), "
             f"{alq['ste_epochs']} STE + {alq['final_coordinate_epochs']} coordinate epochs of {alq['batches']} "
             f"batches.", "",
             "| | avg bits | val loss (nats/char) | perplexity | bits/char | quantized params (weights) | "
             "float params (weights) | run time |", "|---|---|---|---|---|---|---|---|",
             f"| float | 32 | {fl['val_loss']:.4f} | {fl['perplexity']:.3f} | {fl['val_loss'] / math.log(2):.3f} | "
             f"0 (0) | {record['num_parameters']} ({record['num_weights'] + record['num_other']}) | "
             f"{fl['seconds'] / 60:.1f} min |"]
    if record["float_continued"]:
        c = record["float_continued"]
        lines.append(f"| float, {c['epochs']} × {c['batches']} more batches (control) | 32 | {c['val_loss']:.4f} | "
                     f"{c['perplexity']:.3f} | {c['val_loss'] / math.log(2):.3f} | 0 (0) | {record['num_parameters']} "
                     f"({record['num_weights'] + record['num_other']}) | {c['seconds'] / 60:.1f} min |")
    for r in record["alq"]:
        lines.append(f"| ALQ, target {r['target_bits']:g} | {r['avg_bits']:.3f} | {r['val_loss']:.4f} | "
                     f"{r['perplexity']:.3f} | {r['val_loss'] / math.log(2):.3f} | {r['quantized_parameters']} "
                     f"({r['quantized_weights']}) | {r['float_parameters']} ({r['float_weights']}) | "
                     f"{r['seconds'] / 60:.1f} min |")
    lines.append("")
    for r in record["alq"]:
        bits = ", ".join(f"{row['name'].removeprefix('model.')} {row['avg_bits']:.2f}" for row in r["layers"])
        lines.append(f"Bits per weight matrix at target {r['target_bits']:g}: {bits}.")
    return "\n".join(lines)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes for a quick test")
    parser.add_argument("--targets", type=float, nargs="+", default=[1.0, 0.7])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fsdp2", action="store_true", help="each ALQ fit sharded by FSDP2 on 2 CPU processes "
                        "(bench/char_lm_sharded.py); no RESULTS.md section")
    parser.add_argument("--no-control", action="store_true",
                        help="skip the control: the float model trained on as many further batches as ALQ sees")
    parser.add_argument("--corpus", type=Path, nargs="+", default=None, help=f"text files (default: {FORTUNES})")
    parser.add_argument("--out", type=Path, default=None, help="JSON (default bench/results/char_lm.json, "
                        "or char_lm_smoke.json with --smoke)")
    parser.add_argument("--results-md", type=Path, default=None,
                        help="RESULTS.md to write a section into (default bench/RESULTS.md; none with --smoke)")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads={args.threads} must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse(argv)
    warnings.filterwarnings("ignore", message=r".*IterableDataset. has .__len__. defined")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    config = copy.deepcopy(SMOKE if args.smoke else FULL)
    out = args.out or HERE / "results" / ("char_lm_smoke.json" if args.smoke else "char_lm.json")
    results_md = args.results_md or (None if args.smoke or args.fsdp2 else HERE / "RESULTS.md")
    began = time.perf_counter()

    files = [Path(p) for p in args.corpus] if args.corpus else corpus_files()
    documents, duplicates = read_documents(files)
    train_text, val_text = split_corpus(documents)
    train_ids, val_ids = encode(train_text), encode(val_text)
    corpus = {"description": "English fortune cookies of Debian's `fortunes` package" if not args.corpus
              else "text files " + ", ".join(map(str, files)),
              "install": INSTALL if not args.corpus else None, "root": str(FORTUNES) if not args.corpus else None,
              "files": [str(p) for p in files], "bytes": sum(p.stat().st_size for p in files),
              "documents": len(documents), "duplicates_dropped": duplicates, "validation_every": VALIDATION_EVERY,
              "train_chars": len(train_ids), "val_chars": len(val_ids), "vocab_size": len(VOCAB),
              "unknown_chars": int((torch.cat([train_ids, val_ids]) == len(VOCAB) - 1).sum())}

    torch.manual_seed(args.seed)
    model = CharTransformer(len(VOCAB), **config["model"])
    matrices = weight_matrices(model)
    num_weights = sum(p.numel() for p in matrices.values())
    num_other = sum(p.numel() for p in model.parameters()) - num_weights
    before = evaluate(model, val_ids)
    module, float_seconds = train_float(model, train_ids, config["float"], args.seed)
    model = module.model
    start = time.perf_counter()
    float_loss = evaluate(model, val_ids)
    eval_seconds = time.perf_counter() - start
    print(f"float: val loss {float_loss:.4f} nats/char (untrained {before:.4f}), {float_seconds:.0f} s", flush=True)

    control = None
    if not args.no_control:
        continued, seconds = continue_float(model, train_ids, config["alq"], config["float"]["weight_decay"],
                                            args.seed + 1)
        loss = evaluate(continued, val_ids)
        control = {"epochs": alq_epochs(config["alq"]), "batches": config["alq"]["batches"],
                   "lr": config["alq"]["float_lr"], "val_loss": loss, "perplexity": perplexity(loss),
                   "seconds": seconds}
        print(f"float, trained on as many further batches as ALQ: val loss {loss:.4f} nats/char", flush=True)

    runs = []
    for target in args.targets:
        if args.fsdp2:
            from char_lm_sharded import quantize_sharded

            result = quantize_sharded(model, train_ids, target, config["alq"], args.seed + 1)
        else:
            result = quantize(model, train_ids, target, config["alq"], args.seed + 1)
        quantized = result.pop("module").model
        loss = evaluate(quantized, val_ids)
        runs.append({"target_bits": target, "val_loss": loss, "perplexity": perplexity(loss), **result})
        print(f"ALQ {target:g}: {result['avg_bits']:.3f} bits, val loss {loss:.4f} nats/char, "
              f"{result['quantized_parameters']} quantized / {result['float_parameters']} float parameters, "
              f"{result['seconds']:.0f} s", flush=True)

    import alq_lightning

    package = Path(alq_lightning.__file__).resolve().parent
    record = {
        "command": "python bench/char_lm.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "hardware": hardware(),
        "threads": args.threads, "torch": torch.__version__, "lightning": L.__version__,
        "alq_lightning_path": str(package), **git_state(package), "smoke": args.smoke, "fsdp2": args.fsdp2,
        "seed": args.seed,
        "corpus": corpus, "model": {"vocab": len(VOCAB), **config["model"]},
        "num_parameters": len(dict(model.named_parameters())), "num_weights": num_weights,
        "num_matrices": len(matrices), "num_other": num_other,
        "float": {**config["float"], "val_loss_untrained": before, "val_loss": float_loss,
                  "perplexity": perplexity(float_loss), "seconds": float_seconds, "eval_seconds": eval_seconds},
        "float_continued": control, "alq_config": config["alq"], "alq": runs,
        "wall_seconds": time.perf_counter() - began,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    if results_md is not None:
        write_section(results_md, "char_lm", markdown(record))
    print(markdown(record))
    return record


if __name__ == "__main__":
    main()
