"""AudioDiT: equivalence with diffusers' Wan, streaming == whole-clip causal, the sparse mask, audio."""

import pytest
import torch
from diffusers import WanTransformer3DModel

from talkingmachines.config import DiTConfig
from talkingmachines.model import attention as A
from talkingmachines.model.dit import AudioDiT

TEXT_DIM, IMG_DIM, AUDIO_DIM, WINDOW = 20, 24, 10, 8


def tiny_cfg(**kw):
    base = dict(num_attention_heads=2, attention_head_dim=12, in_channels=20, out_channels=8, text_dim=TEXT_DIM,
                freq_dim=16, ffn_dim=40, num_layers=2, image_dim=None, audio_dim=AUDIO_DIM, audio_window=WINDOW)
    return DiTConfig(**{**base, **kw})


def randomize(module, std=0.1, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)
    return module.eval()


# ============================================================ (1) equivalence with diffusers
@pytest.fixture(scope="module", params=["t2v", "i2v"])
def pair(request):
    i2v = request.param == "i2v"
    in_ch = 36 if i2v else 16
    ref = WanTransformer3DModel(
        num_attention_heads=2, attention_head_dim=12, in_channels=in_ch, out_channels=16, text_dim=TEXT_DIM,
        freq_dim=16, ffn_dim=40, num_layers=2, image_dim=IMG_DIM if i2v else None,
        added_kv_proj_dim=24 if i2v else None,  # = inner dim, as in Wan2.1-I2V
    )
    randomize(ref)
    model = AudioDiT(tiny_cfg(in_channels=in_ch, out_channels=16, image_dim=IMG_DIM if i2v else None)).eval()
    missing, unexpected = model.load_state_dict(ref.state_dict(), strict=False)
    assert not unexpected
    assert missing and all(k.startswith("audio_embedder.") or ".norm_audio." in k or ".audio_attn." in k
                           for k in missing)
    return i2v, ref, model


def _inputs(i2v, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 36 if i2v else 16, 5, 8, 8, generator=g)
    text = torch.randn(1, 512, TEXT_DIM, generator=g)  # diffusers' I2V splits image tokens at shape[1] - 512
    img = torch.randn(1, 7, IMG_DIM, generator=g) if i2v else None
    audio = torch.randn(1, 5, WINDOW, AUDIO_DIM, generator=g)
    return x, text, img, audio


@pytest.mark.parametrize("per_frame", [False, True], ids=["scalar_t", "per_frame_t"])
def test_matches_diffusers_wan(pair, per_frame):
    i2v, ref, model = pair
    x, text, img, audio = _inputs(i2v)
    if per_frame:
        t_frames = torch.tensor([[0.0, 250.0, 500.0, 750.0, 999.0]])  # [B, T]
        t_ref = t_frames.repeat_interleave(4 * 4, dim=1)  # diffusers: [B, seq_len], one per token
    else:
        t_frames = t_ref = torch.tensor([500.0])
    with torch.no_grad():
        r = ref(x, t_ref, text, encoder_hidden_states_image=img).sample
        o = model(x, t_frames, text, img)
        o_audio = model(x, t_frames, text, img, audio=audio)  # audio layers at their zero init
    assert r.abs().mean() > 0.1  # nothing trivially zero
    assert (o - r).abs().max() < 1e-4
    assert (o_audio - r).abs().max() < 1e-4


# ============================================================ (2) streaming == whole-clip causal
@pytest.fixture(scope="module")
def causal_model():
    return randomize(AudioDiT(tiny_cfg()), std=0.2)


def _clip(n_chunks, fr, hw=8, seed=0, cfg=None):
    cfg = cfg or tiny_cfg()
    g = torch.Generator().manual_seed(seed)
    T = 1 + fr * n_chunks
    xn = torch.randn(1, cfg.in_channels, T, hw, hw, generator=g)
    xc = torch.randn(1, cfg.in_channels, T, hw, hw, generator=g)
    xc[:, :, 0] = xn[:, :, 0]  # one sink
    t = torch.rand(1, T, generator=g) * 1000
    t[:, 0] = 0
    au = torch.randn(1, T, WINDOW, AUDIO_DIM, generator=g)
    text = torch.randn(1, 1, TEXT_DIM, generator=g)
    return xn, xc, t, au, text


def test_streaming_matches_teacher_forced_causal(causal_model):
    m, fr, n = causal_model, 3, 6
    xn, xc, t, au, text = _clip(n, fr)
    with torch.no_grad():
        ctx = m.encode_context(text)
        full = m.forward_causal(xn, t, audio=au, chunk_frames=fr, x_clean=xc, ctx=ctx)
        cache = m.new_cache()
        sink = m.prefill_sink(cache, xc[:, :, :1], ctx, au[:, :1])
        errs = [(sink - full[:, :, :1]).abs().max().item()]
        for i in range(1, n + 1):
            sl = slice(1 + (i - 1) * fr, 1 + i * fr)
            o = m.forward_chunk(cache, xn[:, :, sl], t[:, sl], ctx, au[:, sl], chunk=i)  # denoise pass
            errs.append((o - full[:, :, sl]).abs().max().item())
            m.forward_chunk(cache, xc[:, :, sl], 0, ctx, au[:, sl], chunk=i, write=True)  # clean pass -> cache
    assert full.abs().mean() > 0.1
    assert max(errs) < 1e-4, errs


def test_streaming_matches_self_contained_causal(causal_model):
    m, fr, n = causal_model, 3, 6
    xn, _, t, au, text = _clip(n, fr, seed=1)
    with torch.no_grad():
        ctx = m.encode_context(text)
        full = m.forward_causal(xn, t, audio=au, chunk_frames=fr, ctx=ctx)
        cache = m.new_cache()
        m.prefill_sink(cache, xn[:, :, :1], ctx, au[:, :1])
        errs = []
        for i in range(1, n + 1):
            sl = slice(1 + (i - 1) * fr, 1 + i * fr)
            o = m.forward_chunk(cache, xn[:, :, sl], t[:, sl], ctx, au[:, sl], chunk=i, write=True)
            errs.append((o - full[:, :, sl]).abs().max().item())
    assert max(errs) < 1e-4, errs


def test_cache_size_is_constant(causal_model):
    m = causal_model
    xn, _, _, au, text = _clip(30, 1, hw=4, seed=2)
    sizes = {}
    with torch.no_grad():
        ctx = m.encode_context(text)
        cache = m.new_cache()
        m.prefill_sink(cache, xn[:, :, :1], ctx, au[:, :1])
        for i in range(1, 31):
            sl = slice(i, i + 1)
            m.forward_chunk(cache, xn[:, :, sl], 500.0, ctx, au[:, sl], chunk=i)
            m.forward_chunk(cache, xn[:, :, sl], 0, ctx, au[:, sl], chunk=i, write=True)
            sizes[i] = cache.nbytes()
    assert cache.chunks_written == 30
    assert sizes[3] == sizes[30] == sizes[2] > 0


def test_cache_buffers_are_preallocated(causal_model):
    """The cache's buffers are allocated once (at chunk 1) and written in place: same storage and
    shape for every later chunk, nothing re-created per pass."""
    m, fr = causal_model, 3
    xn, _, _, au, text = _clip(4, fr, seed=3)
    with torch.no_grad():
        ctx = m.encode_context(text)
        cache = m.new_cache()
        m.prefill_sink(cache, xn[:, :, :1], ctx, au[:, :1])
        seen = set()
        for i in range(1, 5):
            sl = slice(1 + (i - 1) * fr, 1 + i * fr)
            m.forward_chunk(cache, xn[:, :, sl], 500.0, ctx, au[:, sl], chunk=i)
            m.forward_chunk(cache, xn[:, :, sl], 0, ctx, au[:, sl], chunk=i, write=True)
            seen.add((cache.k.data_ptr(), cache.v.data_ptr(), tuple(cache.k.shape)))
    assert len(seen) == 1
    (_, _, shape), = seen
    assert shape[0] == len(m.blocks) and shape[2] == cache.sink_tokens + 2 * cache.chunk_tokens
    assert {n for n, _ in cache.named_buffers()} == {"k", "v"}


# ============================================================ (3) the sparse-causal mask
def test_mask_structure():
    n, fr, h, w = 4, 2, 2, 2
    s = A.SparseCausal(n, fr, h, w, head_dim=12)
    hw = h * w
    # token -> segment: sink copies (one per chunk) | sink | chunk 1..n
    seg_k = [f"copy{c}" for c in range(1, n + 1) for _ in range(hw)] + ["sink"] * hw
    seg_k += [f"c{c}" for c in range(1, n + 1) for _ in range(fr * hw)]
    seg_q = ["sink"] * hw + [f"c{c}" for c in range(1, n + 1) for _ in range(fr * hw)]
    allowed = {"sink": {"sink"}}
    for c in range(1, n + 1):
        allowed[f"c{c}"] = {f"copy{c}", f"c{c}"} | ({f"c{c - 1}"} if c > 1 else set())
    expect = torch.tensor([[k in allowed[q] for k in seg_k] for q in seg_q])
    assert torch.equal(s.mask.cpu(), expect)


def _chunk_out(m, x, t, au, text, fr, i, x_clean=None):
    with torch.no_grad():
        out = m.forward_causal(x, t, text, audio=au, chunk_frames=fr, x_clean=x_clean)
    return out[:, :, 1 + (i - 1) * fr: 1 + i * fr]


def _perturb(x, au, frames):
    x, au = x.clone(), au.clone()
    x[:, :, frames] += 1.0
    au[:, frames] += 1.0
    return x, au


@pytest.mark.parametrize("layers", [1, 2])
def test_sparse_causality(layers):
    """Chunk i (latents and audio) sees the sink, chunk i-1 and itself. With one layer that is its
    whole receptive field; deeper, chunk i-2 reaches chunk i through chunk i-1's hidden states (as in
    streaming, where i-1's cached K/V were computed with i-2 in view), but the future never does."""
    cfg = tiny_cfg(num_layers=layers)
    m = randomize(AudioDiT(cfg), std=0.2)
    fr, n, i = 2, 4, 3
    x, _, t, au, text = _clip(n, fr, hw=4, seed=3, cfg=cfg)
    base = _chunk_out(m, x, t, au, text, fr, i)

    def frames(c):
        return slice(1 + (c - 1) * fr, 1 + c * fr)

    def diff(fr_slice):
        xp, ap = _perturb(x, au, fr_slice)
        return (_chunk_out(m, xp, t, ap, text, fr, i) - base).abs().max().item()

    assert diff(frames(i + 1)) < 1e-6  # the future
    assert diff(frames(i)) > 1e-3
    assert diff(frames(i - 1)) > 1e-3
    assert diff(slice(0, 1)) > 1e-3  # the sink
    if layers == 1:
        assert diff(frames(i - 2)) < 1e-6  # outside the window
    else:
        assert diff(frames(i - 2)) > 1e-3


def test_teacher_forcing_causality():
    """Noisy chunk i sees the sink, *clean* chunk i-1 and itself: never another noisy chunk."""
    m = randomize(AudioDiT(tiny_cfg()), std=0.2)
    fr, n, i = 2, 4, 3
    x, xc, t, au, text = _clip(n, fr, hw=4, seed=4)
    base = _chunk_out(m, x, t, au, text, fr, i, x_clean=xc)
    for c in (i - 1, i + 1):
        xp = x.clone()
        xp[:, :, 1 + (c - 1) * fr: 1 + c * fr] += 1.0
        assert (_chunk_out(m, xp, t, au, text, fr, i, x_clean=xc) - base).abs().max() < 1e-6
    xcp = xc.clone()
    xcp[:, :, 1 + (i - 2) * fr: 1 + (i - 1) * fr] += 1.0  # clean chunk i-1
    assert (_chunk_out(m, x, t, au, text, fr, i, x_clean=xcp) - base).abs().max() > 1e-3
    xcp = xc.clone()
    xcp[:, :, 1 + i * fr: 1 + (i + 1) * fr] += 1.0  # clean chunk i+1
    assert (_chunk_out(m, x, t, au, text, fr, i, x_clean=xcp) - base).abs().max() < 1e-6


# ============================================================ (4) bidirectional vs causal
def test_bidirectional_differs_from_causal(causal_model):
    m = causal_model
    x, _, t, au, text = _clip(3, 2, hw=4, seed=5)
    with torch.no_grad():
        bi = m(x, t, text, audio=au)
        ca = m.forward_causal(x, t, text, audio=au, chunk_frames=2)
    assert bi.shape == ca.shape
    assert (bi - ca).abs().max() > 1e-2
    # the last chunk sees only chunk n-1 and the sink causally: still differs from seeing everything
    assert (bi[:, :, -2:] - ca[:, :, -2:]).abs().max() > 1e-3


# ============================================================ (5) audio
def test_audio_zero_init_then_matters():
    m = randomize(AudioDiT(tiny_cfg()), std=0.2)
    for b in m.blocks:  # back to the zero-initialised output projection
        torch.nn.init.zeros_(b.audio_attn.to_out[0].weight)
        torch.nn.init.zeros_(b.audio_attn.to_out[0].bias)
    fresh = AudioDiT(tiny_cfg())
    assert all(b.audio_attn.to_out[0].weight.abs().sum() == 0 for b in fresh.blocks)
    x, _, t, au, text = _clip(2, 2, hw=4, seed=6)
    au2 = torch.randn_like(au)
    with torch.no_grad():
        none = m(x, t, text)
        a1, a2 = m(x, t, text, audio=au), m(x, t, text, audio=au2)
        assert torch.equal(a1, none) and torch.equal(a2, none)
        for b in m.blocks:
            b.audio_attn.to_out[0].weight.normal_(0, 0.2)
        a1, a2 = m(x, t, text, audio=au), m(x, t, text, audio=au2)
        c1 = m.forward_causal(x, t, text, audio=au, chunk_frames=2)
        c2 = m.forward_causal(x, t, text, audio=au2, chunk_frames=2)
    assert (a1 - a2).abs().max() > 1e-3
    assert (c1 - c2).abs().max() > 1e-3


def _assert_same_function(grown, small, inputs, atol):
    """A grown DiT computes what the small one did: bidirectional, and causal in chunks of 2 frames."""
    x, t, text, au = inputs
    with torch.no_grad():
        assert torch.allclose(grown(x, t, text, audio=au), small(x, t, text, audio=au), atol=atol, rtol=0)
        assert torch.allclose(grown.forward_causal(x, t, text, audio=au, chunk_frames=2),
                              small.forward_causal(x, t, text, audio=au, chunk_frames=2), atol=atol, rtol=0)


def test_grow_depth_computes_what_the_smaller_dit_did_then_trains(tmp_path):
    """A trained DiT grown to more blocks (`weights.grow_depth`, `new_dit(init_from=...)` with a
    deeper preset) gives the same output, bidirectional and causal, and its new blocks learn."""
    import dataclasses

    from talkingmachines.config import get_preset
    from talkingmachines.errors import InputError
    from talkingmachines.model.weights import grow_depth
    from talkingmachines.train.teacher import new_dit

    small = randomize(AudioDiT(tiny_cfg()), std=0.2)
    big = grow_depth(AudioDiT(tiny_cfg(num_layers=4)), small).eval()
    x, _, t, au, text = _clip(2, 2, hw=4, seed=3)
    _assert_same_function(big, small, (x, t, text, au), atol=1e-6)
    big.train()
    opt = torch.optim.SGD(big.parameters(), lr=0.1)
    for _ in range(2):  # step 1 moves the zero outputs, step 2 the weights behind them
        opt.zero_grad()
        big(x, t, text, audio=au).pow(2).mean().backward()
        opt.step()
    assert big.blocks[3].attn1.to_q.weight.grad.abs().sum() > 0
    with pytest.raises(InputError, match="differ in ffn_dim"):
        grow_depth(AudioDiT(tiny_cfg(num_layers=4, ffn_dim=48)), small)

    # through the training entry point: a folder of the shipped preset's shape, grown to 8 blocks
    p = get_preset("tiny")
    six = AudioDiT(p.dit)
    six.save_pretrained(tmp_path / "dit")
    deeper = dataclasses.replace(p, dit=dataclasses.replace(p.dit, num_layers=8))
    grown = new_dit(deeper, tmp_path / "dit")
    assert len(grown.blocks) == 8
    assert torch.equal(grown.blocks[5].attn1.to_q.weight, six.blocks[5].attn1.to_q.weight)
    assert grown.blocks[7].ffn.net[-1].weight.abs().sum() == 0



def test_grow_width_computes_what_the_narrower_dit_did_then_trains(tmp_path):
    """A trained DiT widened to twice the heads and FFN width (`weights.grow_width`, or `new_dit` with a
    wider preset) gives the same output, bidirectional and causal; after one update the two copies of a
    feature differ (the split columns break the symmetry); a wrong width is a one-line error."""
    import dataclasses

    from talkingmachines.config import get_preset
    from talkingmachines.model.weights import WeightsError, grow_width
    from talkingmachines.train.teacher import new_dit

    small = randomize(AudioDiT(tiny_cfg()), std=0.2)
    wide = grow_width(AudioDiT(tiny_cfg(num_attention_heads=4, ffn_dim=80)), small).eval()
    assert wide.config.dim == 2 * small.config.dim
    x, _, t, au, text = _clip(2, 2, hw=4, seed=3)
    _assert_same_function(wide, small, (x, t, text, au), atol=1e-5)
    wide.train()
    opt = torch.optim.SGD(wide.parameters(), lr=0.1)
    before = wide.blocks[0].attn1.to_q.weight.detach().clone()
    opt.zero_grad()
    wide(x, t, text, audio=au).pow(2).mean().backward()
    opt.step()
    step = wide.blocks[0].attn1.to_q.weight.detach() - before
    D = small.config.dim
    # the two copies of each query feature move differently: they come apart
    assert (step[:D] - step[D:]).abs().max() > 0.1 * step.abs().max() > 0
    with pytest.raises(WeightsError, match="cannot widen: .*differs in ffn_dim"):
        grow_width(AudioDiT(tiny_cfg(num_attention_heads=4, ffn_dim=40)), small)

    # through the training entry point: the shipped preset's shape, widened to 8 heads (256 features)
    p = get_preset("tiny")
    AudioDiT(p.dit).save_pretrained(tmp_path / "dit")
    wider = dataclasses.replace(p, dit=dataclasses.replace(p.dit, num_attention_heads=2 * p.dit.num_attention_heads,
                                                           ffn_dim=2 * p.dit.ffn_dim))
    assert new_dit(wider, tmp_path / "dit").config.dim == 2 * p.dit.dim