"""The bundled speech as samples, read (and written, `write_wav`) with the standard library (no PyAV).

Benchmarks, the GPU checks and the compile warm-up need a stretch of realistic speech on
machines that have PyTorch but not PyAV (a lent GPU box); the asset is a plain 16 kHz mono
PCM16 WAV, which `wave` + numpy read exactly. User files of any format go through
`media.load_audio` (PyAV).
"""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np

from .config import SAMPLE_RATE

SPEECH_WAV = Path(__file__).resolve().parent / "assets" / "speech.wav"


def read_wav(path: str | Path) -> np.ndarray:
    """A PCM16 WAV at 16 kHz -> float32 mono in [-1, 1] (channels averaged)."""
    with wave.open(str(path), "rb") as w:
        if w.getsampwidth() != 2 or w.getframerate() != SAMPLE_RATE:
            raise ValueError(f"{path}: expected 16-bit PCM at {SAMPLE_RATE} Hz, got {8 * w.getsampwidth()}-bit "
                             f"at {w.getframerate()} Hz (use media.load_audio for other audio)")
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").reshape(-1, w.getnchannels())
    return (pcm.astype(np.float32) / 32768.0).mean(axis=1)


def write_wav(path: str | Path, audio: np.ndarray, sr: int = SAMPLE_RATE) -> None:
    """16-bit PCM mono wav (the format `read_wav` reads)."""
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes(pcm.tobytes())


def speech_like(seconds: float, sr: int = SAMPLE_RATE, seed: int = 0) -> np.ndarray:
    """The bundled speech, looped to `seconds` (modulated noise if the asset is missing)."""
    n = int(seconds * sr)
    if SPEECH_WAV.exists() and sr == SAMPLE_RATE:
        return np.resize(read_wav(SPEECH_WAV), n).astype(np.float32)
    rng = np.random.default_rng(seed)
    env = (np.sin(np.arange(n) / sr * 2 * np.pi * 3) > 0).astype(np.float32)
    return (0.2 * env * rng.standard_normal(n)).astype(np.float32)
