"""CUDA-only paths: they run where a GPU is present (a lent device machine) and are skipped
elsewhere, since CI has none. The CPU suite proves the same logic in float32; these check that
the GPU kernels, bf16 and the second CUDA stream keep it.

Run on a GPU machine: `python -m pytest -q tests/test_cuda.py`."""

import numpy as np
import pytest
import torch

from talkingmachines.audio_io import speech_like
from talkingmachines.model.dit import AudioDiT
from talkingmachines.stream import disagg
from talkingmachines.stream.generator import load_avatar

from test_dit import _clip, randomize, tiny_cfg

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _keep_tf32_settings():
    """A test that turns TF32 off must not change what the next one measures."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _stream_vs_full(m, dtype, n=6, fr=3, cfg=None, hw=8, device="cuda"):
    """Max |streaming - full masked forward| (the teacher-forced causal pass), and the scale."""
    xn, xc, t, au, text = (v.to(device) for v in _clip(n, fr, hw=hw, cfg=cfg))
    xn, xc, au, text = (v.to(dtype) for v in (xn, xc, au, text))
    with torch.no_grad():
        ctx = m.encode_context(text)
        full = m.forward_causal(xn, t, audio=au, chunk_frames=fr, x_clean=xc, ctx=ctx).float()
        cache = m.new_cache()
        errs = [(m.prefill_sink(cache, xc[:, :, :1], ctx, au[:, :1]).float() - full[:, :, :1]).abs().max().item()]
        for i in range(1, n + 1):
            sl = slice(1 + (i - 1) * fr, 1 + i * fr)
            o = m.forward_chunk(cache, xn[:, :, sl], t[:, sl], ctx, au[:, sl], chunk=i)
            errs.append((o.float() - full[:, :, sl]).abs().max().item())
            m.forward_chunk(cache, xc[:, :, sl], 0, ctx, au[:, sl], chunk=i, write=True)
    return max(errs), full.abs().mean().item()


def test_streaming_matches_masked_forward_fp32_on_cuda():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    m = randomize(AudioDiT(tiny_cfg()), std=0.2).cuda().eval()
    err, scale = _stream_vs_full(m, torch.float32)
    assert scale > 0.1 and err < 1e-4, err


def test_streaming_matches_masked_forward_bf16_on_cuda():
    """bf16 (the CUDA default): the cached path and the masked forward round differently, so
    the bound is relative to the output's size."""
    m = randomize(AudioDiT(tiny_cfg()), std=0.2).cuda().to(torch.bfloat16).eval()
    err, scale = _stream_vs_full(m, torch.bfloat16)
    assert err < 0.05 * scale + 0.02, (err, scale)


def wan13_heads_cfg():
    """Wan 1.3B's attention geometry (12 heads of 128: the flash/SDPA kernels' real head size),
    two blocks."""
    return tiny_cfg(num_attention_heads=12, attention_head_dim=128, ffn_dim=1024, num_layers=2)


def test_streaming_matches_masked_forward_bf16_head_size_128_on_cuda():
    cfg = wan13_heads_cfg()
    m = randomize(AudioDiT(cfg), std=0.03).cuda().to(torch.bfloat16).eval()
    err, scale = _stream_vs_full(m, torch.bfloat16, n=3, cfg=cfg, hw=16)
    assert scale > 0.1 and err < 0.05 * scale + 0.02, (err, scale)


def _sequential_and_pipelined(avatar, decode_device=None, n=4):
    """The same stream's first `n` chunks from the sequential engine and from the pipeline."""
    audio = speech_like((n + 2) * 0.48)
    s = avatar.new_stream(seed=3)
    s.push_audio(audio)
    s.end_audio()
    ref = disagg.sequential_chunks(s, n)
    p = disagg.PipelinedStream(avatar.new_stream(seed=3), decode_device=decode_device, depth=2)
    p.push_audio(audio)
    p.end_audio()
    return ref, list(p.chunks(n)), p


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_on_its_own_cuda_stream_equals_sequential(dtype):
    """The VAE decoding on a second CUDA stream (events order it after the DiT) gives exactly the
    frames of the sequential engine."""
    ref, got, p = _sequential_and_pipelined(load_avatar(None, "tiny", "cuda", dtype=dtype))
    assert p.decode_stream is not None
    assert [c.index for c in got] == list(range(len(ref)))
    for a, b in zip(ref, got):
        assert np.array_equal(a.frames, b.frames)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_decode_on_a_second_gpu_equals_sequential():
    ref, got, _ = _sequential_and_pipelined(load_avatar(None, "tiny", "cuda:0", dtype=torch.float32), "cuda:1")
    assert len(got) == len(ref)
    for a, b in zip(ref, got):
        assert np.abs(a.frames.astype(int) - b.frames.astype(int)).max() <= 1  # another GPU's kernels
