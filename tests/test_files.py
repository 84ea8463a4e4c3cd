"""The one atomic writer: permissions from the umask, stale temporary files of killed writers removed, targets
checked, exclusive writes, nothing half-written."""
from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from alq_lightning.files import write_atomic


def test_new_file_takes_its_mode_from_the_umask(tmp_path, umask_027):
    path = write_atomic(tmp_path / "f.bin", lambda handle: handle.write(b"data"))
    assert path.read_bytes() == b"data"
    assert path.stat().st_mode & 0o777 == umask_027


def kill_writer_midway(path: Path) -> int:
    """Run a writer of ``path`` in another process that SIGKILLs itself halfway; return its pid."""
    code = ("import os, signal, sys\nfrom alq_lightning.files import write_atomic\n"
            "def write(handle):\n    handle.write(b'half'); handle.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
            "write_atomic(sys.argv[1], write)\n")
    writer = subprocess.Popen([sys.executable, "-c", code, str(path)], stderr=subprocess.PIPE)
    assert writer.wait(timeout=120) == -signal.SIGKILL, writer.stderr.read()
    return writer.pid


def test_temporary_file_of_a_killed_writer_is_removed_by_the_next_write(tmp_path):
    path = tmp_path / "m.alq"
    pid = kill_writer_midway(path)
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(f".m.alq.{socket.gethostname()}.{pid}.") and not path.exists()
    alive = tmp_path / f".m.alq.{socket.gethostname()}.{os.getpid()}.0123abcd.tmp"
    other_host = tmp_path / f".m.alq.elsewhere.{pid}.0123abcd.tmp"
    other_target = tmp_path / f".m.alq.bak.{socket.gethostname()}.{pid}.0123abcd.tmp"
    for keep in (alive, other_host, other_target):
        keep.write_bytes(b"")
    write_atomic(path, lambda handle: handle.write(b"whole"))
    assert path.read_bytes() == b"whole"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, other_host.name, other_target.name,
                                                                  "m.alq"])


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")

    def fail(handle):
        handle.write(b"new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, fail)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_exclusive_write_never_replaces(tmp_path):
    path = write_atomic(tmp_path / "r.json", lambda handle: handle.write(b"first"), exclusive=True)
    with pytest.raises(FileExistsError, match="r.json' exists already; it is not overwritten"):
        write_atomic(path, lambda handle: handle.write(b"second"), exclusive=True)
    assert path.read_bytes() == b"first" and [p.name for p in tmp_path.iterdir()] == ["r.json"]


@pytest.mark.parametrize("name,error,message", [
    ("", ValueError, "path='' is empty"),
    (".", ValueError, "path='.' names a folder"),
    ("sub/", ValueError, "names a folder"),
    ("missing/f.bin", FileNotFoundError, "folder '{tmp}/missing' does not exist"),
])
def test_bad_targets_are_named(tmp_path, monkeypatch, name, error, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    target = name if not name.startswith("missing") else str(tmp_path / name)
    with pytest.raises(error, match=message.replace("{tmp}", str(tmp_path))):
        write_atomic(target, lambda handle: handle.write(b"x"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"] and not any((tmp_path / "sub").iterdir())


def test_folder_that_refuses_new_files_is_named(tmp_path, monkeypatch):
    def read_only(path, flags, mode=0o777):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(OSError, match=f"cannot create a file in folder '{tmp_path}' to write '{tmp_path}/f.bin': "
                                      "Read-only file system") as error:
        write_atomic(tmp_path / "f.bin", lambda handle: handle.write(b"x"))
    assert error.value.errno == errno.EROFS and ".tmp" not in str(error.value)
