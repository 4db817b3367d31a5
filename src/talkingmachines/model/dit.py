"""AudioDiT: a Wan2.1 transformer with audio cross-attention in every block.

Parameter names and shapes follow diffusers' `WanTransformer3DModel`, so Wan2.1 checkpoints
(T2V, I2V; diffusers or original layout, see `weights.py`) load as they are; the audio layers
are extra keys (`audio_embedder.*`, `blocks.N.norm_audio.*`, `blocks.N.audio_attn.*`) whose
output projection starts at zero, so a freshly adapted model computes exactly what Wan did.

Self-attention is delegated to a strategy from `attention.py` (bidirectional, sparse-causal
over a clip, or one chunk against a KV cache): the block does not know which one runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.attention import FeedForward
from diffusers.models.embeddings import PixArtAlphaTextProjection, TimestepEmbedding, Timesteps
from diffusers.models.normalization import FP32LayerNorm
from diffusers.models.transformers.transformer_wan import WanImageEmbedding

from ..config import DiTConfig
from . import attention as A


class Attention(nn.Module):
    """Wan attention layout: to_q/k/v, RMS norm across heads on q and k, to_out.0.

    `added_kv_dim` adds the I2V image branch (add_k_proj/add_v_proj/norm_added_k)."""

    def __init__(self, dim, heads, kv_dim=None, eps=1e-6, added_kv_dim=None):
        super().__init__()
        kv_dim = kv_dim or dim
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(kv_dim, dim)
        self.to_v = nn.Linear(kv_dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)
        self.add_k_proj = self.add_v_proj = self.norm_added_k = None
        if added_kv_dim is not None:
            self.add_k_proj = nn.Linear(added_kv_dim, dim)
            self.add_v_proj = nn.Linear(added_kv_dim, dim)
            self.norm_added_k = nn.RMSNorm(dim, eps=eps)

    def heads_view(self, x):
        return x.unflatten(-1, (self.heads, -1))

    def qkv(self, x):
        q = self.heads_view(self.norm_q(self.to_q(x)))
        k = self.heads_view(self.norm_k(self.to_k(x)))
        return q, k, self.heads_view(self.to_v(x))

    def context_kv(self, ctx):
        """Keys/values of a cross-attention context (cacheable per session)."""
        return self.heads_view(self.norm_k(self.to_k(ctx))), self.heads_view(self.to_v(ctx))

    def image_kv(self, img):
        return self.heads_view(self.norm_added_k(self.add_k_proj(img))), self.heads_view(self.add_v_proj(img))

    def out(self, x):
        return self.to_out[0](x.flatten(-2))


@dataclass
class Context:
    """Per-session cross-attention inputs, computed once (the paper's embedding caching).

    `text_kv`/`image_kv`: per block (k, v) for text and image tokens."""

    text_kv: list
    image_kv: list | None


class AudioDiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        dim, eps = cfg.dim, cfg.eps
        self.norm1 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.attn1 = Attention(dim, cfg.num_attention_heads, eps=eps)
        self.attn2 = Attention(dim, cfg.num_attention_heads, eps=eps, added_kv_dim=dim if cfg.image_dim else None)
        self.norm2 = FP32LayerNorm(dim, eps, elementwise_affine=True) if cfg.cross_attn_norm else nn.Identity()
        self.ffn = FeedForward(dim, inner_dim=cfg.ffn_dim, activation_fn="gelu-approximate")
        self.norm3 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)
        self.has_audio = cfg.audio_dim is not None
        if self.has_audio:
            self.norm_audio = FP32LayerNorm(dim, eps, elementwise_affine=True)
            self.audio_attn = Attention(dim, cfg.num_attention_heads, eps=eps)
            if cfg.audio_zero_init:
                nn.init.zeros_(self.audio_attn.to_out[0].weight)  # starts as the identity: Wan unchanged
                nn.init.zeros_(self.audio_attn.to_out[0].bias)

    def cross_kv(self, text_tokens, image_tokens=None) -> tuple:
        """(text K/V, image K/V or None) of this block's cross-attention: computed once per
        prompt and reference, then cached (a method of the block so that FSDP can gather the
        block's weights for it as for its forward)."""
        img = self.attn2.image_kv(image_tokens) if image_tokens is not None else None
        return self.attn2.context_kv(text_tokens), img

    def forward(self, x, mod, frames: int, ctx_kv, img_kv, audio, self_attn, layer: int):
        """x [B, L, D] frame-major with `frames` frames; mod [B, frames, 6, D] (adaLN per frame);
        audio [B, frames, W, D] projected audio tokens or None."""
        B, L, D = x.shape
        hw = L // frames
        shift, scale, gate, c_shift, c_scale, c_gate = (self.scale_shift_table[:, None] + mod.float()).unbind(2)

        def per_frame(t):  # [B, L, D] <-> [B, frames, hw, D] so modulation broadcasts per frame
            return t.view(B, frames, hw, D)

        h = (per_frame(self.norm1(x.float())) * (1 + scale[:, :, None]) + shift[:, :, None]).type_as(x)
        q, k, v = self.attn1.qkv(h.view(B, L, D))
        a = self.attn1.out(self_attn(layer, q, k, v))
        x = (per_frame(x.float()) + per_frame(a) * gate[:, :, None]).view(B, L, D).type_as(x)

        h = self.norm2(x.float()).type_as(x)
        q = self.attn2.heads_view(self.attn2.norm_q(self.attn2.to_q(h)))
        a = A.sdpa(q, *ctx_kv)
        if img_kv is not None:
            a = a + A.sdpa(q, *img_kv)
        x = x + self.attn2.out(a)

        if self.has_audio and audio is not None:
            # each latent frame attends only to its own window of audio frames
            h = per_frame(self.norm_audio(x.float()).type_as(x)).reshape(B * frames, hw, D)
            au = audio.reshape(B * frames, audio.shape[2], D)
            q = self.audio_attn.heads_view(self.audio_attn.norm_q(self.audio_attn.to_q(h)))
            ak, av = self.audio_attn.context_kv(au)
            x = x + self.audio_attn.out(A.sdpa(q, ak, av)).view(B, L, D)

        h = (per_frame(self.norm3(x.float())) * (1 + c_scale[:, :, None]) + c_shift[:, :, None]).type_as(x)
        f = self.ffn(h.view(B, L, D))
        x = (per_frame(x.float()) + per_frame(f.float()) * c_gate[:, :, None]).view(B, L, D).type_as(x)
        return x


class AudioEmbedder(nn.Module):
    """Audio features [B, T, W, audio_dim] -> tokens [B, T, W, D], with a learned position per window slot."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        hidden = cfg.audio_proj_dim or cfg.dim
        self.linear_1 = nn.Linear(cfg.audio_dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.linear_2 = nn.Linear(hidden, cfg.dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, 1, cfg.audio_window, cfg.dim))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.eps)

    def forward(self, a):
        return self.norm(self.linear_2(self.act(self.linear_1(a))) + self.pos_embed)


class ConditionEmbedder(nn.Module):
    """Wan's timestep / text / image embedders (diffusers names: condition_embedder.*)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        dim = cfg.dim
        self.timesteps_proj = Timesteps(num_channels=cfg.freq_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedder = TimestepEmbedding(in_channels=cfg.freq_dim, time_embed_dim=dim)
        self.act_fn = nn.SiLU()
        self.time_proj = nn.Linear(dim, dim * 6)
        self.text_embedder = PixArtAlphaTextProjection(cfg.text_dim, dim, act_fn="gelu_tanh")
        self.image_embedder = WanImageEmbedding(cfg.image_dim, dim) if cfg.image_dim else None

    def time(self, t: torch.Tensor, dtype):
        """t [B, T] (per latent frame) -> temb [B, T, D], mod [B, T, 6, D]."""
        B, T = t.shape
        e = self.timesteps_proj(t.flatten()).to(next(self.time_embedder.parameters()).dtype)
        temb = self.time_embedder(e).to(dtype)
        mod = self.time_proj(self.act_fn(temb)).to(dtype)
        return temb.view(B, T, -1), mod.view(B, T, 6, -1)


class AudioDiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.config = cfg
        dim = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_channels, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.condition_embedder = ConditionEmbedder(cfg)
        self.audio_embedder = AudioEmbedder(cfg) if cfg.audio_dim else None
        self.blocks = nn.ModuleList([AudioDiTBlock(cfg) for _ in range(cfg.num_layers)])
        self.norm_out = FP32LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.proj_out = nn.Linear(dim, cfg.out_channels * math.prod(cfg.patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)
        self.gradient_checkpointing = False

    # ------------------------------------------------------------------ pieces
    @property
    def head_dim(self) -> int:
        return self.config.attention_head_dim

    def encode_context(self, text: torch.Tensor, image: torch.Tensor | None = None) -> Context:
        """text [B, Lt, text_dim], image [B, Li, image_dim] -> per-block cross-attention K/V."""
        ce = self.condition_embedder
        t = ce.text_embedder(text)
        img = ce.image_embedder(image) if (image is not None and ce.image_embedder is not None) else None
        kvs = [b.cross_kv(t, img) for b in self.blocks]
        return Context([kv[0] for kv in kvs], [kv[1] for kv in kvs] if img is not None else None)

    def embed_audio(self, audio: torch.Tensor | None):
        if audio is None or self.audio_embedder is None:
            return None
        return self.audio_embedder(audio.to(self.proj_out.weight.dtype))

    def _patchify(self, x):
        """Conv3d patch embedding computed as one matmul over non-overlapping patches (same
        weights and result; CPU conv3d is far slower for this stride == kernel case)."""
        B, C, T, H, W = x.shape
        pt, ph, pw = self.config.patch_size
        T, H, W = T // pt, H // ph, W // pw
        x = x.reshape(B, C, T, pt, H, ph, W, pw).permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(B, T * H * W, -1)
        conv = self.patch_embedding
        return F.linear(x, conv.weight.flatten(1), conv.bias), (T, H, W)

    def _unpatchify(self, x, temb, grid):
        T, H, W = grid
        B, L, D = x.shape
        shift, scale = (self.scale_shift_table[:, None] + temb[:, :, None].float()).unbind(2)  # [B, T, D]
        x = self.norm_out(x.float()).view(B, T, H * W, D) * (1 + scale[:, :, None]) + shift[:, :, None]
        x = self.proj_out(x.view(B, L, D).type_as(temb))
        p_t, p_h, p_w = self.config.patch_size
        x = x.reshape(B, T, H, W, p_t, p_h, p_w, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)

    def _run(self, x, t, ctx: Context, audio, self_attn):
        """x [B, C, T, H, W] latents, t [B, T] per-frame timesteps, audio [B, T, W, audio_dim]."""
        tokens, grid = self._patchify(x)
        temb, mod = self.condition_embedder.time(t.float(), tokens.dtype)  # timesteps stay fp32
        a = self.embed_audio(audio)
        for i, block in enumerate(self.blocks):
            img_kv = ctx.image_kv[i] if ctx.image_kv is not None else None
            args = (tokens, mod, grid[0], ctx.text_kv[i], img_kv, a, self_attn, i)
            if self.gradient_checkpointing and torch.is_grad_enabled():
                tokens = torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
            else:
                tokens = block(*args)
        return self._unpatchify(tokens, temb, grid)

    @staticmethod
    def _frame_timesteps(t, B, T, device):
        t = torch.as_tensor(t, device=device, dtype=torch.float32)
        if t.ndim == 0:
            t = t.expand(B)
        if t.ndim == 1:
            t = t[:, None].expand(B, T)
        return t

    # ------------------------------------------------------------------ public forwards
    def forward(self, x, timestep, text, image=None, audio=None, ctx: Context | None = None):
        """Bidirectional forward over a whole clip (the teacher; diffusers' Wan when audio=None).

        x [B, C, T, H, W]; timestep scalar, [B] or [B, T] (per latent frame)."""
        B, _, T, H, W = x.shape
        ctx = ctx or self.encode_context(text, image)
        _, ph, pw = self.config.patch_size
        strategy = A.Bidirectional(T, H // ph, W // pw, self.head_dim, x.device)
        return self._run(x, self._frame_timesteps(timestep, B, T, x.device), ctx, audio, strategy)

    def forward_causal(self, x, timestep, text=None, image=None, audio=None, chunk_frames=3, x_clean=None,
                       ctx: Context | None = None):
        """Sparse-causal forward over a whole clip: frame 0 is the sink, then chunks of `chunk_frames`.

        With `x_clean` (teacher forcing), noisy chunk i sees the clean chunk i-1 (as in streaming,
        where the cache holds clean chunks); returns the prediction for `x`'s frames only (the
        sink frame included, first)."""
        B, _, T, H, W = x.shape
        fr = chunk_frames
        assert (T - 1) % fr == 0, f"clip of {T} latent frames is not 1 + k*{fr}"
        n = (T - 1) // fr
        ctx = ctx or self.encode_context(text, image)
        _, ph, pw = self.config.patch_size
        t = self._frame_timesteps(timestep, B, T, x.device)
        strategy = A.SparseCausal(n, fr, H // ph, W // pw, self.head_dim, teacher_forcing=x_clean is not None,
                                  device=x.device)
        if x_clean is None:
            return self._run(x, t, ctx, audio, strategy)
        # sequence: sink, clean chunks (timestep 0), noisy chunks
        seq = torch.cat([x_clean, x[:, :, 1:]], dim=2)
        ts = torch.cat([torch.zeros_like(t), t[:, 1:]], dim=1)
        au = torch.cat([audio, audio[:, 1:]], dim=1) if audio is not None else None
        out = self._run(seq, ts, ctx, au, strategy)
        return torch.cat([out[:, :, :1], out[:, :, T:]], dim=2)

    # ------------------------------------------------------------------ streaming
    def new_cache(self) -> A.KVCache:
        return A.KVCache(len(self.blocks))

    def prefill_sink(self, cache: A.KVCache, sink, ctx: Context, audio=None):
        """sink [B, C, 1, H, W]: the reference frame (timestep 0); stores its K/V in `cache`."""
        B, _, _, H, W = sink.shape
        _, ph, pw = self.config.patch_size
        t = torch.zeros(B, 1, device=sink.device)
        return self._run(sink, t, ctx, audio, A.SinkPrefill(cache, H // ph, W // pw, self.head_dim, sink.device))

    def forward_chunk(self, cache: A.KVCache, x, timestep, ctx: Context, audio=None, chunk: int = 1, write=False):
        """One chunk (chunk >= 1) against the cache. `write=True` stores its K/V as the new
        previous chunk (use it for the clean pass at timestep 0)."""
        B, _, T, H, W = x.shape
        _, ph, pw = self.config.patch_size
        strategy = A.CachedChunk(cache, chunk, T, H // ph, W // pw, self.head_dim, write=write, device=x.device)
        out = self._run(x, self._frame_timesteps(timestep, B, T, x.device), ctx, audio, strategy)
        if write:
            strategy.commit()
        return out

    # ------------------------------------------------------------------ checkpoints (see weights.py)
    def save_pretrained(self, directory, **kwargs):
        """Write this model to `directory`: config.json + safetensors (`weights.save_dit`)."""
        from .weights import save_dit

        return save_dit(self, directory, **kwargs)

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=None, **overrides) -> "AudioDiT":
        """A folder written by `save_pretrained`, or a Wan2.1 checkpoint (diffusers or original
        layout; `overrides` are DiTConfig fields such as `audio_dim`): `weights.load_pretrained`."""
        from .weights import load_pretrained

        return load_pretrained(path, device=device, dtype=dtype, **overrides)


def count_parameters(cfg: DiTConfig) -> int:
    """Parameter count without allocating memory (meta device)."""
    with torch.device("meta"):
        m = AudioDiT(cfg)
    return sum(p.numel() for p in m.parameters())
