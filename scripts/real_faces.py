"""Real faces through a model, framed as given and with ``--align-face``: does the mouth talk?

Each image is one face, or (``--crop-faces``) every face dlib's detector finds in it is cut out
with a margin, as a person would crop a face from a group photo. Each face goes through the model
twice on the same speech: centre-cropped as it is (what ``generate --image`` does), and aligned to
the model's training faces (``generate --image ... --align-face``). The face judge then reports,
per face and mode: face found, the lip opening's best lag and correlation with the speech, and the
opening in speech over silence; and a summary per mode.

    python scripts/real_faces.py PHOTO [PHOTO ...] [--crop-faces] [--model DIR] [--audio WAV] [--out DIR]

``--out`` also writes, per face and mode, the portrait the model got and every 6th frame
(``sheet.png``: per face, a row as given and a row aligned).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def crops(img: np.ndarray, detector) -> list[np.ndarray]:
    """Every detected face, left to right, with about one face width of margin around it."""
    out = []
    for r in sorted(detector(img, 1), key=lambda r: r.left()):
        cx, cy, s = (r.left() + r.right()) / 2, (r.top() + r.bottom()) / 2, r.width() * 1.1
        x0, y0 = max(0, int(cx - s)), max(0, int(cy - 1.05 * s))
        x1, y1 = min(img.shape[1], int(cx + s)), min(img.shape[0], int(cy + 0.95 * s))
        out.append(img[y0:y1, x0:x1])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("photos", nargs="+")
    ap.add_argument("--crop-faces", action="store_true", help="cut every detected face out of each photo")
    ap.add_argument("--model", default=None, help="a model folder (default: the shipped tiny model)")
    ap.add_argument("--audio", default=None, help="speech (default: the bundled speech.wav)")
    ap.add_argument("--out", default=None, help="a folder for the portraits, frames, sheet.png and results.json")
    a = ap.parse_args()

    from talkingmachines import face_align
    from talkingmachines.errors import InputError
    from talkingmachines.eval import face_judge
    from talkingmachines.eval.runners import generate_video
    from talkingmachines.media import load_audio, load_image
    from talkingmachines.stream.generator import fit_image, load_avatar

    try:
        if a.audio is None:
            from talkingmachines.audio_io import SPEECH_WAV

            a.audio = str(SPEECH_WAV)
        audio = np.asarray(load_audio(a.audio), np.float32)
        judge = face_judge.FaceJudge.load("hog")
        faces: dict[str, np.ndarray] = {}
        for p in a.photos:
            img = load_image(p, None)
            found = crops(img, judge.detector) if a.crop_faces else [img]
            for i, f in enumerate(found):
                faces[Path(p).stem + (f"-{i}" if a.crop_faces else "")] = f
        avatar = load_avatar(a.model)
        template = face_align.load_template(avatar.folder)
    except (InputError, RuntimeError, OSError) as e:  # a missing file, or the judge's optional extra
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not faces:
        print("error: no face found to test", file=sys.stderr)
        return 2
    P = avatar.preset
    out = Path(a.out) if a.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    rows, sheet = {}, []
    for name, img in faces.items():
        for mode in ("as given", "aligned"):
            try:
                portrait = fit_image(img, P.height, P.width) if mode == "as given" else \
                    face_align.align_face(img, template, P.height, P.width, judge, source=name)[0]
            except InputError as e:
                rows[f"{name}|{mode}"] = {"error": str(e)}
                continue
            vid = generate_video(avatar, portrait, audio)
            f = face_judge.face_metrics(vid, audio, judge)
            rows[f"{name}|{mode}"] = {k: f[k] for k in ("face_found", "lag", "confidence", "open_ratio")}
            if out:
                sheet.append(np.concatenate([portrait, *vid[12:84:6]], 1))
    print("| face | mode | face found | lag, lip corr | open speech / silence |")
    print("|---|---|---|---|---|")

    def fmt(v, f):
        return "-" if v is None or (isinstance(v, float) and not np.isfinite(v)) else format(v, f)

    for key, r in rows.items():
        name, mode = key.split("|")
        if "error" in r:
            print(f"| {name} | {mode} | {r['error']} | | |")
        else:
            print(f"| {name} | {mode} | {100 * r['face_found']:.0f} % | {fmt(r['lag'], 'd')}, "
                  f"{fmt(r['confidence'], '.2f')} | {fmt(r['open_ratio'], '.1f')}x |")
    for mode in ("as given", "aligned"):
        rs = [r for k, r in rows.items() if k.endswith("|" + mode) and "error" not in r]
        if not rs:
            continue
        follow = sum(1 for r in rs if r["lag"] is not None and abs(r["lag"]) <= 2 and (r["confidence"] or 0) >= 0.5)
        corr = [r["confidence"] for r in rs if r["confidence"] is not None and np.isfinite(r["confidence"])]
        print(f"{mode}: {len(rs)} faces; face found {100 * np.mean([r['face_found'] for r in rs]):.0f} % on average; "
              f"lips follow the speech (lag within 2, corr >= 0.5) in {follow}; mean lip corr "
              f"{np.mean(corr) if corr else float('nan'):.2f}; median opening speech / silence "
              f"{np.median([r['open_ratio'] or 0 for r in rs]):.1f}x")
    if out:
        from talkingmachines.fileio import atomic_write_text

        atomic_write_text(out / "results.json", json.dumps(rows, indent=1))
        if sheet:
            Image.fromarray(np.concatenate(sheet, 0)).save(out / "sheet.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
