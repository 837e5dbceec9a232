from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from asyndgan.io import load_checkpoint, save_checkpoint, write_bytes_atomic, write_json_atomic


def test_atomic_write_replaces_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "a" / "x.bin"
    write_bytes_atomic(path, b"one")
    write_bytes_atomic(path, b"two")
    assert path.read_bytes() == b"two"
    assert os.listdir(path.parent) == ["x.bin"], "no temp files left behind"


def test_failed_write_keeps_old_file(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    write_json_atomic(path, {"a": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"a": object()})
    assert path.read_text().strip().startswith("{") and '"a": 1' in path.read_text()
    assert os.listdir(tmp_path) == ["s.json"]


def test_checkpoint_round_trip_and_refuses_non_checkpoints(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "c.pt", {"w": torch.ones(3), "step": 4})
    state = load_checkpoint(tmp_path / "c.pt")
    assert state["step"] == 4 and torch.equal(state["w"], torch.ones(3))
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="not an asyndgan checkpoint"):
        load_checkpoint(tmp_path / "list.pt")
