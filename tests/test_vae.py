"""Video VAEs: streaming decode == whole decode, constant state, shapes, persistence."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from talkingmachines.model.vae import (
    TinyVAE,
    TinyVAEConfig,
    VideoVAE,
    WanStreamingDecoder,
    WanVAE,
    as_video_vae,
    load_vae,
    tensor_to_uint8,
    video_to_tensor,
)


def _stream(dec, z: torch.Tensor, chunk: int = 3) -> list[torch.Tensor]:
    """Sink first, then chunks of `chunk` latent frames."""
    outs = [dec.decode_float(z[:, :, :1])]
    for s in range(1, z.shape[2], chunk):
        outs.append(dec.decode_float(z[:, :, s:s + chunk]))
    return outs


# ----------------------------------------------------------------------------- Wan-VAE


@pytest.fixture(scope="module")
def wan():
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    vae = AutoencoderKLWan(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        latents_mean=[0.1, -0.2, 0.3, 0.0],
        latents_std=[1.5, 0.5, 2.0, 1.0],
    ).eval()
    return vae


def test_wan_streaming_matches_whole_decode(wan):
    torch.manual_seed(1)
    z = torch.randn(1, 4, 1 + 3 + 3 + 3, 4, 4)  # sink + 3 chunks -> 37 frames at 32x32
    vae = WanVAE(wan)
    assert vae.latent_channels == 4 and vae.spatial == 8 and vae.temporal == 4
    whole = vae.decode_float(z)
    assert whole.shape == (1, 3, 37, 32, 32)
    # the un-normalisation is the pipelines' one: raw = z * std + mean
    mean = torch.tensor(wan.config.latents_mean).view(1, 4, 1, 1, 1)
    std = torch.tensor(wan.config.latents_std).view(1, 4, 1, 1, 1)
    ref = wan.decode(z * std + mean).sample
    assert torch.allclose(whole, ref)

    dec = WanStreamingDecoder(wan)
    outs = _stream(dec, z)
    assert [o.shape[2] for o in outs] == [1, 12, 12, 12]
    streamed = torch.cat(outs, dim=2)
    assert (streamed - whole).abs().max().item() < 1e-4
    # uint8 edges
    u_whole = tensor_to_uint8(whole)
    assert u_whole.shape == (37, 32, 32, 3) and u_whole.dtype == np.uint8
    assert np.abs(tensor_to_uint8(streamed).astype(int) - u_whole.astype(int)).max() <= 1


def test_wan_stream_state_is_constant(wan):
    torch.manual_seed(2)
    dec = WanVAE(wan).stream_decoder()
    first = dec.decode(torch.randn(1, 4, 1, 4, 4))
    assert first.shape == (1, 32, 32, 3) and first.dtype == np.uint8
    sizes = []
    for _ in range(6):
        frames = dec.decode(torch.randn(1, 4, 3, 4, 4))
        assert frames.shape == (12, 32, 32, 3)
        sizes.append(dec.state_numel())
    assert sizes[1] == sizes[5] > 0
    dec.reset()
    assert dec.state_numel() == 0


def test_wan_encode_shapes_and_loading(wan, tmp_path):
    vae = WanVAE(wan)
    rng = np.random.default_rng(0)
    video = rng.integers(0, 256, size=(9, 32, 32, 3), dtype=np.uint8)
    z = vae.encode_video(video)
    assert z.shape == (1, 4, 3, 4, 4)
    zi = vae.encode_image(video[0])
    assert zi.shape == (1, 4, 1, 4, 4)
    assert torch.allclose(zi, z[:, :, :1], atol=1e-5)  # causal: frame 0 alone == the sink latent
    with pytest.raises(ValueError):
        vae.encode_video(video[:8])

    wan.save_pretrained(tmp_path / "wan" / "vae")
    loaded = load_vae("wan", tmp_path / "wan")  # finds the vae/ subfolder
    assert isinstance(loaded, WanVAE) and isinstance(loaded, VideoVAE)
    assert torch.allclose(loaded.encode_video(video), z, atol=1e-6)
    assert isinstance(as_video_vae(wan), WanVAE)


# ----------------------------------------------------------------------------- TinyVAE


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    vae = TinyVAE(TinyVAEConfig()).eval()
    # non-trivial weights everywhere (zero-initialised residual convs included)
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.02 * torch.randn_like(p))
    vae.set_latent_stats(torch.linspace(-0.5, 0.5, 8), torch.linspace(0.5, 2.0, 8))
    return vae


def test_tiny_streaming_matches_whole_decode(tiny):
    torch.manual_seed(3)
    z = torch.randn(1, 8, 1 + 3 * 3, 8, 12)  # non-square: 64x96
    whole = tiny.decode_float(z)
    assert whole.shape == (1, 3, 37, 64, 96)
    dec = tiny.stream_decoder()
    outs = _stream(dec, z)
    assert [o.shape[2] for o in outs] == [1, 12, 12, 12]
    assert (torch.cat(outs, dim=2) - whole).abs().max().item() < 1e-5
    # one latent at a time gives the same, and the state stays one latent frame
    dec.reset()
    one = [dec.decode_float(z[:, :, i:i + 1]) for i in range(z.shape[2])]
    assert (torch.cat(one, dim=2) - whole).abs().max().item() < 1e-5
    assert dec.state_numel() == 8 * 8 * 12
    u = dec.decode(z[:, :, :3])
    assert u.shape == (12, 64, 96, 3) and u.dtype == np.uint8


def test_reference_decoder_starts_as_the_plain_one_and_streams_as_the_whole_clip(tiny, tmp_path):
    """A decoder that also sees the stream's first latent (`decoder_ref`): grown from a plain one it
    decodes exactly as that one did (the new input weights are zero); trained, its streaming decode
    (the first latent remembered as the reference) is the whole-clip decode; it saves and loads."""
    torch.manual_seed(5)
    z = torch.randn(1, 8, 1 + 3 * 3, 8, 12)
    ref = tiny.with_ref_decoder()
    assert ref.config.decoder_ref and not tiny.config.decoder_ref
    assert ref.decoder.conv_in.in_channels == tiny.decoder.conv_in.in_channels + 8
    assert torch.equal(ref.decode_float(z), tiny.decode_float(z))
    with torch.no_grad():  # as if trained: the reference now changes what is drawn
        ref.decoder.conv_in.weight[:, -8:].normal_(0, 0.05)
    whole = ref.decode_float(z)
    assert (whole - tiny.decode_float(z)).abs().max().item() > 1e-3
    dec = ref.stream_decoder()
    assert (torch.cat(_stream(dec, z), dim=2) - whole).abs().max().item() < 1e-5
    assert dec.state_numel() == 2 * 8 * 8 * 12  # the last latent and the reference: flat over the stream
    dec.reset()
    one = [dec.decode_float(z[:, :, i:i + 1]) for i in range(z.shape[2])]
    assert (torch.cat(one, dim=2) - whole).abs().max().item() < 1e-5
    # another reference gives other frames: the decoder reads it
    raw = ref.denormalize(z)
    other = ref.decode_raw(raw, ref=raw[:, :, 1:2])
    assert (other - ref.decode_raw(raw)).abs().max().item() > 1e-3
    with pytest.raises(ValueError, match="reference latent"):
        ref.decode_raw(raw[:, :, 1:], prev=raw[:, :, :1], first=False)
    with pytest.raises(ValueError, match="decoder_ref"):
        tiny.decode_raw(raw, ref=raw[:, :, :1])
    with pytest.raises(ValueError, match="already"):
        ref.with_ref_decoder()
    ref.save_pretrained(tmp_path / "ref")
    loaded = load_vae("tiny", tmp_path / "ref")
    assert loaded.config.decoder_ref and torch.equal(loaded.decode_float(z), whole)
    with pytest.raises(ValueError, match="true or false"):
        TinyVAEConfig(decoder_ref="yes")


def test_tiny_encode_shapes_and_normalisation(tiny):
    rng = np.random.default_rng(1)
    video = rng.integers(0, 256, size=(9, 64, 64, 3), dtype=np.uint8)
    z = tiny.encode_video(video)
    assert z.shape == (1, 8, 3, 8, 8)
    zi = tiny.encode_image(video[0])
    assert zi.shape == (1, 8, 1, 8, 8)
    assert torch.allclose(zi, z[:, :, :1], atol=1e-5)
    x = video_to_tensor(video)
    assert x.shape == (1, 3, 9, 64, 64) and x.min() >= -1 and x.max() <= 1
    assert np.array_equal(tensor_to_uint8(x), video)
    zb = tiny.encode_video(torch.cat([x, -x]))
    assert zb.shape == (2, 8, 3, 8, 8)
    assert torch.allclose(zb[:1], z, atol=1e-5)
    mean, _ = tiny.encode_moments(x)
    assert torch.allclose(z, (mean - tiny.latents_mean) / tiny.latents_std, atol=1e-6)
    out = tiny.decode(z)
    assert out.shape == (9, 64, 64, 3) and out.dtype == np.uint8
    with pytest.raises(ValueError):
        tiny.encode_video(video[:6])
    with pytest.raises(ValueError):
        tiny.encode_video(video[:, :60])


def test_tiny_save_load_round_trip(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "tiny")
    assert sorted(p.name for p in (tmp_path / "tiny").iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_vae("tiny", tmp_path / "tiny")
    assert isinstance(loaded, TinyVAE) and isinstance(loaded, VideoVAE)
    assert loaded.config == tiny.config
    torch.manual_seed(4)
    z = torch.randn(1, 8, 4, 8, 8)
    assert torch.equal(loaded.decode_float(z), tiny.decode_float(z))
    video = torch.rand(1, 3, 5, 64, 64) * 2 - 1
    assert torch.equal(loaded.encode_video(video), tiny.encode_video(video))


def test_tiny_spatial_4_streams_round_trips_and_loads(tmp_path):
    """A TinyVAE with 4x spatial compression (a latent pixel per 4x4 pixels, for faces whose
    mouth an 8x latent blurs): latents at H/4, streaming decode == whole decode, save/load."""
    torch.manual_seed(0)
    vae = TinyVAE(TinyVAEConfig(latent_channels=4, spatial=4, enc_widths=(8, 16), dec_widths=(16, 8))).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.02 * torch.randn_like(p))
    assert vae.spatial == 4 and vae.latent_hw(64, 96) == (16, 24)
    video = torch.rand(1, 3, 9, 32, 48) * 2 - 1
    z = vae.encode_video(video)
    assert z.shape == (1, 4, 3, 8, 12)
    assert vae.decode_float(z).shape == (1, 3, 9, 32, 48)
    zz = torch.randn(1, 4, 7, 8, 12)
    whole = vae.decode_float(zz)
    outs = _stream(vae.stream_decoder(), zz)
    assert (torch.cat(outs, dim=2) - whole).abs().max().item() < 1e-5
    vae.save_pretrained(tmp_path / "v4")
    loaded = load_vae("tiny", tmp_path / "v4")
    assert loaded.spatial == 4 and torch.equal(loaded.decode_float(zz), whole)
    with pytest.raises(ValueError, match="needs 2 encoder and decoder widths"):
        TinyVAEConfig(spatial=4)  # the 8x default widths
    with pytest.raises(ValueError, match="spatial 8 or 4"):
        TinyVAEConfig(spatial=2, enc_widths=(8,), dec_widths=(8,))


def test_tiny_decode_timing(tiny):
    """Prints the time to decode one 3-latent chunk (12 frames at 128x128); not asserted."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        dec = tiny.stream_decoder()
        dec.decode(torch.randn(1, 8, 1, 16, 16))
        z = torch.randn(1, 8, 3, 16, 16)
        times = []
        for _ in range(10):
            t0 = time.perf_counter()
            frames = dec.decode(z)
            times.append(time.perf_counter() - t0)
        assert frames.shape == (12, 128, 128, 3)
        print(f"\nTinyVAE chunk decode (3 latents -> 12 x 128x128, 2 threads): "
              f"median {1e3 * sorted(times)[5]:.1f} ms, min {1e3 * min(times):.1f} ms")
    finally:
        torch.set_num_threads(threads)


def test_saved_vae_files_have_ordinary_permissions(tmp_path):
    """Atomic saves go through mkstemp (mode 0600): the finished files get the umask's usual mode."""
    import os
    import stat

    from talkingmachines.model.vae import TinyVAE, TinyVAEConfig

    TinyVAE(TinyVAEConfig(enc_widths=(8, 8, 8), dec_widths=(8, 8, 8))).save_pretrained(tmp_path / "vae")
    umask = os.umask(0)
    os.umask(umask)
    for f in (tmp_path / "vae").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f


def test_vae_grid_script_draws_ground_truth_and_each_round_trip(tmp_path):
    """scripts/vae_grid.py: a row of real frames and one per VAE for each clip, judged per frame;
    bad input is a one-line error and writes nothing."""
    from PIL import Image
    from script_loader import load_script
    from train_fixtures import make_clips

    pytest.importorskip("dlib")
    mod = load_script("scripts/vae_grid.py")
    make_clips(tmp_path / "data", n=2)
    for name, spatial, widths in (("a", 8, ((8, 8, 8), (8, 8, 8))), ("b", 4, ((8, 8), (8, 8)))):
        TinyVAE(TinyVAEConfig(latent_channels=4, spatial=spatial, enc_widths=widths[0], dec_widths=widths[1])).save_pretrained(tmp_path / name)
    out = tmp_path / "grid.png"
    args = ["--data", str(tmp_path / "data"), "--clips", "clip_00000,clip_00001", "--start", "2", "--frames", "5",
            "--out", str(out), f"a={tmp_path / 'a'}", f"b={tmp_path / 'b'}"]
    assert mod.main(args) == 0
    img = Image.open(out)
    assert img.size == (mod.LABEL_W + 5 * 32, 2 * 3 * 32)  # 2 clips x (ground truth + 2 VAEs), 32 px frames
    assert mod.main(args[:-2] + ["nolabel"]) == 2
    assert mod.main([*args[:3], "clip_00009", *args[4:]]) == 2
    assert mod.main(args[:-1] + [f"c={tmp_path}"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".png") == ["grid.png"]
