"""Training crops from a `data prep` cache (real talking-head videos, real presets).

`RealClips` mirrors `latents.LatentClips` (same crop convention, same determinism, same
`Batch` fields) and adds what the real presets condition on:

* ``text``  [B, text_len, text_dim]: the umT5 embedding of the clip's prompt;
* ``image`` [B, image_len, image_dim]: the CLIP embedding of the very reference frame whose
  latent is the sink (``ref``).

A crop of ``1 + 12 n`` video frames starts at latent ``m`` of a cached clip: the sink is
``encode_image(ref)`` of one of the video's reference frames (random per (seed, clip,
epoch)), then the clip's latents ``m + 1 .. m + 3n`` (video frames ``4m + 1 .. 4m + 12n``),
whose audio windows are ``audio_windows(features[4m + 1 : 4m + 1 + 12n], context)`` with a
zero window prepended for the sink, exactly as `LatentClips`. Tensors are read lazily (only the
crop's slice of each file), so the cache can be far larger than memory.

The split into training and held-out clips is by video (a held-out identity is never seen).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import VAE_TEMPORAL
from ..errors import InputError
from ..model import audio as audio_fe
from .latents import Batch
from .preprocess import FORMAT, INDEX_NAME, PREP_VERSION


def is_prepared(data_dir) -> bool:
    """True when ``data_dir`` holds a `data prep` cache (its index file)."""
    return data_dir is not None and (Path(data_dir) / INDEX_NAME).is_file()


def read_index(data_dir) -> dict:
    p = Path(data_dir) / INDEX_NAME
    try:
        idx = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{p}: unreadable index ({e})") from None
    if idx.get("format") != FORMAT:
        raise InputError(f"{p}: not a data prep index")
    if idx.get("version", 0) > PREP_VERSION:
        raise InputError(f"{p}: made by a newer version ({idx['version']} > {PREP_VERSION})")
    return idx


@dataclass
class RealBatch(Batch):
    """`Batch` plus the prompt and reference-image embeddings (float32)."""

    text: torch.Tensor | None = None
    image: torch.Tensor | None = None

    def to(self, device) -> "RealBatch":
        return RealBatch(self.z.to(device), self.ref.to(device), self.audio.to(device), self.speaking.to(device),
                         self.clips, self.starts, self.js,
                         text=None if self.text is None else self.text.to(device),
                         image=None if self.image is None else self.image.to(device))


def check_preset(idx: dict, preset, where="") -> None:
    """The cache's sizes must be the preset's (latent channels, audio / text / image dims)."""
    d = preset.dit
    want = {"latent_channels": d.out_channels, "audio_dim": d.audio_dim, "text_dim": d.text_dim,
            "image_dim": d.image_dim}
    bad = [f"{k} {idx.get(k)} (preset {v})" for k, v in want.items() if idx.get(k) != v]
    if bad:
        raise InputError(f"{where}: data made for another model than preset {preset.name!r}: " + ", ".join(bad))
    if d.audio_window != VAE_TEMPORAL + 2 * preset.stream.audio_context:
        raise InputError(f"preset {preset.name!r}: audio_window {d.audio_window} != 4 + 2 * audio_context "
                         f"({preset.stream.audio_context})")


def split_by_video(idx: dict, frac: float, seed: int) -> tuple[list[int], list[int]]:
    """(train clip ids, held-out clip ids); whole videos held out, at least one each way when
    there are two videos or more and ``frac > 0``."""
    if not 0 <= frac < 1:
        raise InputError(f"held-out fraction must be in [0, 1), got {frac}")
    vids = sorted({c["video"] for c in idx["clips"]})
    n = len(vids)
    k = int(round(n * frac))
    if frac > 0 and n > 1:
        k = min(max(k, 1), n - 1)
    perm = np.random.default_rng([int(seed), 2654435761]).permutation(n)
    held = {vids[i] for i in perm[:k]}
    tr = [c["clip"] for c in idx["clips"] if c["video"] not in held]
    ho = [c["clip"] for c in idx["clips"] if c["video"] in held]
    return tr, ho


class RealClips:
    """Crops of ``1 + 12 n`` frames (``n = chunks``) from a `data prep` cache; deterministic.

    ``get(i, epoch)`` -> dict (the `LatentClips` keys plus ``text``, ``image``);
    ``collate(items)`` -> `RealBatch`. ``clip_ids`` restricts to some clips (training split)."""

    def __init__(self, data_dir: str | Path, chunks: int, chunk_frames: int = 3, context: int = 2,
                 seed: int = 0, clip_ids: list[int] | None = None, preset=None):
        self.root = Path(data_dir)
        self.index = read_index(self.root)
        if preset is not None:
            check_preset(self.index, preset, str(self.root))
        need = 1 + chunks * chunk_frames
        # a crop takes latents m+1 .. m+3n of a clip with m in [0, latent_frames - 3n): the
        # clip needs 1 + 3n latent frames (its own frame 0 is never used: the sink replaces it)
        ents = [e for e in self.index["clips"] if e["latent_frames"] >= need]
        if clip_ids is not None:
            keep = set(int(c) for c in clip_ids)
            ents = [e for e in ents if e["clip"] in keep]
        if not ents:
            raise InputError(f"{self.root}: no clip has the {need} latent frames a crop of {chunks} chunks needs "
                             f"(prepare longer clips: data prep --clip-chunks)")
        self.entries = ents
        self.chunks, self.chunk_frames, self.context, self.seed = chunks, chunk_frames, context, int(seed)
        self._text: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def _text_of(self, name: str) -> torch.Tensor:
        if name not in self._text:
            from safetensors.torch import load_file

            self._text[name] = load_file(str(self.root / name))["text"].float()
        return self._text[name]

    def get(self, i: int, epoch: int = 0) -> dict:
        from safetensors import safe_open

        e = self.entries[i]
        n_lat = self.chunks * self.chunk_frames
        rng = np.random.default_rng([self.seed, int(e["clip"]), int(epoch), 11])
        m = int(rng.integers(0, e["latent_frames"] - n_lat))  # crop = latents m .. m + n_lat
        f0 = VAE_TEMPORAL * m + 1
        nf = VAE_TEMPORAL * n_lat
        with safe_open(str(self.root / e["refs"]), "pt") as f:
            r = int(rng.integers(f.get_slice("latents").get_shape()[0]))
            ref = f.get_slice("latents")[r:r + 1][0].float()[:, None]  # [C, 1, h, w]
            image = f.get_slice("image_embeds")[r:r + 1][0].float()
        with safe_open(str(self.root / e["file"]), "pt") as f:
            lat = f.get_slice("latents")[:, m + 1: m + 1 + n_lat].float()
            feats = f.get_slice("features")[f0: f0 + nf].float()
            spk = f.get_slice("speaking")[f0: f0 + nf].bool()
        z = torch.cat([ref, lat], dim=1)
        win = audio_fe.audio_windows(feats, self.context, n_latent=n_lat)  # [n_lat, W, F]
        audio = torch.cat([torch.zeros_like(win[:1]), win])
        return {"z": z, "ref": ref, "audio": audio, "speaking": spk, "clip": int(e["clip"]), "start": 4 * m,
                "text": self._text_of(e["text"]), "image": image}

    @staticmethod
    def collate(items: list[dict]) -> RealBatch:
        return RealBatch(torch.stack([it["z"] for it in items]), torch.stack([it["ref"] for it in items]),
                         torch.stack([it["audio"] for it in items]), torch.stack([it["speaking"] for it in items]),
                         [it["clip"] for it in items], [it["start"] for it in items], [],
                         text=torch.stack([it["text"] for it in items]),
                         image=torch.stack([it["image"] for it in items]))


def load_real_clips(stage, cfg, preset) -> RealClips:
    """The training split of a `data prep` cache for a DiT stage (writes ``OUT/held_out.json``)."""
    from ..fileio import atomic_write_text

    idx = read_index(cfg.data)
    check_preset(idx, preset, str(cfg.data))
    train, held = split_by_video(idx, cfg.held_out, cfg.seed)
    if not train:
        raise InputError(f"{cfg.data}: no training clips left after the held-out split")
    if stage.env.is_main:
        vids = sorted({c["video"] for c in idx["clips"] if c["clip"] in set(held)})
        atomic_write_text(stage.out / "held_out.json", json.dumps({"clips": held, "videos": vids, "data": cfg.data}))
    stage.cache_dir = Path(cfg.data)
    return RealClips(cfg.data, cfg.clip_chunks, preset.stream.chunk_frames, preset.stream.audio_context, cfg.seed,
                     clip_ids=train)


__all__ = ["RealClips", "RealBatch", "is_prepared", "read_index", "split_by_video", "check_preset", "load_real_clips"]
