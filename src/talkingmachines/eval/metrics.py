"""Metrics of a per-frame mouth signal against its audio, and of a video's drift (plain numpy).

**Speech energy** (`speech_envelope`): per-video-frame RMS (640 samples at 16 kHz) in
linear amplitude, smoothed by a 3-frame box; `speech_frames` marks frames as speech,
silence (the whole +-3 frame neighbourhood below the threshold) or neither.

**Lip-sync** (`lipsync`): the lag in -10..10 frames maximising the Pearson correlation
between the mouth signal and the speech envelope; positive lag = the mouth moves *after*
the sound (video late). ``confidence`` is the correlation at that lag; ``corr_at_0`` the
correlation without any shift. For a synthetic clip the same computed on the renderer's
``mouth_open`` is the ceiling the pixel measure can reach.

**Listening stillness** (`stillness`): mean |frame-to-frame change| of the mouth signal in
speech frames over the same in silence frames (``ratio``; the target is >= 2), plus the mean
opening (above the clip's 5th percentile) in each.

**Drift** (`drift`): PSNR between the mean frame of the first and the last `window` seconds
of a long video (identical -> capped at 100 dB), the per-channel RGB mean shift and the
brightness (Rec. 601 luma) shift last minus first, and the same PSNR for every window
against the first (to see a trend). `evaluate_model`'s long stream ends with the same
`window` seconds of speech it starts with, so that what is said does not count as drift.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from ..config import FPS, SAMPLES_PER_FRAME
from ..model.audio import frame_rms, frame_rms_db

__all__ = ["speech_envelope", "speech_frames", "lipsync", "lipsync_in_speech", "stillness", "psnr", "drift",
           "DriftAccumulator", "evaluate_signals", "pool_lipsync", "summarize_signals", "PSNR_CAP", "MAX_LAG"]

PSNR_CAP = 100.0  # dB reported for identical images
MAX_LAG = 10
MIN_SPEECH_FRAMES = 10  # fewer speech (or readable) frames: no lip-sync to measure


def speech_envelope(audio, n_frames: int | None = None, smooth: int = 3) -> np.ndarray:
    """Per-video-frame speech energy: RMS of each 640-sample frame (linear), box-smoothed
    over `smooth` frames. Audio past `n_frames` is ignored, missing audio counts as silence."""
    a = np.asarray(audio, np.float64).reshape(-1)
    n = n_frames if n_frames is not None else -(-a.size // SAMPLES_PER_FRAME)
    e = frame_rms(a, n)
    if smooth > 1:
        e = np.convolve(np.pad(e, (smooth // 2, smooth - 1 - smooth // 2), mode="edge"),
                        np.ones(smooth) / smooth, mode="valid")
    return e


def speech_frames(audio, n_frames: int | None = None, threshold_db: float | None = None,
                  guard: int = 3) -> tuple[np.ndarray, np.ndarray, float]:
    """(speech bool [T], silence bool [T], threshold dBFS). A frame is speech when its RMS is
    above the threshold; silence when every frame within +-`guard` is below it (so the
    mouth's closing after the last syllable is not counted as listening). Default
    threshold: the larger of (the loud frames' level (95th percentile) - 25 dB, clamped to
    [-50, -30] dBFS) and (the noise floor (5th percentile) + 6 dB, at most the loud level
    - 12 dB), so steady room noise and hum stay below it; a quiet, level track (5th to 95th
    percentile within 12 dB, 95th below -35 dBFS) is all silence."""
    a = np.asarray(audio, np.float64).reshape(-1)
    n = n_frames if n_frames is not None else -(-a.size // SAMPLES_PER_FRAME)
    db = frame_rms_db(a, n)
    if threshold_db is None:
        if n:
            p5, p95 = np.percentile(db, [5, 95])
            if p95 - p5 < 12.0 and p95 < -35.0:  # nothing but noise
                threshold_db = float(p95 + 1.0)
            else:
                threshold_db = float(max(np.clip(p95 - 25.0, -50.0, -30.0), min(p5 + 6.0, p95 - 12.0)))
        else:
            threshold_db = -45.0
    speech = db > threshold_db
    near = np.convolve(speech.astype(np.float64), np.ones(2 * guard + 1), mode="same") > 0
    return speech, ~near, float(threshold_db)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    ok = np.isfinite(a) & np.isfinite(b)  # frames a judge could not read (no face) are left out
    if not ok.all():
        a, b = a[ok], b[ok]
    if len(a) < 3:
        return float("nan")
    a = a - a.mean()
    b = b - b.mean()
    d = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum() / d) if d > 1e-12 else float("nan")


def lipsync(mouth: np.ndarray, envelope: np.ndarray, max_lag: int = MAX_LAG) -> dict:
    """Best audio-visual lag and its correlation. lag > 0: the mouth follows the sound `lag`
    frames late (mouth[t + lag] ~ envelope[t]). Returns {lag, confidence, corr_at_0,
    corr_by_lag}; nan confidence when either signal is constant."""
    m = np.asarray(mouth, np.float64)
    e = np.asarray(envelope, np.float64)
    n = min(len(m), len(e))
    m, e = m[:n], e[:n]
    corrs = {}
    for lag in range(-max_lag, max_lag + 1):
        if lag >= 0:
            a, b = m[lag:], e[: n - lag]
        else:
            a, b = m[: n + lag], e[-lag:]
        enough = int((np.isfinite(a) & np.isfinite(b)).sum()) >= max(10, n // 3)
        corrs[lag] = _corr(a, b) if enough else float("nan")
    valid = {k: v for k, v in corrs.items() if not math.isnan(v)}
    if not valid:
        return {"lag": None, "confidence": float("nan"), "corr_at_0": float("nan"), "corr_by_lag": corrs}
    best = max(valid, key=lambda k: (valid[k], -abs(k)))
    return {"lag": int(best), "confidence": float(valid[best]), "corr_at_0": float(corrs[0]),
            "corr_by_lag": {int(k): float(v) for k, v in corrs.items()}}


def stillness(mouth: np.ndarray, speech: np.ndarray, silence: np.ndarray) -> dict:
    """Mouth motion in speech vs silence. motion = |mouth[t] - mouth[t-1]| (attributed to
    frame t). ratio = mean motion in speech / mean motion in silence (capped at 1000;
    None when either set is empty). level_* = mean opening above the 5th percentile.
    motion_silence_by_phase[k] = mean motion in silence over frames t with t % 4 == k: a VAE
    decodes 4 frames per latent, so a spike at one phase is a jump between latents (latent
    jitter) and high values elsewhere are wobble inside a latent's frames."""
    m = np.asarray(mouth, np.float64)
    n = min(len(m), len(speech), len(silence))
    m, sp, si = m[:n], np.asarray(speech[:n], bool), np.asarray(silence[:n], bool)
    mot = np.abs(np.diff(m, prepend=m[:1]))
    mot[0] = np.nan
    base = np.percentile(m, 5) if n else 0.0
    ms = float(np.nanmean(mot[sp])) if sp[1:].any() else float("nan")
    mq = float(np.nanmean(mot[si])) if si[1:].any() else float("nan")
    if math.isnan(ms) or math.isnan(mq):
        ratio = None
    else:
        ratio = float(min(1000.0, ms / mq)) if mq > 1e-12 else (1000.0 if ms > 0 else None)
    by_phase = [float(np.nanmean(mot[k::4][si[k::4]])) if si[k::4].any() and np.isfinite(mot[k::4][si[k::4]]).any()
                else float("nan") for k in range(4)]
    return {"ratio": ratio, "motion_speech": ms, "motion_silence": mq, "motion_silence_by_phase": by_phase,
            "level_speech": float((m[sp] - base).mean()) if sp.any() else float("nan"),
            "level_silence": float((m[si] - base).mean()) if si.any() else float("nan"),
            "speech_frames": int(sp.sum()), "silence_frames": int(si.sum())}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2).mean())
    if mse <= 0:
        return PSNR_CAP
    return float(min(PSNR_CAP, 10 * math.log10(255.0 ** 2 / mse)))


class DriftAccumulator:
    """Mean frames of the first and the last `window` seconds of a video of any length, fed
    chunk by chunk (`add(frames)`), in bounded memory: the first window's sum, the last
    2 windows as 1-second block sums, and the PSNR of each complete window against the
    first. `result()` as `drift`. A video shorter than two windows is split in halves."""

    def __init__(self, fps: float = FPS, window: float = 10.0):
        from collections import deque

        self.fps, self.window = float(fps), float(window)
        self.nb = max(1, int(round(window)))  # blocks per window
        self.block = max(1, int(round(window * fps / self.nb)))  # frames per block
        self.per = self.nb * self.block
        self.blocks = deque(maxlen=2 * self.nb + 1)  # [sum, count] of the latest blocks
        self.first: np.ndarray | None = None  # mean frame of the first window
        self.cur: np.ndarray | None = None  # running sum of the current window
        self.cur_n = 0
        self.window_psnr: list[float] = []
        self.n = 0

    def add(self, frames) -> None:
        frames = np.asarray(frames)
        if frames.ndim == 3:
            frames = frames[None]
        for f in frames:
            f = f.astype(np.float64)
            if self.n % self.block == 0:
                self.blocks.append([np.zeros_like(f), 0])
            self.blocks[-1][0] += f
            self.blocks[-1][1] += 1
            self.cur = f.copy() if self.cur is None else self.cur + f
            self.cur_n += 1
            self.n += 1
            if self.cur_n == self.per:
                mean = self.cur / self.per
                if self.first is None:
                    self.first = mean
                else:
                    self.window_psnr.append(psnr(self.first, mean))
                self.cur, self.cur_n = None, 0

    def _mean(self, blocks) -> np.ndarray:
        return sum(b[0] for b in blocks) / max(1, sum(b[1] for b in blocks))

    def result(self) -> dict:
        if self.n == 0:
            raise ValueError("drift: no frames")
        blocks = list(self.blocks)
        note = ""
        if self.n >= 2 * self.per:
            first = self.first
            last_blocks, k = [], 0
            for b in reversed(blocks):  # the latest blocks holding about one window of frames
                if k >= self.per:
                    break
                last_blocks.append(b)
                k += b[1]
            last = self._mean(last_blocks)
        else:  # every block is still held: split the frames in two halves (by block)
            half = max(1, len(blocks) // 2)
            first = self._mean(blocks[:half])
            last = self._mean(blocks[half:]) if len(blocks) > 1 else first
            note = f"shorter than two {self.window:g} s windows: first half vs second half"
        luma = np.array([0.299, 0.587, 0.114])
        m0, m1 = first.reshape(-1, 3).mean(0), last.reshape(-1, 3).mean(0)
        return {
            "seconds": self.n / self.fps,
            "window_seconds": self.window,
            "psnr_first_last": psnr(first, last),
            "rgb_mean_first": [float(v) for v in m0],
            "rgb_mean_last": [float(v) for v in m1],
            "rgb_shift": [float(v) for v in (m1 - m0)],
            "brightness_shift": float((m1 - m0) @ luma),
            "psnr_by_window": list(self.window_psnr),
            "note": note,
        }


def drift(frames, fps: float = FPS, window: float = 10.0) -> dict:
    """PSNR between the mean frames of the first and last `window` seconds, RGB / brightness
    shift (last - first, 0..255 units), PSNR of every window against the first."""
    acc = DriftAccumulator(fps, window)
    acc.add(frames)
    return acc.result()


def lipsync_in_speech(signal: np.ndarray, envelope: np.ndarray, speech: np.ndarray, max_lag: int = MAX_LAG) -> dict:
    """`lipsync`, or no lag and NaN correlations when fewer than `MIN_SPEECH_FRAMES` frames are
    speech or the signal has fewer readable (finite) frames: there is nothing to measure."""
    ls = lipsync(signal, envelope, max_lag)
    if speech.sum() < MIN_SPEECH_FRAMES or np.isfinite(signal).sum() < MIN_SPEECH_FRAMES:
        nan = float("nan")
        ls = {"lag": None, "confidence": nan, "corr_at_0": nan, "corr_by_lag": {k: nan for k in ls["corr_by_lag"]}}
    return ls


def evaluate_signals(mouth: np.ndarray, audio, max_lag: int = MAX_LAG, corr_by_lag: bool = False) -> dict:
    """Lip-sync and stillness of a per-frame mouth signal against its audio."""
    T = len(mouth)
    speech, silence, thr = speech_frames(audio, T)
    ls = lipsync_in_speech(mouth, speech_envelope(audio, T), speech, max_lag)
    st = stillness(mouth, speech, silence)
    return {"lag": ls["lag"], "confidence": ls["confidence"], "corr_at_0": ls["corr_at_0"],
            "stillness_ratio": st["ratio"], "stillness": st, "silence_threshold_db": thr,
            "frames": T, **({"corr_by_lag": ls["corr_by_lag"]} if corr_by_lag else {})}


def pool_lipsync(per_clip: list[dict]) -> dict:
    """Pool per-clip lip-sync figures (each with ``corr_by_lag``, ``frames``, ``lag``,
    ``confidence``): the lag of the frame-weighted mean correlation-vs-lag curve and its
    correlation, the curve at lag 0, the mean of per-clip best correlations, the fraction of
    clips whose own best lag is within 2 frames and how many clips had one. {} without curves."""
    per_clip = [m for m in per_clip if m and m.get("corr_by_lag")]
    if not per_clip:
        return {}
    curve = {}
    for L in sorted(per_clip[0]["corr_by_lag"]):
        vals = [(m["corr_by_lag"][L], m["frames"]) for m in per_clip if math.isfinite(m["corr_by_lag"][L])]
        curve[L] = sum(v * w for v, w in vals) / sum(w for _, w in vals) if vals else float("nan")
    valid = {k: v for k, v in curve.items() if math.isfinite(v)}
    best = max(valid, key=lambda k: (valid[k], -abs(k))) if valid else None
    conf = [m["confidence"] for m in per_clip if m.get("confidence") is not None and math.isfinite(m["confidence"])]
    clags = [m["lag"] for m in per_clip if m.get("lag") is not None]
    return {
        "lag": best, "confidence": valid.get(best, float("nan")) if best is not None else float("nan"),
        "corr_at_0": curve.get(0, float("nan")),
        "mean_clip_confidence": float(np.mean(conf)) if conf else float("nan"),
        "clips_lag_within_2": float(np.mean([abs(v) <= 2 for v in clags])) if clags else float("nan"),
        "clips_with_lipsync": len(clags),
    }


def summarize_signals(per_clip: list[dict]) -> dict:
    """Pool per-clip `evaluate_signals(..., corr_by_lag=True)` figures: `pool_lipsync`, the
    median stillness ratio and the mean silence motion by phase."""
    per_clip = [m for m in per_clip if m is not None]
    if not per_clip:
        return {}
    still = [m["stillness_ratio"] for m in per_clip if m["stillness_ratio"] is not None]
    phases = np.array([m["stillness"]["motion_silence_by_phase"] for m in per_clip
                       if (m.get("stillness") or {}).get("motion_silence_by_phase")], np.float64)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a phase without silence in any clip: NaN
        by_phase = np.nanmean(phases, axis=0).tolist() if len(phases) else None
    return {
        **pool_lipsync(per_clip),
        "stillness_ratio_median": float(np.median(still)) if still else None,
        "stillness_ratio_clips": len(still),
        "silence_motion_by_phase": by_phase,
        "clips": len(per_clip),
    }
