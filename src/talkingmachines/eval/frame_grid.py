"""A picture to look at before believing a number: every 2nd frame over one second of speech
and one second of silence, with what the face judge saw drawn on top.

`frame_grid(frames, audio)` picks the 25-frame window with the most speech frames and the one
with the most silence frames (`metrics.speech_frames`), takes every 2nd frame of each (13 a
row) and draws, when the face judge is installed, its 68 landmarks in green on frames where it
found a face and a red corner mark where it did not. Given the judge's per-frame results
(``landmarks``, as `eval` already has them) it draws those instead of running it again."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from ..config import FPS

WINDOW = FPS  # one second
STEP = 2


def _best_window(mask: np.ndarray, n: int) -> int:
    if len(mask) <= n:
        return 0
    counts = np.convolve(mask.astype(np.int64), np.ones(n, np.int64), mode="valid")
    return int(np.argmax(counts))


def frame_grid(frames: np.ndarray, audio, scale: int = 2, judge=True,
               landmarks: list | None = None) -> Image.Image:
    """uint8 frames [T, H, W, 3] and their 16 kHz audio -> a PIL image: a row of speech frames,
    a row of silence frames (every 2nd frame over 1 s each), each cell `scale`x enlarged.
    ``landmarks``: the face judge's result for every frame (None: no face), used instead of
    running the judge (``judge``) on the drawn frames."""
    from .metrics import speech_frames

    frames = np.asarray(frames)
    T, H, W = frames.shape[:3]
    speech, silence, _ = speech_frames(audio, T)
    fj = None
    if landmarks is None and judge:
        from ..errors import InputError
        from .face_judge import FaceJudge

        try:
            fj = FaceJudge.load()
        except InputError:
            fj = None
    rows = []
    for label, mask in (("speech", speech), ("silence", silence)):
        s = _best_window(mask, WINDOW)
        idx = list(range(s, min(T, s + WINDOW), STEP))
        rows.append((label, idx, float(mask[s:s + WINDOW].mean()) if T else 0.0))
    cols = max(len(r[1]) for r in rows)
    cw, ch = W * scale, H * scale
    label_h = 14
    img = Image.new("RGB", (cols * cw, len(rows) * (ch + label_h)), (255, 255, 255))
    d = ImageDraw.Draw(img)
    for r, (label, idx, frac) in enumerate(rows):
        y0 = r * (ch + label_h)
        d.text((2, y0 + 1), f"{label}: frames {idx[0] if idx else 0}-{idx[-1] if idx else 0} "
                            f"(every {STEP}nd; {100 * frac:.0f} % {label})", fill=(0, 0, 0))
        for c, t in enumerate(idx):
            cell = Image.fromarray(frames[t]).resize((cw, ch), Image.NEAREST)
            x0, yy = c * cw, y0 + label_h
            img.paste(cell, (x0, yy))
            if landmarks is not None or fj is not None:
                p = landmarks[t] if landmarks is not None else fj.landmarks(frames[t])
                if p is None:
                    d.rectangle([x0, yy, x0 + 6, yy + 6], fill=(230, 0, 0))
                else:
                    for (px, py) in p * scale:
                        d.point((x0 + px, yy + py), fill=(0, 255, 0))
    return img


def save_frame_grid(path, frames, audio, **kw) -> None:
    """`frame_grid` written atomically as PNG."""
    from ..fileio import atomic_write

    img = frame_grid(frames, audio, **kw)
    atomic_write(path, lambda p: img.save(p, format="PNG"))
