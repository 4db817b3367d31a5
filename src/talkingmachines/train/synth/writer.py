"""The data set on disk: `synth_dataset(n, out_dir)` writes `clip_XXXXX.mp4` (for people),
`clip_XXXXX.npz` (for training) and `index.json`; resumable, atomic writes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ...config import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME
from .clip import make_clip
from .face import check_data_version
from .speech import _require_espeak


def _clip_seed(seed: int, i: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(i)]).generate_state(1)[0])


def _atomic_npz(path: Path, **arrays) -> None:
    from ...fileio import atomic_savez

    atomic_savez(path, **arrays)


def _write_clip(args) -> dict:
    i, out_dir, seed, size, seconds, speech, write_video, version = args
    out_dir = Path(out_dir)
    name = f"clip_{i:05d}"
    npz, mp4 = out_dir / f"{name}.npz", out_dir / f"{name}.mp4"
    cs = _clip_seed(seed, i)
    rng = np.random.default_rng(cs)
    sec = float(rng.uniform(*seconds)) if isinstance(seconds, (tuple, list)) else float(seconds)
    clip = make_clip(cs, sec, size=size, speech=speech, version=version)
    meta = dict(clip.params, name=name, index=i)
    if write_video:
        from ...media import write_mp4

        tmp = mp4.with_name(f"{name}.tmp{os.getpid()}.mp4")
        write_mp4(tmp, clip.frames, clip.audio, fps=FPS)
        os.replace(tmp, mp4)
    _atomic_npz(npz, frames=clip.frames, audio=clip.audio, mouth_open=clip.mouth_open,
                mouth_round=clip.mouth_round, speaking=clip.speaking, meta=np.array(json.dumps(meta)))
    return meta


def _read_meta(npz: Path) -> dict | None:
    try:
        with np.load(npz) as z:
            return json.loads(str(z["meta"]))
    except Exception:
        return None


def synth_dataset(n: int, out_dir: str | Path, seed: int = 0, size: int = 128,
                  seconds: float | tuple[float, float] = (4.0, 8.0), workers: int = 1,
                  speech: str = "auto", video: bool = True, progress: bool = True, version: int = 1) -> Path:
    """Write `n` clips to `out_dir`: clip_XXXXX.npz (frames, audio, mouth_open,
    mouth_round, speaking, meta), clip_XXXXX.mp4 (H.264 + AAC, when `video`) and
    index.json. Clips already complete are skipped, so an interrupted run resumes.
    `version`: the data version (`make_clip`). Returns the path of index.json."""
    check_data_version(version)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if speech == "espeak":
        _require_espeak()
    metas: dict[int, dict] = {}
    todo = []
    for i in range(n):
        name = f"clip_{i:05d}"
        npz = out / f"{name}.npz"
        if npz.exists() and (not video or (out / f"{name}.mp4").exists()):
            m = _read_meta(npz)
            if (m is not None and m.get("size") == size and m.get("seed") == _clip_seed(seed, i)
                    and m.get("data_version", 1) == version):
                metas[i] = m
                continue
        todo.append((i, str(out), seed, size, tuple(seconds) if isinstance(seconds, (tuple, list)) else seconds,
                     speech, video, version))
    from tqdm.auto import tqdm

    bar = tqdm(total=n, initial=n - len(todo), desc="synth clips", unit="clip", disable=not progress)
    if workers > 1 and len(todo) > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers) as pool:
            for m in pool.imap_unordered(_write_clip, todo):
                metas[m["index"]] = m
                bar.update(1)
    else:
        for a in todo:
            m = _write_clip(a)
            metas[m["index"]] = m
            bar.update(1)
    bar.close()
    clips = []
    for i in sorted(metas):
        m = metas[i]
        clips.append(dict(
            name=m["name"], npz=f"{m['name']}.npz", mp4=f"{m['name']}.mp4" if video else None,
            frames=m["frames"], seconds=m["frames"] / FPS, speech_source=m["speech_source"],
            voice=m.get("voice"), style=m["face"]["style"], human=m["face"]["human"],
            listen_frac=m["listen_frac"], seed=m["seed"], texts=m.get("texts", []),
        ))
    index = dict(version=1, data_version=version, generator="talkingmachines.train.synth", n=len(clips), size=size, fps=FPS,
                 sample_rate=SAMPLE_RATE, samples_per_frame=SAMPLES_PER_FRAME, seed=seed, clips=clips)
    idx = out / "index.json"
    from ...fileio import atomic_write_text

    atomic_write_text(idx, json.dumps(index, indent=1))
    return idx
