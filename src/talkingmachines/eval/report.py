"""The evaluation report: the targets it checks and its JSON."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["targets", "strip_curves", "to_json"]


def targets(out: dict) -> dict:
    """The issue's 'must show' thresholds, checked on the student (None where not measured)."""
    s = out["summary"].get("student", {})
    t = {
        "lag_within_2": None if s.get("lag") is None else abs(s["lag"]) <= 2,
        "confidence_ge_0.5": None if s.get("confidence") is None or math.isnan(s["confidence"]) else s["confidence"] >= 0.5,
        "stillness_ge_2": None if s.get("stillness_ratio_median") is None else s["stillness_ratio_median"] >= 2.0,
    }
    faces = out.get("face") or {}

    def fig(system, key):
        v = (faces.get(system) or {}).get(key)
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else v

    if faces:  # the face judge's targets (issue 10): the picture, as a landmark model sees it
        ff, lag, conf, ratio = (fig("student", k) for k in ("face_found", "lag", "confidence", "open_ratio_median"))
        t["face_found_ge_0.98"] = None if ff is None else ff >= 0.98
        # the same bar, charged only on frames where the judge finds the ground truth's face
        fw = fig("student", "found_where_reference_found")
        t["face_found_where_gt_ge_0.98"] = None if fw is None else fw >= 0.98
        t["face_lag_within_2"] = None if lag is None else abs(lag) <= 2
        t["face_corr_ge_0.6"] = None if conf is None else conf >= 0.6
        t["face_open_ratio_ge_2"] = None if ratio is None else ratio >= 2.0
        tc, vc = fig("teacher", "confidence"), fig("vae_roundtrip", "confidence")
        t["teacher_face_corr_ge_0.6"] = None if tc is None else tc >= 0.6
        t["vae_face_corr_ge_0.75"] = None if vc is None else vc >= 0.75
    ls = out.get("long_stream")
    if ls:
        d = ls["drift"]
        t["drift_psnr_ge_24"] = d["psnr_first_last"] >= 24.0
        if ls.get("face"):
            t["long_face_found_last_ge_0.98"] = ls["face"]["face_found_last_window"] >= 0.98
        t["no_creep"] = bool(max(abs(v) for v in d["rgb_shift"]) <= 3.0 and abs(d["brightness_shift"]) <= 2.0)
    return t


def strip_curves(row: dict) -> dict:
    """A report row without the per-lag correlation curves (kept only for pooling)."""
    r = dict(row)
    for k, v in row.items():
        if isinstance(v, dict) and "corr_by_lag" in v:
            r[k] = {kk: vv for kk, vv in v.items() if kk != "corr_by_lag"}
    return r


def to_json(obj) -> str:
    """One JSON line; NaN / inf become null (strict JSON)."""
    import json

    def clean(o):
        if isinstance(o, dict):
            return {str(k): clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        if isinstance(o, (np.floating, float)):
            f = float(o)
            return f if math.isfinite(f) else None
        if isinstance(o, (np.integer,)):
            return int(o)
        if isinstance(o, np.bool_):
            return bool(o)
        if isinstance(o, np.ndarray):
            return clean(o.tolist())
        return o

    return json.dumps(clean(obj), separators=(",", ":"))
