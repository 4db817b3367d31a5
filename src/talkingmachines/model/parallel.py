"""Ulysses-style sequence parallelism for the DiT (14B/18B presets across GPUs, under torchrun).

Each of P ranks holds a slice of the tokens: the same spatial slice of every latent frame
(tokens h*w of a frame split into P contiguous pieces), so per-frame adaLN modulation, the
per-frame audio cross-attention, text/image cross-attention and the FFN all run on the local
tokens with no communication. Only self-attention needs every token; around it:

    q, k, v [B, T*hw/P, H, D]  --all-to-all-->  [B, T*hw, H/P, D]   (all tokens, H/P heads)
    attention strategy (RoPE, masks, KV cache) on the head slice
    out [B, T*hw, H/P, D]      --all-to-all-->  [B, T*hw/P, H, D]

`Ulysses` wraps any strategy of `attention.py` (Bidirectional, SparseCausal, SinkPrefill,
CachedChunk): RoPE and masks act per head, so the inner strategy runs unchanged on a head
slice. With the streaming strategies each rank's `KVCache` holds its H/P heads only: the KV
cache is split P ways. Weights are replicated (every rank holds the whole DiT; combine with
FSDP for training or where the weights alone do not fit: see `eval/plan.py`).

Collectives: `all_to_all_single` (NCCL, and gloo in the torch used here). Where a backend
lacks it, `all_to_all` falls back to an `all_gather` of the whole tensor followed by a local
slice (P times the traffic; correct, used only as a fallback). Inference only (no autograd
through the collectives).

Requirements: heads % P == 0 and (h*w tokens per frame) % P == 0.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import attention as A

_A2A_OK: dict = {}


def _all_to_all(x: torch.Tensor, group=None) -> torch.Tensor:
    """x [P, ...] (chunk j goes to rank j) -> [P, ...] (chunk j came from rank j)."""
    x = x.contiguous()
    key = dist.get_backend(group)
    if _A2A_OK.get(key, True):
        out = torch.empty_like(x)
        try:
            dist.all_to_all_single(out, x, group=group)
            _A2A_OK[key] = True
            return out
        except (RuntimeError, NotImplementedError):
            _A2A_OK[key] = False
    # fallback: everybody gathers everything and keeps what was addressed to it
    P, r = dist.get_world_size(group), dist.get_rank(group)
    bufs = [torch.empty_like(x) for _ in range(P)]
    dist.all_gather(bufs, x, group=group)
    return torch.stack([b[r] for b in bufs])


class Ulysses:
    """Wraps an attention strategy so the block can hand it local-token q/k/v."""

    def __init__(self, inner, hw: int, group=None):
        self.inner, self.group = inner, group
        self.P = dist.get_world_size(group)
        assert hw % self.P == 0, f"{hw} tokens per frame do not split over {self.P} ranks"
        self.hw, self.hw_l = hw, hw // self.P

    def _gather_seq(self, x):
        """[B, T*hw_l, H, D] -> [B, T*hw, H/P, D]"""
        B, L, H, D = x.shape
        P, T = self.P, L // self.hw_l
        assert H % P == 0, f"{H} heads do not split over {P} ranks"
        send = x.view(B, T, self.hw_l, P, H // P, D).permute(3, 0, 1, 2, 4, 5)  # [P(heads), B, T, hw_l, h, D]
        recv = _all_to_all(send, self.group)  # [P(tokens), B, T, hw_l, h, D]
        return recv.permute(1, 2, 0, 3, 4, 5).reshape(B, T * self.hw, H // P, D)

    def _scatter_seq(self, y):
        """[B, T*hw, H/P, D] -> [B, T*hw_l, H, D]"""
        B, L, h, D = y.shape
        P, T = self.P, L // self.hw
        send = y.view(B, T, P, self.hw_l, h, D).permute(2, 0, 1, 3, 4, 5)  # [P(tokens), B, T, hw_l, h, D]
        recv = _all_to_all(send, self.group)  # [P(heads), B, T, hw_l, h, D]
        return recv.permute(1, 2, 3, 0, 4, 5).reshape(B, T * self.hw_l, P * h, D)

    def __call__(self, layer: int, q, k, v):
        out = self.inner(layer, self._gather_seq(q), self._gather_seq(k), self._gather_seq(v))
        return self._scatter_seq(out)

    def commit(self):
        self.inner.commit()


def shard_tokens(tokens: torch.Tensor, frames: int, rank: int, P: int) -> torch.Tensor:
    """[B, T*hw, D] -> this rank's [B, T*hw/P, D] (its spatial slice of every frame)."""
    B, L, D = tokens.shape
    hw = L // frames
    return tokens.view(B, frames, P, hw // P, D)[:, :, rank].reshape(B, -1, D).contiguous()


def gather_tokens(local: torch.Tensor, frames: int, group=None) -> torch.Tensor:
    """Inverse of `shard_tokens` (all_gather)."""
    P = dist.get_world_size(group)
    parts = [torch.empty_like(local) for _ in range(P)]
    dist.all_gather(parts, local.contiguous(), group=group)
    B, Ll, D = local.shape
    return torch.stack([p.view(B, frames, Ll // frames, D) for p in parts], dim=2).reshape(B, -1, D)


class SequenceParallelDiT:
    """The `AudioDiT` forwards, sequence-parallel over `group` (every rank calls each method
    with the same full inputs and gets the same full output).

    forward / forward_causal mirror `AudioDiT.forward` / `forward_causal` (without teacher
    forcing); new_cache / prefill_sink / forward_chunk mirror the streaming API, with a
    per-rank cache of H/P heads."""

    def __init__(self, dit, group=None):
        self.dit, self.group = dit, group
        self.P = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        assert dit.config.num_attention_heads % self.P == 0, "heads must divide over the ranks"

    def _run(self, x, t, ctx, audio, strategy_factory):
        dit = self.dit
        tokens, grid = dit._patchify(x)
        T, H, W = grid
        temb, mod = dit.condition_embedder.time(t.float(), tokens.dtype)
        a = dit.embed_audio(audio)
        strategy = Ulysses(strategy_factory(H, W), H * W, self.group)
        local = shard_tokens(tokens, T, self.rank, self.P)
        for i, block in enumerate(dit.blocks):
            img_kv = ctx.image_kv[i] if ctx.image_kv is not None else None
            local = block(local, mod, T, ctx.text_kv[i], img_kv, a, strategy, i)
        full = gather_tokens(local, T, self.group)
        return dit._unpatchify(full, temb, grid), strategy

    def forward(self, x, timestep, text, image=None, audio=None, ctx=None):
        dit = self.dit
        B, _, T, _, _ = x.shape
        ctx = ctx or dit.encode_context(text, image)
        t = dit._frame_timesteps(timestep, B, T, x.device)
        out, _ = self._run(x, t, ctx, audio, lambda h, w: A.Bidirectional(T, h, w, dit.head_dim, x.device))
        return out

    def forward_causal(self, x, timestep, text=None, image=None, audio=None, chunk_frames=3, ctx=None):
        dit = self.dit
        B, _, T, _, _ = x.shape
        n = (T - 1) // chunk_frames
        ctx = ctx or dit.encode_context(text, image)
        t = dit._frame_timesteps(timestep, B, T, x.device)
        out, _ = self._run(x, t, ctx, audio,
                           lambda h, w: A.SparseCausal(n, chunk_frames, h, w, dit.head_dim, device=x.device))
        return out

    def new_cache(self) -> A.KVCache:
        return self.dit.new_cache()  # filled with this rank's head slice only

    def prefill_sink(self, cache, sink, ctx, audio=None):
        B = sink.shape[0]
        t = torch.zeros(B, 1, device=sink.device)
        out, _ = self._run(sink, t, ctx, audio,
                           lambda h, w: A.SinkPrefill(cache, h, w, self.dit.head_dim, sink.device))
        return out

    def forward_chunk(self, cache, x, timestep, ctx, audio=None, chunk: int = 1, write=False):
        dit = self.dit
        B, _, T, _, _ = x.shape
        t = dit._frame_timesteps(timestep, B, T, x.device)
        out, strategy = self._run(
            x, t, ctx, audio,
            lambda h, w: A.CachedChunk(cache, chunk, T, h, w, dit.head_dim, write=write, device=x.device))
        if write:
            strategy.commit()
        return out
