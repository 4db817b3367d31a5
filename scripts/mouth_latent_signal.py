"""How strongly a synthetic face's mouth opening shows in a VAE's latents, by skin band.

For each clip of a data folder: encode its first 97 frames (the shipped latent grid: one reference
latent, then one per 4 frames), take the clip's mouth box in latent pixels (`latents.mouth_box`),
and regress every latent value in that box on the drawn opening (``mouth_open``, averaged over each
latent frame's 4 frames). Printed per skin band, as means over its clips:

- the mouth box's RMS change over time, and the rest of the frame's;
- the RMS over the box's latent values of the change one unit of opening makes (the regression
  slope), and the drawn opening's std.

The DiT's flow loss sees a mouth only through that change: a band whose openings move the latents
less is, per pixel of loss, a weaker target.

    python scripts/mouth_latent_signal.py DATA --vae src/talkingmachines/weights/tiny/vae [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

FRAMES = 97  # 1 + 4 * 24: the reference latent and 24 more


def clip_signal(vae, npz: Path) -> tuple[str | None, dict] | None:
    import torch

    from talkingmachines.train.latents import clip_face, mouth_box
    from talkingmachines.train.synth.face import skin_band

    face = clip_face(npz)
    if not face:
        return None
    with np.load(npz) as z:
        if "frames" not in z or "mouth_open" not in z:
            return None
        frames, opening = z["frames"][:FRAMES], z["mouth_open"][:FRAMES].astype(np.float64)
    with torch.no_grad():
        lat = vae.encode_video(frames).float()
    lat = lat[0] if lat.dim() == 5 else lat  # [C, T, h, w]
    C, T, h, w = lat.shape
    if T < 3:
        return None
    y0, y1, x0, x1 = mouth_box(face, frames.shape[1], frames.shape[2], frames.shape[1] // h)
    z = lat[:, 1:].numpy().astype(np.float64)  # the latent frames after the reference
    box = z[:, :, y0:y1, x0:x1]
    inside = np.zeros((h, w), bool)
    inside[y0:y1, x0:x1] = True
    rest = z[:, :, ~inside]
    rms = lambda a: float(np.sqrt(((a - a.mean(1, keepdims=True)) ** 2).mean()))  # noqa: E731
    op = opening[1:1 + 4 * (T - 1)]
    op = op[: 4 * (len(op) // 4)].reshape(-1, 4).mean(1)
    n = len(op)
    X = box[:, :n].transpose(1, 0, 2, 3).reshape(n, -1)
    X = X - X.mean(0)
    oc = op - op.mean()
    slope = X.T @ oc / max(float(oc @ oc), 1e-9)  # per latent value: its change per unit of opening
    return skin_band(face), {"box_rms": rms(box), "rest_rms": rms(rest),
                             "slope_rms": float(np.sqrt((slope ** 2).mean())), "opening_std": float(op.std())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", help="a folder of synthetic clips (clip_XXXXX.npz)")
    ap.add_argument("--vae", default=str(Path(__file__).parents[1] / "src/talkingmachines/weights/tiny/vae"))
    ap.add_argument("--json", help="also write the per-band means here")
    args = ap.parse_args(argv)
    from talkingmachines.errors import InputError
    from talkingmachines.fileio import atomic_write_text
    from talkingmachines.model.vae import load_vae

    clips = sorted(Path(args.data).glob("clip_*.npz"))
    if not clips:
        print(f"error: {args.data}: no clip_*.npz files", file=sys.stderr)
        return 2
    try:
        vae = load_vae("tiny", args.vae).eval()
    except (InputError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    bands: dict[str, list[dict]] = {}
    for f in clips:
        got = clip_signal(vae, f)
        if got is not None and got[0] is not None:
            bands.setdefault(got[0], []).append(got[1])
    if not bands:
        print(f"error: {args.data}: no synthetic clip with face parameters, frames and drawn openings", file=sys.stderr)
        return 2
    out = {}
    for band, rows in bands.items():
        m = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
        out[band] = {"clips": len(rows), **m}
        print(f"{band:6s} {len(rows):3d} clips: mouth box RMS change {m['box_rms']:.3f} (rest of frame "
              f"{m['rest_rms']:.3f}); per unit of opening {m['slope_rms']:.3f}; drawn opening std {m['opening_std']:.3f}")
    if args.json:
        atomic_write_text(args.json, json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
