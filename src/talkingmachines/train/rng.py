"""Determinism: nothing in training draws from a global RNG.

The clip order is a permutation per epoch from ``(seed, epoch)`` (`GlobalOrder`); each sample's
noise/timestep/dropout comes from `sample_generator(seed, step, j)`, where ``j`` is the sample's
index in the *global* batch, so a resumed run, and a run on any number of processes, computes
the same thing.
"""

from __future__ import annotations

import base64

import numpy as np
import torch

from ..errors import InputError

_MIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix-style), stable across processes and runs."""
    h = 0
    for i, p in enumerate(parts):
        h = (h ^ ((int(p) + 1) * _MIX[i % 3])) & 0xFFFFFFFFFFFFFFFF
        h = ((h ^ (h >> 31)) * _MIX[(i + 1) % 3]) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


def sample_generator(seed: int, step: int, j: int, salt: int = 0) -> torch.Generator:
    """The RNG of sample ``j`` of the global batch of ``step`` (CPU generator)."""
    return torch.Generator().manual_seed(mix_seed(seed, step, j, salt))


def randn(shape, gen: torch.Generator, device) -> torch.Tensor:
    return torch.randn(shape, generator=gen).to(device)


class GlobalOrder:
    """Which clips make up the global batch of each step: epoch ``e`` is a permutation from
    ``(seed, e)``; position ``p = step * batch + j`` is clip ``perm_{p // N}[p % N]``."""

    def __init__(self, n: int, batch_size: int, seed: int):
        if n < 1:
            raise InputError("the data set is empty")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._perm: dict[int, np.ndarray] = {}

    def perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm:
            if len(self._perm) > 4:
                self._perm.clear()
            self._perm[epoch] = np.random.default_rng([self.seed, epoch, 3]).permutation(self.n)
        return self._perm[epoch]

    def global_batch(self, step: int) -> list[tuple[int, int]]:
        """[(clip index, epoch)] for the whole global batch of ``step``."""
        out = []
        for j in range(self.batch_size):
            p = step * self.batch_size + j
            e = p // self.n
            out.append((int(self.perm(e)[p % self.n]), e))
        return out

    def position(self, step: int) -> dict:
        p = step * self.batch_size
        return {"epoch": p // self.n, "offset": p % self.n, "samples_seen": p}


def rng_state() -> dict:
    return {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
            "numpy": np.random.get_state()[1][:4].tolist()}
