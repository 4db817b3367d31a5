"""Put `talkingmachines eval-model --out` reports side by side, by the face judge's figures.

    python scripts/compare_reports.py ship=src/talkingmachines/weights/tiny/eval.json:student \
        new=runs/new/eval.json:student [more LABEL=REPORT:SYSTEM ...]

SYSTEM is a column of the report: ``student``, ``teacher``, ``vae_roundtrip`` or ``ground_truth``.
REPORT may be several reports joined by commas, the same model evaluated at several noise seeds
(``eval-model --seed N``): each gets its own row (LABEL/1, LABEL/2, ...) and the per-clip differences
use each clip's mean over them, since one run's figures move by about a point with the seed alone.
One row per argument with the pooled figures (all frames of all clips), and the same on the clips
whose ground-truth lips the judge reads where the report has them. The first argument is the
baseline: every other row that shares clips with it also gets the per-clip difference of its lip
correlation and of its face found where the ground truth's is (mean, standard error, on how many clips
it is higher and lower), since pooled figures over a few dozen clips move with a handful of them.
With ``--skin dark`` (or medium, light) every figure is taken on the clips whose synthetic face's skin
is in that band only (the report's ``face_by_skin``; the per-clip differences read each clip's face
from the report's data folder).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


# the per-clip figures paired against the baseline, and how a line names them
PAIRED = {"confidence": "lip corr", "found_where_reference_found": "found where GT's is"}


def _num(d: dict, key: str) -> float:
    v = d.get(key)
    return float("nan") if v is None else float(v)


def _skin_of(report: dict, name: str) -> str | None:
    from talkingmachines.train.latents import clip_skin

    npz = Path(report.get("data", {}).get("dir", "")) / f"{name}.npz"
    return clip_skin(npz) if npz.is_file() else None


def _load(arg: str, skin: str | None = None) -> tuple[str, list[tuple[str, dict, dict]], dict]:
    """LABEL=REPORT[,REPORT...]:SYSTEM -> (label, [(row label, pooled, readable pooled)], per-clip
    figures averaged over the reports)."""
    if "=" not in arg or ":" not in arg.split("=", 1)[1]:
        sys.exit(f"error: {arg!r} is not LABEL=REPORT.json[,REPORT.json...]:SYSTEM")
    label, rest = arg.split("=", 1)
    paths, system = rest.rsplit(":", 1)
    paths = paths.split(",")
    runs = [_load_one(path, system, skin) for path in paths]
    rows = [(label if len(runs) == 1 else f"{label}/{i + 1}", face, readable)
            for i, (face, readable, _) in enumerate(runs)]
    return label, rows, _mean_clips([clips for *_, clips in runs])


def _mean_clips(runs: list[dict]) -> dict:
    """Per clip (those in every run), the mean of each paired figure; None where a run lacks it."""
    out = {}
    for name in runs[0]:
        if all(name in r for r in runs):
            out[name] = {}
            for key in PAIRED:
                v = [r[name].get(key) for r in runs]
                out[name][key] = None if any(x is None for x in v) else sum(v) / len(v)
    return out


def _load_one(path: str, system: str, skin: str | None) -> tuple[dict, dict, dict]:
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        sys.exit(f"error: {path}: {e}")
    face = report.get("face", {}).get(system)
    if face is None:
        sys.exit(f"error: {path} has no {system!r} column (it has {sorted(report.get('face', {}))})")
    readable = report.get("face_readable", {}).get("systems", {}).get(system, {})
    clips = {c["name"]: c["face"][system] for c in report.get("clips", []) if c.get("face", {}).get(system)}
    if skin is not None:
        band = report.get("face_by_skin", {}).get(skin)
        if band is None or system not in band.get("systems", {}):
            sys.exit(f"error: {path} has no {skin!r} skin figures for {system!r}")
        face, readable = band["systems"][system], {}  # the readable pool is not split by skin
        clips = {n: c for n, c in clips.items() if _skin_of(report, n) == skin}
    return face, readable, clips


def _diff(base: dict, other: dict, key: str, what: str) -> str:
    d = [other[n][key] - base[n][key] for n in base
         if n in other and base[n].get(key) is not None and other[n].get(key) is not None]
    if len(d) < 2:
        return ""
    mu = sum(d) / len(d)
    se = math.sqrt(sum((x - mu) ** 2 for x in d) / (len(d) - 1) / len(d))
    return (f"{what} per clip {mu:+.3f} (s.e. {se:.3f}), higher on {sum(x > 0 for x in d)}, "
            f"lower on {sum(x < 0 for x in d)} of {len(d)}")


def _paired(base: dict, other: dict) -> str:
    """Per-clip differences: the lip correlation, and the face found where the ground truth's is."""
    parts = [_diff(base, other, key, what) for key, what in PAIRED.items()]
    return "; ".join(p for p in parts if p)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("columns", nargs="+", metavar="LABEL=REPORT:SYSTEM")
    ap.add_argument("--skin", choices=["dark", "medium", "light"], help="only the clips of this skin band")
    args = ap.parse_args()
    columns = [_load(a, args.skin) for a in args.columns]
    rows = [row for _, rs, _ in columns for row in rs]
    w = max(len(r[0]) for r in rows)
    print(f"{'':{w}s}  found  where-GT  speech  silence  lag   corr  opening |  readable: where-GT   corr  opening")
    for label, f, r in rows:
        lag = f.get("lag")
        print(f"{label:{w}s} {100 * _num(f, 'face_found'):5.1f} %  {100 * _num(f, 'found_where_reference_found'):5.1f} %"
              f"  {100 * _num(f, 'face_found_speech'):5.1f} %  {100 * _num(f, 'face_found_silence'):5.1f} %"
              f"  {'-' if lag is None else lag:>3}  {_num(f, 'confidence'):5.3f}  {_num(f, 'open_ratio_median'):5.2f}x |"
              f"            {100 * _num(r, 'found_where_reference_found'):5.1f} %  {_num(r, 'confidence'):5.3f}"
              f"  {_num(r, 'open_ratio_median'):5.2f}x")
    base_label, _, base_clips = columns[0]
    for label, _, clips in columns[1:]:
        text = _paired(base_clips, clips)
        if text:
            print(f"{label} against {base_label}: {text}")


if __name__ == "__main__":
    main()
