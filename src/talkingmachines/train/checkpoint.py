"""Checkpoints (``OUT/checkpoints/step_XXXXXXXX/``), written atomically and verified on resume.

A checkpoint holds per trainable group ``model.NAME.safetensors``, ``ema.NAME.safetensors``,
``optim.NAME.safetensors`` (+ ``optim.NAME.json`` for the non-tensor part), and ``state.json``
(step, seed, data position, RNG, metric history, config), and ``manifest.json`` (the sha256 and
size of every other file). `write_checkpoint` fills a temp folder (on rank 0), syncs it and
renames it into place (`os.replace`); ``checkpoints/latest`` names the newest one and is itself
replaced atomically. A ``kill -9`` at any moment leaves the previous checkpoint intact. Resume
verifies the manifest (`intact_checkpoint`): a damaged checkpoint (truncated, flipped bytes, a
file missing) is named in a warning and the newest intact one is used; with none intact it
refuses with one line. Pruning old checkpoints never removes the newest intact one, even when
every newer checkpoint is damaged (`prune_checkpoints`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from ..errors import InputError
from ..fileio import atomic_write_text

CKPT_DIR = "checkpoints"
LATEST = "latest"
MANIFEST = "manifest.json"
FINAL = "final"


def state_dict_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kw)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict on CPU (a collective under FSDP: every rank must call it; only
    rank 0 gets the tensors)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=state_dict_options(full_state_dict=True, cpu_offload=True))


def load_full_model_state(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, sd, options=state_dict_options(full_state_dict=True))


def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    """The newest checkpoint folder (``latest``, else the highest step), intact or not: use
    `intact_checkpoint` to resume from one."""
    root = Path(out) / CKPT_DIR
    lf = root / LATEST
    if lf.is_file():
        p = root / lf.read_text().strip()
        if (p / "state.json").is_file():
            return p
    cands = sorted(p for p in root.glob("step_*") if (p / "state.json").is_file()) if root.is_dir() else []
    return cands[-1] if cands else None


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_checkpoint(root: Path, name: str, write: Callable[[Path], object], keep: int) -> Path:
    """Build checkpoint ``root/name`` atomically: ``write(tmp_folder)`` fills a temp folder, a
    manifest of every file's sha256 is added, the files are synced, the folder is renamed into
    place and ``latest`` points at it; then old checkpoints are pruned (`prune_checkpoints`)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp_{name}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    write(tmp)
    files = {}
    for f in sorted(tmp.iterdir()):
        with open(f, "rb") as fh:  # on disk before the rename, or a power cut could leave it short
            os.fsync(fh.fileno())
        files[f.name] = {"sha256": _sha256(f), "bytes": f.stat().st_size}
    (tmp / MANIFEST).write_text(json.dumps({"version": 1, "files": files}, indent=1))
    path = root / name
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    atomic_write_text(root / LATEST, name)
    prune_checkpoints(root, path, keep)
    for stale in root.glob(".tmp_*"):
        shutil.rmtree(stale, ignore_errors=True)
    return path


def prune_checkpoints(root: Path, newest: Path, keep: int) -> list[Path]:
    """Remove all but ``newest`` and the ``keep - 1`` checkpoints before it in step order; the
    removed folders are returned. When none of those kept passes `checkpoint_problem` (say the
    newest was damaged on its way to disk), the newest older one that does is kept too, so
    pruning never removes the last checkpoint a resume could use. Verifying reads files, so it
    happens only when something is to be removed, and stops at the first intact one."""
    olds = sorted((p for p in Path(root).glob("step_*") if p.is_dir() and p != newest), reverse=True)
    kept, drop = [newest, *olds[: max(0, keep - 1)]], olds[max(0, keep - 1):]
    if drop:
        problems = {}
        for ck in kept:
            problems[ck] = checkpoint_problem(ck)
            if problems[ck] is None:
                break
        else:  # nothing kept is intact: spare the newest intact older one
            rescue = next((ck for ck in drop if checkpoint_problem(ck) is None), None)
            if rescue is not None:
                drop.remove(rescue)
            print(f"warning: checkpoint {newest.name} is damaged ({problems[newest]}); "
                  + (f"keeping {rescue.name}, the newest intact one" if rescue else "no intact checkpoint is left"),
                  file=sys.stderr, flush=True)
    for old in drop:
        shutil.rmtree(old, ignore_errors=True)
    return drop


def checkpoint_problem(ck: Path) -> str | None:
    """What is wrong with checkpoint folder ``ck`` (naming the file), or None when every file
    matches its manifest. A checkpoint from before manifests is checked as far as it can be:
    its JSON parses and its safetensors headers match their sizes."""
    ck = Path(ck)
    man = ck / MANIFEST
    if not man.is_file():
        if not (ck / "state.json").is_file():
            return f"{ck / 'state.json'}: missing"
        return _legacy_problem(ck)
    try:
        files = json.loads(man.read_text())["files"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        return f"{man}: unreadable ({e})"
    for name, want in files.items():
        f = ck / name
        if not f.is_file():
            return f"{f}: missing"
        size = f.stat().st_size
        if size != want.get("bytes"):
            return f"{f}: {size} bytes, the manifest says {want.get('bytes')} (truncated or replaced)"
        if _sha256(f) != want.get("sha256"):
            return f"{f}: checksum mismatch (damaged data)"
    return None


def _legacy_problem(ck: Path) -> str | None:
    from safetensors import safe_open

    for f in sorted(ck.iterdir()):
        try:
            if f.suffix == ".json":
                json.loads(f.read_text())
            elif f.suffix == ".safetensors":
                with safe_open(str(f), "pt") as h:
                    h.keys()
        except Exception as e:
            return f"{f}: unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    return None


def intact_checkpoint(out: str | os.PathLike, is_main: bool = True) -> Path | None:
    """The newest checkpoint in ``out/checkpoints`` that passes `checkpoint_problem`, or None if
    there is none. Each damaged newer one gets a warning naming the file (on stderr, from the
    main rank); when checkpoints exist but none is intact this raises a one-line InputError."""
    root = Path(out) / CKPT_DIR
    if not root.is_dir():
        return None
    cands = sorted((p for p in root.glob("step_*") if p.is_dir()), reverse=True)
    problems = []
    for ck in cands:
        why = checkpoint_problem(ck)
        if why is None:
            if problems and is_main:
                print(f"warning: resuming from {ck.name}: the newer checkpoint is damaged ({problems[-1]})",
                      file=sys.stderr, flush=True)
            return ck
        problems.append(why)
        if is_main:
            print(f"warning: checkpoint {ck.name} is damaged: {why}", file=sys.stderr, flush=True)
    if problems:
        raise InputError(f"no intact checkpoint in {root} to resume from: {'; '.join(problems)} "
                         "(move the folder away to start over)")
    return None


def final_done(out: str | os.PathLike) -> bool:
    """True once a stage has finished and exported (``OUT/final/DONE.json``)."""
    return (Path(out) / FINAL / "DONE.json").is_file()
