"""How much a teacher uses the audio: its x0 error in the mouth box of held-out crops with the clip's own
audio against another clip's (same length), at a few noise levels. gain = 1 - err(own) / err(other's).

A teacher that ignores the audio scores about 0; one that knew the lip opening exactly would score about
0.2-0.3 on data version 3 (the opening explains 0.039 of the mouth box's 0.099 per-element variance over time).

    python scripts/teacher_audio_gain.py RUN DIT [PRESET_JSON]

RUN: a recipe run folder (RUN/data with its latent cache, RUN/teacher/held_out.json); DIT: a DiT folder
(RUN/teacher/final/dit) or a teacher checkpoint folder (RUN/teacher/checkpoints/step_N, its EMA weights);
PRESET_JSON: default RUN/teacher/final/preset.json.
"""
import glob
import json
import os
import sys

import torch

from talkingmachines.config import Preset
from talkingmachines.diffusion import flow
from talkingmachines.model.dit import AudioDiT
from talkingmachines.pipeline import bidirectional_v
from talkingmachines.train.latents import LatentClips


def main(run: str, dit: str, preset: str | None = None, n_max: int = 24) -> None:
    torch.set_num_threads(1)
    p = Preset.load(preset or f"{run}/teacher/final/preset.json")
    ema = os.path.join(dit, "ema.teacher.safetensors")
    if os.path.isfile(ema):
        from safetensors.torch import load_file

        m = AudioDiT(p.dit)
        m.load_state_dict(load_file(ema))
    else:
        m = AudioDiT.from_pretrained(dit)
    m.eval()
    held = json.load(open(f"{run}/teacher/held_out.json"))["clips"]
    cache = sorted(glob.glob(f"{run}/data/latents-*"))[0]
    ho = LatentClips(cache, 2, p.stream.chunk_frames, p.stream.audio_context, 0, clip_ids=sorted(held))
    items = [ho.collate([ho.get(i, 0)]) for i in range(min(len(ho), n_max))]
    n = len(items)
    with torch.no_grad():
        for sv in (1.0, 0.7):
            own = other = 0.0
            for i, b in enumerate(items):
                x0 = b.z[:, :, 1:]
                e = torch.randn(x0.shape, generator=torch.Generator().manual_seed(i))
                s = torch.tensor([sv])
                xs = flow.add_noise(x0, e, s)
                box = b.mouth[:, None, None].bool().expand_as(x0)
                for audio, which in ((b.audio, "own"), (items[(i + 1) % n].audio, "other")):
                    v = bidirectional_v(m, xs, 1000 * s, b.ref, audio, p)
                    err = ((xs - s * v - x0)[box] ** 2).mean().item()
                    if which == "own":
                        own += err
                    else:
                        other += err
            print(f"noise {sv}: mouth-box x0 mse, own audio {own / n:.4f}, another clip's {other / n:.4f}, "
                  f"gain {1 - own / other:+.3f} ({n} held-out crops)", flush=True)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(*sys.argv[1:4])
