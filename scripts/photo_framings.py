"""A real photo through a model, framed six ways: how much does the face-found rate depend on
the crop? One crop of one photo is a noisy figure (the judge sits near its detection edge on
a soft 128x128 face), so this reports the photo as given by ``--box`` and five variants of it:
wider, tighter, shifted left, shifted down, and mirrored.

For each framing: does the judge find the face in the input itself (resized to the model's
size), and in a still clip of it through the model's VAE (the ceiling for anything generated
through that VAE); then the student's video of the speech: face found (all, in speech), lip
opening vs speech (lag, correlation) and opening speech / silence.

    python scripts/photo_framings.py PHOTO --box 140 10 340 210 [--model DIR] [--audio WAV] [--align-face]

With ``--align-face`` each framing is first aligned to the model's training faces
(`talkingmachines.face_align`, as ``generate --align-face`` does), so the rows show how much of
the crop's effect alignment removes.

The README's photo: scikit-image's ``astronaut.png`` (public domain), box 140 10 340 210.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
from PIL import Image, ImageOps


def framings(img: Image.Image, box: tuple[int, int, int, int]) -> dict[str, Image.Image]:
    x0, y0, x1, y1 = box
    s = x1 - x0
    d = max(1, s // 13)  # about 8 % of the crop: enough to move the face, not to lose it

    def crop(a, b, c, e):
        a, b = max(0, a), max(0, b)
        return img.crop((a, b, min(img.width, c), min(img.height, e)))

    return {
        "as given": crop(x0, y0, x1, y1),
        "wider": crop(x0 - d, y0 - d, x1 + d, y1 + d),
        "tighter": crop(x0 + d, y0 + d, x1 - d, y1 - d),
        "left": crop(x0 - 2 * d, y0, x1 - 2 * d, y1),
        "down": crop(x0, y0 + 2 * d, x1, y1 + 2 * d),
        "mirrored": ImageOps.mirror(crop(x0, y0, x1, y1)),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("photo")
    ap.add_argument("--box", type=int, nargs=4, metavar=("X0", "Y0", "X1", "Y1"), required=True,
                    help="the crop around the face, in pixels of the photo")
    ap.add_argument("--model", default=None, help="a model folder (default: the shipped tiny model)")
    ap.add_argument("--audio", default=None, help="speech (default: the bundled speech.wav)")
    ap.add_argument("--json", default=None, help="also write the figures here")
    ap.add_argument("--align-face", action="store_true", help="align each framing's face first (generate --align-face)")
    a = ap.parse_args()

    from talkingmachines.eval import face_judge
    from talkingmachines.media import load_audio
    from talkingmachines.eval.runners import generate_video, vae_roundtrip
    from talkingmachines.stream.generator import fit_image, load_avatar

    if a.audio is None:
        from talkingmachines.audio_io import SPEECH_WAV

        a.audio = str(SPEECH_WAV)
    try:
        img = Image.open(a.photo).convert("RGB")
        judge = face_judge.FaceJudge.load()
        audio = np.asarray(load_audio(a.audio), np.float32)  # 16 kHz mono
    except Exception as e:  # a missing or unreadable file, or the judge's optional extra
        print(f"error: {e}", file=sys.stderr)
        return 2
    x0, y0, x1, y1 = a.box
    if not (0 <= x0 < x1 <= img.width and 0 <= y0 < y1 <= img.height):
        print(f"error: --box {a.box} is not inside the {img.width}x{img.height} photo", file=sys.stderr)
        return 2
    avatar = load_avatar(a.model)
    P = avatar.preset
    if a.align_face:
        from talkingmachines import face_align
        from talkingmachines.errors import InputError

        try:
            template = face_align.load_template(avatar.folder)
        except InputError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    rows = {}
    for name, im in framings(img, tuple(a.box)).items():
        portrait = np.asarray(im)
        if a.align_face:
            portrait = face_align.align_face(portrait, template, P.height, P.width, judge)[0]
        still = np.repeat(fit_image(portrait, P.height, P.width)[None], 9, 0)  # as the model sees it
        input_found = judge.frame(still[0])[0]
        vae_found = float(np.mean(judge.video(vae_roundtrip(avatar, still))[0]))
        vid = generate_video(avatar, portrait, audio)
        f = face_judge.face_metrics(vid, audio, judge)
        rows[name] = {"input_found": input_found, "vae_found": vae_found, "face_found": f["face_found"],
                      "face_found_speech": f["face_found_speech"], "lag": f["lag"], "corr": f["confidence"],
                      "open_ratio": f["open_ratio"]}

    def pct(v):
        return "-" if v is None else f"{100 * v:.0f} %"

    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    print("| framing | judge finds the input | VAE round trip | student: face found | in speech | lag, lip corr | open speech / silence |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {'yes' if r['input_found'] else 'no'} | {pct(r['vae_found'])} | {pct(r['face_found'])} | "
              f"{pct(r['face_found_speech'])} | {num(r['lag'], 'd')}, {num(r['corr'], '.2f')} | {num(r['open_ratio'], '.1f')}x |")
    mean = np.mean([r["face_found"] for r in rows.values()])
    corrs = [r["corr"] for r in rows.values() if r["corr"] is not None]
    print(f"mean face found over the {len(rows)} framings: {100 * mean:.0f} %; "
          f"mean lip corr {np.mean(corrs) if corrs else float('nan'):.2f} ({len(corrs)} with a figure)")
    if a.json:
        from talkingmachines.fileio import atomic_write_text

        atomic_write_text(a.json, json.dumps({"photo": a.photo, "box": a.box, "framings": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
