"""Ulysses sequence parallelism over 2 gloo processes equals the single-process DiT."""

import os

import torch
import torch.multiprocessing as mp

from talkingmachines.config import get_preset
from talkingmachines.model.dit import AudioDiT

FR = 3  # chunk frames


def _model():
    torch.manual_seed(0)
    cfg = get_preset("tiny").dit
    cfg.num_layers = 2
    m = AudioDiT(cfg).eval().requires_grad_(False)
    with torch.no_grad():
        for p in m.parameters():  # no zero-initialised layers: every path must matter
            p.add_(0.02 * torch.randn_like(p))
    return m


def _inputs(m):
    g = torch.Generator().manual_seed(1)
    c = m.config
    T = 1 + 2 * FR
    x = torch.randn(1, c.in_channels, T, 8, 8, generator=g)  # 4x4 tokens per frame
    text = torch.randn(1, 1, c.text_dim, generator=g)
    audio = torch.randn(1, T, c.audio_window, c.audio_dim, generator=g)
    return x, text, audio


@torch.inference_mode()
def _reference(m, x, text, audio):
    ctx = m.encode_context(text)
    out = {"bidir": m(x, 500.0, text, audio=audio), "causal": m.forward_causal(x, 500.0, audio=audio, chunk_frames=FR,
                                                                              ctx=ctx)}
    cache = m.new_cache()
    m.prefill_sink(cache, x[:, :, :1], ctx, audio[:, :1])
    for c in (1, 2):
        sl = slice(1 + (c - 1) * FR, 1 + c * FR)
        out[f"chunk{c}"] = m.forward_chunk(cache, x[:, :, sl], 700.0, ctx, audio[:, sl], chunk=c)
        m.forward_chunk(cache, x[:, :, sl], 0.0, ctx, audio[:, sl], chunk=c, write=True)
    return out


def _worker(rank, port, q):
    import torch.distributed as dist

    from talkingmachines.model.parallel import SequenceParallelDiT

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        m = _model()
        x, text, audio = _inputs(m)
        sp = SequenceParallelDiT(m)
        with torch.inference_mode():
            ctx = m.encode_context(text)
            out = {"bidir": sp.forward(x, 500.0, text, audio=audio),
                   "causal": sp.forward_causal(x, 500.0, audio=audio, chunk_frames=FR, ctx=ctx)}
            cache = sp.new_cache()
            sp.prefill_sink(cache, x[:, :, :1], ctx, audio[:, :1])
            for c in (1, 2):
                sl = slice(1 + (c - 1) * FR, 1 + c * FR)
                out[f"chunk{c}"] = sp.forward_chunk(cache, x[:, :, sl], 700.0, ctx, audio[:, sl], chunk=c)
                sp.forward_chunk(cache, x[:, :, sl], 0.0, ctx, audio[:, sl], chunk=c, write=True)
            heads = cache.k.shape[3]
            import talkingmachines.model.parallel as par

            par._A2A_OK[dist.get_backend()] = False  # the all_gather fallback gives the same result
            out["bidir_fallback"] = sp.forward(x, 500.0, text, audio=audio)
        q.put((rank, {k: v.numpy() for k, v in out.items()}, heads))  # numpy: outlives the process
    finally:
        dist.destroy_process_group()


def test_ulysses_two_ranks_equal_single_process():
    torch.set_num_threads(1)
    m = _model()
    ref = _reference(m, *_inputs(m))
    from talkingmachines.stream.disagg import _free_port

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    pc = mp.start_processes(_worker, args=(_free_port(), q), nprocs=2, start_method="spawn", join=False)
    results = [q.get(timeout=120) for _ in range(2)]  # before join: a child exits once its item is read
    pc.join()
    for rank, out, heads in results:
        assert heads == m.config.num_attention_heads // 2  # each rank caches half the heads
        ref["bidir_fallback"] = ref["bidir"]
        for k, v in ref.items():
            err = (torch.from_numpy(out[k]) - v).abs().max().item()
            assert err < 1e-5, (rank, k, err)


def test_shard_gather_layout():
    from talkingmachines.model.parallel import shard_tokens

    t = torch.arange(2 * 8 * 3).view(1, 2 * 8, 3)  # 2 frames of 8 tokens
    parts = [shard_tokens(t, 2, r, 2) for r in range(2)]
    assert parts[0][0, :, 0].tolist() == [0, 3, 6, 9, 24, 27, 30, 33]
    back = torch.stack([p.view(1, 2, 4, 3) for p in parts], dim=2).reshape(1, -1, 3)
    assert torch.equal(back, t)
