"""A teacher's x0 error by skin band, on faces it trained on and on new ones: does the DiT fit dark faces
worse, or do they just carry less signal? Per band (dark, light) and noise level (0.8, 0.6), the latent MSE of
its one-step x0 prediction over the whole frame and in the mouth box, with the clip's own audio.

    python scripts/teacher_x0_by_skin.py RUN DIT PRESET_JSON --data runs/data12 --new runs/unseen [--n 16]

RUN: a recipe run folder (RUN/teacher/held_out.json; RUN/vae, whose latent cache is under --data); training
faces are clips of --data outside the held-out split, new faces every clip of --new (encoded with RUN/vae
the first time). DIT: a DiT folder, or a teacher checkpoint folder (its EMA weights); PRESET_JSON: its preset
(RUN/teacher/final/preset.json).
"""
import argparse
import json
import sys
from pathlib import Path

import torch

from talkingmachines.config import Preset
from talkingmachines.model.dit import AudioDiT
from talkingmachines.train.latents import clip_skin, ensure_latent_cache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from teacher_audio_gain import crops, latent_cache, load_dit, x0_residuals  # noqa: E402

BANDS = ("dark", "light")
CHUNKS = 2


def clips_by_band(root: str, skip: set[int], n: int) -> dict[str, list[int]]:
    """The first ``n`` clips of each band of data folder ``root``, leaving out the clip ids ``skip``."""
    idx = json.loads((Path(root) / "index.json").read_text())
    out = {b: [] for b in BANDS}
    for i, c in enumerate(idx["clips"]):
        if all(len(ids) == n for ids in out.values()):
            break
        if i in skip:
            continue
        band = clip_skin(Path(root) / c["npz"])
        if band in out and len(out[band]) < n:
            out[band].append(i)
    return out


def x0_errors(m: AudioDiT, p: Preset, cache, ids: list[int]) -> dict[float, tuple[float, float]]:
    items = crops(cache, p, CHUNKS, ids)
    res = {}
    for sv in (0.8, 0.6):
        frame = mouth = 0.0
        for i, b in enumerate(items):
            (r,), box = x0_residuals(m, p, b, sv, i, (b.audio,))
            err = r ** 2
            frame += err.mean().item()
            mouth += err[box].mean().item()
        res[sv] = (frame / len(items), mouth / len(items))
    return res


def main(a) -> None:
    torch.set_num_threads(1)
    p = Preset.load(a.preset)
    m = load_dit(a.dit, p)
    held = set(json.load(open(f"{a.run}/teacher/held_out.json"))["clips"])
    sets = [("training faces", latent_cache(a.run, a.data), clips_by_band(a.data, held, a.n)),
            ("new faces", ensure_latent_cache(a.new, f"{a.run}/vae", p, 1 + 12 * CHUNKS), clips_by_band(a.new, set(), a.n))]
    with torch.no_grad():
        for name, cache, bands in sets:
            for band, ids in bands.items():
                if not ids:
                    continue
                res = x0_errors(m, p, cache, ids)
                print(f"{name}, {band} ({len(ids)} clips): " + "; ".join(
                    f"noise {s}: frame {f:.4f}, mouth {mo:.4f}" for s, (f, mo) in res.items()), flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("dit")
    ap.add_argument("preset")
    ap.add_argument("--data", required=True, help="the run's training data folder")
    ap.add_argument("--new", required=True, help="a data folder of faces no split of the run saw")
    ap.add_argument("--n", type=int, default=16, help="clips per skin band")
    try:
        main(ap.parse_args())
    except (ValueError, OSError) as e:  # InputError and WeightsError are ValueErrors: a bad path, one line
        raise SystemExit(f"error: {e}") from None
