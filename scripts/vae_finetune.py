"""Fine-tune a whole TinyVAE, encoder too, on a recipe's training clips (the recipe's `decoder` stage trains the
decoder alone under a frozen encoder). Its encoder then gives other latents, so every DiT stage would retrain.

    python scripts/vae_finetune.py --data runs/data12 --init src/talkingmachines/weights/tiny/vae --out runs/dkenc/vae \\
        --steps 900 --dark-repeat 3 --feature-weight 3

The clips are the recipe's (``--config``, default tiny-face: its held-out split left out), each dark-skinned
synthetic clip listed ``--dark-repeat`` times; batch size and learning rate are its decoder stage's. Resumes
from OUT's last checkpoint.
"""
import argparse
from pathlib import Path

from talkingmachines.train.recipe import _train_clips, recipe_config
from talkingmachines.train.vae_train import train_tiny_vae


def main(a) -> None:
    r = recipe_config(a.config, data=a.data)
    d = r.decoder
    clips = _train_clips(r, r.vae.clip_frames, a.feature_weight > 0, a.dark_repeat)
    train_tiny_vae(clips, Path(a.out), steps=a.steps, batch_size=d.batch_size, lr=d.lr, seed=r.seed, device="cpu",
                   ckpt_every=150, init_from=a.init, temporal_weight=r.vae.temporal_weight,
                   feature_weight=a.feature_weight)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="the recipe's clip folder")
    ap.add_argument("--init", required=True, help="the VAE folder to start from")
    ap.add_argument("--out", required=True, help="the new VAE folder")
    ap.add_argument("--config", default="tiny-face", help="the recipe config (clips, held-out split, batch, lr)")
    ap.add_argument("--steps", type=int, default=900)
    ap.add_argument("--dark-repeat", type=int, default=1)
    ap.add_argument("--feature-weight", type=float, default=0.0)
    try:
        main(ap.parse_args())
    except (ValueError, OSError) as e:  # InputError is a ValueError: a bad path or setting, one line
        raise SystemExit(f"error: {e}") from None
