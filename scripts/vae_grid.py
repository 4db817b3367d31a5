"""Ground truth beside VAE round trips, as a grid a person can judge: for each clip, one row of
the real frames and one per VAE (every 2nd frame from --start), each frame marked by the face
judge (a green square where dlib finds the face, red where it does not) with its lip opening.

A VAE's figures (`talkingmachines eval-model --vae DIR`) can reward a softer round trip (the HOG
detector finds some blurred faces more often than crisp ones), so look at this beside them.

    python scripts/vae_grid.py --data runs/unseen5 --clips clip_00026,clip_00037 --start 40 \\
        --out docs/vae_x4.png tiny=src/talkingmachines/weights/tiny/vae 4x=runs/face5x4/decoder
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image, ImageDraw

from talkingmachines.errors import InputError
from talkingmachines.fileio import atomic_write

LABEL_W = 90


def vae_grid(data: str, clips: list[str], vaes: list[tuple[str, str]], start: int = 0, frames: int = 12) -> Image.Image:
    from talkingmachines.dataset import ClipDataset
    from talkingmachines.eval.face_judge import FaceJudge
    from talkingmachines.eval.runners import vae_roundtrip
    from talkingmachines.model.vae import TinyVAE

    if not (Path(data) / "index.json").is_file():
        raise InputError(f"{data}: not a clip data set (no index.json)")
    models = []
    for label, folder in vaes:
        if not (Path(folder) / "config.json").is_file():
            raise InputError(f"{folder}: not a TinyVAE folder (no config.json)")
        models.append((label, SimpleNamespace(vae=TinyVAE.from_pretrained(folder).eval(), device="cpu")))
    ds = ClipDataset(data)
    by_name = {ds.clips[c]["name"]: i for i, c in enumerate(ds.indices)}
    judge = FaceJudge.load()
    rows = []
    for name in clips:
        if name not in by_name:
            raise InputError(f"{data}: no clip named {name}")
        video = np.asarray(ds.load(by_name[name])["frames"])
        idx = list(range(start, len(video), 2))[:frames]
        if not idx:
            raise InputError(f"{name}: --start {start} is past its {len(video)} frames")
        for label, v in [("ground truth", video)] + [(lb, vae_roundtrip(m, video)) for lb, m in models]:
            rows.append((f"{name}\n{label}", [v[t] for t in idx], [judge.frame(v[t]) for t in idx]))
    h, w = rows[0][1][0].shape[:2]
    img = Image.new("RGB", (LABEL_W + w * frames, h * len(rows)), "white")
    d = ImageDraw.Draw(img)
    for r, (label, cells, marks) in enumerate(rows):
        d.text((2, r * h + h // 2 - 8), label, fill="black")
        for c, (cell, (found, opening)) in enumerate(zip(cells, marks)):
            x, y = LABEL_W + c * w, r * h
            img.paste(Image.fromarray(cell), (x, y))
            d.rectangle([x, y, x + 6, y + 6], fill="lime" if found else "red")
            if found:
                d.text((x + 8, y), f"{opening:.2f}", fill="yellow")
    return img


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("vaes", nargs="+", metavar="LABEL=DIR", help="a TinyVAE folder and its row label")
    ap.add_argument("--data", required=True, help="a clip data set (index.json + clip_*.npz)")
    ap.add_argument("--clips", required=True, help="comma-separated clip names, e.g. clip_00026,clip_00037")
    ap.add_argument("--start", type=int, default=0, help="first frame")
    ap.add_argument("--frames", type=int, default=12, help="frames per row (every 2nd)")
    ap.add_argument("--out", required=True, help="the PNG to write")
    a = ap.parse_args(argv)
    try:
        vaes = []
        for s in a.vaes:
            label, sep, folder = s.partition("=")
            if not sep or not label or not folder:
                raise InputError(f"{s!r}: give each VAE as LABEL=DIR")
            vaes.append((label, folder))
        img = vae_grid(a.data, a.clips.split(","), vaes, a.start, a.frames)
        # a 256-colour palette keeps the figure small without touching the judge's marks
        small = img.quantize(256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
        atomic_write(a.out, lambda p: small.save(p, format="PNG", optimize=True))
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
