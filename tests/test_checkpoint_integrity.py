"""Damaged checkpoints: every file is checksummed in the checkpoint's manifest; a damaged latest
checkpoint is named in a warning and resume falls back to the newest intact one (left as it
was); with none intact, resume refuses with a one-line error naming the damage."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from train_fixtures import make_clips, make_vae, micro_config

from talkingmachines.errors import InputError
from talkingmachines.train import checkpoint as ckmod
from talkingmachines.train.checkpoint import MANIFEST, checkpoint_problem, intact_checkpoint, write_checkpoint
from talkingmachines.train.teacher import TeacherTrainer


def _truncate(f: Path) -> None:
    b = f.read_bytes()
    f.write_bytes(b[: len(b) // 2])


def _zero(f: Path) -> None:
    f.write_bytes(b"")


def _header(f: Path) -> None:  # damage the JSON header of a safetensors file (after its 8-byte length)
    b = bytearray(f.read_bytes())
    b[8:16] = b"\xff" * 8
    f.write_bytes(bytes(b))


def _flip(f: Path) -> None:  # flip bits inside tensor data (the end of the file): still loads
    b = bytearray(f.read_bytes())
    for i in (len(b) - 5, len(b) - 40, len(b) - 77):
        b[i] ^= 0x5A
    f.write_bytes(bytes(b))


def _remove(f: Path) -> None:
    f.unlink()


FAULTS = {
    "truncated model": ("model.teacher.safetensors", _truncate),
    "truncated optimizer": ("optim.teacher.safetensors", _truncate),
    "truncated EMA": ("ema.teacher.safetensors", _truncate),
    "0-byte model": ("model.teacher.safetensors", _zero),
    "damaged header": ("model.teacher.safetensors", _header),
    "truncated state.json": ("state.json", _truncate),
    "missing optim json": ("optim.teacher.json", _remove),
    "flipped tensor bytes": ("ema.teacher.safetensors", _flip),
}


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    work = tmp_path_factory.mktemp("ckpt")
    make_clips(work / "data")
    make_vae(work / "vae")
    _teacher(work, keep_checkpoints=2).run()
    return work


def _teacher(work: Path, **kw) -> TeacherTrainer:
    """The micro teacher run of these tests: 4 steps, a checkpoint every 2."""
    return TeacherTrainer(micro_config(work, "teacher", "run", steps=4, ckpt_every=2, **kw))


def _copy(run_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the run (data, VAE, checkpoints) to damage: its folder and its checkpoints folder."""
    shutil.copytree(run_dir / "data", tmp_path / "data")
    shutil.copytree(run_dir / "vae", tmp_path / "vae")
    shutil.copytree(run_dir / "run" / "checkpoints", tmp_path / "run" / "checkpoints")
    return tmp_path, tmp_path / "run" / "checkpoints"


def test_manifest_lists_every_file_with_its_sha256(run_dir):
    ck = run_dir / "run" / "checkpoints" / "step_00000004"
    man = json.loads((ck / MANIFEST).read_text())["files"]
    assert set(man) == {p.name for p in ck.iterdir()} - {MANIFEST}
    for name, entry in man.items():
        assert entry["sha256"] == hashlib.sha256((ck / name).read_bytes()).hexdigest()
        assert entry["bytes"] == (ck / name).stat().st_size


@pytest.mark.parametrize("fault", list(FAULTS))
def test_damaged_latest_falls_back_to_intact(run_dir, tmp_path, capsys, fault):
    work, root = _copy(run_dir, tmp_path)
    fname, damage = FAULTS[fault]
    good = _digests(root / "step_00000002")
    damage(root / "step_00000004" / fname)

    t = _teacher(work)
    t.setup()
    assert t.resume()
    assert t.step == 2
    err = capsys.readouterr().err
    assert "warning:" in err and "step_00000004" in err and fname in err, err
    assert _digests(root / "step_00000002") == good  # the fallback is read, never changed
    # the fallback's weights are the ones loaded
    from safetensors.torch import load_file

    sd = load_file(str(root / "step_00000002" / "model.teacher.safetensors"))
    for k, p in t.groups["teacher"].module.state_dict().items():
        assert torch.equal(p, sd[k]), k


def test_none_intact_is_a_one_line_error(run_dir, tmp_path):
    work, root = _copy(run_dir, tmp_path)
    _flip(root / "step_00000004" / "model.teacher.safetensors")
    _truncate(root / "step_00000002" / "state.json")
    t = _teacher(work)
    with pytest.raises(InputError) as e:  # found in setup(), before any model is built
        t.setup()
    msg = str(e.value)
    assert "\n" not in msg and "no intact checkpoint" in msg
    assert "model.teacher.safetensors" in msg and "state.json" in msg


def test_resumed_run_after_fallback_finishes(run_dir, tmp_path):
    """Training goes on from the fallback and writes a fresh, verified step 4 over the damaged one."""
    work, root = _copy(run_dir, tmp_path)
    _truncate(root / "step_00000004" / "optim.teacher.safetensors")
    _teacher(work).run()
    assert checkpoint_problem(root / "step_00000004") is None
    assert (work / "run" / "final" / "DONE.json").is_file()


# ------------------------------------------------------------------ the VAE's checkpoints
VAE_FAULTS = {
    "truncated model": ("model.vae.safetensors", _truncate),
    "0-byte optimizer": ("optim.vae.safetensors", _zero),
    "flipped tensor bytes": ("model.vae.safetensors", _flip),
    "truncated state.json": ("state.json", _truncate),
    "missing optimizer json": ("optim.vae.json", _remove),
    "truncated VAE config": ("config.json", _truncate),
}


def _train_vae(out: Path, **kw):
    """The small VAE run of these tests (4 steps), resumed from ``out`` when it has checkpoints."""
    from test_vae_train import SMALL, MovingPatterns

    from talkingmachines.train.vae_train import train_tiny_vae

    kw = {"steps": 4, "batch_size": 2, "log_every": 0, "ckpt_every": 0, "progress": False, "seed": 3,
          "config": SMALL, "stat_batches": 1, **kw}
    return train_tiny_vae(MovingPatterns(n=8, frames=5, size=32), out, **kw)


def _copy_as_step(root: Path, src: str, step: int) -> Path:
    """Checkpoint ``src`` copied as ``step`` (state.json and its manifest entry say so) and made latest."""
    ck = root / f"step_{step:08d}"
    shutil.copytree(root / src, ck)
    st = json.loads((ck / "state.json").read_text())
    st["step"] = step
    (ck / "state.json").write_text(json.dumps(st))
    man = json.loads((ck / MANIFEST).read_text())
    man["files"]["state.json"] = {"sha256": hashlib.sha256((ck / "state.json").read_bytes()).hexdigest(),
                                  "bytes": (ck / "state.json").stat().st_size}
    (ck / MANIFEST).write_text(json.dumps(man))
    (root / "latest").write_text(ck.name)
    return ck


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vae") / "a"
    _train_vae(out, ckpt_every=2)
    shutil.rmtree(out / "checkpoints" / "step_00000004")  # as if killed before the end
    for f in ("model.safetensors", "config.json", "DONE.json"):
        (out / f).unlink()
    (out / "checkpoints" / "latest").write_text("step_00000002")
    return out


@pytest.mark.parametrize("fault", list(VAE_FAULTS))
def test_vae_damaged_latest_falls_back(vae_run, tmp_path, capsys, fault):
    out = tmp_path / "a"
    shutil.copytree(vae_run, out)
    root = out / "checkpoints"
    newer = _copy_as_step(root, "step_00000002", 3)  # a newer checkpoint beside the intact one, then damaged
    good = _digests(root / "step_00000002")
    fname, damage = VAE_FAULTS[fault]
    damage(newer / fname)

    res = _train_vae(out, keep_checkpoints=3)
    assert res.start_step == 2 and res.step == 4
    err = capsys.readouterr().err
    assert "warning:" in err and "step_00000003" in err and fname in err, err
    assert _digests(root / "step_00000002") == good


def test_vae_none_intact_is_a_one_line_error(vae_run, tmp_path):
    out = tmp_path / "a"
    shutil.copytree(vae_run, out)
    _flip(out / "checkpoints" / "step_00000002" / "model.vae.safetensors")
    with pytest.raises(InputError) as e:
        _train_vae(out)
    assert "\n" not in str(e.value) and "model.vae.safetensors" in str(e.value)


# ------------------------------------------------------------------ pruning
def _small_checkpoint(tmp: Path) -> None:
    (tmp / "model.safetensors").write_bytes(bytes(range(256)))
    (tmp / "state.json").write_text(json.dumps({"step": 0}))


def _damaged_on_landing(monkeypatch, root: Path) -> None:
    """The next checkpoint written is damaged between its rename and pruning (a storage fault)."""
    real = ckmod.atomic_write_text

    def write_latest(path, name):
        _flip(root / name / "model.safetensors")
        real(path, name)

    monkeypatch.setattr(ckmod, "atomic_write_text", write_latest)


@pytest.mark.parametrize("keep", [1, 2])
def test_pruning_keeps_the_newest_intact_checkpoint(tmp_path, monkeypatch, capsys, keep):
    root = tmp_path / "checkpoints"
    write_checkpoint(root, "step_00000002", _small_checkpoint, keep)
    if keep == 2:  # a newer checkpoint, damaged on disk later: it counts as kept but cannot be resumed
        write_checkpoint(root, "step_00000004", _small_checkpoint, keep)
        _truncate(root / "step_00000004" / "model.safetensors")
    good = _digests(root / "step_00000002")
    _damaged_on_landing(monkeypatch, root)
    write_checkpoint(root, "step_00000006", _small_checkpoint, keep)

    assert checkpoint_problem(root / "step_00000006") is not None
    assert _digests(root / "step_00000002") == good
    assert "keeping step_00000002" in capsys.readouterr().err
    assert intact_checkpoint(tmp_path) == root / "step_00000002"


def test_pruning_still_removes_old_checkpoints(tmp_path, capsys):
    """Intact or damaged, checkpoints beyond ``keep`` go once a newer intact one is kept."""
    root = tmp_path / "checkpoints"
    for step in (2, 4):
        write_checkpoint(root, f"step_{step:08d}", _small_checkpoint, keep=2)
    _truncate(root / "step_00000004" / "model.safetensors")
    write_checkpoint(root, "step_00000006", _small_checkpoint, keep=2)
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000004", "step_00000006"]
    write_checkpoint(root, "step_00000008", _small_checkpoint, keep=1)
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000008"]
    assert capsys.readouterr().err == ""
