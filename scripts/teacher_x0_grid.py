"""What a teacher believes at each noise level: its one-step x0 prediction on a clip's latents,
noised to a few levels and decoded, one row per level under the clip itself.

A teacher that cannot tell where the face is at mid noise predicts a blend of the places it might be
(ghost eyes, two hairlines); sampling then keeps the blend as grey smudges. The latent MSE per level
is printed beside the picture.

    python scripts/teacher_x0_grid.py RUN DIT OUT.png CLIP [CLIP ...] --data DATA [--noise 0.2,0.4,0.6,0.8,1]

RUN: a recipe run folder (RUN/vae and its latent cache under DATA; the preset RUN/teacher/final/preset.json
unless --preset); DIT: a DiT folder or a teacher checkpoint folder (its EMA weights); CLIP: clip numbers of
DATA (a crop of 2 chunks from each, the crop the teacher's data loader draws first).
"""
import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from teacher_audio_gain import latent_cache, load_dit, run_preset  # noqa: E402

from talkingmachines.diffusion import flow  # noqa: E402
from talkingmachines.model.vae import TinyVAE  # noqa: E402
from talkingmachines.pipeline import bidirectional_v  # noqa: E402
from talkingmachines.train.latents import LatentClips  # noqa: E402


@torch.no_grad()
def main(a) -> None:
    from PIL import Image

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    p = run_preset(a.run, a.preset, None, None)
    model = load_dit(a.dit, p)
    vae = TinyVAE.from_pretrained(f"{a.run}/vae")
    cache = latent_cache(a.run, a.data)
    rows = []
    for clip in a.clips:
        ds = LatentClips(cache, 2, p.stream.chunk_frames, p.stream.audio_context, 0, clip_ids=[clip])
        b = ds.collate([ds.get(0, 0)])
        x0 = b.z[:, :, 1:]
        preds = {"clip": x0}
        for sv in a.noise:
            e = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
            s = torch.tensor([sv])
            xs = flow.add_noise(x0, e, s)
            preds[f"noise {sv:g}"] = xs - s * bidirectional_v(model, xs, 1000 * s, b.ref, b.audio, p)
        for name, z in preds.items():
            frames = np.asarray(vae.decode(torch.cat([b.ref, z], 2)))[1::2][: a.frames]
            print(f"clip {clip} {name}: latent mse {((z - x0) ** 2).mean().item():.4f}", flush=True)
            rows.append(np.concatenate(list(frames), 1))
    Image.fromarray(np.concatenate(rows, 0)).save(a.out)
    print(f"wrote {a.out}: per clip, rows {', '.join(preds)}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("dit")
    ap.add_argument("out")
    ap.add_argument("clips", nargs="+", type=int)
    ap.add_argument("--data", required=True, help="the data folder whose latent cache the run's VAE made")
    ap.add_argument("--preset", default=None, help="preset.json (default RUN/teacher/final/preset.json)")
    ap.add_argument("--noise", type=lambda s: [float(x) for x in s.split(",")], default=[0.2, 0.4, 0.6, 0.8, 1.0])
    ap.add_argument("--frames", type=int, default=12, help="every 2nd frame, this many per row")
    args = ap.parse_args()
    try:
        main(args)
    except (ValueError, OSError) as e:  # InputError and WeightsError are ValueErrors: a bad path, one line
        raise SystemExit(f"error: {e}") from None
