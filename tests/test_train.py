"""Training stages on a micro model (dim 32, 2 layers, 32x32 video, 2 chunks): losses finite and
falling on a fixed batch, exact resume after a simulated kill, safetensors checkpoints, the
DMD rollout equal to the streaming (KV-cached) generator."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from train_fixtures import make_clips, make_vae, micro_config

from talkingmachines.train.checkpoint import latest_checkpoint
from talkingmachines.errors import InputError
from talkingmachines.pipeline import rollout
from talkingmachines.train.student import DmdTrainer, OdeTrainer, train_ode
from talkingmachines.train.teacher import TeacherTrainer, train_teacher


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    make_clips(tmp / "data")
    make_vae(tmp / "vae")
    train_teacher(micro_config(tmp, "teacher", "teacher", steps=2))
    train_ode(micro_config(tmp, "ode", "ode", steps=2, teacher=str(tmp / "teacher")))
    return tmp


def _fixed_batch_losses(trainer, n: int, step: int = 0) -> list[float]:
    trainer.setup()
    return [trainer.train_step(step)["loss"] for _ in range(n)]


def test_teacher_loss_falls_on_fixed_batch(work):
    losses = _fixed_batch_losses(TeacherTrainer(micro_config(work, "teacher", "t_fixed", lr=3e-3)), 8)
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
    assert losses[-1] < 0.8 * losses[0], losses


def test_ode_loss_falls_on_fixed_batch(work):
    from talkingmachines.train.teacher import new_dit, save_dit_weights

    # a student far from the teacher (a copy of it starts at ~0 loss)
    p = micro_config(work, "ode", "x").make_preset()
    save_dit_weights(p, new_dit(p, seed=5).state_dict(), work / "random_dit")
    cfg = micro_config(work, "ode", "o_fixed", lr=3e-3, teacher=str(work / "teacher"), init_from=str(work / "random_dit"))
    losses = _fixed_batch_losses(OdeTrainer(cfg), 8)
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
    assert losses[-1] < 0.8 * losses[0], losses


def test_ode_ground_truth_mouth_term(work):
    """ode.gt_mouth_weight: the student is also pulled onto the clip's own latents in the mouth box.
    The pairs keep the crops' mouth masks; the term is the masked mean the weight multiplies, it
    falls on a fixed batch, and pairs without masks are a one-line error."""
    from safetensors.torch import load_file, save_file

    from talkingmachines.train.student import mouth_mse
    from talkingmachines.train.teacher import new_dit, save_dit_weights

    diff = torch.zeros(2, 3, 4, 5, 5)
    diff[0, :, :, 1:3, 1:3] = 2.0
    diff[1] = 1.0
    mouth = torch.zeros(2, 5, 5)
    mouth[:, 1:3, 1:3] = 1.0
    mouth[1] = 0.0  # no box: the term is 0, not NaN
    assert mouth_mse(diff, mouth).tolist() == [4.0, 0.0]

    p = micro_config(work, "ode", "x").make_preset()
    save_dit_weights(p, new_dit(p, seed=5).state_dict(), work / "random_dit_gt")
    kw = dict(lr=3e-3, teacher=str(work / "teacher"), init_from=str(work / "random_dit_gt"), ode_gt_mouth_weight=2.0)
    tr = OdeTrainer(micro_config(work, "ode", "o_gt", **kw))
    tr.setup()
    m = tr.pairs.t["mouth"]
    assert m.shape == (len(tr.pairs), *tr.pairs.t["z"].shape[-2:])
    m[:, 3:6, 2:6] = 1.0  # the micro clips know no mouth box: give them one
    logs = [tr.train_step(0) for _ in range(8)]
    gts = [lg["gt_mouth_loss"] for lg in logs]
    assert all(g > 0 for g in gts) and gts[-1] < 0.8 * gts[0], gts
    assert all(lg["loss"] > 2.0 * lg["gt_mouth_loss"] for lg in logs)  # the teacher term is there too

    # pairs made before masks were saved
    old = work / "old_pairs_run"
    (old / "pairs").mkdir(parents=True)
    for f in (work / "o_gt" / "pairs").glob("pairs_*.safetensors"):
        t = load_file(str(f))
        t.pop("mouth")
        save_file(t, str(old / "pairs" / f.name))
    (old / "pairs" / "DONE.json").write_text((work / "o_gt" / "pairs" / "DONE.json").read_text())
    with pytest.raises(InputError, match="gt_mouth_weight needs pairs"):
        OdeTrainer(micro_config(work, "ode", "old_pairs_run", **kw)).setup()


def test_dmd_fake_loss_falls_and_generator_moves(work):
    cfg = micro_config(work, "dmd", "d_fixed", lr=1e-3, fake_lr=3e-3, teacher=str(work / "teacher"),
                       init_from=str(work / "ode"), fake_ratio=1)
    tr = DmdTrainer(cfg)
    tr.setup()
    fake = [tr.train_step(0)["loss"] for _ in range(6)]  # step 0: a fake-score update
    assert all(map(torch.isfinite, map(torch.tensor, fake)))
    assert fake[-1] < fake[0], fake
    before = {k: v.clone() for k, v in tr.groups["student"].module.state_dict().items()}
    logs = tr.train_step(1)  # step 1: the generator update (DMD + regression)
    assert logs["group"] == "student"
    for k in ("loss", "dmd_loss", "regression_loss", "grad_norm"):
        assert torch.isfinite(torch.tensor(logs[k])), (k, logs)
    assert logs["grad_norm"] > 0
    after = tr.groups["student"].module.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


class Killed(Exception):
    pass


def killed_before(cls, step: int):
    """``cls`` as if killed when it starts update ``step`` (0-based), after the earlier ones
    and their checkpoints."""

    class KilledTrainer(cls):
        def train_step(self, s: int) -> dict:
            if s >= step:
                raise Killed()
            return super().train_step(s)

    return KilledTrainer


def _params(ckpt: Path, group: str) -> dict:
    return load_file(str(ckpt / f"model.{group}.safetensors"))


@pytest.mark.parametrize("stage", ["teacher", "dmd"])
def test_resume_after_kill_equals_uninterrupted(work, stage):
    extra = {} if stage == "teacher" else dict(teacher=str(work / "teacher"), init_from=str(work / "ode"))
    cls = TeacherTrainer if stage == "teacher" else DmdTrainer
    group = "teacher" if stage == "teacher" else "student"
    a = cls(micro_config(work, stage, f"{stage}_a", steps=4, ckpt_every=2, **extra))
    a.run()
    b = killed_before(cls, 3)(micro_config(work, stage, f"{stage}_b", steps=4, ckpt_every=2, **extra))
    with pytest.raises(Killed):  # "killed" after step 3: the last checkpoint is step 2
        b.run()
    ck = latest_checkpoint(work / f"{stage}_b")
    st = json.loads((ck / "state.json").read_text())
    assert st["step"] == 2 and st["data_position"]["samples_seen"] == 4
    c = cls(micro_config(work, stage, f"{stage}_b", steps=4, ckpt_every=2, **extra))
    c.setup()
    assert c.resume() and c.step == 2
    c.run()
    pa = _params(latest_checkpoint(work / f"{stage}_a"), group)
    pc = _params(latest_checkpoint(work / f"{stage}_b"), group)
    assert json.loads((latest_checkpoint(work / f"{stage}_b") / "state.json").read_text())["step"] == 4
    for k in pa:
        torch.testing.assert_close(pa[k], pc[k], rtol=0, atol=0, msg=k)
    # losses of the resumed steps are those of the uninterrupted run
    ha = [h["loss"] for h in json.loads((latest_checkpoint(work / f"{stage}_a") / "state.json").read_text())["history"]]
    hc = [h["loss"] for h in json.loads((latest_checkpoint(work / f"{stage}_b") / "state.json").read_text())["history"]]
    assert ha == hc


def test_checkpoints_are_safetensors(work):
    ck = latest_checkpoint(work / "teacher")
    names = sorted(p.name for p in ck.iterdir())
    assert {"model.teacher.safetensors", "ema.teacher.safetensors", "optim.teacher.safetensors", "state.json"} <= set(names)
    assert all(n.endswith((".safetensors", ".json")) for n in names), names
    for n in names:
        if n.endswith(".safetensors"):
            assert load_file(str(ck / n))
    assert (work / "teacher" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert (work / "teacher" / "final" / "dit" / "config.json").is_file()
    assert (ck.parent / "latest").read_text().strip() == ck.name


@torch.no_grad()
def test_rollout_matches_streaming_kv_cache(work):
    """The DMD rollout (whole-clip sparse-causal forwards) equals the streaming generator's path
    (sink prefill, chunk against the KV cache, clean pass writing the cache)."""
    from talkingmachines.diffusion import flow
    from talkingmachines.train.distributed import Handle
    from talkingmachines.train.rng import sample_generator
    from talkingmachines.pipeline import dit_input
    from talkingmachines.train.teacher import new_dit

    cfg = micro_config(work, "dmd", "unused")
    p = cfg.make_preset()
    dit = new_dit(p, work / "ode").eval()
    C, h, w, cf, n = 8, 4, 4, 3, 2
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(1, C, 1, h, w, generator=g)
    audio = torch.randn(1, 1 + n * cf, 8, 80, generator=g)
    audio[:, 0] = 0
    sig = flow.student_schedule(p.stream).tolist()
    out, _ = rollout(Handle(dit), ref, audio, p, sig, [sample_generator(0, 0, 0)])
    # the streaming path, as StreamingGenerator.next_chunk does it
    gen = sample_generator(0, 0, 0)
    text = torch.zeros(1, p.text_len, p.dit.text_dim)
    ctx = dit.encode_context(text, None)
    cache = dit.new_cache()
    dit.prefill_sink(cache, dit_input(ref, ref, "all"), ctx, audio[:, :1])
    chunks = []
    for c in range(1, n + 1):
        au = audio[:, 1 + (c - 1) * cf: 1 + c * cf]
        x = torch.randn((C, cf, h, w), generator=gen)[None]
        for i in range(len(sig) - 1):
            v = dit.forward_chunk(cache, dit_input(torch.cat([ref, x], 2), ref)[:, :, 1:], torch.tensor([sig[i] * 1000]),
                                  ctx, au, chunk=c)
            x0 = x - sig[i] * v
            x = (1 - sig[i + 1]) * x0 + sig[i + 1] * torch.randn((C, cf, h, w), generator=gen)[None] if sig[i + 1] > 0 else x0
        dit.forward_chunk(cache, dit_input(x, ref, "all"), torch.zeros(1), ctx, au, chunk=c, write=True)
        chunks.append(x)
    torch.testing.assert_close(out, torch.cat(chunks, 2), rtol=1e-4, atol=1e-4)


def test_cli_errors_are_input_errors(tmp_path, capsys):
    from talkingmachines.cli import main

    assert main(["train", "teacher", "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert "no data folder" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"stepz": 3}))
    assert main(["train", "teacher", "--out", str(tmp_path / "y"), "--config", str(bad)]) == 2
    assert "unknown config keys" in capsys.readouterr().err


def test_tiny_recipe_end_to_end_micro(tmp_path, capsys):
    """`train tiny-recipe` at micro scale, from data synth to the exported model folder, then
    run again: every stage is skipped (resumable), and the model generates a chunk."""
    import json

    from train_fixtures import MICRO_PRESET

    from talkingmachines.cli import main
    from talkingmachines.stream.generator import load_avatar

    cfg = {"preset": "tiny", "preset_overrides": MICRO_PRESET, "seed": 0, "held_out": 0.25, "device": "cpu",
           "synth": {"n": 4, "seconds": [2.0, 2.5], "workers": 1, "speech": "babble", "video": False},
           "vae": {"steps": 3, "batch_size": 2, "clip_frames": 5, "lr": 1e-3},
           "decoder": {"steps": 2, "batch_size": 2, "latent_noise": 0.3, "feature_weight": 3.0, "dec_res_blocks": 2,
                       "dark_skin_repeat": 2,
                       "refine_steps": 2, "refine_latent_noise": 0.1, "adv_weight": 0.5, "adv_start": 0,
                       "ref": True, "latent_blur": 0.5},
           "common": {"clip_chunks": 1, "batch_size": 2, "ckpt_every": 2, "log_every": 1, "progress": False},
           "teacher": {"steps": 2, "lr": 1e-3, "mouth_weight": 3.0}, "ode": {"steps": 2, "ode_steps": 2, "ode_pairs": 2, "ode_batch": 2},
           "dmd": {"steps": 2, "fake_ratio": 1}}
    (tmp_path / "recipe.json").write_text(json.dumps(cfg))
    out = tmp_path / "run"
    args = ["train", "tiny-recipe", "--config", str(tmp_path / "recipe.json"), "--out", str(out)]
    assert main(args) == 0
    model = out / "model"
    for name in ("preset.json", "dit", "teacher", "vae", "card.md"):
        assert (model / name).exists(), name
    card = (model / "card.md").read_text()
    assert "This model's settings: `talkingmachines train tiny-recipe --config" in card and "{reproduce}" not in card
    # synthetic clips know their mouth: every cached clip carries its box in latent pixels
    (cache,) = (out / "data").glob("latents-*")
    boxes = [e["mouth_box"] for e in json.loads((cache / "index.json").read_text())["clips"]]
    assert boxes and all(0 <= y0 < y1 <= 4 and 0 <= x0 < x1 <= 4 for y0, y1, x0, x1 in boxes), boxes
    # the shipped VAE is the decoder stage's: the VAE stage's encoder and latent statistics, a new decoder
    from talkingmachines.model.vae import TinyVAE

    shipped, trained = TinyVAE.from_pretrained(model / "vae"), TinyVAE.from_pretrained(out / "vae")
    se, te = shipped.state_dict(), trained.state_dict()
    assert all(torch.equal(se[k], te[k]) for k in se if k.startswith("encoder."))
    assert any(not torch.equal(se[k], te[k]) for k in se if k.startswith("decoder."))
    assert shipped.config.latents_std == trained.config.latents_std
    assert shipped.config.dec_res_blocks == 2 and trained.config.dec_res_blocks == 1  # a larger, fresh decoder
    assert shipped.config.decoder_ref and not trained.config.decoder_ref  # that also sees the portrait's latent
    # ... then refined at lower noise: the export is the refined decoder, not the first fine-tune's
    first, refined = (TinyVAE.from_pretrained(out / s).state_dict() for s in ("decoder", "decoder_refine"))
    assert all(torch.equal(se[k], refined[k]) for k in se)
    assert any(not torch.equal(first[k], refined[k]) for k in first if k.startswith("decoder."))
    assert all(torch.equal(first[k], refined[k]) for k in first if k.startswith("encoder."))
    assert ("| VAE decoder, that one fine-tuned again at lower noise (std up to 0.1; beside the portrait's latent "
            "(decoder_ref); latents smudged up to 0.5 toward their 3x3 average; against a patch discriminator, "
            "adversarial weight 0.5) | 2 |") in card
    assert (model / "loss_decoder_refine.png").is_file()
    assert ("VAE decoder, a new one (widths [96, 48, 24], 2 res blocks) trained on latents + noise (std up to 0.3; "
            "eyes and mouth weighted 4x; dark-skinned clips 2x as often; beside the portrait's latent (decoder_ref); "
            "latents smudged up to 0.5 toward their 3x3 average; against a patch discriminator, adversarial "
            "weight 0.5)") in card
    timings = json.loads((out / "timings.json").read_text())
    assert {"synth", "vae", "decoder", "teacher", "ode", "dmd", "export"} <= set(timings)
    # a stage resumed across sittings: timings.json saw only the last one, the card counts them all
    from talkingmachines.config import Preset
    from talkingmachines.train.recipe import model_card, recipe_config

    r = recipe_config(tmp_path / "recipe.json")
    r.data = str(out / "data")
    resumed = model_card(r, out, Preset.load(model / "preset.json"), {**timings, "teacher": 12345.0}, model)
    line = next(ln for ln in resumed.splitlines() if ln.startswith("Per-stage wall seconds: "))
    walls = json.loads(line.split(": ", 1)[1].rstrip("."))
    teacher_done = json.loads((out / "teacher" / "final" / "DONE.json").read_text())
    assert walls["teacher"] == round(teacher_done["wall_seconds"]) and walls["synth"] == round(timings["synth"])
    # a decoder saved with the VAE stage's own geometry is that decoder fine-tuned, not a new one
    dec_cfg = out / "decoder" / "config.json"
    saved = dec_cfg.read_text()
    vae_cfg = json.loads((out / "vae" / "config.json").read_text())
    dec_cfg.write_text(json.dumps({**json.loads(saved), **{k: vae_cfg[k] for k in ("dec_widths", "dec_res_blocks")}}))
    same = model_card(r, out, Preset.load(model / "preset.json"), timings, model)
    assert "| VAE decoder, fine-tuned on latents + noise (std up to 0.3;" in same and "a new one" not in same
    dec_cfg.write_text(saved)
    assert main(args) == 0  # all done: every stage is skipped, and adds (almost) no time
    again = json.loads((out / "timings.json").read_text())
    assert all(again[k] - timings[k] < 5 for k in ("vae", "decoder", "teacher", "ode", "dmd"))
    # a run whose decoder finished before it had a refinement gets one on the next call, and its export ships it
    import shutil

    shutil.rmtree(out / "decoder_refine")
    assert main(args) == 0 and (out / "decoder_refine" / "DONE.json").is_file()
    again_vae = TinyVAE.from_pretrained(model / "vae").state_dict()
    redone = TinyVAE.from_pretrained(out / "decoder_refine").state_dict()
    assert all(torch.equal(again_vae[k], redone[k]) for k in redone)
    # scripts/teacher_audio_gain.py scores the finished teacher and a mid-run checkpoint (its EMA weights,
    # the preset built from the config); with one crop "another clip's audio" is its own, so no gain
    from script_loader import load_script

    tag = load_script("scripts/teacher_audio_gain.py")
    capsys.readouterr()
    tag.main(str(out), str(out / "teacher" / "final" / "dit"), n_max=1)
    (ckpt,) = sorted((out / "teacher" / "checkpoints").glob("step_*"))[-1:]
    tag.main(str(out), str(ckpt), n_max=1, config=str(tmp_path / "recipe.json"))
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("noise ")]
    assert len(lines) == 4 and all("gain +0.000 (1 held-out crops)" in ln for ln in lines), lines
    # --new-faces: every clip of another data folder, its latents encoded with the run's VAE first
    other = tmp_path / "faces2"
    other.mkdir()
    for f in [out / "data" / "index.json", *(out / "data").glob("clip_*.npz")]:
        shutil.copy(f, other / f.name)
    tag.main(str(out), str(out / "teacher" / "final" / "dit"), n_max=1, new_faces=str(other))
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("noise ")]
    assert len(lines) == 2 and all("(1 new-face crops)" in ln for ln in lines), lines
    assert len(list(other.glob("latents-*/index.json"))) == 1
    # scripts/teacher_x0_by_skin.py: one line per skin band present, training faces without the held-out split
    from types import SimpleNamespace

    from talkingmachines.train.latents import clip_skin

    xs = load_script("scripts/teacher_x0_by_skin.py")
    held = set(json.loads((out / "teacher" / "held_out.json").read_text())["clips"])
    index = json.loads((out / "data" / "index.json").read_text())["clips"]
    skins = [clip_skin(out / "data" / c["npz"]) for c in index]
    want = [("training faces", b, sum(1 for i, k in enumerate(skins) if k == b and i not in held)) for b in xs.BANDS]
    want += [("new faces", b, skins.count(b)) for b in xs.BANDS]
    xs.main(SimpleNamespace(run=str(out), dit=str(out / "teacher" / "final" / "dit"),
                            preset=str(out / "teacher" / "final" / "preset.json"), data=str(out / "data"),
                            new=str(other), n=99))
    lines = capsys.readouterr().out.strip().splitlines()
    expected = sorted(f"{w}, {b} ({k} clips)" for w, b, k in want if k)
    assert expected and sorted(ln.split(":")[0] for ln in lines) == expected, lines
    assert all("noise 0.8: frame " in ln and "noise 0.6: frame " in ln for ln in lines), lines
    avatar = load_avatar(model)
    s = avatar.new_stream(seed=0)
    # the engine's decoder decodes every chunk beside the portrait's latent (decoder.ref)
    assert torch.equal(s.decoder.ref, avatar.vae.denormalize(s.ref))
    s.push_audio(np.zeros(16000, np.float32))
    s.end_audio()
    chunk = s.next_chunk()
    assert chunk is not None and chunk.frames.shape[1:] == (32, 32, 3)


def test_tiny_recipe_with_a_4x_vae_micro(tmp_path, capsys):
    """``vae.spatial`` 4: the VAE keeps a latent pixel per 4x4 pixels, the DiT stages work on that
    grid (the preset follows the VAE; a patch of 4 keeps the token count), the card says so and
    the exported model generates. A preset that disagrees with its VAE is a one-line error."""
    import json

    from train_fixtures import MICRO_PRESET

    from talkingmachines.cli import main
    from talkingmachines.config import Preset
    from talkingmachines.stream.generator import load_avatar

    overrides = {**MICRO_PRESET, "dit": {**MICRO_PRESET["dit"], "patch_size": [1, 4, 4]}}
    cfg = {"preset": "tiny", "preset_overrides": overrides, "seed": 0, "held_out": 0.25, "device": "cpu",
           "synth": {"n": 3, "seconds": [2.0, 2.5], "workers": 1, "speech": "babble", "video": False},
           "vae": {"steps": 2, "batch_size": 2, "clip_frames": 5, "lr": 1e-3, "spatial": 4,
                   "enc_widths": [8, 16], "dec_widths": [16, 8]},
           "decoder": {"steps": 0, "batch_size": 2, "latent_noise": 0.3},
           "common": {"clip_chunks": 1, "batch_size": 2, "ckpt_every": 2, "log_every": 1, "progress": False},
           "teacher": {"steps": 1, "lr": 1e-3}, "ode": {"steps": 1, "ode_steps": 2, "ode_pairs": 2, "ode_batch": 2},
           "dmd": {"steps": 0}}
    (tmp_path / "recipe.json").write_text(json.dumps(cfg))
    out = tmp_path / "run"
    assert main(["train", "tiny-recipe", "--config", str(tmp_path / "recipe.json"), "--out", str(out)]) == 0
    # 8 channels x 4x4 patch = 128 values per token from a 32-wide micro DiT: the recipe says so
    assert "warning: each token predicts 128 latent values (patch 1x4x4 x 8 channels) from 32" in capsys.readouterr().out
    model = out / "model"
    p = Preset.load(model / "preset.json")
    assert p.vae_spatial == 4 and p.latent_hw == (8, 8) and tuple(p.dit.patch_size) == (1, 4, 4)
    assert "TinyVAE (32x32, 4x spatial" in (model / "card.md").read_text()
    (cache,) = (out / "data").glob("latents-*")
    from safetensors import safe_open

    f = next(cache.glob("*.safetensors"))
    with safe_open(str(f), "pt") as sf:
        assert tuple(sf.get_slice("latents").get_shape()[-2:]) == (8, 8)
    s = load_avatar(model).new_stream(seed=0)
    s.push_audio(np.zeros(16000, np.float32))
    s.end_audio()
    chunk = s.next_chunk()
    assert chunk is not None and chunk.frames.shape[1:] == (32, 32, 3)
    # a preset.json that disagrees with its VAE is refused in one line
    (model / "preset.json").write_text(json.dumps({**json.loads((model / "preset.json").read_text()), "vae_spatial": 8}))
    with pytest.raises(InputError, match="latents are 1/8 of the frame, its VAE makes them 1/4"):
        load_avatar(model)
    from talkingmachines.stream.disagg import _vae_only  # the decoder process loads the VAE alone

    with pytest.raises(InputError, match="latents are 1/8 of the frame, its VAE makes them 1/4"):
        _vae_only(model, "tiny", "cpu")
    bad = {**cfg, "vae": {**cfg["vae"], "dec_widths": [16, 8, 4]}}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    assert main(["train", "tiny-recipe", "--config", str(tmp_path / "bad.json"), "--out", str(tmp_path / "bad")]) != 0


def test_tiny_recipe_grows_the_teacher_micro(tmp_path, capsys):
    """``grow``: the finished teacher deepened (new blocks start as the identity) and widened (twice the
    features) and trained on in OUT/teacher_grow; the student is distilled from it with its shape, the
    export ships both, the card has the row, a second call skips it, and a grown shape that is not deeper,
    or not twice as wide, is a one-line error."""
    import json

    from train_fixtures import MICRO_PRESET

    from talkingmachines.cli import main
    from talkingmachines.model.dit import AudioDiT
    from talkingmachines.stream.generator import load_avatar

    cfg = {"preset": "tiny", "preset_overrides": MICRO_PRESET, "seed": 0, "held_out": 0.25, "device": "cpu",
           "synth": {"n": 4, "seconds": [2.0, 2.5], "workers": 1, "speech": "babble", "video": False},
           "vae": {"steps": 2, "batch_size": 2, "clip_frames": 5, "lr": 1e-3},
           "decoder": {"steps": 0, "batch_size": 2, "latent_noise": 0.3},
           "common": {"clip_chunks": 1, "batch_size": 2, "ckpt_every": 2, "log_every": 1, "progress": False},
           "teacher": {"steps": 2, "lr": 1e-3}, "grow": {"layers": 3, "heads": 4, "steps": 2, "lr": 1e-3},
           "ode": {"steps": 2, "ode_steps": 2, "ode_pairs": 2, "ode_batch": 2}, "dmd": {"steps": 0}}
    (tmp_path / "recipe.json").write_text(json.dumps(cfg))
    out = tmp_path / "run"
    args = ["train", "tiny-recipe", "--config", str(tmp_path / "recipe.json"), "--out", str(out)]
    assert main(args) == 0
    model = out / "model"
    small = AudioDiT.from_pretrained(out / "teacher" / "final" / "dit")
    grown = AudioDiT.from_pretrained(out / "teacher_grow" / "final" / "dit")
    shipped_teacher = AudioDiT.from_pretrained(model / "teacher")
    assert (small.config.num_layers, small.config.dim) == (2, 32) and (grown.config.num_layers, grown.config.dim) == (3, 64)
    assert AudioDiT.from_pretrained(model / "dit").config == grown.config
    g, st = grown.state_dict(), shipped_teacher.state_dict()
    assert all(torch.equal(g[k], st[k]) for k in g)  # the export's teacher is the grown one
    card = (model / "card.md").read_text()
    assert "DiT (Wan2.1 layout, 3 blocks,\nwidth 64)" in card
    assert ("| teacher grown to 3 blocks (the new ones start as the identity) and width 64 (twice the features, "
            "the same function), trained on | 2 |") in card
    timings = json.loads((out / "timings.json").read_text())
    assert "grow" in timings and '"grow": ' in card
    assert main(args) == 0  # all done: the grown teacher is not trained again
    assert json.loads((out / "timings.json").read_text())["grow"] - timings["grow"] < 5
    s = load_avatar(model).new_stream(seed=0)
    s.push_audio(np.zeros(16000, np.float32))
    s.end_audio()
    assert s.next_chunk().frames.shape[1:] == (32, 32, 3)
    capsys.readouterr()
    for shape, why in (({"layers": 2}, "grow.layers (2) must be more than the teacher's 2 blocks"),
                       ({"layers": 0, "heads": 3}, "grow.heads (3) must be twice the teacher's 2")):
        (tmp_path / "bad.json").write_text(json.dumps({**cfg, "grow": {**cfg["grow"], **shape}}))
        assert main(["train", "tiny-recipe", "--config", str(tmp_path / "bad.json"), "--out", str(tmp_path / "r2"),
                     "--data", str(out / "data"), "--stages", "grow"]) == 2
        assert why in capsys.readouterr().err


def test_tiny_recipe_fine_tunes_a_trained_model_micro(tmp_path, capsys):
    """``vae.init_from`` with ``teacher.init_from``: a trained model fine-tuned on other data. The run's VAE stage
    is the given VAE bit for bit (not trained), the export ships it, the card names both starting points; a VAE
    of another latent width, or a folder that is not a VAE, is a one-line error."""
    import json

    from train_fixtures import MICRO_PRESET

    from talkingmachines.cli import main
    from talkingmachines.model.vae import TinyVAE
    from talkingmachines.train.teacher import train_teacher

    src = make_vae(tmp_path / "src_vae")
    make_clips(tmp_path / "data")
    train_teacher(micro_config(tmp_path, "teacher", "t0", vae=str(src), steps=2))
    cfg = {"preset": "tiny", "preset_overrides": MICRO_PRESET, "seed": 0, "held_out": 0.25, "device": "cpu",
           "synth": {"n": 4, "seconds": [2.0, 2.5], "workers": 1, "speech": "babble", "video": False},
           "vae": {"steps": 5, "batch_size": 2, "clip_frames": 5, "lr": 1e-3, "init_from": str(src)},
           "decoder": {"steps": 0, "batch_size": 2, "latent_noise": 0.3},
           "common": {"clip_chunks": 1, "batch_size": 2, "ckpt_every": 2, "log_every": 1, "progress": False},
           "teacher": {"steps": 2, "lr": 1e-3, "init_from": str(tmp_path / "t0")},
           "ode": {"steps": 2, "ode_steps": 2, "ode_pairs": 2, "ode_batch": 2}, "dmd": {"steps": 0}}
    (tmp_path / "recipe.json").write_text(json.dumps(cfg))
    out = tmp_path / "run"
    args = ["train", "tiny-recipe", "--config", str(tmp_path / "recipe.json"), "--out", str(out)]
    assert main(args) == 0
    given = TinyVAE.from_pretrained(src).state_dict()
    for folder in (out / "vae", out / "model" / "vae"):
        got = TinyVAE.from_pretrained(folder).state_dict()
        assert given.keys() == got.keys() and all(torch.equal(given[k], got[k]) for k in given), folder
    assert json.loads((out / "vae" / "DONE.json").read_text())["init_from"] == str(src)
    card = (out / "model" / "card.md").read_text()
    assert f"| VAE (TinyVAE), taken from `{src}`, not trained here | 0 |" in card
    assert f"| teacher (bidirectional, flow matching), fine-tuned from `{tmp_path / 't0'}` | 2 |" in card
    assert f"fine-tuned from a trained model (teacher `{tmp_path / 't0'}`, VAE `{src}`)" in card
    assert "from scratch" not in card and "on top of the model it started from" in card
    capsys.readouterr()
    for vae, why in (({"init_from": str(src), "latent_channels": 16}, "has latent_channels 8, the recipe asks for 16"),
                     ({"init_from": str(tmp_path / "data")}, "is not a VAE folder")):
        (tmp_path / "bad.json").write_text(json.dumps({**cfg, "vae": {**cfg["vae"], **vae}}))
        assert main(["train", "tiny-recipe", "--config", str(tmp_path / "bad.json"), "--out", str(tmp_path / "r2"),
                     "--data", str(out / "data"), "--stages", "vae"]) == 2
        err = capsys.readouterr().err
        assert why in err and "Traceback" not in err and not (tmp_path / "r2" / "vae").exists()


def test_mouth_weighted_mse():
    from talkingmachines.train.teacher import mouth_weighted_mse

    g = torch.Generator().manual_seed(0)
    diff = torch.randn(2, 3, 4, 5, 6, generator=g)
    mouth = torch.zeros(2, 5, 6)
    mouth[0, 1:3, 2:5] = 1.0
    plain = diff.pow(2).flatten(1).mean(1)
    assert torch.allclose(mouth_weighted_mse(diff, None, 3.0), plain)
    assert torch.allclose(mouth_weighted_mse(diff, mouth, 0.0), plain)
    got = mouth_weighted_mse(diff, mouth, 3.0)
    assert torch.allclose(got[1], plain[1])  # no box: the plain mean
    e = diff[0].pow(2)
    inside, n_in = e[:, :, 1:3, 2:5].sum(), 3 * 4 * 2 * 3
    want = (4 * inside + (e.sum() - inside)) / (4 * n_in + (e.numel() - n_in))
    assert torch.allclose(got[0], want)
    # one weight per sample: each sample as if weighted alone
    per = mouth_weighted_mse(diff, mouth, torch.tensor([9.0, 3.0]))
    assert torch.allclose(per[0], mouth_weighted_mse(diff, mouth, 9.0)[0]) and torch.allclose(per[1], plain[1])
    assert not torch.allclose(per[0], got[0])


def test_mouth_box_covers_the_synthetic_mouth():
    from talkingmachines.eval.quality import mouth_roi_from_face
    from talkingmachines.train.latents import mouth_box
    from talkingmachines.train.synth import FaceParams

    for seed in range(20):
        face = dataclasses.asdict(FaceParams.sample(seed))
        y0, y1, x0, x1 = mouth_box(face, 128, 128, 8)
        py0, py1, px0, px1 = mouth_roi_from_face(face, 128, 128)
        assert 8 * y0 <= py0 and py1 <= 8 * y1 and 8 * x0 <= px0 and px1 <= 8 * x1
        assert (y1 - y0) * (x1 - x0) <= 0.3 * 16 * 16  # a box around the mouth, not the face
    assert mouth_box(None, 128, 128, 8) is None


def _clips_with_skins(tmp_path):
    """Three micro clips and a VAE: clip 0's face has dark skin, clip 1's light, clip 2 no face metadata."""
    make_clips(tmp_path / "data", n=3)
    make_vae(tmp_path / "vae")
    for i, skin in ((0, (94, 60, 42)), (1, (250, 210, 180))):
        f = tmp_path / "data" / f"clip_{i:05d}.npz"
        with np.load(f) as z:
            arrays = dict(z)
        np.savez(f, **arrays, meta=np.array(json.dumps({"face": {"skin": list(skin)}})))


def test_dark_skinned_clips_repeat_each_epoch(tmp_path):
    """``dark_skin_repeat``: clips whose synthetic face has a dark skin colour (eval's "dark"
    band) come k times per epoch, each copy with its own crops; the others once."""
    _clips_with_skins(tmp_path)
    tr = TeacherTrainer(micro_config(tmp_path, "teacher", "t", dark_skin_repeat=3))
    tr.setup()
    clips = [e["clip"] for e in tr.data.entries]
    assert sorted(clips) == [0, 0, 0, 1, 2] and len(tr.data) == 5
    starts = {tr.data.get(i, 0)["start"] for i, c in enumerate(clips) if c == 0}
    z = [tr.data.get(i, 0)["z"] for i, c in enumerate(clips) if c == 0]
    assert len(starts) > 1 or any(not torch.equal(z[0], x) for x in z[1:])  # the copies are not one crop
    plain = TeacherTrainer(micro_config(tmp_path, "teacher", "p"))
    plain.setup()
    assert sorted(e["clip"] for e in plain.data.entries) == [0, 1, 2]


def test_dark_mouth_weight_weights_the_dark_faces_mouths(tmp_path):
    """``dark_mouth_weight``: each crop knows whether its synthetic face has dark skin, and the teacher's
    flow loss weights the mouth box of those crops with it instead of ``mouth_weight``; a negative value
    is refused in one line."""
    _clips_with_skins(tmp_path)
    losses = {}
    for name, kw in (("same", {"dark_mouth_weight": 3.0}), ("plain", {}), ("dark", {"dark_mouth_weight": 50.0})):
        tr = TeacherTrainer(micro_config(tmp_path, "teacher", name, mouth_weight=3.0, batch_size=3, **kw))
        tr.setup()
        b = tr.batch(0)
        if name == "plain":
            assert b.dark is None
        else:
            assert {c: bool(d) for c, d in zip(b.clips, b.dark)} == {0: True, 1: False, 2: False}
        for box in b.mouth:  # every crop gets a mouth box, so the weight shows in the loss
            box.zero_()
            box[1:3, 1:3] = 1.0
        torch.manual_seed(0)
        losses[name] = float(tr.loss(b, 0)[1].detach())
    assert losses["same"] == pytest.approx(losses["plain"], rel=1e-6)  # the same weight: the same loss
    assert losses["dark"] != pytest.approx(losses["plain"], rel=1e-3)
    with pytest.raises(InputError, match="dark_mouth_weight must be a number >= 0"):
        micro_config(tmp_path, "teacher", "bad", dark_mouth_weight=-1.0)


def test_latent_cache_follows_clips_added_to_the_data(tmp_path):
    """Clips added to a data folder after its latents were cached are encoded before the next stage
    trains, and only they (the cache used to be checked for its VAE alone, so new clips were silently
    left out of training)."""
    make_clips(tmp_path / "data", n=4)
    make_vae(tmp_path / "vae")
    TeacherTrainer(micro_config(tmp_path, "teacher", "t1", steps=1)).setup()
    (cache,) = (tmp_path / "data").glob("latents-*")
    first = json.loads((cache / "index.json").read_text())
    assert first["n"] == 4
    stamp = {e["clip"]: (cache / e["file"]).stat().st_mtime_ns for e in first["clips"]}
    make_clips(tmp_path / "data", n=6)  # the same 4 clips and 2 more
    t = TeacherTrainer(micro_config(tmp_path, "teacher", "t2", steps=1))
    t.setup()
    idx = json.loads((cache / "index.json").read_text())
    assert idx["n"] == 6 and sorted(e["clip"] for e in idx["clips"]) == list(range(6))
    held = json.loads((tmp_path / "t2" / "held_out.json").read_text())["clips"]
    assert sorted({e["clip"] for e in t.data.entries} | set(held)) == list(range(6))
    assert all((cache / e["file"]).stat().st_mtime_ns == stamp[e["clip"]] for e in idx["clips"] if e["clip"] < 4)


def test_vae_stages_repeat_dark_clips(tmp_path):
    """``dark_skin_repeat`` in the ``vae`` and ``decoder`` sections lists each training clip whose skin is
    in the "dark" band k times (the held-out clips never), as the DiT stages do; a count below 1 is refused."""
    import json

    from talkingmachines.dataset import ClipDataset, held_out_split
    from talkingmachines.train.latents import clip_skin
    from talkingmachines.train.recipe import _train_clips, recipe_config
    from talkingmachines.train.synth import synth_dataset

    data = synth_dataset(12, tmp_path / "data", seed=3, size=32, seconds=(1.0, 1.2), speech="babble", video=False,
                         progress=False, version=4).parent
    cfg = {"preset": "tiny", "seed": 0, "held_out": 0.25, "device": "cpu", "data": str(data),
           "decoder": {"steps": 2, "batch_size": 2, "latent_noise": 0.1, "dark_skin_repeat": 3}}
    (tmp_path / "r.json").write_text(json.dumps(cfg))
    r = recipe_config(tmp_path / "r.json")
    ds = ClipDataset(str(data))
    train, held = held_out_split(ds, r.held_out, r.seed)
    dark = {i for i in train.indices if clip_skin(ds.root / ds.clips[i]["npz"]) == "dark"}
    assert dark, "the fixture needs a dark-skinned training clip"
    plain = _train_clips(r, 5)
    repeated = _train_clips(r, 5, dark_repeat=r.decoder.dark_skin_repeat)
    assert len(plain) == len(train.indices)
    assert len(repeated) == len(train.indices) + 2 * len(dark)
    # the extra entries are the dark clips' videos, each k - 1 more times
    at = [j for j in range(len(plain)) if train.indices[j] in dark]
    for m in range(2 * len(dark)):
        assert np.array_equal(repeated[len(plain) + m], plain[at[m // 2]])
    for section in ("vae", "decoder"):
        bad = {**cfg, section: {**cfg.get(section, {}), "dark_skin_repeat": 0}}
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(InputError, match=f"{section}.dark_skin_repeat must be a whole number >= 1"):
            recipe_config(tmp_path / "bad.json")


def test_tiny_recipe_without_export_names_no_model_folder(tmp_path, capsys):
    """Stages that leave out "export" make no model folder, and the command says so instead of naming one."""
    import json

    from talkingmachines.cli import main

    cfg = {"preset": "tiny", "seed": 0, "device": "cpu",
           "synth": {"n": 2, "seconds": [1.0, 1.2], "workers": 1, "speech": "babble", "video": False}}
    (tmp_path / "r.json").write_text(json.dumps(cfg))
    out = tmp_path / "run"
    assert main(["train", "tiny-recipe", "--config", str(tmp_path / "r.json"), "--out", str(out), "--stages", "synth"]) == 0
    said = capsys.readouterr().out
    assert f"stages synth done in {out} (no model folder" in said and "model ->" not in said
    assert (out / "data" / "index.json").is_file() and not (out / "model").exists()
