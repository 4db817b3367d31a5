"""The mouth drive: per video frame, how far the mouth opens and how round it is, from the
speech (`mouth_drive`)."""

from __future__ import annotations

import numpy as np

from ...config import SAMPLE_RATE, SAMPLES_PER_FRAME
from ...model.audio import frame_rms

# level that opens the mouth fully (RMS of a 40 ms frame); utterances are normalised to
# an RMS of 0.05..0.11 over their voiced part
MOUTH_REF_RMS = 0.13
MOUTH_GATE_RMS = 0.006


def mouth_drive(audio: np.ndarray, speaking: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per video frame (640 samples): mouth_open from the smoothed RMS energy, mouth_round
    from the spectral balance (energy below 1 kHz vs 1-4 kHz: 'o'/'u' high, 'e'/'i' and
    fricatives low). Both are zero in silence; where `speaking` is given, they are forced
    to zero outside it."""
    T = len(audio) // SAMPLES_PER_FRAME
    fr = audio[: T * SAMPLES_PER_FRAME].reshape(T, SAMPLES_PER_FRAME).astype(np.float32)
    rms = frame_rms(fr, T)
    raw = np.clip((rms - MOUTH_GATE_RMS) / (MOUTH_REF_RMS - MOUTH_GATE_RMS), 0, 1) ** 0.8
    # attack / release smoothing (fast open, slower close)
    mo = np.zeros(T, np.float32)
    prev = 0.0
    for t in range(T):
        a = 0.75 if raw[t] > prev else 0.5
        prev = prev + a * (raw[t] - prev)
        mo[t] = prev
    mo[mo < 0.02] = 0.0
    # spectral balance
    spec = np.abs(np.fft.rfft(fr * np.hanning(SAMPLES_PER_FRAME)[None, :].astype(np.float32), axis=1)) ** 2
    freqs = np.fft.rfftfreq(SAMPLES_PER_FRAME, 1.0 / SAMPLE_RATE)
    lo = spec[:, (freqs >= 150) & (freqs < 1000)].sum(1)
    hi = spec[:, (freqs >= 1000) & (freqs < 4000)].sum(1)
    lr = np.log10((lo + 1e-9) / (hi + 1e-9))
    rd = np.clip((lr - 0.3) / 1.2, 0, 1)
    sm = np.copy(rd)
    for t in range(1, T):
        sm[t] = sm[t - 1] + 0.6 * (rd[t] - sm[t - 1])
    mr = (sm * np.clip(mo / 0.15, 0, 1)).astype(np.float32)
    if speaking is not None:
        mo = np.where(speaking, mo, 0).astype(np.float32)
        mr = np.where(speaking, mr, 0).astype(np.float32)
    return mo.astype(np.float32), mr.astype(np.float32)
