"""Consolidation refuses what is not a sharded checkpoint folder, naming what it expected, and writes nothing."""
from __future__ import annotations

import pytest
import torch

from alq_lightning import consolidate_checkpoint
from alq_lightning.cli import dispatch


@pytest.mark.parametrize("make", ["missing", "file", "empty folder", "meta only"])
def test_what_is_not_a_sharded_checkpoint_is_refused(tmp_path, make):
    source = tmp_path / "source"
    if make == "file":
        torch.save({"state_dict": {}}, source)
    elif make != "missing":
        source.mkdir()
        if make == "meta only":
            torch.save({"epoch": 0}, source / "meta.pt")
    with pytest.raises(ValueError, match=r"is not a sharded checkpoint: expected the folder ModelParallelStrategy"):
        consolidate_checkpoint(source, tmp_path / "out.ckpt")
    assert not (tmp_path / "out.ckpt").exists()


def test_the_command_reports_a_bad_folder_as_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        dispatch(["consolidate", str(tmp_path / "nowhere"), str(tmp_path / "out.ckpt")])
    assert stop.value.code == 2
    assert "is not a sharded checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out.ckpt").exists()
