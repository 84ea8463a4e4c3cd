"""Command-line entry points: the console scripts ``alq-export`` / ``alq-summary`` / ``alq-eval`` /
``alq-consolidate`` and ``python -m
alq_lightning COMMAND ...`` (``alq-train`` is :func:`alq_lightning.app.train.main`). The commands live in
:mod:`alq_lightning.packed.cli` and :mod:`alq_lightning.app.evaluate`, which load when one runs."""
from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

COMMANDS = {
    "export": "write a Lightning checkpoint's ALQ model as a bit-packed file (alq-export)",
    "summary": "verify a packed file and print its per-layer table (alq-summary)",
    "eval": "a packed file's test accuracy on a data module, with its bytes and bits (alq-eval)",
    "consolidate": "write a sharded (FSDP2) checkpoint folder as one checkpoint file (alq-consolidate)",
}


def run(command: str, argv: Sequence[str] | None, prog: str) -> int:
    """Run ``command`` (a key of :data:`COMMANDS`) on ``argv``; its usage text names ``prog``."""
    main: Callable[..., int]
    if command == "export":
        from alq_lightning.packed.cli import export_main as main
    elif command == "summary":
        from alq_lightning.packed.cli import summary_main as main
    elif command == "eval":
        from alq_lightning.app.evaluate import eval_main as main
    elif command == "consolidate":
        from alq_lightning.consolidate import consolidate_main as main
    else:
        raise ValueError(f"unknown command {command!r}; the commands are {', '.join(COMMANDS)}")
    return main(None if argv is None else list(argv), prog=prog)


def export(argv: Sequence[str] | None = None) -> int:
    """``alq-export CHECKPOINT.ckpt OUT.alq ...``, the same as ``python -m alq_lightning export ...``."""
    return run("export", argv, "alq-export")


def summary(argv: Sequence[str] | None = None) -> int:
    """``alq-summary FILE.alq``, the same as ``python -m alq_lightning summary ...``."""
    return run("summary", argv, "alq-summary")


def evaluate(argv: Sequence[str] | None = None) -> int:
    """``alq-eval FILE.alq [--model NAME --data NAME | --run DIR] [--bitwise]``, the same as ``python -m
    alq_lightning eval ...``."""
    return run("eval", argv, "alq-eval")


def consolidate(argv: Sequence[str] | None = None) -> int:
    """``alq-consolidate FOLDER FILE.ckpt``, the same as ``python -m alq_lightning consolidate ...``."""
    return run("consolidate", argv, "alq-consolidate")


def usage(prog: str) -> str:
    lines = [f"usage: {prog} {{{','.join(COMMANDS)}}} ...", "", "commands:"]
    lines += [f"  {name:<9} {about}" for name, about in COMMANDS.items()]
    lines += ["", f"Run `{prog} COMMAND --help` for a command's arguments."]
    return "\n".join(lines)


def dispatch(argv: Sequence[str] | None = None, prog: str = "python -m alq_lightning") -> int:
    """``python -m alq_lightning COMMAND ARGS...``: run ``COMMAND`` (``export``, ``summary``, ``eval``,
    ``consolidate``) on ``ARGS``. No command, or an unknown one, prints the usage naming the commands to stderr
    and returns 2 (argparse's status for bad usage); ``-h`` / ``--help`` prints it to stdout and returns 0."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(usage(prog))
        return 0
    if not args or args[0] not in COMMANDS:
        problem = "a command is required" if not args else f"unknown command {args[0]!r}"
        print(f"{usage(prog)}\n{prog}: error: {problem} (choose from {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    return run(args[0], args[1:], f"{prog} {args[0]}")
