"""The renderer: `FaceRenderer(params, size)` draws the static layers once (background, body,
head with hair and shading) and composes a frame per `FaceState`; `render_face` is a cached
shortcut. Also the mouth's pixel box (`mouth_roi_from_face`), which eval and the latent cache
read."""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from ...errors import InputError
from .face import FaceParams, FaceState, _jitter, _mix, _scale


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
        if p.contour > 0:
            img = self._contour(img)
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

    def _contour(self, img: Image.Image) -> Image.Image:
        """Version 4: soft shadows where a real face has them (eye sockets, beside and under the
        nose, under the lower lip), so every style carries the light-dark layout that face
        detectors key on; a closed mouth alone left most flat faces unrecognised."""
        p, S = self.p, self.S
        cx, cy, fw, fh = self.cx, self.cy, self.fw, self.fh
        sh = Image.new("L", (S, S), 0)
        d = ImageDraw.Draw(sh)
        ew = fw * p.eye_size
        eh = ew * p.eye_aspect
        ey = cy - fh * p.eye_y
        for sgn in (-1, 1):  # eye sockets: from the brow down to the eye's middle
            ex = cx + sgn * fw * p.eye_spacing
            d.ellipse([ex - ew * 1.45, ey - eh * 2.1, ex + ew * 1.45, ey + eh * 0.6], fill=150)
        ny = cy + fh * 0.2
        d.ellipse([cx - fw * 0.16, ny - fh * 0.02, cx + fw * 0.16, ny + fh * 0.1], fill=170)  # under the nose
        d.rectangle([cx + fw * 0.05, cy - fh * 0.05, cx + fw * 0.11, ny], fill=90)  # nose side
        my = cy + fh * p.mouth_y
        lt = max(fw * p.mouth_w * p.lip_thick, S * 0.008)
        mw = fw * p.mouth_w
        d.ellipse([cx - mw * 0.7, my + lt * 1.2, cx + mw * 0.7, my + lt * 1.2 + fh * 0.09], fill=130)  # under the lip
        sh = sh.filter(ImageFilter.GaussianBlur(fw * 0.06))
        arr = np.asarray(img).astype(np.float32)
        face = Image.new("L", (S, S), 0)
        ImageDraw.Draw(face).polygon(self._face_polygon(), fill=255)
        fm = np.asarray(face, np.float32) / 255.0
        rim = 1.0 - _blur_np(fm, fw * 0.15)  # the face's rim turns away from the light
        k = (np.asarray(sh, np.float32) / 255.0 * 0.45 + rim * 0.35) * fm * p.contour
        arr[..., :3] *= 1.0 - k[..., None]
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGBA")

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
            if p.style != "flat" or p.lid_line:  # upper lid line
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
        mow = ow if p.mouth_outline else 0
        mr = min(max(st.mouth_round, 0.0), 1.0)
        mx, my = cx, cy + fh * p.mouth_y
        hw = fw * p.mouth_w * (1.0 - 0.38 * mr)  # round 'o' is narrower
        opening = mo * fh * p.max_open * (1.0 + 0.25 * mr)
        lt = max(fw * p.mouth_w * p.lip_thick, S * 0.008)
        up = opening * 0.3  # the jaw drops: most of the opening goes down
        dn = opening * 0.7
        smile = p.smile * fh * 0.08 * (1.0 - mo)
        if p.mouth_shape == "lens" and opening >= S * 0.01:
            self._lens_mouth(d, mx, my, hw, lt, opening, mr)
            return self._glasses(d, cx, cy, ey, ew, eh)
        if opening < S * 0.01:  # closed: lips and a line between them
            d.ellipse([mx - hw, my - lt, mx + hw, my + lt * 1.1], fill=p.lip,
                      outline=olc if mow else None, width=mow)
            lw = max(1, int(S * 0.009 * p.closed_line))
            d.line([(mx - hw * 0.98, my - smile), (mx - hw * 0.4, my + smile * 0.3), (mx, my + smile * 0.4),
                    (mx + hw * 0.4, my + smile * 0.3), (mx + hw * 0.98, my - smile)],
                   fill=_mix(p.mouth_inner, p.lip, 0.3 / p.closed_line), width=lw, joint="curve")
            return self._glasses(d, cx, cy, ey, ew, eh)
        box = [mx - hw, my - up - lt, mx + hw, my + dn + lt * 1.1]
        d.ellipse(box, fill=p.lip, outline=olc if mow else None, width=mow)
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

    def _lens_mouth(self, d, mx, my, hw, lt, opening, mr) -> None:
        """An open mouth shaped as a real one is: the lips meet in pointed corners, the upper lip
        is thin and the lower one full, the opening is a lens no taller than `open_aspect` x its
        width, with the upper teeth showing (a face-landmark model reads an ellipse in a ring of
        lip as a pursed mouth, whatever its height)."""
        p = self.p
        iw = hw * (0.9 - 0.08 * mr)
        opening = min(opening, p.open_aspect * 2 * iw)
        up, dn = opening * 0.3, opening * 0.7

        def arc(half_w, rise, n=24):  # corner to corner, rise > 0 upwards; corners pointed
            xs = np.linspace(-1.0, 1.0, n)
            return [(mx + half_w * x, my - rise * (1.0 - x * x) ** 0.75) for x in xs]

        outer = arc(hw, up + lt * 0.8) + arc(hw, -(dn + lt * 1.3))[::-1]
        d.polygon(outer, fill=p.lip)
        top = arc(iw, up)
        bottom = arc(iw, -dn)[::-1]
        d.polygon(top + bottom, fill=p.mouth_inner)
        S = self.S
        ih = up + dn
        if ih > S * 0.012:  # upper teeth: the top of the opening, a band at most 0.018 S high
            tb = min(ih * 0.35, S * 0.018)
            d.polygon(top + [(x, min(y + tb, my)) for x, y in top[::-1]], fill=p.teeth)
            tg = min(ih * 0.3, S * 0.02)  # the tongue's top, low in the opening
            low = arc(iw * 0.7, -dn)
            d.polygon(low + [(x, max(y - tg, my)) for x, y in low[::-1]], fill=p.tongue)

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


def eyes_roi_from_face(face, height: int, width: int | None = None, margin: float = 0.03) -> tuple[int, int, int, int]:
    """The ROI that holds both of a synthetic face's eyes and brows (at any brow raise), from its
    `FaceParams` or stored ``face`` dict, plus `margin` (fraction of the side) for head motion;
    the same geometry `FaceRenderer._draw_features` draws with."""
    if not isinstance(face, dict):
        face = dataclasses.asdict(face)
    width = width or height
    fw = face["face_w"]
    fh = fw * face["face_aspect"]
    ew = fw * face["eye_size"]
    eh = ew * face["eye_aspect"]
    ey = face["cy"] - fh * face["eye_y"]
    y0 = ey - eh * 1.45 - fh * 0.07 - fw * face["brow_thick"] - margin  # the brow at its highest
    y1 = ey + eh + margin
    half = fw * face["eye_spacing"] + ew + margin
    return clip_box(y0 * height, y1 * height, (face["cx"] - half) * width, (face["cx"] + half) * width,
                    height, width)


def features_mask_from_face(face, height: int, width: int | None = None, margin: float = 0.03) -> np.ndarray:
    """uint8 [H, W]: 1 inside the eyes' and the mouth's boxes (`eyes_roi_from_face`,
    `mouth_roi_from_face`), the parts of a face a landmark model reads, 0 elsewhere."""
    width = width or height
    m = np.zeros((height, width), np.uint8)
    for roi in (eyes_roi_from_face, mouth_roi_from_face):
        y0, y1, x0, x1 = roi(face, height, width, margin=margin)
        m[y0:y1, x0:x1] = 1
    return m


@functools.lru_cache(maxsize=8)
def _renderer(params: FaceParams, size: int) -> FaceRenderer:
    return FaceRenderer(params, size)


def render_face(params: FaceParams, state: FaceState | None = None, size: int = 128) -> np.ndarray:
    """Draw one frame of `params` in `state` (uint8 [size, size, 3]); renderers are cached."""
    return _renderer(params, int(size)).render(state or FaceState())
