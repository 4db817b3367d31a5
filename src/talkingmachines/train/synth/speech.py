"""Synthetic speech: `espeak_tts` (espeak-ng, resampled to 16 kHz) or `babble_tts` (a pure
numpy formant synthesiser, the fallback when espeak-ng is missing), random sentences, and
one utterance at a random loudness (`_utterance`)."""

from __future__ import annotations

import io
import shutil
import subprocess
import wave

import numpy as np

from ...config import SAMPLE_RATE
from ...errors import InputError

ESPEAK_VOICES = (
    "en", "en-us", "en+f3", "en+m3", "en+f2", "en+m7", "en-us+f4", "en+klatt",
    "en-gb-x-rp", "en+f5", "fr", "de", "es", "it", "pt", "nl", "fr+f3", "de+m3", "es+f2",
)

_EN_WORDS = (
    "the a and to of in is you that it he she was for on are with as I his they be at one have "
    "this from or had by word but what some we can out other were all there when up use your how "
    "said an each which do their time if will way about many then them write would like so these "
    "her long make thing see him two has look more day could go come did number sound no most "
    "people my over know water than call first who may down side been now find any new work part "
    "take get place made live where after back little only round man year came show every good me "
    "give our under name very through just form sentence great think say help low line differ turn "
    "cause much mean before move right boy old too same tell does set three want air well also play "
    "small end put home read hand port large spell add even land here must big high such follow act "
    "why ask men change went light kind off need house picture try us again animal point mother world "
    "near build self earth father head stand own page should country found answer school grow study "
    "still learn plant cover food sun four between state keep eye never last let thought city tree "
    "cross farm hard start might story saw far sea draw left late run while press close night real "
    "life few north open seem together next white children begin got walk example ease paper group "
    "always music those both mark often letter until mile river car feet care second book carry took "
    "science eat room friend began idea fish mountain stop once base hear horse cut sure watch colour "
    "face wood main enough plain girl usual young ready above ever red list though feel talk bird soon "
    "body dog family direct pose leave song measure door product black short numeral class wind "
    "question happen complete ship area half rock order fire south problem piece told knew pass since "
    "top whole king space heard best hour better true during hundred five remember step early hold "
    "west ground interest reach fast verb sing listen six table travel less morning ten simple several "
    "vowel toward war lay against pattern slow centre love person money serve appear road map rain rule"
).split()
_ONSETS = ["", "b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z", "ch", "sh",
           "br", "tr", "pl", "st", "gr", "kl"]
_NUCLEI = ["a", "e", "i", "o", "u", "ou", "ai", "ee", "oo", "au"]
_CODAS = ["", "", "", "n", "m", "s", "t", "l", "r", "k"]


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def _require_espeak() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise InputError(
            "espeak-ng is not installed (needed for synthetic speech); install it with "
            "`apt-get install espeak-ng` (or `brew install espeak-ng`), or use speech='babble' "
            "for the built-in numpy babble synthesiser"
        )
    return exe


def random_sentence(rng: np.random.Generator, lang: str = "en", n_words: tuple[int, int] = (3, 11)) -> str:
    """A random sentence: English words for 'en' voices, pronounceable pseudo-words otherwise."""
    n = int(rng.integers(n_words[0], n_words[1] + 1))
    if lang.startswith("en") and rng.random() < 0.85:
        words = [_EN_WORDS[int(rng.integers(len(_EN_WORDS)))] for _ in range(n)]
    else:
        words = []
        for _ in range(n):
            syl = int(rng.integers(1, 4))
            words.append("".join(
                _ONSETS[int(rng.integers(len(_ONSETS)))] + _NUCLEI[int(rng.integers(len(_NUCLEI)))]
                + _CODAS[int(rng.integers(len(_CODAS)))] for _ in range(syl)))
    # a comma now and then makes a short pause inside the utterance
    if n > 5 and rng.random() < 0.5:
        k = int(rng.integers(2, n - 2))
        words[k] = words[k] + ","
    s = " ".join(words)
    return s[0].upper() + s[1:] + str(rng.choice([".", ".", "?", "!"]))


def resample(x: np.ndarray, sr_in: int, sr_out: int = SAMPLE_RATE) -> np.ndarray:
    """Resample mono float32 audio with PyAV's (libswresample) resampler."""
    if sr_in == sr_out or len(x) == 0:
        return x.astype(np.float32)
    import av

    r = av.AudioResampler(format="flt", layout="mono", rate=sr_out)
    fr = av.AudioFrame.from_ndarray(np.ascontiguousarray(x, dtype=np.float32)[None, :], format="flt", layout="mono")
    fr.sample_rate = sr_in
    out = [f.to_ndarray().reshape(-1) for f in r.resample(fr)]
    out += [f.to_ndarray().reshape(-1) for f in r.resample(None)]
    y = np.concatenate(out) if out else np.zeros(0, np.float32)
    n = int(round(len(x) * sr_out / sr_in))
    if len(y) < n:
        y = np.pad(y, (0, n - len(y)))
    return y[:n].astype(np.float32)


def espeak_tts(text: str, voice: str = "en", rate: int = 165, pitch: int = 50) -> np.ndarray:
    """Speak `text` with espeak-ng; float32 mono at 16 kHz.

    voice: an espeak-ng voice such as en, en-us, en+f3, fr, de; rate: words per minute
    (80..450); pitch: 0..99. Raises InputError when espeak-ng is missing."""
    exe = _require_espeak()
    cmd = [exe, "-v", voice, "-s", str(int(rate)), "-p", str(int(pitch)), "--stdout", text]
    try:
        res = subprocess.run(cmd, capture_output=True, timeout=60, check=True)
    except subprocess.CalledProcessError as e:
        raise InputError(f"espeak-ng failed for voice {voice!r}: {e.stderr.decode(errors='replace').strip()}") from e
    with wave.open(io.BytesIO(res.stdout)) as w:
        sr = w.getframerate()
        raw = w.readframes(w.getnframes())
        ch = w.getnchannels()
    x = np.frombuffer(raw, dtype=np.int16).astype(np.float32) / 32768.0
    if ch > 1:
        x = x.reshape(-1, ch).mean(1)
    return resample(x, sr, SAMPLE_RATE)


# formants (F1, F2, F3) in Hz of a few vowels; the last value is the "roundness" label
_VOWELS = {
    "a": (800, 1200, 2500), "e": (500, 1900, 2500), "i": (300, 2300, 3000),
    "o": (500, 850, 2400), "u": (320, 800, 2300), "ae": (650, 1700, 2500), "er": (500, 1350, 1700),
}


def babble_tts(rng: np.random.Generator, seconds: float | None = None, n_syllables: int | None = None,
               f0: float | None = None) -> np.ndarray:
    """Pure numpy speech-like babble (no espeak needed): syllables of a consonant (noise
    burst or nasal hum) and a vowel made of f0 harmonics shaped by formant peaks, with a
    falling pitch contour, jitter and word gaps. float32 mono at 16 kHz."""
    sr = SAMPLE_RATE
    if n_syllables is None:
        sec = seconds if seconds is not None else rng.uniform(1.0, 3.0)
        n_syllables = max(1, int(sec / 0.2))
    f0 = f0 if f0 is not None else float(rng.uniform(90, 240))
    out = []
    total = n_syllables
    names = list(_VOWELS)
    for i in range(total):
        prog = i / max(1, total - 1)
        cons = rng.choice(["none", "fric", "stop", "nasal"], p=[0.2, 0.3, 0.3, 0.2])
        if cons == "fric":
            n = int(sr * rng.uniform(0.05, 0.11))
            nz = rng.normal(0, 1, n)
            nz = np.diff(nz, prepend=0)  # high-pass: hiss
            if rng.random() < 0.5:
                nz = np.diff(nz, prepend=0)
            env = np.sin(np.linspace(0, np.pi, n)) ** 0.7
            out.append((nz / (np.abs(nz).max() + 1e-6) * env * rng.uniform(0.05, 0.15)).astype(np.float32))
        elif cons == "stop":
            out.append(np.zeros(int(sr * rng.uniform(0.02, 0.05)), np.float32))
            n = int(sr * 0.015)
            out.append((rng.normal(0, 0.15, n) * np.exp(-np.linspace(0, 5, n))).astype(np.float32))
        elif cons == "nasal":
            n = int(sr * rng.uniform(0.04, 0.08))
            t = np.arange(n) / sr
            out.append((0.08 * np.sin(2 * np.pi * f0 * t) * np.sin(np.linspace(0, np.pi, n))).astype(np.float32))
        # vowel
        n = int(sr * rng.uniform(0.08, 0.22))
        v = _VOWELS[names[int(rng.integers(len(names)))]]
        fz = np.array(v, np.float32) * rng.uniform(0.9, 1.15)
        pitch = f0 * (1.15 - 0.3 * prog) * (1 + 0.08 * np.sin(np.linspace(0, np.pi, n) + rng.uniform(0, 6)))
        pitch = pitch * (1 + 0.01 * rng.normal(0, 1, n).cumsum() / np.sqrt(n))
        phase = 2 * np.pi * np.cumsum(pitch) / sr
        H = int(4000 / f0)
        h = np.arange(1, H + 1, dtype=np.float32)[:, None]
        fh = h * pitch[None, :]
        amp = np.zeros_like(fh)
        for k, (F, bw) in enumerate(zip(fz, (90, 120, 180))):
            amp += (1.0 / (2 ** k)) / (1 + ((fh - F) / bw) ** 2)
        amp *= 1.0 / (1 + fh / 1500)  # spectral tilt
        amp[fh > 7000] = 0
        sig = (amp * np.sin(h * phase[None, :])).sum(0)
        env = np.minimum(1, np.minimum(np.arange(n), np.arange(n)[::-1]) / (0.02 * sr))
        sig = sig / (np.abs(sig).max() + 1e-6) * env * rng.uniform(0.3, 0.6)
        out.append(sig.astype(np.float32))
        if rng.random() < 0.25 and i < total - 1:  # a word gap
            out.append(np.zeros(int(sr * rng.uniform(0.04, 0.15)), np.float32))
    x = np.concatenate(out)
    if seconds is not None:
        x = x[: int(seconds * sr)]
    return x.astype(np.float32)


def _trim(x: np.ndarray, pad: int = int(0.04 * SAMPLE_RATE), thresh: float = 0.01) -> np.ndarray:
    idx = np.nonzero(np.abs(x) > thresh)[0]
    if len(idx) == 0:
        return x[:0]
    return x[max(0, idx[0] - pad): idx[-1] + pad]


def _cut_quiet(x: np.ndarray, max_len: int) -> np.ndarray:
    """Shorten `x` to at most `max_len` samples, cutting at the quietest 20 ms in the last
    40% of the allowed length, with a short fade-out."""
    if len(x) <= max_len:
        return x
    w = 320
    lo = int(0.6 * max_len) // w
    hi = max_len // w
    e = (x[: hi * w].reshape(hi, w) ** 2).mean(1)
    k = lo + int(np.argmin(e[lo:hi])) if hi > lo else hi
    y = x[: max(k, 1) * w + w // 2].copy()
    f = min(len(y), 160)
    y[-f:] *= np.linspace(1, 0, f, dtype=np.float32)
    return y



def _utterance(rng: np.random.Generator, source: str, voice: str, rate: int, pitch: int, f0: float):
    if source == "espeak":
        lang = voice.split("+")[0]
        text = random_sentence(rng, lang)
        x = espeak_tts(text, voice, rate, pitch)
    else:
        text = None
        x = babble_tts(rng, seconds=rng.uniform(0.8, 3.0), f0=f0)
    x = _trim(x)
    if len(x) == 0:
        return x, text
    # normalise the voiced part to a random loudness
    fr = x[: len(x) // 320 * 320].reshape(-1, 320)
    r = np.sqrt((fr**2).mean(1))
    voiced = r[r > 0.25 * r.max()] if len(r) else r
    level = float(np.sqrt((voiced**2).mean())) if len(voiced) else 1.0
    x = x * (rng.uniform(0.05, 0.11) / max(level, 1e-6))
    x = np.clip(x, -0.99, 0.99)
    return x.astype(np.float32), text
