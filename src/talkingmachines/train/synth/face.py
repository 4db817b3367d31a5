"""Who is drawn: one identity (`FaceParams`: shape, colours, hair, style, ...), what changes
per frame (`FaceState`), and how each data version frames an identity (`framed`)."""

from __future__ import annotations

import colorsys
import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from ...errors import InputError

STYLES = ("flat", "outline", "shaded", "photo")
HAIR_STYLES = ("bald", "short", "long", "bob", "spiky", "afro", "bun", "mohawk")
NOSE_STYLES = ("none", "dot", "line", "triangle", "nostrils")
Color = tuple[int, int, int]

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


# colour helpers (the renderer uses them too)
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


SKIN_BANDS = (("dark", 0.40), ("medium", 0.65), ("light", float("inf")))  # skin colour luminance, upper bounds


def skin_band(face: dict) -> str | None:
    """The band of a face's skin colour luminance (Rec. 601, 0..1; `FaceParams.to_dict` or a
    clip's ``face`` metadata), None without a skin colour. Eval pools its figures by it, and
    training can repeat the dark clips (`TrainConfig.dark_skin_repeat`)."""
    rgb = face.get("skin")
    if not rgb:
        return None
    return next(name for name, top in SKIN_BANDS if _lum(tuple(rgb)) < top)


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
    # data version 4's facial structure (0 / False: as versions 1-3 draw it)
    contour: float = 0.0  # strength of the soft shadows of eye sockets, nose and lower lip
    lid_line: bool = False  # an upper lid line in every style (1-3: not in flat)
    closed_line: float = 1.0  # the closed mouth's line: width and darkness scale
    mouth_outline: bool = True  # outline style: a dark ring round the lips too
    # data version 5's mouth: "lens" (lips meeting in pointed corners, a thin upper and a full
    # lower lip, the opening no taller than `open_aspect` x its width) or "ellipse" (1-4)
    mouth_shape: str = "ellipse"
    open_aspect: float = 10.0

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



DATA_VERSIONS = (1, 2, 3, 4, 5, 6, 7, 8)
# per close-up version: max opening x v1's (head-motion amplitude: `clip._HEAD_AMP`)
_OPEN_SCALE = {2: 1.3, 3: 1.55, 4: 1.55, 5: 1.0, 6: 1.55, 7: 1.55, 8: 1.0}
# version 5's mouth colours: the inside no lighter than this luminance, the lips at least this
# much lighter than the inside, lightened toward LIP_LIGHT when they are not
INNER_MAX_LUM, LIP_OVER_INNER, LIP_LIGHT = 0.1, 0.3, (235, 150, 140)


def check_data_version(version: int) -> None:
    """InputError unless `version` is one of DATA_VERSIONS."""
    if version not in DATA_VERSIONS:
        raise InputError(f"unknown data version {version}; choose one of {', '.join(map(str, DATA_VERSIONS))}")


def framed(params: FaceParams, version: int) -> FaceParams:
    """The identity as data `version` frames it. 1: as drawn by `FaceParams.sample`. 2: a
    FaceTime close-up: the face 1.3x larger, centred a little lower, and the mouth opening up
    to 1.3x wider, so the mouth covers more of the 8x8-pixel VAE cells and the DiT's 16x16
    tokens (at 128 px a v1 mouth is about 2 tokens wide and opens by less than one). 3: as 2
    with the mouth opening up to 1.55x v1's (and a third of v2's head motion, `head_motion`).
    4: as 3, drawn with the light-dark layout of a real face in every style (soft shadows of eye
    sockets, nose, lower lip and rim; a lid line on flat faces too; a darker closed-mouth line),
    without blush or dotted/striped backgrounds, and with no dark ring round the lips of outline
    faces: in v3 dlib's detector missed the closed-mouth face of most flat and of a third of the
    other renders, and on outline faces it read the ring as the lip gap (a closed mouth measured
    as open as a half-open one). 5: as 4 with a mouth drawn for a landmark model to read
    (`_readable_mouth`): lips that meet in pointed corners round a lens-shaped opening no taller
    than 0.7x its width, opening up to v1's height, a dark inside and lips lighter than it. On
    v4's elliptical mouths dlib's landmarks followed the drawn opening at corr 0.40 (60 new
    faces, 20 openings each; outline faces 0.13), and at the widest openings read a round dark
    hole in a ring of lip as a closed mouth. 6: as 4 with a still head (no sway, nod or tilt:
    `clip.head_motion`), so that a reference frame is where the face stays; the same seed draws
    the same identity, speech, blinks and gaze as v4. 7: as 6 with a steady gaze (`clip.gaze_track`).
    8: as 5 (the readable mouth) with 6's still head: the shipped model's data without the sway
    that made the DiT draw ghost eyes."""
    if version == 1:
        return params
    check_data_version(version)
    p = dataclasses.replace(params, face_w=params.face_w * 1.3, cy=params.cy + 0.06,
                            max_open=params.max_open * _OPEN_SCALE[version])
    if version >= 4:
        p = dataclasses.replace(p, contour=1.0, lid_line=True, closed_line=2.0, blush=False, mouth_outline=False,
                                bg_kind="gradient" if p.bg_kind in ("dots", "stripes") else p.bg_kind)
    if version in (5, 8):
        p = _readable_mouth(p)
    return p


def _readable_mouth(p: FaceParams) -> FaceParams:
    """Version 5's mouth: lens-shaped (`FaceRenderer._lens_mouth`), a dark inside, a tongue
    close to it, and lips clearly lighter than the inside (lips as dark as the opening merge
    with it, and a landmark model then reads the whole dark shape as a closed mouth)."""
    inner = p.mouth_inner
    if _lum(inner) > INNER_MAX_LUM:
        inner = _scale(inner, INNER_MAX_LUM / _lum(inner))
    lip, t = p.lip, 0.0
    while _lum(lip) < _lum(inner) + LIP_OVER_INNER and t < 1.0:
        t = min(1.0, t + 0.1)
        lip = _mix(p.lip, LIP_LIGHT, t)
    return dataclasses.replace(p, mouth_shape="lens", open_aspect=0.7, mouth_inner=inner, lip=lip,
                               tongue=_mix(p.tongue, inner, 0.7))
