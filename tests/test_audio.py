import numpy as np
import pytest
import torch

from talkingmachines.config import SAMPLES_PER_FRAME, StreamConfig, get_preset
from talkingmachines.errors import InputError
from talkingmachines.model.audio import (
    AudioFeatureStream,
    LogMelFrontEnd,
    Wav2Vec2FrontEnd,
    audio_windows,
    build_frontend,
    frame_rms,
    frame_rms_db,
    is_silence,
    lookahead_ms,
    num_video_frames,
    rms_db,
    windows_for_latents,
)

torch.set_num_threads(1)
SR = 16000


def speechy(seconds=3.0, seed=0):
    """Amplitude-modulated harmonic signal with pauses and noise: a stand-in for speech."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SR)
    t = np.arange(n) / SR
    f0 = 120 + 30 * np.sin(2 * np.pi * 0.7 * t)
    ph = 2 * np.pi * np.cumsum(f0) / SR
    x = sum(np.sin(k * ph) / k for k in range(1, 12))
    env = np.clip(np.sin(2 * np.pi * 2.3 * t), 0, None) ** 2
    x = 0.2 * env * x + 0.003 * rng.standard_normal(n)
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def logmel():
    return LogMelFrontEnd(80)


def test_logmel_shape_and_range(logmel):
    x = speechy(2.01)
    f = logmel.features(x)
    assert f.shape == (num_video_frames(len(x)), 80) == (51, 80)
    assert f.dtype == torch.float32 and torch.isfinite(f).all()
    assert -2.05 < f.min() and f.max() < 3.0
    assert torch.allclose(logmel.features(np.zeros(6400, np.float32)), torch.full((10, 80), -2.0), atol=1e-4)
    assert logmel.lookahead_samples == 120 and logmel.lookback_samples == 120
    # a frame's features depend only on samples_needed(frame): perturbing outside leaves it alone
    y = x.copy()
    lo, hi = logmel.samples_needed(20, 1)
    y[: lo - 1] = 0.5
    y[hi + 1 :] = -0.5
    assert torch.allclose(logmel.features(y)[20], f[20], atol=1e-6)
    assert not torch.allclose(logmel.features(y)[19], f[19], atol=1e-3)


@pytest.mark.parametrize("a,b", [(0, 5), (7, 19), (40, 51), (0, 51), (50, 51)])
def test_logmel_streaming_equals_offline(logmel, a, b):
    x = speechy(2.01, seed=1)
    full = logmel.features(x)
    lo, hi = logmel.samples_needed(a, b - a)
    lo_c, hi_c = max(lo, 0), min(hi, len(x))  # only the samples that exist
    part = logmel.features_for_frames(x[lo_c:hi_c], a, b - a, buffer_offset=lo_c)
    assert part.shape == (b - a, 80)
    assert torch.allclose(part, full[a:b], atol=1e-5, rtol=0)


def test_audio_windows_layout():
    T, C = 10, 3
    feats = torch.arange(1, T + 1, dtype=torch.float32)[:, None].repeat(1, C)
    w = audio_windows(feats, context=2)
    assert w.shape == (3, 8, C)  # ceil(10/4) latents, 4 + 2*2 rows
    for j in range(3):
        for r in range(8):
            f = 4 * j - 2 + r
            expect = f + 1 if 0 <= f < T else 0
            assert torch.all(w[j, r] == expect), (j, r)
    assert audio_windows(feats, context=0).shape == (3, 4, C)
    assert audio_windows(feats, context=2, n_latent=2).shape == (2, 8, C)
    # streaming twin with a feature function on absolute frames
    got = windows_for_latents(lambda s, k: feats[s : s + k], 1, 2, C, 2, num_frames=T)
    assert torch.equal(got, w[1:3])
    assert get_preset("tiny").dit.audio_window == 4 + 2 * StreamConfig().audio_context


def test_feature_stream_matches_offline(logmel):
    x = speechy(3.3, seed=2)
    offline = audio_windows(logmel.features(x), context=2)
    rng = np.random.default_rng(0)
    s = AudioFeatureStream(logmel, context=2)
    got, nxt, pos = [], 0, 0
    while pos < len(x):
        k = int(rng.integers(100, 5000))
        s.push(x[pos : pos + k])
        pos += k
        while s.latents_ready() >= nxt + 3:  # chunks of 3 latent frames
            got.append(s.windows(nxt, 3))
            nxt += 3
        assert len(s.buffer) < 2 * 12 * SAMPLES_PER_FRAME + 6000  # old samples are dropped
    assert s.latents_ready() < offline.shape[0]  # the tail waits for the look-ahead ...
    s.end()  # ... or the end of the utterance
    assert s.latents_ready() == offline.shape[0]
    got.append(s.windows(nxt, offline.shape[0] - nxt))
    got = torch.cat(got)
    assert got.shape == offline.shape
    assert torch.allclose(got, offline, atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError):
        s.windows(0, 1)  # already dropped


def test_feature_stream_not_ready(logmel):
    s = AudioFeatureStream(logmel, context=2)
    s.push(np.zeros(6 * SAMPLES_PER_FRAME + 119, np.float32))
    assert s.frames_ready() == 5 and s.latents_ready() == 0
    with pytest.raises(RuntimeError):
        s.windows(0, 1)
    s.push(np.zeros(1, np.float32))
    assert s.frames_ready() == 6 and s.latents_ready() == 1
    assert s.windows(0, 1).shape == (1, 8, 80)


def test_silence_helpers():
    rng = np.random.default_rng(0)
    assert is_silence(np.zeros(640, np.float32))
    assert is_silence(1e-3 * rng.standard_normal(16000))  # -60 dBFS
    assert not is_silence(0.1 * rng.standard_normal(16000))  # -20 dBFS
    assert not is_silence(speechy(1.0))
    assert abs(rms_db(np.sin(np.linspace(0, 200 * np.pi, 16000))) + 3.01) < 0.05
    assert is_silence(np.zeros(0)) and rms_db(torch.zeros(10)) == -200.0
    fr = frame_rms_db(np.concatenate([np.zeros(1280), 0.1 * np.ones(700)]))
    assert fr.shape == (4,) and fr[0] < -100 and abs(fr[2] + 20) < 0.01 and fr[3] < -30
    # a fixed frame count: audio past it is ignored, missing audio is silence
    x = np.concatenate([np.zeros(640), 0.5 * np.ones(640), 0.2 * np.ones(100)])
    r = frame_rms(x, 2)
    assert r.shape == (2,) and r[0] == 0.0 and abs(r[1] - 0.5) < 1e-12
    r = frame_rms(x, 5)
    assert r.shape == (5,) and abs(r[2] - 0.2 * np.sqrt(100 / 640)) < 1e-12 and r[3] == r[4] == 0.0
    assert np.array_equal(frame_rms_db(x, 5), 20 * np.log10(np.maximum(r, 1e-10)))


def test_lookahead_and_build(logmel):
    assert lookahead_ms(StreamConfig()) == pytest.approx(87.5)
    assert lookahead_ms(StreamConfig(audio_context=0), logmel) == pytest.approx(7.5)
    fe = build_frontend(get_preset("tiny"))
    assert isinstance(fe, LogMelFrontEnd) and fe.dim == get_preset("tiny").dit.audio_dim == 80
    with pytest.raises(InputError):
        build_frontend(get_preset("wan-1.3b-audio"))  # needs a model path
    with pytest.raises(ValueError):
        build_frontend("nope")


# ----------------------------------------------------------------------------- wav2vec2


@pytest.fixture(scope="module")
def w2v_dir(tmp_path_factory):
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    torch.manual_seed(0)
    cfg = Wav2Vec2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(16,) * 7,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        vocab_size=8,
    )
    d = tmp_path_factory.mktemp("w2v")
    Wav2Vec2Model(cfg).eval().save_pretrained(d, safe_serialization=True)
    Wav2Vec2FeatureExtractor(do_normalize=True).save_pretrained(d)
    assert (d / "model.safetensors").exists()
    return d


def test_wav2vec2_frontend(w2v_dir):
    fe = Wav2Vec2FrontEnd(w2v_dir)
    assert fe.dim == 32 and fe.stride == 320 and fe.receptive_field == 400 and not fe.exact
    x = speechy(3.0, seed=3)
    T = num_video_frames(len(x))
    f = fe.features(x)
    assert f.shape == (T, 32) and torch.isfinite(f).all()
    # direct check of the 50 Hz -> 25 fps grid: frame n = lerp of hidden 2n, 2n+1 at 0.375
    from transformers import Wav2Vec2Model

    m = Wav2Vec2Model.from_pretrained(w2v_dir, local_files_only=True).eval()
    xt = torch.tensor(x, dtype=torch.float64)
    xn = ((xt - xt.mean()) / torch.sqrt(xt.var(unbiased=False) + 1e-7)).float()
    with torch.no_grad():
        h = m(xn[None]).last_hidden_state[0]
    n = 10
    assert torch.allclose(f[n], 0.625 * h[2 * n] + 0.375 * h[2 * n + 1], atol=1e-4)
    # a streaming window that reaches the whole signal reproduces the offline pass
    fe_wide = Wav2Vec2FrontEnd(w2v_dir, lookahead_s=3.0)
    assert torch.allclose(fe_wide.features_for_frames(x, 0, T), f, atol=1e-4)
    # a short sliding window: right shape, finite, same ballpark
    lo, hi = fe.samples_needed(50, 12)
    assert (lo, hi) == (50 * 640 - 32000, 62 * 640 + 3200)
    part = fe.features_for_frames(x[lo:hi], 50, 12, buffer_offset=lo)
    assert part.shape == (12, 32) and torch.isfinite(part).all()
    cos = torch.nn.functional.cosine_similarity(part, f[50:62], dim=1)
    assert cos.mean() > 0.5
    assert lookahead_ms(StreamConfig(), fe) == pytest.approx(280.0)


def test_wav2vec2_mean_layer_and_long(w2v_dir):
    fe = Wav2Vec2FrontEnd(w2v_dir, layer="mean", offline_max_s=1.0, offline_block_s=0.5)
    x = speechy(2.0, seed=4)
    f = fe.features(x)  # > offline_max: sliding windows
    assert f.shape == (50, 32) and torch.isfinite(f).all()
    s = AudioFeatureStream(fe, context=2)
    s.push(x)
    s.end()
    assert s.windows(0, s.latents_ready()).shape == (13, 8, 32)


def test_wav2vec2_errors(tmp_path, w2v_dir):
    with pytest.raises(InputError):
        Wav2Vec2FrontEnd(tmp_path / "missing")
    with pytest.raises(InputError):
        Wav2Vec2FrontEnd(tmp_path)  # no config.json
    with pytest.raises(InputError, match="hidden size 32"):
        build_frontend(get_preset("wan-1.3b-audio"), w2v_dir)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((w2v_dir / "config.json").read_text())
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InputError):
        Wav2Vec2FrontEnd(bad)
