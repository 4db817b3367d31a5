"""Tiny synthetic data, VAE and config for the training tests (fast on 2 CPU cores)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

MICRO_PRESET = {
    "dit": {"num_attention_heads": 2, "attention_head_dim": 16, "ffn_dim": 64, "num_layers": 2,
            "text_dim": 16, "freq_dim": 32},
    "height": 32, "width": 32,
}


def make_clips(root: Path, n: int = 4, frames: int = 29, size: int = 32, seed: int = 0) -> Path:
    """`n` clips in the ClipDataset layout: a coloured square whose 'mouth' bar opens with a tone."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    clips = []
    for i in range(n):
        T = frames
        speaking = np.zeros(T, bool)
        speaking[T // 3:] = True
        t = np.arange(T * 640) / 16000
        env = np.repeat(speaking.astype(np.float32) * (0.5 + 0.5 * np.sin(np.arange(T) * 0.9) ** 2), 640)
        audio = (0.3 * env * np.sin(2 * np.pi * (150 + 40 * i) * t)).astype(np.float32)
        mouth = speaking * (0.5 + 0.5 * np.sin(np.arange(T) * 0.9) ** 2)
        col = rng.integers(40, 215, 3)
        vid = np.zeros((T, size, size, 3), np.uint8)
        vid[:] = rng.integers(0, 60, 3)
        for k in range(T):
            vid[k, 6:26, 6:26] = col
            h = int(1 + 6 * mouth[k])
            vid[k, 18:18 + h, 11:21] = 20
        np.savez(root / f"clip_{i:05d}.npz", frames=vid, audio=audio, mouth_open=mouth.astype(np.float32),
                 mouth_round=np.zeros(T, np.float32), speaking=speaking)
        clips.append({"name": f"clip_{i:05d}", "npz": f"clip_{i:05d}.npz", "frames": T})
    (root / "index.json").write_text(json.dumps({"version": 1, "n": n, "size": size, "clips": clips}))
    return root


def make_vae(path: Path) -> Path:
    from talkingmachines.model.vae import TinyVAE, TinyVAEConfig

    torch.manual_seed(0)
    TinyVAE(TinyVAEConfig(enc_widths=(8, 8, 8), dec_widths=(8, 8, 8))).save_pretrained(path)
    return path


def micro_config(tmp: Path, stage: str, out: str, **kw):
    from talkingmachines.train.config import TrainConfig

    base = dict(stage=stage, preset="tiny", preset_overrides=MICRO_PRESET, data=str(tmp / "data"),
                vae=str(tmp / "vae"), out=str(tmp / out), steps=4, batch_size=2, clip_chunks=2, lr=1e-3,
                warmup=0, ckpt_every=2, log_every=1, progress=False, held_out=0.0, ode_steps=4, ode_pairs=4,
                ode_batch=2, fake_ratio=1, ema_decay=0.99)
    base.update(kw)
    return TrainConfig.from_dict(base)  # flat keys, as the shipped configs
