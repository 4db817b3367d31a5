"""Procedural talking-face data set for the `tiny` preset.

There is no real talking-head data in this project, so the tiny model is trained on clips
that are drawn here: faces of varied shape, colour and drawing style (flat cartoon,
outlined cartoon, shaded, photo-like) whose mouths open and change shape with speech,
that blink, move their heads a little, and close their mouths while listening.

Pieces, bottom up:

* `FaceParams.sample(seed)`: one identity (shape, colours, hair, style, ...).
* `FaceState`: what changes per frame (mouth_open, mouth_round, blink, head dx/dy/tilt,
  brow, gaze).
* `FaceRenderer(params, size)`: draws the static layers once (background, body, head with
  hair and shading) and composes a frame per state; `render_face(params, state, size)` is a
  cached shortcut.
* Speech: `espeak_tts` (espeak-ng, resampled to 16 kHz) or `babble_tts` (a pure numpy
  formant synthesiser, the fallback when espeak-ng is missing).
* `mouth_drive(audio)`: per video frame (640 samples) mouth opening from the smoothed RMS
  energy and mouth roundness from the spectral balance; both zero in silence.
* `make_clip(seed, seconds, size)`: turns of speech and silence, blinks, idle and speaking
  head motion -> `Clip` (T = 1 + 4k frames, audio T * 640 samples).
* `synth_dataset(n, out_dir)`: writes `clip_XXXXX.mp4` (for people), `clip_XXXXX.npz`
  (for training) and `index.json`; resumable, atomic writes.
* `preview(path)`: a contact sheet of random faces.

Run `talkingmachines data synth --help` for the command line.
"""

from __future__ import annotations

import colorsys
import dataclasses
import functools
import io
import json
import math
import os
import shutil
import subprocess
import wave
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from ..config import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME, VAE_TEMPORAL
from ..errors import InputError

STYLES = ("flat", "outline", "shaded", "photo")
HAIR_STYLES = ("bald", "short", "long", "bob", "spiky", "afro", "bun", "mohawk")
NOSE_STYLES = ("none", "dot", "line", "triangle", "nostrils")
ESPEAK_VOICES = (
    "en", "en-us", "en+f3", "en+m3", "en+f2", "en+m7", "en-us+f4", "en+klatt",
    "en-gb-x-rp", "en+f5", "fr", "de", "es", "it", "pt", "nl", "fr+f3", "de+m3", "es+f2",
)

Color = tuple[int, int, int]

# --------------------------------------------------------------------------------------
# Identity
# --------------------------------------------------------------------------------------

_SKIN_HUMAN = [
    (255, 224, 196), (241, 194, 165), (224, 172, 135), (198, 134, 96), (161, 102, 68),
    (125, 80, 54), (94, 60, 42), (236, 188, 150), (250, 210, 180), (180, 120, 85),
]
_HAIR_HUMAN = [
    (20, 16, 14), (45, 32, 24), (85, 55, 32), (120, 80, 45), (170, 120, 70), (215, 180, 110),
    (235, 215, 160), (150, 60, 30), (185, 90, 45), (140, 140, 140), (215, 215, 210), (60, 40, 35),
]
_EYES_HUMAN = [(70, 45, 25), (110, 70, 35), (60, 100, 150), (80, 130, 170), (70, 110, 70),
               (110, 110, 120), (40, 30, 25)]
_LIPSTICK = [(190, 40, 60), (150, 30, 50), (210, 90, 110), (120, 40, 90), (220, 60, 40)]


def _hsv(h: float, s: float, v: float) -> Color:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0), 1), min(max(v, 0), 1))
    return (int(r * 255), int(g * 255), int(b * 255))


def _jitter(c: Color, rng: np.random.Generator, amt: float = 12) -> Color:
    return tuple(int(np.clip(v + rng.normal(0, amt), 0, 255)) for v in c)  # type: ignore[return-value]


def _mix(a: Color, b: Color, t: float) -> Color:
    return tuple(int(round(x * (1 - t) + y * t)) for x, y in zip(a, b))  # type: ignore[return-value]


def _scale(c: Color, f: float) -> Color:
    return tuple(int(np.clip(v * f, 0, 255)) for v in c)  # type: ignore[return-value]


def _lum(c: Color) -> float:
    return (0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]) / 255.0


@dataclass(frozen=True)
class FaceParams:
    """One identity. Geometry is in units of the image side (0..1); colours are RGB."""

    seed: int = 0
    style: str = "flat"
    human: bool = True
    # head geometry
    cx: float = 0.5
    cy: float = 0.46
    face_w: float = 0.27  # half width
    face_aspect: float = 1.25  # half height / half width
    jaw: float = 0.85  # 1 round chin, smaller pointier
    ears: bool = True
    # colours
    skin: Color = (241, 194, 165)
    hair: Color = (45, 32, 24)
    eye_color: Color = (70, 45, 25)
    eye_white: Color = (245, 245, 240)
    lip: Color = (200, 110, 110)
    mouth_inner: Color = (70, 20, 25)
    teeth: Color = (245, 240, 230)
    tongue: Color = (200, 90, 100)
    brow_color: Color = (40, 30, 25)
    cloth: Color = (60, 80, 140)
    bg1: Color = (180, 200, 220)
    bg2: Color = (120, 140, 170)
    outline: Color = (25, 20, 20)
    # parts
    hair_style: str = "short"
    hairline: float = 0.45  # fraction of face half-height above the centre
    eye_size: float = 0.22  # half width, fraction of face_w
    eye_aspect: float = 0.65
    eye_spacing: float = 0.42  # eye centre offset, fraction of face_w
    eye_y: float = 0.08  # above centre, fraction of face half-height
    iris: float = 0.55  # iris radius / eye half height
    brow_thick: float = 0.05  # fraction of face_w
    brow_tilt: float = 0.0
    nose: str = "line"
    mouth_w: float = 0.38  # half width, fraction of face_w
    mouth_y: float = 0.45  # below centre, fraction of face half-height
    lip_thick: float = 0.16  # fraction of mouth half width
    max_open: float = 0.34  # max inner opening, fraction of face half-height
    smile: float = 0.1
    glasses: bool = False
    glasses_color: Color = (30, 30, 30)
    blush: bool = False
    bg_kind: str = "flat"  # flat | gradient | stripes | dots | blobs
    light: float = 0.0  # light direction (radians)
    noise: float = 0.0  # photo texture amplitude (0..255 units)
    outline_w: float = 0.012  # outline width, fraction of image side

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FaceParams":
        names = {f.name: f for f in dataclasses.fields(cls)}
        kw = {}
        for k, v in d.items():
            if k in names:
                kw[k] = tuple(v) if isinstance(v, list) else v
        return cls(**kw)

    @classmethod
    def sample(cls, seed: int, style: str | None = None, human: bool | None = None) -> "FaceParams":
        """Draw a random identity. `style` in STYLES; `human` forces natural colours."""
        rng = np.random.default_rng([int(seed), 7919])
        if style is None:
            style = str(rng.choice(STYLES, p=[0.25, 0.25, 0.25, 0.25]))
        if style not in STYLES:
            raise InputError(f"unknown face style {style!r}; choose one of {', '.join(STYLES)}")
        if human is None:
            human = bool(rng.random() < (0.85 if style == "photo" else 0.5))
        pick = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731

        if human:
            skin = _jitter(pick(_SKIN_HUMAN), rng, 10)
            hair = _jitter(pick(_HAIR_HUMAN), rng, 10)
            eye = _jitter(pick(_EYES_HUMAN), rng, 10)
            lip = _mix(skin, (170, 60, 70), rng.uniform(0.3, 0.55))
            if rng.random() < 0.2:
                lip = _jitter(pick(_LIPSTICK), rng, 10)
        else:
            hs = rng.random()
            skin = _hsv(hs, rng.uniform(0.25, 0.8), rng.uniform(0.55, 0.95))
            hair = _hsv(rng.random(), rng.uniform(0.4, 1.0), rng.uniform(0.2, 0.95))
            eye = _hsv(rng.random(), rng.uniform(0.4, 1.0), rng.uniform(0.2, 0.8))
            lip = _hsv(rng.random(), rng.uniform(0.4, 0.9), rng.uniform(0.3, 0.8))
            if abs(_lum(lip) - _lum(skin)) < 0.12:
                lip = _scale(lip, 0.55)
        # the lips must stand out from the skin so the model can see the mouth
        if abs(_lum(lip) - _lum(skin)) < 0.08 and sum(abs(a - b) for a, b in zip(lip, skin)) < 90:
            lip = _scale(lip, 0.7 if _lum(skin) > 0.4 else 1.5)
        mouth_inner = _jitter((60, 15, 22), rng, 10) if rng.random() < 0.8 else _jitter((25, 15, 15), rng, 5)
        if _lum(skin) < 0.3:  # very dark skin: lighter inner mouth so the opening still reads
            mouth_inner = _jitter((120, 30, 45), rng, 10)
        if sum(abs(a - b) for a, b in zip(hair, skin)) < 110:  # hair must not melt into the face
            hair = _scale(hair, 0.45) if _lum(hair) > 0.35 else _mix(hair, (235, 225, 200), 0.6)
        brow = _scale(hair, 0.8) if rng.random() < 0.8 else _jitter((40, 30, 25), rng, 8)
        if abs(_lum(brow) - _lum(skin)) < 0.12:
            brow = _scale(skin, 0.45)

        bg_kind = {
            "flat": pick(["flat", "flat", "stripes", "dots", "gradient"]),
            "outline": pick(["flat", "flat", "stripes", "dots", "gradient"]),
            "shaded": pick(["gradient", "gradient", "blobs", "flat"]),
            "photo": pick(["blobs", "blobs", "gradient"]),
        }[style]
        bgh = rng.random()
        if style == "photo" and rng.random() < 0.6:
            bg1 = _hsv(bgh, rng.uniform(0.05, 0.35), rng.uniform(0.35, 0.9))
        else:
            bg1 = _hsv(bgh, rng.uniform(0.1, 0.8), rng.uniform(0.3, 0.98))
        bg2 = _hsv(bgh + rng.uniform(-0.15, 0.15), rng.uniform(0.1, 0.8), rng.uniform(0.2, 0.9))
        # keep the face off a background of the same colour
        if sum(abs(a - b) for a, b in zip(bg1, skin)) < 80:
            bg1 = _scale(bg1, 0.55 if _lum(bg1) > 0.5 else 1.6)
        cloth = _hsv(rng.random(), rng.uniform(0.1, 0.9), rng.uniform(0.15, 0.9))

        face_w = rng.uniform(0.23, 0.30)
        face_aspect = rng.uniform(1.1, 1.4)
        hair_style = pick(HAIR_STYLES)
        return cls(
            seed=int(seed), style=style, human=human,
            cx=0.5 + rng.uniform(-0.04, 0.04), cy=0.45 + rng.uniform(-0.03, 0.03),
            face_w=face_w, face_aspect=face_aspect, jaw=rng.uniform(0.55, 1.0),
            ears=bool(rng.random() < 0.75),
            skin=skin, hair=hair, eye_color=eye,
            eye_white=_jitter((245, 245, 240), rng, 5) if rng.random() < 0.9 else _hsv(rng.random(), 0.2, 0.95),
            lip=lip, mouth_inner=mouth_inner, teeth=_jitter((245, 240, 228), rng, 5),
            tongue=_jitter((205, 95, 105), rng, 10), brow_color=brow, cloth=cloth,
            bg1=bg1, bg2=bg2,
            outline=_jitter((25, 20, 20), rng, 5) if rng.random() < 0.8 else _scale(skin, 0.35),
            hair_style=hair_style, hairline=rng.uniform(0.35, 0.6),
            eye_size=rng.uniform(0.17, 0.28), eye_aspect=rng.uniform(0.5, 0.85),
            eye_spacing=rng.uniform(0.36, 0.5), eye_y=rng.uniform(0.0, 0.16),
            iris=rng.uniform(0.45, 0.85), brow_thick=rng.uniform(0.035, 0.08),
            brow_tilt=rng.uniform(-0.25, 0.25), nose=pick(NOSE_STYLES),
            mouth_w=rng.uniform(0.3, 0.46), mouth_y=rng.uniform(0.42, 0.52),
            lip_thick=rng.uniform(0.1, 0.22), max_open=rng.uniform(0.28, 0.38),
            smile=rng.uniform(-0.05, 0.3),
            glasses=bool(rng.random() < 0.15), glasses_color=_hsv(rng.random(), rng.uniform(0, 0.8), rng.uniform(0.05, 0.6)),
            blush=bool(rng.random() < (0.5 if style in ("flat", "outline") else 0.15)),
            bg_kind=bg_kind, light=rng.uniform(-math.pi, math.pi),
            noise=rng.uniform(4, 9) if style == "photo" else 0.0,
            outline_w=rng.uniform(0.008, 0.016),
        )


@dataclass
class FaceState:
    """Per-frame state. Offsets dx, dy are fractions of the image side; tilt in degrees."""

    mouth_open: float = 0.0  # 0 closed .. 1 widest
    mouth_round: float = 0.0  # 0 wide ('e') .. 1 round ('o')
    blink: float = 0.0  # 0 open .. 1 closed
    dx: float = 0.0
    dy: float = 0.0
    tilt: float = 0.0
    brow: float = 0.0  # 0 rest .. 1 raised
    gaze_x: float = 0.0  # -1..1
    gaze_y: float = 0.0


# --------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------


def _ellipse_pts(cx, cy, rx, ry, a0=0.0, a1=2 * math.pi, n=48):
    t = np.linspace(a0, a1, n)
    return list(zip((cx + rx * np.cos(t)).tolist(), (cy + ry * np.sin(t)).tolist()))


def _blur_np(a: np.ndarray, radius: float) -> np.ndarray:
    """Gaussian blur of a float [H,W] array in 0..1 via PIL (8-bit precision is enough)."""
    img = Image.fromarray(np.clip(a * 255, 0, 255).astype(np.uint8))
    return np.asarray(img.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float32) / 255.0


class FaceRenderer:
    """Draws frames of one identity: the static layers are built once, per frame only the
    eyes, brows and mouth are drawn, the head is moved and the result downsampled."""

    def __init__(self, params: FaceParams, size: int = 128, supersample: int = 2):
        if size < 16:
            raise InputError(f"face size must be at least 16 px, got {size}")
        self.p = params
        self.size = int(size)
        self.ss = int(supersample)
        self.S = self.size * self.ss
        self._rng = np.random.default_rng([params.seed, 104729])
        p, S = params, self.S
        self.fw = p.face_w * S
        self.fh = self.fw * p.face_aspect
        self.cx, self.cy = p.cx * S, p.cy * S
        self.ow = max(1, round(p.outline_w * S)) if p.style == "outline" else 0
        self.bg = self._background()
        self.head = self._head_layer()
        # the head layer only covers part of the canvas: transform that part only
        a = np.asarray(self.head)[..., 3]
        ys, xs = np.nonzero(a)
        m = int(0.08 * S)
        self.box = (max(0, xs.min() - m), max(0, ys.min() - m), min(S, xs.max() + m + 1), min(S, ys.max() + m + 1))
        self.head_crop = self.head.crop(self.box)
        # world-space lighting on the (static) background, sensor grain per frame (photo)
        self.grain = None
        if p.style in ("shaded", "photo"):
            yy, xx = np.mgrid[0:S, 0:S].astype(np.float32) / S - 0.5
            lx, ly = math.cos(p.light), math.sin(p.light)
            lm = 1.0 + 0.24 * (xx * lx + yy * ly)
            lm *= 1.0 - 0.35 * (xx**2 + yy**2) * (1.0 if p.style == "photo" else 0.5)  # vignette
            bg = np.asarray(self.bg, dtype=np.float32) * lm[..., None]
            self.bg = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
        if p.style == "photo":
            g = np.clip(self._rng.normal(128, 2.5, size=(4, self.size, self.size, 1)), 0, 255).astype(np.uint8)
            self.grain = [Image.fromarray(np.repeat(gi, 3, axis=2)) for gi in g]
        self._frame_i = 0

    # ---- static layers -------------------------------------------------------------
    def _background(self) -> Image.Image:
        p, S, rng = self.p, self.S, self._rng
        kind = p.bg_kind
        if kind == "gradient":
            t = np.linspace(0, 1, S, dtype=np.float32)[:, None, None]
            ang = rng.uniform(0, math.pi)
            yy, xx = np.mgrid[0:S, 0:S].astype(np.float32) / S
            t = (xx * math.cos(ang) + yy * math.sin(ang))
            t = (t - t.min()) / (t.max() - t.min() + 1e-6)
            arr = (np.array(p.bg1, np.float32) * (1 - t[..., None]) + np.array(p.bg2, np.float32) * t[..., None])
            img = Image.fromarray(arr.astype(np.uint8))
        else:
            img = Image.new("RGB", (S, S), p.bg1)
            d = ImageDraw.Draw(img)
            if kind == "stripes":
                w = rng.uniform(0.04, 0.12) * S
                vertical = rng.random() < 0.5
                for i in range(int(S / w) + 2):
                    if i % 2:
                        x0 = i * w
                        d.rectangle([x0, 0, x0 + w, S] if vertical else [0, x0, S, x0 + w], fill=p.bg2)
            elif kind == "dots":
                step = rng.uniform(0.08, 0.16) * S
                r = step * rng.uniform(0.12, 0.3)
                for iy in range(int(S / step) + 2):
                    for ix in range(int(S / step) + 2):
                        x = ix * step + (step / 2 if iy % 2 else 0)
                        d.ellipse([x - r, iy * step - r, x + r, iy * step + r], fill=p.bg2)
            elif kind == "blobs":  # a blurred "room": soft shapes of related colours
                for _ in range(int(rng.integers(6, 14))):
                    c = _mix(p.bg1, p.bg2, rng.random())
                    c = _jitter(c, rng, 25)
                    x, y = rng.uniform(0, S, 2)
                    w, h = rng.uniform(0.1, 0.5, 2) * S
                    if rng.random() < 0.5:
                        d.rectangle([x - w / 2, y - h / 2, x + w / 2, y + h / 2], fill=c)
                    else:
                        d.ellipse([x - w / 2, y - h / 2, x + w / 2, y + h / 2], fill=c)
                img = img.filter(ImageFilter.GaussianBlur(S * rng.uniform(0.02, 0.05)))
        d = ImageDraw.Draw(img)
        # neck and shoulders (static: the head moves over them)
        cx, cy, fw, fh = self.cx, self.cy, self.fw, self.fh
        neck_w = fw * 0.42
        neck_c = _scale(p.skin, 0.82) if p.style != "flat" else _scale(p.skin, 0.9)
        ol = dict(outline=p.outline, width=self.ow) if self.ow else {}
        sh_top = cy + fh * 1.18
        d.ellipse([cx - fw * 2.1, sh_top, cx + fw * 2.1, sh_top + fh * 2.2], fill=p.cloth, **ol)
        d.rectangle([cx - neck_w, cy + fh * 0.5, cx + neck_w, sh_top + fh * 0.12], fill=neck_c, **ol)
        # collar
        d.polygon(_ellipse_pts(cx, sh_top + fh * 0.1, neck_w * 1.4, fh * 0.22, 0, math.pi, 24), fill=neck_c)
        if p.style in ("shaded", "photo"):
            # shading on the clothes
            arr = np.asarray(img, dtype=np.float32)
            yy = np.arange(S, dtype=np.float32)[:, None, None]
            arr = arr * np.clip(1.0 - 0.25 * np.clip((yy - sh_top) / (S - sh_top + 1), 0, 1), 0, 1)
            img = Image.fromarray(arr.astype(np.uint8))
        if p.style == "photo":
            img = img.filter(ImageFilter.GaussianBlur(0.6 * self.ss))
        return img

    def _face_polygon(self, scale: float = 1.0):
        cx, cy = self.cx, self.cy
        fw, fh = self.fw * scale, self.fh * scale
        t = np.linspace(0, 2 * math.pi, 72, endpoint=False)
        s = np.sin(t)
        x = fw * np.cos(t) * np.where(s > 0, 1 - (1 - self.p.jaw) * s**2 * 0.9, 1.0)
        y = fh * s
        return list(zip((cx + x).tolist(), (cy + y).tolist()))

    def _head_layer(self) -> Image.Image:
        p, S, rng = self.p, self.S, self._rng
        cx, cy, fw, fh = self.cx, self.cy, self.fw, self.fh
        img = Image.new("RGBA", (S, S), (0, 0, 0, 0))
        d = ImageDraw.Draw(img)
        ol = dict(outline=p.outline + (255,), width=self.ow) if self.ow else {}
        hair = p.hair + (255,)
        skin = p.skin + (255,)
        hs = p.hair_style
        top = cy - fh * 1.06
        # back hair
        if hs == "long":
            d.rounded_rectangle([cx - fw * 1.18, top, cx + fw * 1.18, cy + fh * rng.uniform(1.0, 1.5)],
                                radius=fw * 0.6, fill=hair, **ol)
        elif hs == "bob":
            d.rounded_rectangle([cx - fw * 1.2, top, cx + fw * 1.2, cy + fh * 0.55], radius=fw * 0.7, fill=hair, **ol)
        elif hs == "afro":
            r = fw * rng.uniform(1.45, 1.7)
            d.ellipse([cx - r, cy - fh * 0.45 - r, cx + r, cy - fh * 0.45 + r], fill=hair, **ol)
        elif hs == "bun":
            r = fw * 0.45
            d.ellipse([cx - r, top - r * 1.4, cx + r, top + r * 0.6], fill=hair, **ol)
        # ears
        if p.ears:
            ec = _scale(p.skin, 0.92)
            for sgn in (-1, 1):
                ex = cx + sgn * fw * 0.97
                d.ellipse([ex - fw * 0.15, cy - fh * 0.12, ex + fw * 0.15, cy + fh * 0.22], fill=ec + (255,), **ol)
        # face
        d.polygon(self._face_polygon(), fill=skin, **ol)
        # nose (static)
        ny = cy + fh * 0.2
        nc = _scale(p.skin, 0.72) + (255,)
        lw = max(1, int(S * 0.008))
        if p.nose == "dot":
            r = fw * 0.05
            d.ellipse([cx - r, ny - r, cx + r, ny + r], fill=nc)
        elif p.nose == "line":
            d.line([(cx + fw * 0.02, cy - fh * 0.05), (cx - fw * 0.07, ny + fh * 0.02), (cx + fw * 0.05, ny + fh * 0.05)],
                   fill=nc, width=lw, joint="curve")
        elif p.nose == "triangle":
            d.polygon([(cx, cy - fh * 0.06), (cx - fw * 0.1, ny + fh * 0.05), (cx + fw * 0.1, ny + fh * 0.05)],
                      fill=_scale(p.skin, 0.88) + (255,))
        elif p.nose == "nostrils":
            r = fw * 0.035
            for sgn in (-1, 1):
                x = cx + sgn * fw * 0.07
                d.ellipse([x - r, ny - r * 0.7, x + r, ny + r * 0.7], fill=nc)
        if p.blush:
            bc = _mix(p.skin, (240, 100, 120), 0.45) + (255,)
            for sgn in (-1, 1):
                x = cx + sgn * fw * 0.58
                y = cy + fh * 0.25
                d.ellipse([x - fw * 0.15, y - fh * 0.06, x + fw * 0.15, y + fh * 0.06], fill=bc)
        # front hair: the top of the head down to the hairline
        if hs != "bald":
            hl = cy - fh * p.hairline
            rx, ry = fw * 1.07, fh * 1.08
            pts = [(x, y) for x, y in _ellipse_pts(cx, cy, rx, ry, math.pi, 2 * math.pi, 60) if y <= hl]
            if pts:
                xl, xr = pts[0][0], pts[-1][0]
                if hs == "spiky":
                    top_pts = []
                    n = 9
                    for i, (x, y) in enumerate(_ellipse_pts(cx, cy, rx, ry, math.pi * 1.05, math.pi * 1.95, 2 * n + 1)):
                        if i % 2:
                            k = 1.0 + rng.uniform(0.15, 0.35)
                            top_pts.append((cx + (x - cx) * k, cy + (y - cy) * k))
                        else:
                            top_pts.append((x, y))
                    pts = [pts[0]] + top_pts + [pts[-1]]
                elif hs == "mohawk":
                    pts = [(x, y) for x, y in pts if abs(x - cx) < fw * 0.25]
                    pts = [(cx - fw * 0.25, hl)] + [(x, y - fh * 0.25) for x, y in pts] + [(cx + fw * 0.25, hl)]
                    xl, xr = cx - fw * 0.25, cx + fw * 0.25
                # the lower edge: a fringe (bangs) or a side parting
                edge = []
                if hs in ("short", "long", "bob", "bun", "afro", "spiky"):
                    part = rng.uniform(-0.4, 0.4)
                    n = 8
                    for i in range(n + 1):
                        t = i / n
                        x = xr + (xl - xr) * t
                        bump = math.sin(t * math.pi) * fh * rng.uniform(0.0, 0.12)
                        if hs == "spiky" and i % 2:
                            bump += fh * 0.08
                        y = hl + bump * (1 if (t > 0.5 + part * 0.5) else 0.6)
                        edge.append((x, y))
                d.polygon(pts + edge, fill=hair, **ol)
                # side locks down over the temples for long styles
                if hs in ("long", "bob"):
                    for sgn in (-1, 1):
                        x0 = cx + sgn * fw * 1.1
                        x1 = cx + sgn * fw * 0.82
                        d.polygon([(x0, hl - fh * 0.2), (x1, hl), (x1 + sgn * fw * 0.05, cy + fh * 0.3), (x0, cy + fh * 0.5)],
                                  fill=hair)
        # shading, texture (baked into the layer so it moves with the head)
        if p.style in ("shaded", "photo"):
            arr = np.asarray(img).astype(np.float32)
            alpha = arr[..., 3] / 255.0
            edge = _blur_np(alpha, fw * 0.18)
            yy, xx = np.mgrid[0:S, 0:S].astype(np.float32)
            lx, ly = math.cos(p.light), math.sin(p.light)
            dirl = ((xx - cx) * lx + (yy - cy) * ly) / fw
            shade = (0.62 + 0.38 * edge) * (1.0 + 0.14 * np.clip(dirl, -1.5, 1.5))
            # soft shadow under the chin on the neck is done in the background pass; here a
            # slight darkening of the lower face
            shade *= 1.0 - 0.08 * np.clip((yy - cy) / fh, 0, 1)
            # a soft highlight on the lit side of the forehead and cheek
            fm = Image.new("L", (S, S), 0)
            ImageDraw.Draw(fm).polygon(self._face_polygon(0.97), fill=255)
            hx, hy = cx + 0.35 * fw * lx, cy - 0.25 * fh + 0.2 * fh * ly
            spot = np.exp(-(((xx - hx) / (0.45 * fw)) ** 2 + ((yy - hy) / (0.6 * fh)) ** 2))
            shade += 0.12 * spot * (np.asarray(fm, dtype=np.float32) / 255.0)
            arr[..., :3] *= shade[..., None]
            if p.noise > 0:
                nz = self._rng.normal(0, p.noise, size=(S, S, 1)).astype(np.float32)
                nz = nz + _blur_np(np.clip(self._rng.random((S, S)) * 1.0, 0, 1), 2 * self.ss)[..., None] * p.noise
                arr[..., :3] += nz
            arr[..., :3] = np.clip(arr[..., :3], 0, 255)
            img = Image.fromarray(arr.astype(np.uint8), "RGBA")
            if p.style == "photo":
                # soft chin shadow: a dark blurred ellipse behind the head on the neck
                sh = Image.new("L", (S, S), 0)
                ImageDraw.Draw(sh).ellipse([cx - fw * 0.5, cy + fh * 0.7, cx + fw * 0.5, cy + fh * 1.15], fill=110)
                sh = sh.filter(ImageFilter.GaussianBlur(fw * 0.12))
                base = Image.new("RGBA", (S, S), (0, 0, 0, 0))
                base.putalpha(sh)
                base.alpha_composite(img)
                img = base
        return img

    # ---- per frame -----------------------------------------------------------------
    def _draw_features(self, d: ImageDraw.ImageDraw, st: FaceState, ox: float, oy: float) -> None:
        """Eyes, brows, mouth, glasses; coordinates shifted by (-ox, -oy) (crop origin)."""
        p = self.p
        cx, cy, fw, fh = self.cx - ox, self.cy - oy, self.fw, self.fh
        ow = self.ow
        olc = p.outline
        S = self.S
        # --- eyes
        ew = fw * p.eye_size
        eh = ew * p.eye_aspect
        ey = cy - fh * p.eye_y
        blink = min(max(st.blink, 0.0), 1.0)
        open_h = eh * (1.0 - blink)
        for sgn in (-1, 1):
            ex = cx + sgn * fw * p.eye_spacing
            if open_h < eh * 0.18:
                w = max(1, int(S * 0.012))
                d.line([(ex - ew, ey), (ex - ew * 0.4, ey + eh * 0.18), (ex + ew * 0.4, ey + eh * 0.18), (ex + ew, ey)],
                       fill=_scale(p.skin, 0.45), width=w, joint="curve")
                continue
            top, bot = ey - open_h, ey + open_h
            d.ellipse([ex - ew, top, ex + ew, bot], fill=p.eye_white, outline=olc if ow else None, width=ow)
            r = eh * p.iris
            ix = ex + st.gaze_x * (ew - r) * 0.6
            iy = ey + st.gaze_y * eh * 0.2
            it, ib = max(iy - r, top + (1 if ow else 0)), min(iy + r, bot - (1 if ow else 0))
            if ib > it:
                d.ellipse([ix - r, it, ix + r, ib], fill=p.eye_color)
                pr = r * 0.5
                pt, pb = max(iy - pr, top), min(iy + pr, bot)
                if pb > pt:
                    d.ellipse([ix - pr, pt, ix + pr, pb], fill=(12, 10, 10))
                hr = r * 0.25
                if iy - r * 0.35 - hr > top:
                    hx, hy = ix + r * 0.3, iy - r * 0.35
                    d.ellipse([hx - hr, hy - hr, hx + hr, hy + hr], fill=(255, 255, 255))
            if p.style != "flat":  # upper lid line
                lw = max(1, int(S * 0.008))
                d.line(_ellipse_pts(ex, ey, ew, open_h, math.radians(195), math.radians(345), 10),
                       fill=_scale(p.skin, 0.4), width=lw, joint="curve")
        # --- brows
        bt = fw * p.brow_thick
        by = ey - eh * 1.45 - st.brow * fh * 0.07
        for sgn in (-1, 1):
            bx = cx + sgn * fw * p.eye_spacing
            tl = p.brow_tilt * ew
            inner = (bx - sgn * ew * 0.9, by + tl)
            outer = (bx + sgn * ew * 1.05, by - tl * 0.5 + bt * 0.3)
            mid = (bx + sgn * ew * 0.1, by - bt * 0.8)
            d.line([inner, mid, outer], fill=p.brow_color, width=max(1, int(bt)), joint="curve")
        # --- mouth
        mo = min(max(st.mouth_open, 0.0), 1.0)
        mr = min(max(st.mouth_round, 0.0), 1.0)
        mx, my = cx, cy + fh * p.mouth_y
        hw = fw * p.mouth_w * (1.0 - 0.38 * mr)  # round 'o' is narrower
        opening = mo * fh * p.max_open * (1.0 + 0.25 * mr)
        lt = max(fw * p.mouth_w * p.lip_thick, S * 0.008)
        up = opening * 0.3  # the jaw drops: most of the opening goes down
        dn = opening * 0.7
        smile = p.smile * fh * 0.08 * (1.0 - mo)
        if opening < S * 0.01:  # closed: lips and a line between them
            d.ellipse([mx - hw, my - lt, mx + hw, my + lt * 1.1], fill=p.lip,
                      outline=olc if ow else None, width=ow)
            lw = max(1, int(S * 0.009))
            d.line([(mx - hw * 0.98, my - smile), (mx - hw * 0.4, my + smile * 0.3), (mx, my + smile * 0.4),
                    (mx + hw * 0.4, my + smile * 0.3), (mx + hw * 0.98, my - smile)],
                   fill=_mix(p.mouth_inner, p.lip, 0.3), width=lw, joint="curve")
            return self._glasses(d, cx, cy, ey, ew, eh)
        box = [mx - hw, my - up - lt, mx + hw, my + dn + lt * 1.1]
        d.ellipse(box, fill=p.lip, outline=olc if ow else None, width=ow)
        iw = hw * (0.82 - 0.1 * mr)
        inner = [mx - iw, my - up, mx + iw, my + dn]
        d.ellipse(inner, fill=p.mouth_inner)
        ih = (dn + up) / 2
        # teeth: a band at the top of the opening
        if ih > S * 0.012:
            tb = min(ih * 0.45, S * 0.018)
            ang = math.asin(max(-1.0, min(1.0, 1 - tb / ih)))
            d.polygon(_ellipse_pts(mx, (dn - up) / 2 + my, iw, ih, math.pi + ang, 2 * math.pi - ang, 16), fill=p.teeth)
            tg = min(ih * 0.55, S * 0.03)
            ang = math.asin(max(-1.0, min(1.0, 1 - tg / ih)))
            d.polygon(_ellipse_pts(mx, (dn - up) / 2 + my, iw, ih, ang, math.pi - ang, 16), fill=p.tongue)
        self._glasses(d, cx, cy, ey, ew, eh)

    def _glasses(self, d, cx, cy, ey, ew, eh):
        p = self.p
        if not p.glasses:
            return
        w = max(1, int(self.S * 0.012))
        r = ew * 1.35
        for sgn in (-1, 1):
            ex = cx + sgn * self.fw * p.eye_spacing
            d.ellipse([ex - r, ey - r * 0.8, ex + r, ey + r * 0.8], outline=p.glasses_color, width=w)
        gap = self.fw * p.eye_spacing - r
        d.line([(cx - gap, ey - r * 0.2), (cx + gap, ey - r * 0.2)], fill=p.glasses_color, width=w)

    def render(self, state: FaceState) -> np.ndarray:
        """One frame, uint8 [size, size, 3]."""
        x0, y0, x1, y1 = self.box
        head = self.head_crop.copy()
        self._draw_features(ImageDraw.Draw(head), state, x0, y0)
        S = self.S
        tx, ty = state.dx * S, state.dy * S
        px, py = self.cx - x0, self.cy + self.fh * 0.9 - y0  # pivot: the neck
        th = math.radians(state.tilt)
        c, s = math.cos(th), math.sin(th)
        # output -> input mapping (PIL AFFINE), within the crop box's own coordinates
        coeffs = (c, s, -c * (px + tx) - s * (py + ty) + px, -s, c, s * (px + tx) - c * (py + ty) + py)
        head = head.transform(head.size, Image.AFFINE, coeffs, resample=Image.NEAREST)
        frame = self.bg.copy()
        frame.paste(head, (x0, y0), head)
        if self.ss > 1:
            frame = frame.reduce(self.ss)
        if self.grain is not None:
            frame = ImageChops.add(frame, self.grain[self._frame_i % len(self.grain)], 1.0, -128)
            self._frame_i += 1
        out = np.asarray(frame)
        return out


def clip_box(y0, y1, x0, x1, H, W) -> tuple[int, int, int, int]:
    """A box in pixels (y0, y1, x0, x1; half-open) widened to whole pixels and clipped to an
    H x W frame; ValueError when less than 2 pixels are left on a side."""
    y0, x0 = max(0, int(math.floor(y0))), max(0, int(math.floor(x0)))
    y1, x1 = min(H, int(math.ceil(y1))), min(W, int(math.ceil(x1)))
    if y1 - y0 < 2 or x1 - x0 < 2:
        raise ValueError(f"empty mouth ROI {(y0, y1, x0, x1)} for a {H}x{W} frame")
    return y0, y1, x0, x1


def mouth_roi_from_face(face, height: int, width: int | None = None, margin: float = 0.03) -> tuple[int, int, int, int]:
    """The ROI that holds a synthetic face's mouth at any opening, from its `FaceParams`
    (or the `face` dict stored in a clip's metadata), plus `margin` (fraction of the side)
    for head motion. Assumes the square frames `FaceRenderer` draws."""
    if not isinstance(face, dict):
        face = dataclasses.asdict(face)
    width = width or height
    fw = face["face_w"]
    fh = fw * face["face_aspect"]
    mx, my = face["cx"], face["cy"] + fh * face["mouth_y"]
    hw = fw * face["mouth_w"]
    lt = max(fw * face["mouth_w"] * face["lip_thick"], 0.008)
    opening = fh * face["max_open"] * 1.25
    y0, y1 = my - 0.3 * opening - lt - margin, my + 0.7 * opening + 1.1 * lt + margin
    x0, x1 = mx - hw - margin, mx + hw + margin
    return clip_box(y0 * height, y1 * height, x0 * width, x1 * width, height, width)


@functools.lru_cache(maxsize=8)
def _renderer(params: FaceParams, size: int) -> FaceRenderer:
    return FaceRenderer(params, size)


def render_face(params: FaceParams, state: FaceState | None = None, size: int = 128) -> np.ndarray:
    """Draw one frame of `params` in `state` (uint8 [size, size, 3]); renderers are cached."""
    return _renderer(params, int(size)).render(state or FaceState())


# --------------------------------------------------------------------------------------
# Speech
# --------------------------------------------------------------------------------------

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
    rms = np.sqrt((fr.astype(np.float64) ** 2).mean(1))
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


# --------------------------------------------------------------------------------------
# Clips
# --------------------------------------------------------------------------------------


@dataclass
class Clip:
    frames: np.ndarray  # uint8 [T, H, W, 3]
    audio: np.ndarray  # float32 [T * 640] at 16 kHz
    mouth_open: np.ndarray  # float32 [T]
    mouth_round: np.ndarray  # float32 [T]
    speaking: np.ndarray  # bool [T]
    params: dict = field(default_factory=dict)  # identity + clip metadata (json-able)

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])


def clip_frames_for(seconds: float) -> int:
    """Frame count of 1 + 4k frames closest to `seconds` at 25 fps."""
    k = max(1, int(round((seconds * FPS - 1) / VAE_TEMPORAL)))
    return 1 + VAE_TEMPORAL * k


def _smooth_noise(rng: np.random.Generator, T: int, sigma: float) -> np.ndarray:
    n = rng.normal(0, 1, T + int(6 * sigma))
    k = np.exp(-0.5 * (np.arange(-3 * sigma, 3 * sigma + 1) / sigma) ** 2)
    s = np.convolve(n, k / k.sum(), mode="same")[: T]
    return (s / (s.std() + 1e-8)).astype(np.float32)


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


DATA_VERSIONS = (1, 2, 3)
# per close-up version: head-motion amplitude (v1's varies with speech), max opening x v1's
_HEAD_AMP = {2: 1.6, 3: 0.55}
_OPEN_SCALE = {2: 1.3, 3: 1.55}


def head_motion(rng: np.random.Generator, speaking: np.ndarray, mouth_open: np.ndarray, version: int = 1):
    """Per-frame head offsets dx, dy (image fractions), tilt (degrees) and brow raise: slow
    smooth noise. v1: larger while speaking, with nods and brow raises that follow the mouth.
    v2: the same whatever is said (the amplitude of v1's average), so that loudness drives the
    mouth and nothing else. v3: as v2 at a third of the amplitude, so that the mouth, not the
    head, holds most of what changes from frame to frame (the teacher learns what explains most
    of its loss first; in v2 the opening explained 4 % of the latents' change over time)."""
    T = len(speaking)
    spk_s = np.convolve(speaking.astype(np.float32), np.ones(13) / 13, mode="same")
    amp = 1.0 + 1.2 * spk_s if version == 1 else np.full(T, _HEAD_AMP[version], np.float32)
    head_amp = float(rng.uniform(0.5, 1.5))
    dx = 0.010 * head_amp * _smooth_noise(rng, T, 15) * amp
    dy = 0.007 * head_amp * _smooth_noise(rng, T, 12) * amp
    tilt = 2.0 * head_amp * _smooth_noise(rng, T, 20) * amp
    emph = np.convolve(mouth_open, np.ones(7) / 7, mode="same")
    brow_speech = 0.6 * np.convolve(mouth_open, np.ones(9) / 9, mode="same") ** 2 * rng.uniform(0, 1.5)
    brow_idle = 0.25 * np.clip(_smooth_noise(rng, T, 25), 0, None) * rng.uniform(0, 1)
    if version == 1:
        return dx, dy + 0.008 * emph, tilt, np.clip(brow_speech + brow_idle, 0, 1)
    return dx, dy, tilt, np.clip(brow_idle, 0, 1)


def framed(params: FaceParams, version: int) -> FaceParams:
    """The identity as data `version` frames it. 1: as drawn by `FaceParams.sample`. 2: a
    FaceTime close-up: the face 1.3x larger, centred a little lower, and the mouth opening up
    to 1.3x wider, so the mouth covers more of the 8x8-pixel VAE cells and the DiT's 16x16
    tokens (at 128 px a v1 mouth is about 2 tokens wide and opens by less than one). 3: as 2
    with the mouth opening up to 1.55x v1's (and a third of v2's head motion, `head_motion`)."""
    if version == 1:
        return params
    if version not in DATA_VERSIONS:
        raise InputError(f"unknown data version {version}; choose one of {', '.join(map(str, DATA_VERSIONS))}")
    return dataclasses.replace(params, face_w=params.face_w * 1.3, cy=params.cy + 0.06,
                               max_open=params.max_open * _OPEN_SCALE[version])


def make_clip(seed: int, seconds: float = 6.0, size: int = 128, speech: str = "auto",
              babble_frac: float = 0.15, listen_frac: float | None = None,
              face: FaceParams | None = None, version: int = 1) -> Clip:
    """One clip: a random identity speaking in turns with listening pauses.

    speech: 'espeak' (raises InputError when espeak-ng is missing), 'babble' (numpy
    synthesiser), or 'auto' (espeak-ng when installed, with `babble_frac` of the clips
    babble for variety; babble only when it is missing). T = 1 + 4k frames.
    version: 1, the original data; 2, a close-up face (`framed`) whose head motion and brows
    do not follow the speech, so that loudness explains the mouth and nothing else (in v1,
    head motion was 2.2x larger while speaking and nods and brows followed loudness: a model
    could lower its loss by moving the head instead of opening the mouth)."""
    rng = np.random.default_rng([int(seed), 15485863])
    T = clip_frames_for(seconds)
    N = T * SAMPLES_PER_FRAME
    if speech == "auto":
        source = "espeak" if espeak_available() and rng.random() >= babble_frac else "babble"
    elif speech in ("espeak", "babble"):
        source = speech
        if source == "espeak":
            _require_espeak()
    else:
        raise InputError(f"speech must be 'auto', 'espeak' or 'babble', got {speech!r}")
    params = framed(face if face is not None else FaceParams.sample(seed), version)

    # --- speech turns and listening
    voice = str(rng.choice(ESPEAK_VOICES))
    rate = int(rng.uniform(130, 210))
    pitch = int(rng.uniform(20, 80))
    f0 = float(rng.uniform(90, 240))
    if listen_frac is None:
        u = rng.random()
        listen_frac = 1.0 if u < 0.05 else (0.0 if u < 0.1 else float(rng.uniform(0.25, 0.55)))
    speech_track = np.zeros(N, np.float32)
    turn = np.zeros(N, bool)
    texts = []
    pos = 0
    speaking_turn = bool(rng.random() < 0.5) if 0 < listen_frac < 1 else listen_frac < 1
    last_len = int(2.0 * SAMPLE_RATE)
    while pos < N:
        if listen_frac >= 1:
            break
        if speaking_turn:
            x, text = _utterance(rng, source, voice, rate, pitch, f0)
            if 0 < listen_frac < 1:  # leave room for listening: cut long utterances in a quiet spot
                x = _cut_quiet(x, int(max(0.6 * SAMPLE_RATE, (1 - listen_frac) * N * rng.uniform(0.45, 0.8))))
            n = min(len(x), N - pos)
            speech_track[pos: pos + n] = x[:n]
            turn[pos: pos + n] = True
            if text:
                texts.append(text)
            pos += n
            last_len = max(n, 1)
            # within a turn, a short breath between utterances sometimes
            if rng.random() < 0.3 and listen_frac > 0:
                pos += int(rng.uniform(0.15, 0.4) * SAMPLE_RATE)
                continue
        else:
            if listen_frac <= 0:
                pos += int(rng.uniform(0.1, 0.3) * SAMPLE_RATE)
            else:
                d = last_len * listen_frac / (1 - listen_frac) * rng.uniform(0.6, 1.4)
                pos += int(np.clip(d, 0.4 * SAMPLE_RATE, 4.0 * SAMPLE_RATE))
        speaking_turn = not speaking_turn
    # a speech frame is one whose 640 samples are mostly inside an utterance
    speaking = turn.reshape(T, SAMPLES_PER_FRAME).mean(1) > 0.3

    # room noise (the model should learn to ignore it)
    noise_amp = float(rng.uniform(0.0, 0.004))
    audio = speech_track + rng.normal(0, 1, N).astype(np.float32) * noise_amp
    if rng.random() < 0.3:  # a hum now and then
        t = np.arange(N) / SAMPLE_RATE
        audio += (rng.uniform(0.0, 0.003) * np.sin(2 * np.pi * rng.choice([50, 60]) * t)).astype(np.float32)
    audio = np.clip(audio, -1, 1).astype(np.float32)

    mouth_open, mouth_round = mouth_drive(speech_track, speaking)

    # --- blinks
    blink = np.zeros(T, np.float32)
    t = int(rng.uniform(0.3, 3.0) * FPS)
    while t < T:
        dur = int(rng.integers(4, 7))
        prof = np.sin(np.linspace(0, np.pi, dur + 2)[1:-1]) ** 0.6
        prof = prof / prof.max()
        blink[t: t + dur] = np.maximum(blink[t: t + dur], prof[: max(0, min(dur, T - t))])
        t += dur + int(rng.uniform(2.0, 5.0) * FPS)

    dx, dy, tilt, brow = head_motion(rng, speaking, mouth_open, version)
    # gaze: fixations with saccades
    gx = np.zeros(T, np.float32)
    gy = np.zeros(T, np.float32)
    t = 0
    while t < T:
        d = int(rng.uniform(0.5, 2.5) * FPS)
        gx[t: t + d] = rng.normal(0, 0.35)
        gy[t: t + d] = rng.normal(0, 0.3)
        t += d

    # --- render
    renderer = FaceRenderer(params, size)
    frames = np.empty((T, size, size, 3), np.uint8)
    for i in range(T):
        st = FaceState(mouth_open=float(mouth_open[i]), mouth_round=float(mouth_round[i]), blink=float(blink[i]),
                       dx=float(dx[i]), dy=float(dy[i]), tilt=float(tilt[i]), brow=float(brow[i]),
                       gaze_x=float(np.clip(gx[i], -1, 1)), gaze_y=float(np.clip(gy[i], -1, 1)))
        frames[i] = renderer.render(st)

    meta = dict(
        seed=int(seed), frames=T, fps=FPS, sample_rate=SAMPLE_RATE, size=size,
        speech_source=source, voice=voice if source == "espeak" else None,
        rate=rate if source == "espeak" else None, pitch=pitch if source == "espeak" else None,
        f0=f0 if source == "babble" else None, texts=texts,
        listen_frac_target=float(listen_frac), listen_frac=float(1 - speaking.mean()),
        face=params.to_dict(), data_version=int(version),
    )
    return Clip(frames=frames, audio=audio, mouth_open=mouth_open, mouth_round=mouth_round,
                speaking=speaking, params=meta)


# --------------------------------------------------------------------------------------
# Data set on disk
# --------------------------------------------------------------------------------------


def _clip_seed(seed: int, i: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(i)]).generate_state(1)[0])


def _atomic_npz(path: Path, **arrays) -> None:
    from ..fileio import atomic_savez

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
        from ..media import write_mp4

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
    if version not in DATA_VERSIONS:
        raise InputError(f"unknown data version {version}; choose one of {', '.join(map(str, DATA_VERSIONS))}")
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
    from ..fileio import atomic_write_text

    atomic_write_text(idx, json.dumps(index, indent=1))
    return idx


# --------------------------------------------------------------------------------------
# Previews and assets
# --------------------------------------------------------------------------------------


def preview(path: str | Path, n: int = 16, seed: int = 0, size: int = 128, cols: int | None = None,
            styles: tuple[str, ...] | None = None) -> Path:
    """Contact sheet PNG of `n` random faces in random states (mouths open in about half)."""
    rng = np.random.default_rng(seed)
    cols = cols or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    sheet = Image.new("RGB", (cols * size, rows * size), (255, 255, 255))
    for k in range(n):
        st = None if styles is None else styles[k % len(styles)]
        p = FaceParams.sample(int(rng.integers(2**31)), style=st)
        s = FaceState(mouth_open=float(rng.choice([0.0, rng.uniform(0.3, 1.0)])), mouth_round=float(rng.random()),
                      blink=float(rng.choice([0.0, 0.0, 0.0, 1.0])), dx=float(rng.uniform(-0.02, 0.02)),
                      tilt=float(rng.uniform(-3, 3)), gaze_x=float(rng.uniform(-1, 1)))
        img = FaceRenderer(p, size).render(s)
        sheet.paste(Image.fromarray(img), ((k % cols) * size, (k // cols) * size))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def write_wav(path: str | Path, audio: np.ndarray, sr: int = SAMPLE_RATE) -> None:
    """16-bit PCM mono wav."""
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes(pcm.tobytes())


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
