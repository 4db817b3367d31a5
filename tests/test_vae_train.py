"""TinyVAE training: the loss falls, checkpoints are atomic safetensors, resume is exact."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from talkingmachines.model.vae import TinyVAEConfig, load_vae, video_to_tensor
from talkingmachines.train.checkpoint import latest_checkpoint
from talkingmachines.train.vae_train import train_tiny_vae


class MovingPatterns:
    """Deterministic toy clips: a coloured background, a moving disc and an opening 'mouth'."""

    def __init__(self, n: int = 32, frames: int = 9, size: int = 64) -> None:
        self.n, self.frames, self.size = n, frames, size
        self.reads = 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        self.reads += 1
        rng = np.random.default_rng(i)
        s, t = self.size, self.frames
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
        bg = rng.uniform(0.1, 0.9, 3).astype(np.float32)
        fg = rng.uniform(0.0, 1.0, 3).astype(np.float32)
        cx, cy = rng.uniform(0.3, 0.7, 2)
        vx, vy = rng.uniform(-0.02, 0.02, 2)
        ph = rng.uniform(0, 2 * np.pi)
        out = np.empty((t, s, s, 3), np.float32)
        for f in range(t):
            img = bg + 0.15 * (xx[..., None] - 0.5)
            px, py = cx + vx * f, cy + vy * f
            disc = ((xx - px) ** 2 + (yy - py) ** 2) < 0.04
            img[disc] = fg
            mouth_h = 0.02 + 0.04 * (1 + np.sin(ph + 0.8 * f))
            mouth = (np.abs(xx - px) < 0.08) & (np.abs(yy - py - 0.08) < mouth_h)
            img[mouth] = 0.1
            out[f] = img
        return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


SMALL = TinyVAEConfig(enc_widths=(16, 32, 48), dec_widths=(48, 24, 16))


def test_loss_falls_and_outputs(tmp_path):
    torch.manual_seed(0)
    data = MovingPatterns(n=32, frames=9, size=64)
    res = train_tiny_vae(data, tmp_path / "vae", steps=40, batch_size=4, lr=3e-3, log_every=10,
                         ckpt_every=20, progress=False, seed=0, config=SMALL, stat_batches=2)
    losses = [v for _, v in res.losses]
    assert len(losses) == 40 and res.step == 40 and res.start_step == 0
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    print(f"\nTinyVAE loss: first-5 mean {first:.4f} -> last-5 mean {last:.4f} ({first / last:.1f}x)")
    assert last < first / 1.7  # stated factor: at least 1.7x lower after 40 steps (measured ~2.6x)

    out = tmp_path / "vae"
    for name in ("model.safetensors", "config.json", "loss.png", "losses.json", "DONE.json"):
        assert (out / name).is_file(), name
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(json.loads((out / "losses.json").read_text())) == 40
    ck = latest_checkpoint(out)
    assert ck is not None and ck.name == "step_00000040"
    assert {p.name for p in ck.iterdir()} >= {"model.vae.safetensors", "config.json", "optim.vae.safetensors",
                                              "optim.vae.json", "state.json", "manifest.json"}
    assert not any(p.name.startswith(".") for p in (out / "checkpoints").iterdir())

    # latent statistics are stored: encoded training clips are ~unit variance per channel
    vae = load_vae("tiny", out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["latents_std"] != [1.0] * 8
    z = torch.cat([vae.encode_video(data[i]) for i in range(8)])
    assert z.shape == (8, 8, 3, 8, 8)
    std = z.transpose(0, 1).reshape(8, -1).std(1)
    assert torch.all(std > 0.5) and torch.all(std < 2.0)
    rec = vae.decode(vae.encode_video(data[0]))
    assert rec.shape == (9, 64, 64, 3) and rec.dtype == np.uint8


class Killed(Exception):
    pass


class KillAfter(MovingPatterns):
    """Raises (like a kill) once `limit` clips have been read."""

    def __init__(self, limit: int, **kw) -> None:
        super().__init__(**kw)
        self.limit = limit

    def __getitem__(self, i: int) -> np.ndarray:
        if self.reads >= self.limit:
            raise Killed()
        return super().__getitem__(i)


def test_resume_after_kill_matches_uninterrupted(tmp_path):
    kw = dict(steps=8, batch_size=2, lr=1e-3, log_every=0, ckpt_every=3, progress=False, seed=3,
              config=SMALL, stat_batches=1)
    small = dict(n=8, frames=5, size=32)
    # killed during step 8 (7 steps x 2 clips read): the last checkpoint is step 6
    with pytest.raises(Killed):
        train_tiny_vae(KillAfter(limit=14, **small), tmp_path / "a", **kw)
    assert latest_checkpoint(tmp_path / "a").name == "step_00000006"
    assert not (tmp_path / "a" / "model.safetensors").exists()

    res = train_tiny_vae(MovingPatterns(**small), tmp_path / "a", **kw)
    assert res.start_step == 6 and res.step == 8 and len(res.losses) == 2
    assert len(json.loads((tmp_path / "a" / "losses.json").read_text())) == 8

    ref = train_tiny_vae(MovingPatterns(**small), tmp_path / "b", **kw)
    assert ref.start_step == 0
    assert [v for _, v in ref.losses[6:]] == pytest.approx([v for _, v in res.losses], rel=1e-5)
    for (k, a), (_, b) in zip(res.vae.state_dict().items(), ref.vae.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), k

    # a finished run resumes to a no-op and returns the trained model
    again = train_tiny_vae(MovingPatterns(**small), tmp_path / "a", **kw)
    assert again.start_step == 8 and again.losses == []
    assert torch.equal(again.vae.decoder.conv_out.weight, res.vae.decoder.conv_out.weight)


def _random_clips_and_saved_vae(folder, seed: int):
    """Four random 5-frame 32x32 clips and a small TinyVAE with non-trivial latent statistics, saved
    to ``folder``: what a decoder-only fine-tune starts from."""
    from talkingmachines.model.vae import TinyVAE

    rng = np.random.default_rng(seed)
    clips = [rng.integers(0, 255, (5, 32, 32, 3), dtype=np.uint8) for _ in range(4)]
    torch.manual_seed(0)
    base = TinyVAE(TinyVAEConfig(enc_widths=(8, 8, 8), dec_widths=(8, 8, 8)))
    base.set_latent_stats(torch.linspace(-0.2, 0.2, 8), torch.linspace(0.5, 1.5, 8))
    base.save_pretrained(folder)
    return clips, base


def test_temporal_term_and_decoder_only_finetune(tmp_path):
    """The temporal term penalises a reconstruction that wobbles where the clip is still; a
    decoder-only fine-tune (init_from + freeze_encoder) leaves the encoder and its latent
    statistics bit for bit, so latents a DiT was trained on do not move, and changes the decoder."""
    from talkingmachines.model.vae import TinyVAE
    from talkingmachines.train.vae_train import train_tiny_vae, vae_loss

    x = torch.zeros(1, 3, 5, 8, 8)
    wobble = x + 0.1 * torch.tensor([0.0, 1, -1, 1, -1]).view(1, 1, 5, 1, 1)
    shifted = x + 0.1  # wrong by a constant: no temporal error
    m = torch.zeros(1, 4, 2, 1, 1)
    assert vae_loss(wobble, x, m, m, temporal_weight=1.0)[1]["temporal"] > 0.15
    assert vae_loss(shifted, x, m, m, temporal_weight=1.0)[1]["temporal"] < 1e-7

    clips, base = _random_clips_and_saved_vae(tmp_path / "base", seed=0)
    train_tiny_vae(clips, tmp_path / "ft", steps=3, batch_size=2, lr=1e-2, progress=False, init_from=tmp_path / "base",
                   freeze_encoder=True, temporal_weight=1.0, ckpt_every=0)
    a, b = TinyVAE.from_pretrained(tmp_path / "base"), TinyVAE.from_pretrained(tmp_path / "ft")
    ea, eb = a.encoder.state_dict(), b.encoder.state_dict()
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    assert torch.equal(a.latents_mean, b.latents_mean) and torch.equal(a.latents_std, b.latents_std)
    da, db = a.decoder.state_dict(), b.decoder.state_dict()
    assert any(not torch.equal(da[k], db[k]) for k in da)
    with pytest.raises(ValueError, match="init_from"):
        train_tiny_vae(clips, tmp_path / "bad", steps=1, freeze_encoder=True, progress=False)

    # latent noise: the same fine-tune decodes noisy latents, so it ends elsewhere; the encoder still stays
    train_tiny_vae(clips, tmp_path / "noisy", steps=3, batch_size=2, lr=1e-2, progress=False, init_from=tmp_path / "base",
                   freeze_encoder=True, temporal_weight=1.0, ckpt_every=0, latent_noise=0.5)
    c = TinyVAE.from_pretrained(tmp_path / "noisy")
    ec, dc = c.encoder.state_dict(), c.decoder.state_dict()
    assert all(torch.equal(ea[k], ec[k]) for k in ea)
    assert any(not torch.allclose(db[k], dc[k]) for k in db)
    with pytest.raises(ValueError, match="latent_noise"):
        train_tiny_vae(clips, tmp_path / "bad2", steps=1, latent_noise=0.3, progress=False)


def test_new_larger_decoder_keeps_encoder_and_resumes(tmp_path):
    """``dec_widths`` / ``dec_res_blocks``: a fresh decoder of other widths under a trained encoder.
    The encoder and its latent statistics stay bit for bit (the latents a DiT was trained on), the
    saved folder loads with the new geometry, and a run stopped at a checkpoint resumes to the
    same weights as one that was not stopped."""
    from talkingmachines.model.vae import TinyVAE
    from talkingmachines.train.vae_train import train_tiny_vae

    clips, base = _random_clips_and_saved_vae(tmp_path / "base", seed=1)
    kw = dict(batch_size=2, lr=1e-2, progress=False, init_from=tmp_path / "base", freeze_encoder=True,
              latent_noise=0.2, dec_widths=(16, 12, 8), dec_res_blocks=2, ckpt_every=2, log_every=0)
    train_tiny_vae(clips, tmp_path / "big", steps=4, **kw)
    big = TinyVAE.from_pretrained(tmp_path / "big")
    assert big.config.dec_widths == (16, 12, 8) and big.config.dec_res_blocks == 2 and len(big.decoder.res) == 2
    ea, eb = base.encoder.state_dict(), big.encoder.state_dict()
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    assert torch.equal(base.latents_mean, big.latents_mean) and torch.equal(base.latents_std, big.latents_std)
    x = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    assert big.decode_float(big.encode_video(x)).shape == (1, 3, 5, 32, 32)

    # as if stopped after step 2: the step-4 checkpoint and the exported model are gone
    import shutil

    shutil.copytree(tmp_path / "big" / "checkpoints" / "step_00000002", tmp_path / "stopped" / "checkpoints" / "step_00000002")
    res = train_tiny_vae(clips, tmp_path / "stopped", steps=4, **kw)
    assert res.start_step == 2
    for (k, a), (_, b) in zip(res.vae.state_dict().items(), big.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), k
    with pytest.raises(ValueError, match="dec_widths"):
        train_tiny_vae(clips, tmp_path / "bad", steps=1, dec_widths=(16, 12, 8), progress=False)
    # widths that do not fit the VAE, a negative count: one line each, before any training
    for bad in (dict(dec_widths=(16, 12)), dict(dec_res_blocks=-1), dict(dec_widths=(16, 0, 8))):
        with pytest.raises(ValueError, match="the new decoder"):
            train_tiny_vae(clips, tmp_path / "bad", steps=1, **{**kw, **bad})
        assert not (tmp_path / "bad" / "checkpoints").exists()


def test_older_vae_checkpoint_is_refused_in_one_line(tmp_path):
    """Checkpoints of the VAE trainer before it used the stages' Trainer (model.safetensors +
    optimizer.safetensors) are not resumed: one line says why and what to do."""
    from talkingmachines.errors import InputError
    from talkingmachines.model.vae import TinyVAE
    from talkingmachines.train.checkpoint import write_checkpoint

    def old_format(tmp):
        TinyVAE(SMALL).save_pretrained(tmp)
        (tmp / "optimizer.safetensors").write_bytes(b"")
        (tmp / "optimizer.json").write_text("{}")
        (tmp / "state.json").write_text(json.dumps({"step": 2, "seed": 0, "losses": [[1, 0.5], [2, 0.4]]}))

    write_checkpoint(tmp_path / "a" / "checkpoints", "step_00000002", old_format, keep=2)
    with pytest.raises(InputError) as e:
        train_tiny_vae(MovingPatterns(n=4, frames=5, size=32), tmp_path / "a", steps=4, batch_size=2,
                       progress=False, config=SMALL)
    assert "\n" not in str(e.value) and "older VAE trainer" in str(e.value) and "step_00000002" in str(e.value)


def test_feature_weight_counts_the_masked_pixels_more_and_flips_with_the_clip():
    """`vae_loss`'s per-pixel weight: all ones is the unweighted loss; an error inside the mask
    counts 1 + feature_weight times one outside it. `_to_batch` builds that weight from a clip's
    "features" mask (1 where a clip has none) and flips it with the clip."""
    from talkingmachines.train.vae_train import _to_batch, vae_loss

    x = torch.zeros(1, 3, 1, 8, 8)
    m = torch.zeros(1, 4, 1, 1, 1)
    inside, outside = x.clone(), x.clone()
    inside[..., 2, 2], outside[..., 6, 6] = 0.5, 0.5
    mask = np.zeros((8, 8), np.uint8)
    mask[1:4, 1:4] = 1
    w = (1 + 3.0 * torch.as_tensor(mask, dtype=torch.float32)).view(1, 1, 1, 8, 8)
    for rec in (inside, outside):
        assert vae_loss(rec, x, m, m)[0] == vae_loss(rec, x, m, m, weight=torch.ones_like(w))[0]
    for key in ("l1", "mse", "edge"):
        ratio = vae_loss(inside, x, m, m, weight=w)[1][key] / vae_loss(outside, x, m, m, weight=w)[1][key]
        assert ratio == pytest.approx(4.0), key

    rng = np.random.default_rng(0)
    clip = rng.integers(0, 255, (5, 8, 8, 3), dtype=np.uint8)
    xb, wb, rb = _to_batch([{"video": clip, "features": mask}, clip], torch.device("cpu"), torch.tensor([True, False]), 3.0)
    assert rb is None  # no reference frames asked for
    assert torch.equal(wb[0, 0, 0], w[0, 0, 0].flip(-1)) and torch.equal(wb[1], torch.ones(1, 1, 8, 8))
    assert torch.equal(xb[0], _to_batch([clip], torch.device("cpu"), None)[0][0].flip(-1))
    assert _to_batch([clip], torch.device("cpu"), None)[1] is None  # no weight asked for: none built


def test_adversarial_decoder_finetune_alternates_keeps_encoder_and_resumes(tmp_path):
    """``adv_weight``: steps alternate between a patch discriminator (even) and the decoder (odd),
    the encoder and latent statistics stay bit for bit, the adversarial term is balanced by
    VQGAN's adaptive weight once ``adv_start`` decoder updates have passed, only the decoder's
    losses are exported, and a stopped run resumes to the same decoder and discriminator."""
    import shutil

    from safetensors.torch import load_file

    from talkingmachines.model.vae import TinyVAE
    from talkingmachines.train.discriminator import PatchDiscriminator, adaptive_weight, hinge_d_loss

    d = PatchDiscriminator(width=8)
    assert d(torch.zeros(2, 3, 32, 32)).shape == (2, 1, 4, 4)
    # hinge: 0 when real scores >= 1 and fakes <= -1; 1 at a discriminator that says 0 everywhere
    assert float(hinge_d_loss(torch.full((4,), 2.0), torch.full((4,), -3.0))) == 0.0
    assert float(hinge_d_loss(torch.zeros(4), torch.zeros(4))) == pytest.approx(1.0)
    w = torch.ones(3, requires_grad=True)
    assert float(adaptive_weight((2 * w).sum(), (0.5 * w).sum(), w)) == pytest.approx(4.0, rel=1e-3)

    clips, base = _random_clips_and_saved_vae(tmp_path / "base", seed=2)
    kw = dict(batch_size=2, lr=1e-2, progress=False, init_from=tmp_path / "base", freeze_encoder=True,
              latent_noise=0.1, adv_weight=0.5, adv_start=1, ckpt_every=2, log_every=1)
    res = train_tiny_vae(clips, tmp_path / "adv", steps=6, **kw)
    ck = tmp_path / "adv" / "checkpoints" / "step_00000006"
    state = json.loads((ck / "state.json").read_text())
    assert [h["group"] for h in state["history"]] == ["disc", "vae"] * 3
    assert state["group_updates"] == {"vae": 3, "disc": 3}
    lams = [h["adv_lambda"] for h in state["history"] if h["group"] == "vae"]
    assert lams[0] == 0.0 and all(x > 0 for x in lams[1:])  # off for the first decoder update, then on
    assert [s for s, _ in res.losses] == [2, 4, 6]  # the decoder's steps only
    assert len(json.loads((tmp_path / "adv" / "losses.json").read_text())) == 3
    assert (ck / "model.disc.safetensors").is_file()
    ft = TinyVAE.from_pretrained(tmp_path / "adv")
    ea, eb = base.encoder.state_dict(), ft.encoder.state_dict()
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    assert torch.equal(base.latents_mean, ft.latents_mean) and torch.equal(base.latents_std, ft.latents_std)

    # as if stopped after step 4 (a discriminator step came last: the next one is the decoder's)
    shutil.copytree(tmp_path / "adv" / "checkpoints" / "step_00000004", tmp_path / "stopped" / "checkpoints" / "step_00000004")
    again = train_tiny_vae(clips, tmp_path / "stopped", steps=6, **kw)
    assert again.start_step == 4
    for (k, a), (_, b) in zip(again.vae.state_dict().items(), ft.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), k
    da = load_file(str(ck / "model.disc.safetensors"))
    db = load_file(str(tmp_path / "stopped" / "checkpoints" / "step_00000006" / "model.disc.safetensors"))
    assert all(torch.allclose(da[k], db[k], atol=1e-6) for k in da)
    with pytest.raises(ValueError, match="adv_weight"):
        train_tiny_vae(clips, tmp_path / "bad", steps=1, adv_weight=0.5, progress=False)


def test_reference_decoder_finetune_learns_from_the_first_latent_and_resumes(tmp_path):
    """``decoder_ref``: a plain decoder is grown to one that also sees the clip's first latent (clean,
    as a stream's portrait latent) and starts as it was; trained on smudged latents (``latent_blur``),
    it comes to read the reference; the encoder stays bit for bit; a stopped run resumes exactly."""
    import shutil

    from talkingmachines.model.vae import TinyVAE

    from talkingmachines.train.vae_train import _to_batch

    clips, base = _random_clips_and_saved_vae(tmp_path / "base", seed=3)
    # each clip's own reference frame (the DiT stages' listening frame outside the crop), else its first
    own = np.random.default_rng(9).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    x, _, ref = _to_batch([{"video": clips[0], "ref": own}, clips[1]], torch.device("cpu"), torch.tensor([True, False]),
                          refs=True)
    assert ref.shape == (2, 3, 1, 32, 32)
    assert torch.equal(ref[0, :, 0], video_to_tensor(own[None])[0, :, 0].flip(-1))  # flipped with its clip
    assert torch.equal(ref[1], x[1, :, :1])
    clips = [{"video": c, "ref": c[-1]} for c in clips]
    kw = dict(batch_size=2, lr=1e-2, progress=False, init_from=tmp_path / "base", freeze_encoder=True,
              latent_noise=0.1, latent_blur=0.8, decoder_ref=True, ckpt_every=2, log_every=1)
    res = train_tiny_vae(clips, tmp_path / "ref", steps=4, **kw)
    ft = TinyVAE.from_pretrained(tmp_path / "ref")
    assert ft.config.decoder_ref and not base.config.decoder_ref
    assert ft.decoder.conv_in.weight[:, -base.latent_channels:].abs().max().item() > 0  # it reads the reference
    ea, eb = base.encoder.state_dict(), ft.encoder.state_dict()
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    assert torch.equal(base.latents_mean, ft.latents_mean)
    assert [s for s, _ in res.losses] == [1, 2, 3, 4]

    shutil.copytree(tmp_path / "ref" / "checkpoints" / "step_00000002", tmp_path / "stopped" / "checkpoints" / "step_00000002")
    again = train_tiny_vae(clips, tmp_path / "stopped", steps=4, **kw)
    assert again.start_step == 2
    for (k, a), (_, b) in zip(again.vae.state_dict().items(), ft.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), k
    for bad, match in ((dict(decoder_ref=True), "decoder_ref"), (dict(latent_blur=0.5), "latent_blur")):
        with pytest.raises(ValueError, match=match):
            train_tiny_vae(clips, tmp_path / "bad", steps=1, progress=False, **bad)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        train_tiny_vae(clips, tmp_path / "bad", steps=1, progress=False, init_from=tmp_path / "base",
                       freeze_encoder=True, latent_blur=1.5)
