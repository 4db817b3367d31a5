"""Does the face judge read ground truth better with its contrast step? A check on ground truth alone.

For each clip of a synthetic data set the judge looks at the real frames twice: as they are, and
with the optional contrast step (`face_judge.equalize`, CLAHE on lightness). Every frame holds a
face, and the renderer records how wide it drew the mouth, so both readings can be scored against
the truth: the face-found rate, and how well the judge's lip opening follows the drawn opening
(Pearson correlation per clip). Also the lip opening's correlation with the speech (best lag), as
`eval-model` reports it. Per clip, then pooled, by skin band, and as paired per-clip differences.

    python scripts/judge_contrast.py runs/unseen --clips 40 80

Pick clips that no report you compare with is measured on (the model card uses clips 0-39 of
`data synth --n 120 --seed 7`), so the choice of judge is not made on the figures it then judges.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from talkingmachines.errors import InputError
from talkingmachines.eval.face_judge import FaceJudge, face_metrics_from_signals, signals
from talkingmachines.eval.metrics import pool_lipsync
from talkingmachines.train.synth.face import SKIN_BANDS, skin_band

CONTRASTS = ("none", "clahe")


def read_clip(judges: dict, z: dict) -> dict:
    """Both judges' figures on one ground-truth clip."""
    truth = np.asarray(z["mouth_open"], np.float64)
    out = {}
    for name, judge in judges.items():
        found, opening = signals(judge.video_landmarks(z["frames"]))
        m = face_metrics_from_signals(found, opening, z["audio"])
        ok = np.isfinite(opening)
        drawn = None
        if ok.sum() >= 10 and np.std(opening[ok]) > 0 and np.std(truth[ok]) > 0:
            drawn = float(np.corrcoef(opening[ok], truth[ok])[0, 1])
        out[name] = {"found": float(found.mean()), "vs_drawn": drawn, "lag": m.get("lag"),
                     "confidence": m.get("confidence"), "corr_by_lag": m.get("corr_by_lag"), "frames": len(found)}
    return out


def _mean(xs) -> float:
    xs = [x for x in xs if x is not None and np.isfinite(x)]
    return float(np.mean(xs)) if xs else float("nan")


def paired(rows: list[dict], key: str) -> str:
    d = np.array([r["clahe"][key] - r["none"][key] for r in rows
                  if r["none"][key] is not None and r["clahe"][key] is not None
                  and np.isfinite(r["none"][key]) and np.isfinite(r["clahe"][key])])
    if len(d) < 2:
        return "n/a"
    return (f"{d.mean():+.3f} (s.e. {d.std(ddof=1) / np.sqrt(len(d)):.3f}), higher on {(d > 0.01).sum()}, "
            f"lower on {(d < -0.01).sum()} of {len(d)}")


def main() -> int:
    return main_args(sys.argv[1:])


def main_args(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", help="a synthetic data set (index.json + clip_*.npz, from `data synth`)")
    ap.add_argument("--clips", type=int, nargs=2, default=(40, 80), metavar=("FROM", "TO"),
                    help="clip indices FROM..TO-1 (default 40 80)")
    ap.add_argument("--json", default=None, help="also write the per-clip figures here")
    args = ap.parse_args(argv)
    try:
        root = Path(args.data)
        if not (root / "index.json").is_file():
            raise InputError(f"no index.json in {root} (make one with `talkingmachines data synth --out {root}`)")
        clips = json.loads((root / "index.json").read_text())["clips"]
        lo, hi = args.clips
        if not 0 <= lo < hi <= len(clips):
            raise InputError(f"--clips {lo} {hi}: the data set has clips 0..{len(clips) - 1}")
        judges = {c: FaceJudge.load("hog", c) for c in CONTRASTS}
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    rows = []
    for c in tqdm(clips[lo:hi], desc="clips", unit="clip"):
        with np.load(root / c["npz"]) as z:
            data = {k: z[k] for k in ("frames", "audio", "mouth_open")}
            meta = json.loads(str(z["meta"]))
        rows.append({"name": c["name"], "skin": skin_band(meta.get("face") or {}), "style": c.get("style"),
                     **read_clip(judges, data)})

    print(f"{len(rows)} ground-truth clips of {root} ({lo}..{hi - 1}); the judge as it is against with its contrast step")
    print(f"{'':8s} {'found':>7s} {'lips vs drawn':>14s} {'lips vs speech (pooled)':>24s}")
    for name in CONTRASTS:
        p = pool_lipsync([r[name] for r in rows if r[name]["corr_by_lag"]])
        print(f"{name:8s} {100 * _mean(r[name]['found'] for r in rows):6.1f} % {_mean(r[name]['vs_drawn'] for r in rows):14.3f} "
              f"{'lag ' + str(p.get('lag')) + ', ' + format(p.get('confidence', float('nan')), '.3f'):>24s}")
    for band, _ in SKIN_BANDS:
        sub = [r for r in rows if r["skin"] == band]
        if sub:
            print(f"  {band:6s} ({len(sub):2d} clips): found " +
                  ", ".join(f"{n} {100 * _mean(r[n]['found'] for r in sub):.0f} %" for n in CONTRASTS) +
                  "; lips vs drawn " + ", ".join(f"{n} {_mean(r[n]['vs_drawn'] for r in sub):.2f}" for n in CONTRASTS))
    print("per clip, clahe minus none:")
    print(f"  found: {paired(rows, 'found')}")
    print(f"  lips vs drawn: {paired(rows, 'vs_drawn')}")
    print(f"  lips vs speech (own best lag): {paired(rows, 'confidence')}")
    if args.json:
        tmp = Path(args.json).with_suffix(".tmp")  # atomic: a reader never sees half a file
        tmp.write_text(json.dumps(rows, indent=1))
        tmp.replace(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
