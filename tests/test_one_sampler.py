"""One few-step sampler: the streaming engine (KV cache), the training rollout (whole-clip
sparse-causal forwards) and the bench's no-cache baseline run `flow.denoise_chunk` with the
schedule of `flow.student_schedule`, and make the same latents from the same seed."""

import dataclasses

import numpy as np
import pytest
import torch

from talkingmachines.diffusion import flow
from talkingmachines.eval.bench import NoCacheStream
from talkingmachines.pipeline import rollout
from talkingmachines.stream.generator import Avatar, load_avatar


@pytest.fixture(scope="module")
def avatar():
    torch.set_num_threads(1)
    return load_avatar(None, "tiny")


def portrait():
    return np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)


def speech(seconds=1.0):
    rng = np.random.default_rng(1)
    n = int(seconds * 16000)
    return (0.2 * (0.5 + 0.5 * np.sin(np.arange(n) / 16000 * 25)) * rng.standard_normal(n)).astype(np.float32)


def _stream(avatar, seed, steps, cls=None):
    s = avatar.new_stream(portrait(), seed=seed, steps=steps) if cls is None else cls(avatar, portrait(), seed, steps)
    s.push_audio(speech())
    s.end_audio()
    return s


@pytest.mark.parametrize("steps", [None, 3])
def test_engine_rollout_and_bench_make_the_same_latents(avatar, steps):
    n = 2  # chunks; the bench's no-cache window (sink + previous chunk) is the whole history here
    engine = _stream(avatar, 3, steps)
    lat_engine = torch.cat([engine.next_latents().latents for _ in range(n)], dim=2)
    bench = _stream(avatar, 3, steps, NoCacheStream)
    lat_bench = torch.cat([bench.next_latents().latents for _ in range(n)], dim=2)

    s = _stream(avatar, 3, steps)  # fresh: its audio windows and reference, nothing generated
    cf = s.chunk_frames
    windows = s.audio_windows(0, n * cf)
    torch.testing.assert_close(windows, torch.cat([s.audio_windows(12 * c, cf) for c in range(n)], dim=1))
    audio = torch.cat([s.sink_audio(), windows], dim=1)
    lat_train, _ = rollout(avatar.dit, s.ref, audio, avatar.preset, s.sigmas, [torch.Generator().manual_seed(3)])

    assert s.sigmas == flow.student_schedule(avatar.preset.stream, steps).tolist()
    assert lat_engine.abs().mean() > 0.1
    torch.testing.assert_close(lat_train, lat_engine, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lat_bench, lat_engine, rtol=1e-4, atol=1e-4)
    other = _stream(avatar, 4, steps).next_latents().latents
    assert not torch.allclose(other, lat_engine[:, :, :cf], atol=1e-2)  # the seed matters


def test_empty_student_timesteps_still_denoise(avatar):
    """`student_timesteps=()` (accepted by the config) derives Wan's schedule: the engine runs
    `student_steps` denoising passes, not none."""
    p = avatar.preset
    derived = dataclasses.replace(p, stream=dataclasses.replace(p.stream, student_timesteps=()))
    av = Avatar(derived, avatar.dit, avatar.vae, avatar.frontend, avatar.device, avatar.dtype, avatar.text)
    calls = []
    hook = avatar.dit.blocks[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        s = _stream(av, 0, None)
        calls.clear()
        s.next_latents()
    finally:
        hook.remove()
    assert s.sigmas == pytest.approx([1.0, 5 / 6, 0.0])
    assert len(calls) == p.stream.student_steps + 1  # the denoising passes + the clean pass writing the cache


def test_reference_guidance_only_at_low_noise(avatar):
    """guided_v(..., ref_max_sigma=s): the reference guidance at sigma <= s, plain audio guidance
    above (the ODE pairs of `guidance.ref_max_sigma`), through the sampler's own timestep batches."""
    from talkingmachines.model.audio import audio_windows
    from talkingmachines.pipeline import guided_v

    p = avatar.preset
    g = torch.Generator().manual_seed(0)
    ref = avatar.vae.encode_image(portrait()).to(avatar.device, avatar.dtype)
    win = audio_windows(avatar.frontend.features(torch.as_tensor(speech(0.5))), context=p.stream.audio_context,
                        n_latent=3)
    au = torch.cat([torch.zeros_like(win[:1]), win])[None]
    x = torch.randn((1, ref.shape[1], 3, *ref.shape[3:]), generator=g)
    split = guided_v(avatar.dit, ref, au, p, 2.5, 1.5, ref_max_sigma=0.6)
    every = guided_v(avatar.dit, ref, au, p, 2.5, 1.5)
    plain = guided_v(avatar.dit, ref, au, p, 2.5, 1.0)
    with torch.no_grad():
        for s, want in ((0.9, plain), (0.6, every), (0.25, every)):
            t = flow._t_batch(s, x)
            torch.testing.assert_close(split(x, t), want(x, t))
        t = flow._t_batch(0.25, x)
        assert (every(x, t) - plain(x, t)).abs().max() > 1e-2  # the reference guidance does something (more than
        # the batch tolerance below)
        # a batch whose samples sit at different levels (DMD's re-noising): each sample gets its own guidance
        x2 = torch.cat([x, x])
        t2 = torch.tensor([flow.sigma_to_t(0.9), flow.sigma_to_t(0.25)])
        au2, ref2 = torch.cat([au, au]), torch.cat([ref, ref])
        split2 = guided_v(avatar.dit, ref2, au2, p, 2.5, 1.5, ref_max_sigma=0.6)(x2, t2)
        # (a batch of two sums in another order than a batch of one: float tolerance)
        torch.testing.assert_close(split2[:1], plain(x, t2[:1]), atol=1e-4, rtol=1e-3)
        torch.testing.assert_close(split2[1:], every(x, t2[1:]), atol=1e-4, rtol=1e-3)
