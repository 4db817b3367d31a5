"""The clips an evaluation runs on, whatever their source, and the long stream's audio made from them."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..config import SAMPLE_RATE

__all__ = ["clip_files", "eval_clips", "listening_frame", "long_stream_audio"]


def clip_files(data, numbers: Sequence[int]) -> list[Path]:
    """The `data synth` folder's clip files for clip ``numbers`` (``clip_NNNNN.npz``); an
    `InputError` naming every one that is missing."""
    from ..errors import InputError

    paths = [Path(data) / f"clip_{c:05d}.npz" for c in numbers]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise InputError(f"no such clip: {', '.join(missing)}")
    return paths


def eval_clips(clips, n: int | None = None):
    """Normalise the clip sources to dicts {name, frames, audio, mouth_open, speaking, face}:
    a `ClipDataset` (held-out view), `synth.Clip`s, or dicts with those keys."""
    import json as _json

    try:
        from ..dataset import ClipDataset
    except Exception:  # pragma: no cover
        ClipDataset = ()  # type: ignore[assignment]
    if isinstance(clips, ClipDataset):
        count = len(clips) if n is None else min(n, len(clips))
        for i in range(count):
            meta = clips.clips[clips.indices[i]]
            with np.load(clips.root / meta["npz"]) as z:
                d = {k: z[k] for k in ("frames", "audio", "mouth_open", "speaking")}
                face = _json.loads(str(z["meta"])).get("face") if "meta" in z else None
            yield dict(d, name=meta.get("name", f"clip{i}"), face=face)
        return
    for i, c in enumerate(clips):
        if n is not None and i >= n:
            return
        if isinstance(c, dict):
            yield dict(name=c.get("name", f"clip{i}"), frames=c.get("frames", c.get("video")), audio=c["audio"],
                       mouth_open=c.get("mouth_open"), speaking=c.get("speaking"), face=c.get("face"))
        else:  # synth.Clip
            yield dict(name=f"seed{c.params.get('seed', i)}", frames=c.frames, audio=c.audio, mouth_open=c.mouth_open,
                       speaking=c.speaking, face=c.params.get("face"))


def listening_frame(frames: np.ndarray, speaking) -> int:
    """The first frame where the clip listens (not speaking), else 0: the portrait a model starts from."""
    if speaking is not None:
        idx = np.nonzero(~np.asarray(speaking, bool))[0]
        if len(idx):
            return int(idx[0])
    return 0


def long_stream_audio(clips: Sequence[np.ndarray], seconds: float, seed: int = 0,
                      gap: tuple[float, float] = (0.5, 2.5), repeat_first: float = 0.0) -> np.ndarray:
    """`seconds` of audio: the given clips' audio looped in order, each followed by a random
    silence of `gap` seconds (so the stream alternates speaking and listening).

    ``repeat_first`` > 0: the last ``repeat_first`` seconds repeat the first ones exactly, so a
    drift measure that compares the first and last windows compares frames driven by the same
    speech (an open mouth darkens a frame: different speech alone moves the mean brightness)."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * SAMPLE_RATE))
    r = int(round(repeat_first * SAMPLE_RATE)) if 0 < repeat_first * 2 <= seconds else 0
    out = np.zeros(n, np.float32)
    pos, i = 0, 0
    if not len(clips):
        return out
    while pos < n - r:
        a = np.asarray(clips[i % len(clips)], np.float32)
        k = min(len(a), n - r - pos)
        out[pos:pos + k] = a[:k]
        pos += k + int(rng.uniform(*gap) * SAMPLE_RATE)
        i += 1
    if r:
        out[n - r:] = out[:r]
    return out
