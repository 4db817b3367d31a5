"""Clips of a data set through one or more models, for the eye: per clip a row of its ground truth, then a row
per model, every 2nd frame over the second of speech where the ground truth's mouth opens most.

Each model streams the clip's own speech from the clip's first frame as the portrait (as `eval-model` does),
so the rows line up frame for frame.

    python scripts/new_faces_figure.py OUT.png --data runs/unseen --clips 34 30 \\
        --model shipped=src/talkingmachines/weights/tiny --model new=runs/new/model
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SECOND = 25  # frames


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="the figure (.png)")
    ap.add_argument("--data", required=True, help="a `data synth` folder (clip_NNNNN.npz)")
    ap.add_argument("--clips", type=int, nargs="+", required=True, help="clip numbers")
    ap.add_argument("--model", action="append", required=True, metavar="LABEL=DIR", help="a model folder, repeatable")
    ap.add_argument("--scale", type=float, default=0.75, help="shrink the figure (the docs keep it small)")
    a = ap.parse_args()

    models = []
    for m in a.model:
        if "=" not in m:
            print(f"error: --model {m!r} is not LABEL=DIR", file=sys.stderr)
            return 2
        models.append(m.rsplit("=", 1))  # the label may hold "=", the folder rarely does
    from talkingmachines.errors import InputError
    from talkingmachines.eval.clips import clip_files
    from talkingmachines.eval.runners import generate_video
    from talkingmachines.stream.generator import load_avatar

    try:
        paths = clip_files(a.data, a.clips)
        avatars = [(label, load_avatar(folder)) for label, folder in models]
    except (InputError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    rows = []
    for c, path in zip(a.clips, paths):
        d = np.load(path)
        frames, audio, opening = d["frames"], d["audio"], d["mouth_open"]
        start = int(np.argmax(np.convolve(opening, np.ones(SECOND), "valid"))) if len(opening) >= SECOND else 0
        idx = [i for i in range(start, start + SECOND, 2) if i < len(frames)]
        rows.append((f"clip {c}: ground truth", frames[idx]))
        for label, avatar in avatars:
            video = np.asarray(generate_video(avatar, frames[0], audio))
            rows.append((f"clip {c}: {label}", video[[i for i in idx if i < len(video)]]))

    h, w = rows[0][1].shape[1:3]
    pad = 14
    cols = max(len(f) for _, f in rows)
    sheet = Image.new("RGB", (w * cols, len(rows) * (h + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (label, fs) in enumerate(rows):
        draw.text((2, r * (h + pad) + 1), f"{label} (every 2nd frame)", fill="black")
        for j, f in enumerate(fs):
            sheet.paste(Image.fromarray(np.asarray(f, np.uint8)), (j * w, r * (h + pad) + pad))
    if a.scale != 1.0:
        sheet = sheet.resize((round(sheet.width * a.scale), round(sheet.height * a.scale)), Image.LANCZOS)
    out = Path(a.out)
    tmp = out.with_name(f".{out.name}.tmp.png")
    sheet.quantize(256, method=Image.Quantize.MEDIANCUT).save(tmp, optimize=True)
    tmp.replace(out)  # atomic: a half-written figure never replaces a good one
    print(f"{out}: {len(rows)} rows, {sheet.width}x{sheet.height}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
