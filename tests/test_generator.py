"""The streaming engine: chunk contract, audio bookkeeping, flat state, determinism, barge-in."""

import numpy as np
import pytest
import torch

from talkingmachines.config import SAMPLES_PER_FRAME
from talkingmachines.stream.generator import AudioBuffer, load_avatar


@pytest.fixture(scope="module")
def avatar():
    torch.set_num_threads(1)
    return load_avatar(None, "tiny")


def portrait(seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)


def speech(seconds, seed=0):
    rng = np.random.default_rng(seed)
    n = int(seconds * 16000)
    env = 0.5 + 0.5 * np.sin(np.arange(n) / 16000 * 2 * np.pi * 4)
    return (0.2 * env * rng.standard_normal(n)).astype(np.float32)


def test_chunks_carry_their_own_audio(avatar):
    s = avatar.new_stream(portrait())
    a = speech(1.5)
    s.push_audio(a)
    s.end_audio()
    chunks = list(s.stream())
    assert len(chunks) == int(np.ceil(len(a) / s.chunk_samples))
    for c in chunks:
        assert c.frames.shape == (12, 128, 128, 3) and c.frames.dtype == np.uint8
        assert c.audio.shape == (12 * SAMPLES_PER_FRAME,)
    got = np.concatenate([c.audio for c in chunks])[: len(a)]
    np.testing.assert_array_equal(got, a)
    assert all(c.speaking for c in chunks[:-1])


def test_same_seed_same_video_and_pieces_equal_whole(avatar):
    a = speech(1.0)
    s1 = avatar.new_stream(portrait(), seed=3)
    s1.push_audio(a)
    s1.end_audio()
    v1 = [c.frames for c in s1.stream()]
    s2 = avatar.new_stream(portrait(), seed=3)
    for piece in np.array_split(a, 7):  # audio arriving in odd-sized pieces
        s2.push_audio(piece)
    s2.end_audio()
    v2 = [c.frames for c in s2.stream()]
    assert len(v1) == len(v2)
    for x, y in zip(v1, v2):
        np.testing.assert_array_equal(x, y)


def test_state_is_flat_over_a_long_stream(avatar):
    s = avatar.new_stream(portrait())
    s.push_audio(speech(40 * 0.48 + 1))
    sizes, buf = {}, {}
    for i in range(1, 41):
        s.next_chunk()
        if i in (3, 40):
            sizes[i] = s.cache.nbytes()
            buf[i] = len(s.audio.data)
    assert sizes[3] == sizes[40] > 0
    assert s.audio.start > 0  # consumed audio is dropped


def test_wait_and_listening(avatar):
    s = avatar.new_stream(portrait())
    assert s.next_chunk(wait=True) is None  # no audio yet: a live caller waits
    c = s.next_chunk()  # or pads with silence: listening
    assert not c.speaking and np.all(c.audio == 0)
    s.push_audio(speech(0.48 + 0.2))
    assert s.ready()
    assert s.next_chunk(wait=True).speaking


def test_barge_in_drops_unplayed_audio(avatar):
    s = avatar.new_stream(portrait())
    s.push_audio(speech(3.0))
    s.next_chunk()
    dropped = s.clear_audio()
    assert dropped == int(3.0 * 16000) - s.chunk_samples
    assert s.buffered_samples() == 0
    assert not s.next_chunk().speaking  # the very next chunk is listening


def test_audio_buffer_reads_absolute_positions():
    b = AudioBuffer(keep_before=0)
    b.push(np.arange(10, dtype=np.float32))
    np.testing.assert_array_equal(b.read(-2, 3), [0, 0, 0, 1, 2])
    b.drop_before(5)
    assert b.start == 5
    np.testing.assert_array_equal(b.read(4, 12), [0, 5, 6, 7, 8, 9, 0, 0])


def test_random_dit_in_place_is_sane():
    """The random DiT (built on meta, filled in place in its dtype: what benchmarks use for the
    big presets) has every parameter filled, finite and of the right scale, and runs a chunk
    with finite output."""
    from talkingmachines.config import get_preset
    from talkingmachines.model.dit import AudioDiT
    from talkingmachines.stream.generator import random_dit

    cfg = get_preset("tiny").dit
    m = random_dit(cfg, "cpu", torch.bfloat16)
    ref = AudioDiT(cfg)
    assert torch.equal(next(m.parameters()), next(random_dit(cfg, "cpu", torch.bfloat16).parameters()))
    for (name, w), (_, w0) in zip(m.named_parameters(), ref.named_parameters()):
        assert w.dtype == torch.bfloat16 and w.shape == w0.shape and torch.isfinite(w.float()).all(), name
        if w.ndim >= 2 and "pos_embed" not in name:
            assert 0.3 < w.float().std() * w[0].numel() ** 0.5 < 3 or "scale_shift" in name, name
    x = torch.randn(1, cfg.in_channels, 4, 16, 16, dtype=torch.bfloat16)
    au = torch.randn(1, 4, cfg.audio_window, cfg.audio_dim, dtype=torch.bfloat16)
    with torch.no_grad():
        out = m(x, torch.tensor([[0.0, 500.0, 500.0, 500.0]]), torch.zeros(1, 4, cfg.text_dim, dtype=torch.bfloat16),
                audio=au)
    assert out.shape == (1, cfg.out_channels, 4, 16, 16) and torch.isfinite(out.float()).all()


def test_bf16_vae_streams_the_same_video(avatar):
    """--vae-dtype bf16 (1.6x faster decoding on an H100): the same frames as the fp32 VAE, to rounding."""
    half = load_avatar(None, "tiny", vae_dtype=torch.bfloat16)
    assert half.vae.dtype == torch.bfloat16 and avatar.vae.dtype == torch.float32
    videos = []
    for a in (avatar, half):
        s = a.new_stream(portrait(), seed=3)
        s.push_audio(speech(1.0))
        s.end_audio()
        videos.append(np.concatenate([c.frames for c in s.stream()]).astype(np.float64))
    assert videos[0].shape == videos[1].shape
    psnr = 10 * np.log10(255.0 ** 2 / np.mean((videos[0] - videos[1]) ** 2))
    assert psnr > 40, psnr


def test_sink_only_diagnostic_draws_first_chunks_and_restores_the_engine(avatar):
    """scripts/found_by_seed.py --sink-only: every chunk is drawn as the first one is (the portrait's
    keys and values alone), so its first chunk is the engine's own first chunk and later ones differ;
    leaving it puts the engine back."""
    from script_loader import load_script

    from talkingmachines.stream.generator import StreamingGenerator

    def video():
        s = avatar.new_stream(portrait(), seed=5)
        s.push_audio(speech(1.0))
        s.end_audio()
        return [c.frames for c in s.stream()]

    shipped_denoise = StreamingGenerator.denoise
    ref = video()
    with load_script("scripts/found_by_seed.py").sink_only():
        assert StreamingGenerator.denoise is not shipped_denoise
        alone = video()
    assert StreamingGenerator.denoise is shipped_denoise
    assert len(alone) == len(ref) >= 2
    np.testing.assert_array_equal(alone[0], ref[0])
    assert not np.array_equal(alone[1], ref[1])
    np.testing.assert_array_equal(video()[1], ref[1])
