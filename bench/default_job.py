"""The default job, measured: ``python train.py`` with its defaults, from a clean checkout of HEAD.

    python bench/default_job.py                 # torch's default thread count
    python bench/default_job.py --threads 1     # OMP_NUM_THREADS=1 for the job

Runs ``train.py`` (the base config, also named ``experiment=fmnist_lenet5``: 3 float epochs, then ALQ to 0.7 bits)
in a temporary ``git worktree`` of HEAD, so the figures belong to that commit even while the working tree has
uncommitted changes. Pretraining is not taken from the cache (a fresh cache folder), so the run time is end to end.
W&B runs offline (``WANDB_MODE=offline``) and progress bars are off; nothing else is overridden.
Writes ``bench/results/default_job.json``: test and float accuracy, average bits, storage, git commit,
hardware, date and run time (the whole ``train.py`` process, and its stage timings).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def run_job(checkout: Path, run_dir: Path, threads: int | None) -> float:
    """Run ``train.py`` of ``checkout`` into ``run_dir``; return its wall-clock seconds."""
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(checkout)}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    where = subprocess.run([sys.executable, "-c", "import alq_lightning; print(alq_lightning.__file__)"],
                           cwd=checkout, env=env, check=True, capture_output=True, text=True).stdout.strip()
    if not Path(where).resolve().is_relative_to(checkout.resolve()):
        raise RuntimeError(f"the job would import alq_lightning from {where}, not from the checkout {checkout}")
    command = [sys.executable, "train.py", "trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}",
               f"pretrain.cache_dir={run_dir / 'pretrained'}"]
    start = time.perf_counter()
    subprocess.run(command, cwd=checkout, env=env, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the job (default: inherited)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "default_job.json")
    args = parser.parse_args()
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads={args.threads} must be >= 1")
    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no").splitlines()
    with tempfile.TemporaryDirectory(prefix="alq_default_job_") as temp:
        checkout, run_dir = Path(temp) / "checkout", Path(temp) / "run"
        git("worktree", "add", "--detach", str(checkout), commit)
        try:
            seconds = run_job(checkout, run_dir, args.threads)
        finally:
            git("worktree", "remove", "--force", str(checkout))
        results = json.loads((run_dir / "results.json").read_text())
    if results["git_commit"] != commit:
        raise RuntimeError(f"the job reports commit {results['git_commit']}, the checkout was {commit}")
    record = {
        "command": "python train.py", "commit": commit,
        "working_tree_changes_not_used": [line[3:] for line in dirty],
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "run_seconds": round(seconds, 1), "threads": args.threads,
        **{key: results[key] for key in ("test_acc", "float_test_acc", "target_bits", "avg_bits", "num_weights",
                                         "storage_bytes", "compression", "layer_bits", "timings_s", "epochs",
                                         "seed", "hardware")},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"test acc {100 * record['test_acc']:.2f} % at {record['avg_bits']:.3f} bits (float "
          f"{100 * record['float_test_acc']:.2f} %), {record['run_seconds']:.0f} s, commit {commit[:7]}; "
          f"wrote {args.out}")


if __name__ == "__main__":
    main()
