"""Atomic file writes: the one writer behind packed files, cached weights, downloads and ``results.json``.

The bytes go to a hidden temporary file beside the target, ``.<name>.<host>.<pid>.<token>.tmp``, created with
mode ``0o666`` less the umask (as ``open()`` creates files), written, fsync-ed and only then moved onto the
target: readers see the old file or the complete new one, never a part. A failure removes the temporary
file and leaves the target as it was. A writer killed before it could clean up leaves its temporary file
behind; the next write of the same target removes those whose process no longer runs on this host.
"""
from __future__ import annotations

import os
import re
import secrets
import socket
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def check_target(path: str | os.PathLike) -> Path:
    """``path`` as a ``Path`` when a file can be written there; ValueError for an empty path or a folder,
    FileNotFoundError when its folder does not exist."""
    if not os.fspath(path):
        raise ValueError("path='' is empty: give the name of the file to write")
    target = Path(path)
    if target.is_dir() or os.fspath(path).endswith(os.sep):
        raise ValueError(f"path={os.fspath(path)!r} names a folder: give the name of a file to write")
    if not target.parent.is_dir():
        raise FileNotFoundError(f"folder {str(target.parent)!r} does not exist: cannot write {str(target)!r} "
                                "(create the folder first)")
    return target


def is_running(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (it may belong to another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        pass
    return True


def temp_prefix(target: Path) -> str:
    """``.<name>.<host>.``: how the names of ``target``'s temporary files written on this host start."""
    return f".{target.name}.{socket.gethostname()}."


def remove_stale_temps(target: Path) -> list[Path]:
    """Remove the temporary files of ``target`` left by writers on this host that no longer run; return them."""
    pattern = re.compile(re.escape(temp_prefix(target)) + r"(\d+)\.[0-9a-f]+\.tmp")
    with os.scandir(target.parent) as entries:
        stale = [Path(entry.path) for entry in entries
                 if (match := pattern.fullmatch(entry.name)) and not is_running(int(match[1]))]
    for temp in stale:
        temp.unlink(missing_ok=True)
    return stale


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], None], exclusive: bool = False) -> Path:
    """Call ``write(handle)`` on a new temporary file beside ``path``, fsync it, then move it onto ``path``.

    With ``exclusive`` an existing ``path`` is never replaced: FileExistsError, and the new bytes are dropped
    (the move is a hard link, which fails when the target exists). Returns ``path`` as a ``Path``.
    """
    target = check_target(path)
    remove_stale_temps(target)
    temp = target.parent / f"{temp_prefix(target)}{os.getpid()}.{secrets.token_hex(8)}.tmp"
    try:
        descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0o666 less the umask, as open()
    except OSError as error:  # the subclass (PermissionError, ...) follows errno
        raise OSError(error.errno, f"cannot create a file in folder {str(target.parent)!r} to write "
                                   f"{str(target)!r}: {error.strerror}") from None
    try:
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        if exclusive:
            try:
                os.link(temp, target)
            except FileExistsError:
                raise FileExistsError(f"{str(target)!r} exists already; it is not overwritten") from None
        else:
            os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)
    return target
