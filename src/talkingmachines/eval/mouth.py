"""The mouth-opening signal of a video, from its pixels (plain numpy).

**Mouth opening from pixels** (`mouth_signal`). Per frame, a mouth region of interest (ROI)
is compared with the mouth's *rest appearance*: the per-pixel median of the (aligned) ROI
crops of the 30 % of frames closest to the current estimate, iterated from the clip's
median, i.e. the clip's most common, least-open look; when the speech is given (``audio``),
from the listening frames' median and among them, so a mouth that stays a little open
through speech does not become the rest look. The score of a frame is the mean
over the ROI of ``min(1, |RGB - rest| / 64)``: an opening mouth uncovers dark inner mouth,
teeth and tongue where lips and skin were, so the score rises with the opening. Small head
motion is compensated (the ROI is matched to the rest look over shifts up to +-5 % of the frame: a shift can
move a closed mouth back into place but cannot close an open one). The ROI comes
from the renderer's geometry for our synthetic faces (`mouth_roi_from_face`), otherwise
(`auto_mouth_roi`) from a centred-portrait prior (the lower-middle face) refined by where
the video changes most from frame to frame. Validated on ground-truth synthetic clips
against the renderer's true ``mouth_open`` (see the tests and the model card). For real
portraits it is a best effort: it assumes a roughly centred, frontal face that fills about
half the frame; it is *not* a face detector.
"""

from __future__ import annotations

import math

import numpy as np

# the renderer owns the synthetic faces' geometry; every metric uses it
from ..train.synth.render import clip_box as clip_roi, mouth_roi_from_face

__all__ = ["Roi", "mouth_roi_from_face", "clip_roi", "auto_mouth_roi", "auto_roi_full", "mouth_signal"]

DIST_SCALE = 64.0  # RGB distance (0..441) that counts as "fully changed"

Roi = tuple[int, int, int, int]  # y0, y1, x0, x1 (pixels, half-open)


# ----------------------------------------------------------------------------- ROI


def _gray(frames: np.ndarray) -> np.ndarray:
    f = frames.astype(np.float32)
    return 0.299 * f[..., 0] + 0.587 * f[..., 1] + 0.114 * f[..., 2]


def _box_sum(a: np.ndarray, h: int, w: int) -> np.ndarray:
    """Sums over every h x w window (valid positions) via an integral image."""
    c = np.pad(a, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    return c[h:, w:] - c[:-h, w:] - c[h:, :-w] + c[:-h, :-w]


def auto_mouth_roi(frames: np.ndarray, max_frames: int = 400) -> Roi:
    """Best-effort mouth ROI for a centred portrait video: a box of 0.34 x 0.26 of the frame
    placed where the frame-to-frame change is largest within the lower-middle face (centre
    within x 0.40-0.60, y 0.53-0.72 of the frame), weighted towards the usual mouth place
    (x 0.5, y 0.62). With a still video it is that usual place."""
    T, H, W = frames.shape[:3]
    bh, bw = max(2, round(0.26 * H)), max(2, round(0.34 * W))
    prior = clip_roi(0.62 * H - bh / 2, 0.62 * H + bh / 2, 0.5 * W - bw / 2, 0.5 * W + bw / 2, H, W)
    if T < 3:
        return prior
    step = max(1, T // max_frames)
    g = _gray(frames[::step])
    var = np.abs(np.diff(g, axis=0)).mean(0)  # [H, W] mean |frame-to-frame change|
    if var.max() <= 1e-6:
        return prior
    s = _box_sum(var.astype(np.float64), bh, bw)  # s[y, x]: box with top-left (y, x)
    ys = np.arange(s.shape[0]) + bh / 2
    xs = np.arange(s.shape[1]) + bw / 2
    cy_ok = (ys >= 0.53 * H) & (ys <= 0.72 * H)
    cx_ok = (xs >= 0.40 * W) & (xs <= 0.60 * W)
    if not cy_ok.any() or not cx_ok.any():
        return prior
    wy = np.exp(-0.5 * ((ys - 0.62 * H) / (0.08 * H)) ** 2)
    wx = np.exp(-0.5 * ((xs - 0.5 * W) / (0.08 * W)) ** 2)
    score = s * wy[:, None] * wx[None, :]
    score[~cy_ok, :] = -1
    score[:, ~cx_ok] = -1
    y, x = np.unravel_index(int(np.argmax(score)), score.shape)
    return int(y), int(y + bh), int(x), int(x + bw)


# ----------------------------------------------------------------------------- mouth signal


def _dist(c: np.ndarray, rest: np.ndarray) -> np.ndarray:
    """Mean over the ROI of min(1, |RGB - rest| / DIST_SCALE), per frame."""
    return np.minimum(np.sqrt(((c - rest) ** 2).sum(-1)) / DIST_SCALE, 1.0).mean((-2, -1))


def _aligned_score(frames: np.ndarray, roi: Roi, max_shift: int, iters: int = 2,
                   rest_frames: np.ndarray | None = None):
    """Per frame, the distance of the ROI to the rest look, minimised over integer shifts of
    the ROI up to `max_shift` px (head motion moves a closed mouth; it cannot close an open
    one): a coarse search on a 2-px grid, then +-1 px around the best. The rest look starts as
    the median crop of `rest_frames` (indices; default every frame) and is re-estimated `iters`
    times from the aligned crops of the 30 % lowest-scoring of those frames.
    Returns (score [T], shifts [T, 2])."""
    y0, y1, x0, x1 = roi
    h, w = y1 - y0, x1 - x0
    T = len(frames)
    m = max_shift
    pad = np.pad(frames, ((0, 0), (m, m), (m, m), (0, 0)), mode="edge") if m else frames
    coarse = [(dy, dx) for dy in range(-m, m + 1, 2) for dx in range(-m, m + 1, 2)] if m else [(0, 0)]
    iy, ix = np.arange(h), np.arange(w)

    def gather(t_idx, sh):  # crops of frames t_idx at per-frame shifts sh [n, 2]
        rows = (y0 + m + sh[:, 0])[:, None] + iy[None]
        cols = (x0 + m + sh[:, 1])[:, None] + ix[None]
        return pad[t_idx[:, None, None], rows[:, :, None], cols[:, None, :]].astype(np.float32)

    def search(rest):
        best = np.full(T, np.inf)
        arg = np.zeros((T, 2), np.int64)
        for s0 in range(0, T, 128):
            t_idx = np.arange(s0, min(T, s0 + 128))
            b = np.full(len(t_idx), np.inf)
            a = np.zeros((len(t_idx), 2), np.int64)
            cands = [np.tile(np.array(c), (len(t_idx), 1)) for c in coarse]
            for stage in range(2):
                for sh in cands:
                    d = _dist(gather(t_idx, sh), rest) + 2e-4 * (sh ** 2).sum(1)
                    better = d < b
                    b[better] = d[better]
                    a[better] = sh[better]
                if stage == 0 and m:
                    base = a.copy()
                    cands = [np.clip(base + np.array([ddy, ddx]), -m, m)
                             for ddy in (-1, 0, 1) for ddx in (-1, 0, 1) if ddy or ddx]
            best[t_idx], arg[t_idx] = b, a
        return best, arg

    pool = np.arange(T) if rest_frames is None or len(rest_frames) == 0 else np.asarray(rest_frames)
    sub = pool[:: max(1, len(pool) // 300)]
    rest = np.median(gather(sub, np.zeros((len(sub), 2), np.int64)), axis=0)
    for it in range(iters + 1):
        best, arg = search(rest)
        if it == iters:
            break
        keep = pool[best[pool] <= np.quantile(best[pool], 0.3)]  # refined within the rest frames, if given
        if len(keep) > 300:
            keep = keep[np.linspace(0, len(keep) - 1, 300).round().astype(int)]
        rest = np.median(gather(keep, arg[keep]), axis=0)
    return best, arg


def _downscale(frames: np.ndarray, max_side: int = 160) -> tuple[np.ndarray, int]:
    """Integer area downscale so the longer side is <= max_side (speed on big videos)."""
    T, H, W = frames.shape[:3]
    k = max(1, int(math.ceil(max(H, W) / max_side)))
    if k == 1:
        return frames, 1
    H2, W2 = H // k, W // k
    f = frames[:, : H2 * k, : W2 * k].reshape(T, H2, k, W2, k, 3).astype(np.float32).mean((2, 4))
    return f.astype(np.uint8), k


def mouth_signal(frames, roi: Roi | None = None, face=None, motion: bool = True,
                 return_info: bool = False, audio=None):
    """Per-frame mouth-opening score (float [T], 0 = rest look, up to 1) from pixels.

    frames: uint8 [T, H, W, 3]. roi: (y0, y1, x0, x1) in pixels of `frames`; else from
    `face` (synthetic `FaceParams` / dict) or `auto_mouth_roi`. motion: compensate head
    translation (ROI shifts up to +-5 % of the frame) when comparing with the rest look.
    audio: the video's speech (16 kHz); when it has listening frames (`metrics.speech_frames`'
    silence, at least 5), the rest look is sought from their mouth, not the whole clip's: a
    mouth that stays a little open through speech would otherwise become the rest look, and
    the closed mouth of silence would score as open."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [T, H, W, 3], got {frames.shape}")
    T, H, W = frames.shape[:3]
    if roi is None and face is not None:
        roi = mouth_roi_from_face(face, H, W)
    small, k = _downscale(frames)
    Hs, Ws = small.shape[1:3]
    if roi is None:
        r = auto_mouth_roi(small)
        roi_full = (r[0] * k, r[1] * k, r[2] * k, r[3] * k)
    else:
        roi_full = roi
        r = clip_roi(roi[0] / k, roi[1] / k, roi[2] / k, roi[3] / k, Hs, Ws)
    max_shift = int(round(0.05 * max(Hs, Ws))) if motion else 0
    rest = None
    if audio is not None:
        from .metrics import speech_frames

        silence = np.nonzero(speech_frames(audio, T)[1])[0]
        rest = silence if len(silence) >= 5 else None
    score, shifts = _aligned_score(small, r, max_shift, rest_frames=rest)
    score = score.astype(np.float64)
    if return_info:
        return score, {"roi": [int(v) for v in roi_full], "scale": k,
                       "head_shift_px": float(np.abs(shifts).max() * k)}
    return score


def auto_roi_full(frames: np.ndarray) -> Roi:
    """`auto_mouth_roi` found on a downscaled copy, in the full frames' pixels."""
    small, k = _downscale(frames)
    r = auto_mouth_roi(small)
    return r[0] * k, r[1] * k, r[2] * k, r[3] * k
