"""`torch.compile` of the DiT's blocks: one compiled function for every block of a shape.

All blocks share one architecture, so one function takes the block as an argument and dynamo
(which lifts an inlined module's parameters to graph inputs) reuses the same graphs for each of
them. Nothing per layer may reach the traced code as a constant: the layer index and the
self-attention strategy (which keeps the KV cache, Python state) travel through one shared
`_EagerAttention` that runs eagerly (a graph break), so each block call compiles into two graphs
(before and after self-attention) per shape variant: sink prefill, and the chunk passes.

CUDA graphs (`mode="reduce-overhead"`) are not used. Under them the keys and values the blocks
produce are graph outputs, overwritten at the next replay: whatever keeps them must copy them
into buffers of its own, as `attention.KVCache` does (fixed-shape buffers written by slot), and
nothing else may hold on to a block's output between replays.
"""

from __future__ import annotations

import logging
import time

import torch

log = logging.getLogger(__name__)


class _EagerAttention:
    """Self-attention with its KV cache, run eagerly; shared by all blocks, so the compiled
    code guards on one object whatever the layer."""

    def __init__(self):
        self.strategy = None
        self.layer = 0

    @torch.compiler.disable
    def __call__(self, _layer, q, k, v):
        return self.strategy(self.layer, q, k, v)


def _block_step(block, x, mod, frames, ctx_kv, img_kv, audio, attn):
    # the class's forward (the instance's is replaced below); layer 0 here, the real index is attn.layer
    return type(block).forward(block, x, mod, frames, ctx_kv, img_kv, audio, attn, 0)


def graph_count() -> int:
    """Graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def compile_blocks(dit, device, mode: str | None = None, backend: str = "inductor") -> None:
    """Route every block's forward through one compiled function (eager attention inside)."""
    attn = _EagerAttention()
    step = torch.compile(_block_step, mode=mode, backend=backend, dynamic=False)
    for block in dit.blocks:
        def forward(x, mod, frames, ctx_kv, img_kv, audio, self_attn, layer, _b=block):
            attn.strategy, attn.layer = self_attn, layer
            return step(_b, x, mod, frames, ctx_kv, img_kv, audio, attn)

        block.forward = forward


def uncompile_blocks(dit) -> None:
    for block in dit.blocks:
        block.__dict__.pop("forward", None)


def compile_dit(dit, device, warm=None, mode: str | None = None, backend: str = "inductor") -> dict:
    """Compile the blocks and, with `warm` (an Avatar), compile every shape variant on a 3-chunk
    throw-away stream. A recompile-limit hit during warm-up (graphs that would silently run
    eagerly) or any compile error falls back to eager, and says so. Returns what happened:
    compiled, compile_graphs (graphs made by the warm-up), compile_s, compile_mode."""
    import torch._dynamo as dynamo

    from ..audio_io import speech_like

    g0, t0 = graph_count(), time.perf_counter()
    info = {"compiled": False, "compile_mode": f"{backend}:{mode or 'default'}"}
    fail_key = "fail_on_recompile_limit_hit"
    old = getattr(dynamo.config, fail_key, None)
    try:
        compile_blocks(dit, device, mode, backend)
        if warm is not None:
            if old is not None:
                setattr(dynamo.config, fail_key, True)
            st = warm.new_stream(seed=0)
            st.push_audio(speech_like(2.0))
            for _ in range(3):
                st.next_chunk()
        info["compiled"] = True
    except Exception as e:  # noqa: BLE001 - the eager path is always valid
        uncompile_blocks(dit)
        info["compile_error"] = " ".join(str(e).split())[:200]
        log.warning("torch.compile failed (%s): running eagerly", info["compile_error"])
    finally:
        if old is not None:
            setattr(dynamo.config, fail_key, old)
    info["compile_graphs"] = graph_count() - g0
    info["compile_s"] = round(time.perf_counter() - t0, 1)
    return info
