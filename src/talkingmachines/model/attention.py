"""Self-attention strategies for the DiT: 3-D RoPE, block-sparse causal masks, and the KV cache.

A DiT block computes q, k, v (normed, not yet rotated) and hands them to an *attention
strategy*; the strategy owns positions, masks and caching. Four strategies share one block:

- `Bidirectional`: the teacher (and diffusers' Wan): every token sees every token.
- `SparseCausal`: the student over a whole clip in one masked forward (training, and the
  reference the streaming path must reproduce).
- `SinkPrefill` / `CachedChunk`: the streaming path, one chunk at a time against a KV cache
  that holds only the sink (reference image) and the previous chunk.

Positions. The sink is latent frame 0. Chunk i (1-based) covers latent frames
1+(i-1)F .. iF of the clip. Streaming re-bases RoPE to the attention window so that every
chunk sees the same geometry however long the stream runs (no position ever grows, no
extrapolation beyond what training saw): the sink sits at t=0, the previous chunk at
t=1..F, the current chunk at t=F+1..2F (chunk 1, which has no previous chunk, at 1..F).
RoPE only sees position differences, so this equals absolute positions for chunk-to-chunk
attention; only the sink must move: for chunk i it sits at t=max(i-2, 0)*F in absolute
terms. The whole-clip `SparseCausal` forward reproduces that by giving each chunk its own
rotated copy of the sink's keys.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------- RoPE
def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Channels of a head given to (t, h, w), as Wan: 128 -> 44/42/42."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def _axis_angles(pos: torch.Tensor, dim: int, theta: float) -> torch.Tensor:
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim))
    return torch.outer(pos.to(torch.float64), freqs)  # [N, dim/2]


def rope_cos_sin(t_pos, h_pos, w_pos, head_dim: int, theta: float = 10000.0):
    """cos/sin [N, head_dim/2] for tokens at integer (t, h, w) positions (float64 angles, as diffusers)."""
    dt, dh, dw = rope_split(head_dim)
    ang = torch.cat(
        [_axis_angles(t_pos, dt, theta), _axis_angles(h_pos, dh, theta), _axis_angles(w_pos, dw, theta)], dim=1
    )
    return ang.cos().float(), ang.sin().float()


def grid_positions(t_positions: torch.Tensor, height: int, width: int):
    """(t, h, w) per token for frames at `t_positions`, each a height x width token grid, frame-major."""
    n = len(t_positions)
    t = t_positions.view(n, 1, 1).expand(n, height, width)
    h = torch.arange(height, device=t.device).view(1, height, 1).expand(n, height, width)
    w = torch.arange(width, device=t.device).view(1, 1, width).expand(n, height, width)
    return t.reshape(-1), h.reshape(-1), w.reshape(-1)


@functools.lru_cache(maxsize=64)
def _rope_tables(t_positions: tuple, height, width, head_dim, device):
    cos, sin = rope_cos_sin(*grid_positions(torch.tensor(t_positions), height, width), head_dim)
    return cos[None, :, None, :].to(device), sin[None, :, None, :].to(device)


class Rope:
    """cos/sin tables for a set of tokens; `apply` rotates [B, L, H, D] tensors (interleaved pairs).

    Tables are memoised: a stream's chunks all share one geometry, so they are built once."""

    def __init__(self, t_positions, height, width, head_dim, device=None):
        key = tuple(int(t) for t in torch.as_tensor(t_positions).tolist())
        self.cos, self.sin = _rope_tables(key, height, width, head_dim, torch.device(device or "cpu"))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
        cos, sin = self.cos.to(x.device), self.sin.to(x.device)
        out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
        return out.type_as(x)


def sdpa(q, k, v, mask=None):
    """[B, L, H, D] in and out."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


# ----------------------------------------------------------------------------- strategies
class Bidirectional:
    def __init__(self, num_frames: int, height: int, width: int, head_dim: int, device=None):
        self.rope = Rope(torch.arange(num_frames), height, width, head_dim, device)

    def __call__(self, layer: int, q, k, v):
        return sdpa(self.rope.apply(q), self.rope.apply(k), v)


def chunk_t_positions(chunk: int, chunk_frames: int) -> torch.Tensor:
    """Absolute latent-frame positions of chunk `chunk` (1-based)."""
    return torch.arange(1 + (chunk - 1) * chunk_frames, 1 + chunk * chunk_frames)


def sink_t_position(chunk: int, chunk_frames: int) -> int:
    """Where the sink sits, in absolute terms, as seen from chunk `chunk` (re-based RoPE)."""
    return max(chunk - 2, 0) * chunk_frames


class SparseCausal:
    """Whole-clip student forward: chunk i sees the sink, chunk i-1 and itself.

    Token layout (frame-major): [sink (1 frame)] + chunks 1..N; with `teacher_forcing`,
    [sink] + clean chunks 1..N + noisy chunks 1..N, where noisy chunk i sees the sink, the
    *clean* chunk i-1 and itself, and clean chunk i sees the sink, clean chunk i-1 and
    itself, exactly what the streaming path computes when it writes clean chunks to the cache.
    """

    def __init__(self, num_chunks, chunk_frames, height, width, head_dim, teacher_forcing=False, device=None):
        hw = height * width
        n, fr = num_chunks, chunk_frames
        self.hw, self.n, self.fr = hw, n, fr
        # per-token segment ids: -1 sink; clean chunk c -> c; noisy chunk c -> 1000 + c
        segs = [torch.full((hw,), -1)]
        t_pos = [torch.zeros(1, dtype=torch.long)]
        groups = [range(1, n + 1)] + ([range(1001, 1001 + n)] if teacher_forcing else [])
        for g in groups:
            for c in g:
                segs.append(torch.full((fr * hw,), c))
                t_pos.append(chunk_t_positions(c % 1000, fr))
        seg = torch.cat(segs)
        self.rope = Rope(torch.cat(t_pos), height, width, head_dim, device)
        # rotated sink copies, one per chunk: chunk c's copy sits at sink_t_position(c)
        self.sink_ropes = [
            Rope(torch.tensor([sink_t_position(c, fr)]), height, width, head_dim, device) for c in range(1, n + 1)
        ]
        L = seg.numel()
        chunk_of = seg % 1000  # chunk number for clean/noisy tokens, 999 for sink (-1 % 1000)
        is_sink = seg == -1
        is_noisy = seg >= 1000
        clean_key = (~is_sink) & (~is_noisy)
        q_chunk = chunk_of[:, None]
        k_chunk = chunk_of[None, :]
        # keys from the sequence itself
        same = seg[:, None] == seg[None, :]  # itself (noisy sees noisy self; clean sees clean self; sink sink)
        if teacher_forcing:
            prev = clean_key[None, :] & (k_chunk == q_chunk - 1) & (~is_sink[:, None])
        else:
            prev = (k_chunk == q_chunk - 1) & (~is_sink[:, None]) & (~is_sink[None, :])
        seq_mask = same | prev
        # keys from the sink copies: chunk c's queries see copy c only; the sink itself sees the
        # real sink tokens (via `same` above).
        copy_chunk = torch.arange(1, n + 1).repeat_interleave(hw)
        copy_mask = (~is_sink[:, None]) & (chunk_of[:, None] == copy_chunk[None, :])
        self.mask = torch.cat([copy_mask, seq_mask], dim=1).to(device)  # [L, n*hw + L]
        self.length = L

    def __call__(self, layer: int, q, k, v):
        hw = self.hw
        sink_k, sink_v = k[:, :hw], v[:, :hw]
        k_copies = torch.cat([r.apply(sink_k) for r in self.sink_ropes], dim=1)
        v_copies = sink_v.repeat(1, self.n, 1, 1)
        keys = torch.cat([k_copies, self.rope.apply(k)], dim=1)
        vals = torch.cat([v_copies, v], dim=1)
        return sdpa(self.rope.apply(q), keys, vals, self.mask)


# ----------------------------------------------------------------------------- KV cache
class KVCache(torch.nn.Module):
    """Per layer, fixed-shape key and value buffers [B, S, H, D] written by slot (gpt-fast style):

        [ sink | previous chunk | current chunk ]      S = sink tokens + 2 x chunk tokens

    Keys are stored rotated for the re-based window (sink at t=0, previous chunk at t=1..F,
    current chunk at t=F+1..2F, or 1..F for chunk 1, whose empty previous slot is masked out),
    so a cached chunk is never touched again and nothing is concatenated per pass; the shapes
    never change, as CUDA graphs need. The buffers are allocated at the first chunk, when its
    size is known (the sink's K/V from the prefill move in then); under sequence parallelism
    each rank's cache holds its own head slice (`model/parallel.py`).
    """

    def __init__(self, num_layers: int):
        super().__init__()
        self.num_layers = num_layers
        self.sink_tokens = self.chunk_tokens = 0
        self.prev_slot = self.cur_slot = slice(0, 0)  # token ranges of the two chunk slots
        self._sink: list = [None] * num_layers  # (k, v) of the prefill until the buffers exist
        self.register_buffer("k", None)  # [layers, B, S, H, D]
        self.register_buffer("v", None)
        self.chunks_written = 0

    def write_sink(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.sink_tokens = k.shape[1]
        if self.k is not None:
            self.k[layer, :, : self.sink_tokens] = k
            self.v[layer, :, : self.sink_tokens] = v
        else:
            self._sink[layer] = (k, v)

    def allocate(self, chunk_tokens: int) -> None:
        """The buffers, for chunks of `chunk_tokens` tokens (once; the sink must be prefilled)."""
        if self.k is not None:
            assert chunk_tokens == self.chunk_tokens, "a KV cache serves one chunk size"
            return
        k0, v0 = self._sink[0]
        B, n, H, D = k0.shape
        self.chunk_tokens = chunk_tokens
        self.prev_slot, self.cur_slot = slice(n, n + chunk_tokens), slice(n + chunk_tokens, n + 2 * chunk_tokens)
        shape = (self.num_layers, B, n + 2 * chunk_tokens, H, D)
        self.k = k0.new_zeros(shape)
        self.v = v0.new_zeros(shape)
        for layer, (k, v) in enumerate(self._sink):
            self.write_sink(layer, k, v)
        self._sink = [None] * self.num_layers

    def nbytes(self) -> int:
        if self.k is None:
            return sum(t.numel() * t.element_size() for kv in self._sink if kv is not None for t in kv)
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()


class SinkPrefill:
    """Runs the sink (reference frame) alone through the blocks and stores its K/V."""

    def __init__(self, cache: KVCache, height, width, head_dim, device=None):
        self.cache = cache
        self.rope = Rope(torch.zeros(1, dtype=torch.long), height, width, head_dim, device)

    def __call__(self, layer: int, q, k, v):
        k = self.rope.apply(k)
        self.cache.write_sink(layer, k, v)
        return sdpa(self.rope.apply(q), k, v)


class CachedChunk:
    """One chunk against the cache: its keys/values go into the current slot and the queries
    attend over the whole buffer. With `write=True` (the clean pass at timestep 0) each layer
    then stores them in the previous slot for the next chunk (keys re-rotated to t = 1..F);
    the later layers read only their own slots, so this is safe mid-pass. `commit` counts it."""

    def __init__(self, cache: KVCache, chunk: int, chunk_frames, height, width, head_dim, write=False, device=None):
        self.cache, self.write = cache, write
        fr = chunk_frames
        has_prev = chunk > 1
        cur = torch.arange(fr + 1, 2 * fr + 1) if has_prev else torch.arange(1, fr + 1)
        self.rope_cur = Rope(cur, height, width, head_dim, device)
        self.rope_prev = Rope(torch.arange(1, fr + 1), height, width, head_dim, device)
        self.mask = None  # chunk >= 2 sees every slot
        self.has_prev = has_prev

    def __call__(self, layer: int, q, k, v):
        c = self.cache
        if c.k is None:
            c.allocate(k.shape[1])
        cur, prev = c.cur_slot, c.prev_slot
        if not self.has_prev and self.mask is None:  # chunk 1: the previous slot is empty
            self.mask = torch.ones(1, c.k.shape[2], dtype=torch.bool, device=k.device)  # [1, S]: every query
            self.mask[:, prev] = False
        keys, vals = c.k[layer], c.v[layer]
        keys[:, cur] = self.rope_cur.apply(k)
        vals[:, cur] = v
        out = sdpa(self.rope_cur.apply(q), keys, vals, self.mask)
        if self.write:  # the next chunk's previous chunk, at t = 1..F
            keys[:, prev] = self.rope_prev.apply(k)
            vals[:, prev] = v
        return out

    def commit(self):
        assert self.write
        self.cache.chunks_written += 1
