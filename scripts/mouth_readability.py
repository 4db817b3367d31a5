"""Can the face judge read the synthetic data's mouths? For each data version, draw N new
identities at 10 openings (wide and round), run the judge (dlib's 68 landmarks) on every
frame, and report how often it finds the face and how well its lip opening follows the drawn
one (Pearson correlation per identity, averaged), overall, by drawing style and by skin band.

The ceiling of every lip-sync figure the judge gives a model trained on these data is what it
reads on the data themselves: if it cannot follow a drawn mouth, it cannot follow a generated
one either.

    python scripts/mouth_readability.py --versions 4 5 --n 60 --grid mouths.png
"""

from __future__ import annotations

import argparse
import collections
import sys

import numpy as np
from tqdm import tqdm

from talkingmachines.errors import InputError
from talkingmachines.eval.face_judge import FaceJudge, lip_opening
from talkingmachines.train.synth import FaceParams, FaceRenderer, FaceState, check_data_version, framed
from talkingmachines.train.synth.face import skin_band

OPENINGS = np.linspace(0.0, 1.0, 10)
ROUNDS = (0.0, 0.6)


def read_identity(judge: FaceJudge, params: FaceParams) -> tuple[float, float]:
    """(found rate, corr of the judge's lip opening with the drawn opening) over OPENINGS x ROUNDS."""
    r = FaceRenderer(params, 128)
    drawn, read = [], []
    for mr in ROUNDS:
        for m in OPENINGS:
            pts = judge.landmarks(r.render(FaceState(mouth_open=float(m), mouth_round=mr)))
            if pts is not None:
                drawn.append(m)
                read.append(lip_opening(pts))
    found = len(drawn) / (len(OPENINGS) * len(ROUNDS))
    corr = float(np.corrcoef(drawn, read)[0, 1]) if len(drawn) >= 5 and np.std(read) > 0 else float("nan")
    return found, corr


def grid(judge: FaceJudge, version: int, seeds: list[int]):
    """Mouth crops at 8 openings, one row per identity, the judge's mouth points drawn on them."""
    from PIL import Image, ImageDraw

    rows = []
    for seed in seeds:
        r = FaceRenderer(framed(FaceParams.sample(seed), version), 128)
        row = []
        for m in np.linspace(0, 1, 8):
            frame = r.render(FaceState(mouth_open=float(m)))
            pts = judge.landmarks(frame)
            im = Image.fromarray(frame).resize((256, 256), Image.NEAREST).crop((48, 110, 208, 250))
            d = ImageDraw.Draw(im)
            label = "no face"
            if pts is not None:
                for k, (x, y) in enumerate(pts[48:68]):
                    c = (0, 255, 0) if k >= 12 else (255, 255, 0)  # inner lips green, outer yellow
                    d.ellipse([2 * x - 50, 2 * y - 112, 2 * x - 46, 2 * y - 108], fill=c)
                label = f"{lip_opening(pts):.2f}"
            d.text((3, 3), f"v{version} {m:.2f}: {label}", fill=(255, 0, 0))
            row.append(np.asarray(im))
        rows.append(np.concatenate(row, 1))
    return np.concatenate(rows, 0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--versions", type=int, nargs="+", default=[4, 5])
    ap.add_argument("--n", type=int, default=60, help="identities per version")
    ap.add_argument("--seed", type=int, default=900000, help="first identity seed (training data use small seeds)")
    ap.add_argument("--grid", help="also save mouth crops of the first 6 identities of each version here (PNG)")
    ap.add_argument("--judge-contrast", choices=("none", "clahe"), default="none",
                    help="the judge's optional contrast step (CLAHE on lightness; `eval --judge-contrast`)")
    args = ap.parse_args(argv)
    try:
        for v in args.versions:
            check_data_version(v)
        if args.n < 1:
            raise InputError("--n must be at least 1")
        judge = FaceJudge.load(contrast=args.judge_contrast)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for v in args.versions:
        rows = []
        for seed in tqdm(range(args.seed, args.seed + args.n), desc=f"v{v}", leave=False):
            p = framed(FaceParams.sample(seed), v)
            rows.append((p.style, skin_band(p.to_dict()), *read_identity(judge, p)))
        groups = collections.defaultdict(list)
        for row in rows:
            for key in ("all", row[0], row[1]):
                groups[key].append(row)
        print(f"data version {v}: {args.n} new identities, {len(OPENINGS) * len(ROUNDS)} openings each")
        print(f"  {'group':8s} {'faces':>5s} {'found':>6s} {'corr':>5s} {'corr<0.6':>8s}")
        for key in ["all", "flat", "outline", "shaded", "photo", "dark", "medium", "light"]:
            g = groups.get(key)
            if not g:
                continue
            cs = [r[3] for r in g if np.isfinite(r[3])]
            print(f"  {key:8s} {len(g):5d} {np.mean([r[2] for r in g]):6.2f} "
                  f"{np.mean(cs) if cs else float('nan'):5.2f} {sum(c < 0.6 for c in cs):8d}")
    if args.grid:
        from PIL import Image

        from talkingmachines.fileio import atomic_write

        img = np.concatenate([grid(judge, v, list(range(args.seed, args.seed + 6))) for v in args.versions], 0)
        atomic_write(args.grid, lambda tmp: Image.fromarray(img).save(tmp, format="PNG"))
        print(f"grid -> {args.grid}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
