"""Atomic writes: a failed write leaves the old file and no temp file; a finished one has the
mode a plain open() gives."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from talkingmachines.fileio import atomic_save_safetensors, atomic_savez, atomic_write, atomic_write_text


def test_failed_write_keeps_the_old_file(tmp_path):
    f = atomic_write_text(tmp_path / "a.json", "old")

    def broken(p):
        p.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(f, broken)
    assert f.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_written_files_read_back_with_ordinary_mode(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    t = {"x": torch.arange(6.0).view(2, 3)}
    st = atomic_save_safetensors(t, tmp_path / "sub" / "w.safetensors", {"k": 1}, mkdir=True)
    assert torch.equal(load_file(str(st))["x"], t["x"])
    nz = atomic_savez(tmp_path / "c.npz", a=np.arange(3))
    assert nz.name == "c.npz" and np.load(nz)["a"].tolist() == [0, 1, 2]
    for p in (st, nz):
        assert (p.stat().st_mode & 0o777) == (0o666 & ~umask)


def test_an_output_in_a_missing_folder_names_the_output(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        atomic_write_text(tmp_path / "nope" / "g.png", "x")
    assert e.value.filename == str(tmp_path / "nope" / "g.png")  # not the temp file's name
