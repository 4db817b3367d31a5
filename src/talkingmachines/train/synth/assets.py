"""Pictures and sounds made from the generator: a contact sheet of random faces (`preview`)
and the bundled portrait and speech (`default_portrait`, `make_assets`)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from ...audio_io import write_wav
from ...config import SAMPLE_RATE
from .face import FaceParams, FaceState, framed
from .render import FaceRenderer
from .speech import _trim, espeak_tts


def preview(path: str | Path, n: int = 16, seed: int = 0, size: int = 128, cols: int | None = None,
            styles: tuple[str, ...] | None = None, version: int = 1) -> Path:
    """Contact sheet PNG of `n` random faces in random states (mouths open in about half), framed
    as data `version` frames them."""
    rng = np.random.default_rng(seed)
    cols = cols or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    sheet = Image.new("RGB", (cols * size, rows * size), (255, 255, 255))
    for k in range(n):
        st = None if styles is None else styles[k % len(styles)]
        p = framed(FaceParams.sample(int(rng.integers(2**31)), style=st), version)
        s = FaceState(mouth_open=float(rng.choice([0.0, rng.uniform(0.3, 1.0)])), mouth_round=float(rng.random()),
                      blink=float(rng.choice([0.0, 0.0, 0.0, 1.0])), dx=float(rng.uniform(-0.02, 0.02)),
                      tilt=float(rng.uniform(-3, 3)), gaze_x=float(rng.uniform(-1, 1)))
        img = FaceRenderer(p, size).render(s)
        sheet.paste(Image.fromarray(img), ((k % cols) * size, (k // cols) * size))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path

PORTRAIT_SEED = 13  # see make_assets / assets/README.md
SPEECH_TEXT = ("Hello! I am a talking machine. I listen, then I answer.",
               "My lips move with the speech I hear.")


def default_portrait(version: int = 1, portrait_seed: int = PORTRAIT_SEED, size: int = 512) -> np.ndarray:
    """The bundled portrait [size, size, 3] uint8: a photo-like human face in the neutral state,
    framed as data `version` frames its faces (the shipped model's data version)."""
    p = framed(FaceParams.sample(portrait_seed, style="photo", human=True), version)
    return FaceRenderer(p, size).render(FaceState())


def make_assets(out_dir: str | Path, portrait_seed: int = PORTRAIT_SEED, version: int = 1,
                speech: bool = True) -> None:
    """Re-create the bundled assets: portrait.png (512x512, photo-like, framed as data `version`)
    and, with `speech`, speech.wav."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    Image.fromarray(default_portrait(version, portrait_seed)).save(out / "portrait.png")
    if not speech:
        return
    a = espeak_tts(SPEECH_TEXT[0], "en-us", 165, 45)
    b = espeak_tts(SPEECH_TEXT[1], "en-us", 165, 45)
    a, b = _trim(a), _trim(b)
    pad = np.zeros(int(0.25 * SAMPLE_RATE), np.float32)
    gap = np.zeros(int(1.0 * SAMPLE_RATE), np.float32)
    x = np.concatenate([pad, a, gap, b, pad])
    x = x * (0.5 / max(1e-6, float(np.abs(x).max())))
    write_wav(out / "speech.wav", x)
