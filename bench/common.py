"""Helpers shared by the benchmark scripts: machine description and RESULTS.md sections."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch


def proc_field(path: str, field: str) -> str:
    """The value of ``field:`` in a ``/proc`` file such as ``/proc/cpuinfo`` (first occurrence)."""
    with open(path) as handle:
        return next(line.split(":", 1)[1].strip() for line in handle if line.startswith(field))


def git_state(folder: Path | None = None) -> dict:
    """``{"git_commit": HEAD, "git_dirty": whether tracked files differ from HEAD}`` (None values outside git)."""
    folder = folder or Path(__file__).resolve().parent
    try:
        commit, status = (subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, check=True,
                                         timeout=10).stdout.strip()
                          for args in (["rev-parse", "HEAD"], ["status", "--porcelain", "--untracked-files=no"]))
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "git_dirty": None}
    return {"git_commit": commit, "git_dirty": bool(status)}


def hardware(device: torch.device | str = "cpu") -> str:
    """The CUDA card's name, or the CPU's model name and core count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        return f"{proc_field('/proc/cpuinfo', 'model name')} ({os.cpu_count()} logical cores)"
    except (OSError, StopIteration):
        return f"unknown CPU ({os.cpu_count()} logical cores)"


def write_section(path: Path, key: str, text: str) -> None:
    """Replace the text between ``<!-- key:begin -->`` and ``<!-- key:end -->`` in ``path`` (appended when
    missing; the file is created when absent), keeping every other section."""
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    current = path.read_text() if path.exists() else "# Benchmark results\n"
    block = f"{begin}\n{text.rstrip()}\n{end}"
    if begin in current and end in current:
        head, rest = current.split(begin, 1)
        current = head + block + rest.split(end, 1)[1]
    else:
        current = current.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(current)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a process group's rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def exit_without_finalizing() -> None:
    """End a spawned process of a gloo process group with status 0, skipping Python's finalization: a gloo worker
    may release its last collective's tensors after finalization began, and a thread that needs the GIL then aborts
    the process (SIGABRT); FSDP2's process groups outlive ``destroy_process_group``, so their threads can't be
    joined first."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
