"""Atomic file writes: outputs, checkpoints, caches and indexes all go through a temp file in
the destination's folder and `os.replace`, so a crash or ``kill -9`` leaves either the old
file or the new one, never half of one (the guide's "loses no data").

Checkpoint *folders* are built the same way one level up (a temp folder renamed into place,
`train.checkpoint`); the streaming MP4 writer keeps its own temp file (`media.Mp4Writer`)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def ordinary_permissions(path) -> None:
    """Give a finished temp file the mode a plain ``open`` would (mkstemp makes 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def atomic_write(dest, write: Callable[[Path], object], mkdir: bool = False) -> Path:
    """``write(tmp)`` a temp file next to ``dest`` (unique name, so concurrent writers do not
    collide), then move it onto ``dest``; the temp file is removed if ``write`` fails."""
    dest = Path(dest)
    if mkdir:
        dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=str(dest.parent))
    except OSError as e:  # name the file asked for, not a temp name the user never chose
        raise OSError(e.errno, e.strerror, str(dest)) from None
    os.close(fd)
    tmp = Path(tmp)
    try:
        write(tmp)
        ordinary_permissions(tmp)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest


def atomic_write_text(path, text: str, mkdir: bool = False) -> Path:
    return atomic_write(path, lambda p: p.write_text(text), mkdir=mkdir)


def atomic_save_safetensors(tensors: dict, path, metadata: dict | None = None, mkdir: bool = False) -> Path:
    """safetensors ``save_file`` of (detached, CPU, contiguous) ``tensors``; metadata values as str."""
    from safetensors.torch import save_file

    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = None if metadata is None else {k: str(v) for k, v in metadata.items()}
    return atomic_write(path, lambda p: save_file(flat, str(p), metadata=meta), mkdir=mkdir)


def atomic_savez(path, **arrays) -> Path:
    """``np.savez_compressed`` (through a file object: given a name, numpy would add ``.npz``)."""
    import numpy as np

    def write(p: Path) -> None:
        with open(p, "wb") as f:
            np.savez_compressed(f, **arrays)

    return atomic_write(path, write)
