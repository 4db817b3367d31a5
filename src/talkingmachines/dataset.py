"""The clip data set (`talkingmachines.train.synth.synth_dataset` writes it): training reads its
crops, evaluation its held-out clips.

`ClipDataset(dir)` reads `index.json` and the `clip_XXXXX.npz` files. Item i is a dict of
numpy arrays (a torch DataLoader's default collate turns them into tensors):

* video     uint8   [T, H, W, 3]   T = clip_frames (1 + 4k) or the whole clip
* audio     float32 [T * 640]      16 kHz, aligned to the video frames
* mouth_open, mouth_round float32 [T];  speaking bool [T]
* ref       uint8   [H, W, 3]      a reference frame of the same identity (a listening
                                   frame, mouth closed, when the clip has one)
* index, start  int                clip index and first frame of the crop

Crops and the reference frame are random but deterministic given (seed, index, epoch):
call `set_epoch(e)` once per epoch. `held_out_split(ds, frac)` splits by clip.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .config import SAMPLES_PER_FRAME, VAE_TEMPORAL
from .errors import InputError


class ClipDataset:
    def __init__(self, root: str | Path, clip_frames: int | None = None, seed: int = 0,
                 indices: list[int] | None = None, ref_mode: str = "listening"):
        self.root = Path(root)
        idx = self.root / "index.json"
        if not idx.is_file():
            raise InputError(f"no index.json in {self.root} (make a data set with "
                             f"`talkingmachines data synth --out {self.root}`)")
        self.index = json.loads(idx.read_text())
        self.clips = list(self.index["clips"])
        if clip_frames is not None and (clip_frames < 1 or (clip_frames - 1) % VAE_TEMPORAL):
            raise InputError(f"clip_frames must be 1 + {VAE_TEMPORAL}k, got {clip_frames}")
        self.clip_frames = clip_frames
        self.seed = int(seed)
        self.epoch = 0
        if ref_mode not in ("listening", "first", "random"):
            raise InputError(f"ref_mode must be listening, first or random, got {ref_mode!r}")
        self.ref_mode = ref_mode
        all_idx = list(range(len(self.clips)))
        self.indices = all_idx if indices is None else list(indices)
        if clip_frames is not None:  # clips shorter than a crop are left out
            self.indices = [i for i in self.indices if self.clips[i]["frames"] >= clip_frames]
        if not self.indices:
            raise InputError(f"no usable clips in {self.root}")

    @property
    def size(self) -> int:
        return int(self.index["size"])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def subset(self, indices: list[int]) -> "ClipDataset":
        """A view on some clips (indices into this data set)."""
        ds = ClipDataset.__new__(ClipDataset)
        ds.__dict__.update(self.__dict__)
        ds.indices = [self.indices[i] for i in indices]
        return ds

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, i: int) -> dict:
        """The whole clip i (numpy arrays)."""
        c = self.clips[self.indices[i]]
        with np.load(self.root / c["npz"]) as z:
            return {k: z[k] for k in ("frames", "audio", "mouth_open", "mouth_round", "speaking")}

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(i)
        ci = self.indices[i]
        z = self.load(i)
        T = z["frames"].shape[0]
        rng = np.random.default_rng([self.seed, ci, self.epoch])
        n = T if self.clip_frames is None else self.clip_frames
        start = int(rng.integers(0, T - n + 1))
        sl = slice(start, start + n)
        spk = z["speaking"]
        if self.ref_mode == "first":
            r = 0
        else:
            cand = np.nonzero(~spk)[0] if self.ref_mode == "listening" else np.arange(T)
            # prefer frames outside the crop so the model can't just copy the target
            out = cand[(cand < start) | (cand >= start + n)]
            pool = out if len(out) else (cand if len(cand) else np.arange(T))
            r = int(pool[rng.integers(len(pool))])
        return dict(
            video=z["frames"][sl],
            audio=z["audio"][start * SAMPLES_PER_FRAME:(start + n) * SAMPLES_PER_FRAME],
            mouth_open=z["mouth_open"][sl],
            mouth_round=z["mouth_round"][sl],
            speaking=spk[sl],
            ref=z["frames"][r],
            index=ci,
            start=start,
        )


def held_out_split(dataset: ClipDataset, frac: float = 0.1, seed: int = 0) -> tuple[ClipDataset, ClipDataset]:
    """Split by clip into (train, held_out); at least one clip in each when possible."""
    if not 0 <= frac < 1:
        raise InputError(f"held-out fraction must be in [0, 1), got {frac}")
    n = len(dataset)
    k = int(round(n * frac))
    if frac > 0 and n > 1:
        k = min(max(k, 1), n - 1)
    perm = np.random.default_rng([int(seed), 2654435761]).permutation(n)
    held = sorted(perm[:k].tolist())
    train = sorted(perm[k:].tolist())
    return dataset.subset(train), dataset.subset(held)
