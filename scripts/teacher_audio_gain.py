"""How much a teacher uses the audio: its x0 error in the mouth box of held-out crops with the clip's own
audio against another clip's (same length), at a few noise levels. gain = 1 - err(own) / err(other's).

A teacher that ignores the audio scores about 0; one that knew the lip opening exactly would score about
0.2-0.3 on data version 3 (the opening explains 0.039 of the mouth box's 0.099 per-element variance over time).

    python scripts/teacher_audio_gain.py RUN DIT [PRESET_JSON]
    python scripts/teacher_audio_gain.py RUN RUN/teacher/checkpoints/step_N --config CONFIG [--data DATA]
    python scripts/teacher_audio_gain.py RUN DIT --new-faces runs/unseen7

--new-faces DATA2 scores crops of every clip of another data folder instead (faces no split of the run has
seen, so runs with different training splits compare on the same crops); its latents are encoded with
RUN/vae into DATA2's cache the first time.

RUN: a recipe run folder (RUN/teacher/held_out.json; the latent cache of RUN/vae, under RUN/data or
--data); DIT: a DiT folder (RUN/teacher/final/dit) or a teacher checkpoint folder (its EMA weights);
PRESET_JSON: default RUN/teacher/final/preset.json. Mid-run there is no final preset yet: --config names
the recipe config the run was started with, and its teacher stage's preset is used (so a teacher can be
scored while it trains; copy the checkpoint first, they rotate).
"""
import argparse
import glob
import json
import os
from pathlib import Path

import torch

from talkingmachines.config import Preset
from talkingmachines.diffusion import flow
from talkingmachines.model.dit import AudioDiT
from talkingmachines.pipeline import bidirectional_v
from talkingmachines.train.latents import LatentClips


def run_preset(run: str, preset: str | None, config: str | None, data: str | None) -> Preset:
    if config is None:
        return Preset.load(preset or f"{run}/teacher/final/preset.json")
    from talkingmachines.train.recipe import recipe_config

    rc = recipe_config(config, data=data)
    return rc.stage_config("teacher", Path(run)).make_preset()


def latent_cache(run: str, data: str | None) -> str:
    """RUN/vae's latent cache (the one the teacher trained on), under --data or RUN/data."""
    from talkingmachines.train.latents import _file_id, cache_dir

    root = Path(data or f"{run}/data")
    cache = cache_dir(root, _file_id(Path(run) / "vae"))
    if cache.is_dir():
        return str(cache)
    found = sorted(glob.glob(f"{root}/latents-*"))  # runs older than the vae id in the name
    if len(found) != 1:
        raise SystemExit(f"error: no latent cache of {run}/vae under {root} (pass --data)")
    return found[0]


def load_dit(dit: str, preset: Preset) -> AudioDiT:
    """DIT in eval mode: a DiT folder, or a teacher checkpoint folder's EMA weights in the preset's shape."""
    ema = os.path.join(dit, "ema.teacher.safetensors")
    if os.path.isfile(ema):
        from safetensors.torch import load_file

        m = AudioDiT(preset.dit)
        m.load_state_dict(load_file(ema))
    else:
        m = AudioDiT.from_pretrained(dit)
    return m.eval()


def crops(cache: str, p: Preset, chunks: int, ids: list[int] | None, n_max: int | None = None) -> list:
    """One collated crop of ``chunks`` chunks from the start of each clip ``ids`` of latent cache ``cache``
    (every clip when None), at most ``n_max``."""
    clips = LatentClips(cache, chunks, p.stream.chunk_frames, p.stream.audio_context, 0, clip_ids=ids)
    return [clips.collate([clips.get(i, 0)]) for i in range(len(clips) if n_max is None else min(len(clips), n_max))]


def x0_residuals(m: AudioDiT, p: Preset, b, sv: float, seed: int, audios) -> tuple[list, torch.Tensor]:
    """The teacher's one-step x0 prediction minus the clean latents, on crop ``b`` noised to level ``sv`` with
    noise drawn from ``seed``: one residual per audio in ``audios``; and the crop's mouth box as a mask."""
    x0 = b.z[:, :, 1:]
    e = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    s = torch.tensor([sv])
    xs = flow.add_noise(x0, e, s)
    box = b.mouth[:, None, None].bool().expand_as(x0)
    return [xs - s * bidirectional_v(m, xs, 1000 * s, b.ref, audio, p) - x0 for audio in audios], box


def main(run: str, dit: str, preset: str | None = None, n_max: int = 24, config: str | None = None,
         data: str | None = None, new_faces: str | None = None) -> None:
    torch.set_num_threads(1)
    p = run_preset(run, preset, config, data)
    m = load_dit(dit, p)
    chunks = 2
    if new_faces:
        from talkingmachines.train.latents import ensure_latent_cache

        cache, ids, what = ensure_latent_cache(new_faces, f"{run}/vae", p, 1 + 12 * chunks), None, "new-face"
    else:
        ids = sorted(json.load(open(f"{run}/teacher/held_out.json"))["clips"])
        cache, what = latent_cache(run, data), "held-out"
    items = crops(cache, p, chunks, ids, n_max)
    n = len(items)
    with torch.no_grad():
        for sv in (1.0, 0.7):
            own = other = 0.0
            for i, b in enumerate(items):
                (r_own, r_other), box = x0_residuals(m, p, b, sv, i, (b.audio, items[(i + 1) % n].audio))
                own += (r_own[box] ** 2).mean().item()
                other += (r_other[box] ** 2).mean().item()
            print(f"noise {sv}: mouth-box x0 mse, own audio {own / n:.4f}, another clip's {other / n:.4f}, "
                  f"gain {1 - own / other:+.3f} ({n} {what} crops)", flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("dit")
    ap.add_argument("preset", nargs="?", default=None)
    ap.add_argument("--config", default=None, help="the run's recipe config (mid-run: builds the teacher's preset)")
    ap.add_argument("--data", default=None, help="the run's data folder (default RUN/data)")
    ap.add_argument("--n", type=int, default=24, help="held-out crops")
    ap.add_argument("--new-faces", default=None, metavar="DATA2",
                    help="score every clip of this data folder (identities the run never saw) instead")
    a = ap.parse_args()
    try:
        main(a.run, a.dit, a.preset, a.n, a.config, a.data, a.new_faces)
    except (ValueError, OSError) as e:  # InputError and WeightsError are ValueErrors: a bad path, one line
        raise SystemExit(f"error: {e}") from None
