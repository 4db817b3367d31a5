"""Real data and real starting weights, end to end at tiny scale (nothing downloaded).

A random checkpoint folder in the diffusers Wan2.1-I2V layout (transformer, VAE, umT5 text
encoder + tokenizer, CLIP image encoder + processor) and a wav2vec2 model are written here,
with a few MP4s with sound (a moving cartoon face and a tone), some of them unusable. Then
`talkingmachines data prep` caches them and `talkingmachines train teacher --preset
wan-i2v-14b-audio --init-from WAN_DIR --data DATA` trains a few steps on the cache.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from talkingmachines.train import preprocess as P

torch.set_num_threads(1)

HEADS, HEAD_DIM, TEXT_DIM, IMG_DIM, AUDIO_DIM = 2, 16, 32, 32, 32
SIZE = 32
WORDS = ["a", "person", "talking", "to", "the", "camera", "woman", "speaks"]

DIT = {"num_attention_heads": HEADS, "attention_head_dim": HEAD_DIM, "in_channels": 36, "out_channels": 16,
       "text_dim": TEXT_DIM, "freq_dim": 32, "ffn_dim": 64, "num_layers": 2, "image_dim": IMG_DIM,
       "audio_dim": AUDIO_DIM, "audio_window": 8}
PRESET_OVERRIDES = {"dit": DIT, "height": SIZE, "width": SIZE, "text_len": 512, "image_len": 17}


# ---------------------------------------------------------------------------- a random Wan folder
def write_wan_dir(root: Path) -> Path:
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, PreTrainedTokenizerFast,
                              UMT5Config, UMT5EncoderModel, Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model)

    torch.manual_seed(0)
    tr = WanTransformer3DModel(
        num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=36, out_channels=16, text_dim=TEXT_DIM,
        freq_dim=32, ffn_dim=64, num_layers=2, image_dim=IMG_DIM, added_kv_proj_dim=HEADS * HEAD_DIM,
    ).eval()
    with torch.no_grad():
        for p in tr.parameters():  # non-trivial weights everywhere
            p.normal_(0, 0.1)
    tr.save_pretrained(root / "transformer")
    AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1).save_pretrained(root / "vae")

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                            model_max_length=512).save_pretrained(root / "tokenizer")
    UMT5EncoderModel(UMT5Config(vocab_size=len(vocab), d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                relative_attention_num_buckets=8, relative_attention_max_distance=16)
                     ).eval().save_pretrained(root / "text_encoder")
    CLIPVisionModel(CLIPVisionConfig(hidden_size=IMG_DIM, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, image_size=32, patch_size=8)
                    ).eval().save_pretrained(root / "image_encoder")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        root / "image_processor")
    w2v = Wav2Vec2Config(hidden_size=AUDIO_DIM, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         conv_dim=(16,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, vocab_size=8)
    Wav2Vec2Model(w2v).eval().save_pretrained(root / "wav2vec2")
    Wav2Vec2FeatureExtractor(do_normalize=True).save_pretrained(root / "wav2vec2")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "WanImageToVideoPipeline"}))
    return root


# ---------------------------------------------------------------------------- a few talking-head MP4s
def face_video(n: int, fps: float, h: int = 80, w: int = 96, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    bg, skin = rng.integers(0, 255, 3), rng.integers(120, 255, 3)
    out = np.empty((n, h, w, 3), np.uint8)
    for i in range(n):
        t = i / fps
        cx, cy = w / 2 + 3 * math.sin(2 * t), h / 2 + 2 * math.cos(3 * t)
        f = np.empty((h, w, 3), np.uint8)
        f[:] = bg
        f[((xx - cx) / 22) ** 2 + ((yy - cy) / 28) ** 2 < 1] = skin
        for ex in (-9, 9):
            f[((xx - cx - ex) / 3) ** 2 + ((yy - cy + 8) / 3) ** 2 < 1] = (20, 20, 20)
        mo = 1 + 5 * abs(math.sin(7 * t))
        f[((xx - cx) / 8) ** 2 + ((yy - cy - 12) / mo) ** 2 < 1] = (120, 10, 30)
        out[i] = f
    return out


def tone(seconds: float, silence=(0.8, 1.2)) -> np.ndarray:
    t = np.arange(int(seconds * 16000)) / 16000
    a = 0.3 * np.sin(2 * np.pi * 220 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))
    a[(t >= silence[0]) & (t < silence[1])] = 0.0
    return a.astype(np.float32)


def write_videos(root: Path) -> Path:
    from talkingmachines.media import write_mp4

    (root / "sub").mkdir(parents=True, exist_ok=True)
    write_mp4(root / "alice.mp4", face_video(55, 25, seed=1), tone(2.2))
    (root / "alice.txt").write_text("a woman speaks to the camera")  # a prompt of its own
    write_mp4(root / "sub" / "bob.mp4", face_video(60, 30, seed=2), tone(2.0), fps=30)  # resampled to 25 fps
    write_mp4(root / "mute.mp4", face_video(40, 25, seed=3))  # no audio
    write_mp4(root / "short.mp4", face_video(8, 25, seed=4), tone(0.32))  # 8 frames
    (root / "broken.mp4").write_bytes(b"\x00\x01 not a video" * 50)
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("real")
    wan = write_wan_dir(base / "wan")
    videos = write_videos(base / "videos")
    return base, wan, videos


@pytest.fixture(scope="module")
def prepared(world):
    from talkingmachines.cli import main

    base, wan, videos = world
    data = base / "data"
    rc = main(["data", "prep", "--wan", str(wan), "--videos", str(videos), "--out", str(data), "--size", str(SIZE),
               "--clip-chunks", "2", "--refs", "3", "--device", "cpu", "--no-progress"])
    assert rc == 0
    return data


# ---------------------------------------------------------------------------- unit pieces
def test_face_square_smooths_enlarges_and_clamps():
    # median over frames: the outlier detection does not move the box
    dets = [(50, 40, 20), (52, 41, 22), (51, 39, 21), (51, 40, 21), (5, 5, 60)]
    x0, y0, side = P.face_square(dets, 80, 100, scale=1.8)
    assert side == round(21 * 1.8) and abs(x0 + side / 2 - 51) <= 1 and abs(y0 + side / 2 - 40) <= 1
    # a face near the edge: the square moves inside the frame; too large: shrinks to fit
    x0, y0, side = P.face_square([(95, 5, 30)], 80, 100, scale=1.8)
    assert x0 + side <= 100 and y0 == 0 and side == 54
    assert P.face_square([(50, 40, 70)], 80, 100, scale=2.0)[2] == 80
    assert P.face_square([], 80, 100) == (10, 0, 80)  # no face: the centre square
    assert P.clip_spans(55, 2) == [(0, 25), (25, 25)]
    assert P.clip_spans(64, 2) == [(0, 25), (25, 25), (50, 13)]


def test_resample_to_25fps(world, tmp_path):
    from talkingmachines.media import write_mp4

    _, _, videos = world
    ks = [k for k, _ in P.frames_25fps(videos / "sub" / "bob.mp4")]
    assert ks == list(range(50))  # 60 frames at 30 fps = 2 s = 50 frames at 25 fps
    # each output frame is the source frame nearest in time (source frame i is grey 6 i)
    src = np.repeat(np.arange(0, 240, 6, dtype=np.uint8)[:, None, None, None], 32, 1).repeat(32, 2).repeat(3, 3)
    write_mp4(tmp_path / "ramp.mp4", src, fps=30)
    got = [(k, float(f.mean())) for k, f in P.frames_25fps(tmp_path / "ramp.mp4")]
    assert len(got) == round(len(src) * 25 / 30)
    for k, m in got:
        assert abs(m / 6 - round(k * 30 / 25)) < 0.4, (k, m)


# ---------------------------------------------------------------------------- data prep
def test_prep_cache(world, prepared, capsys):
    from safetensors.torch import load_file

    base, wan, videos = world
    idx = json.loads((prepared / P.INDEX_NAME).read_text())
    assert idx["n_videos"] == 2 and len(idx["clips"]) == 4  # 55 and 50 frames: 2 clips of 25 each
    assert sorted(s["video"] for s in idx["skipped"]) == ["broken.mp4", "mute.mp4", "short.mp4"]
    reasons = {s["video"]: s["reason"] for s in idx["skipped"]}
    assert "no audio" in reasons["mute.mp4"] and "too short" in reasons["short.mp4"]
    assert "unreadable" in reasons["broken.mp4"]
    assert (idx["latent_channels"], idx["audio_dim"], idx["text_len"], idx["text_dim"], idx["image_len"],
            idx["image_dim"]) == (16, AUDIO_DIM, 512, TEXT_DIM, 17, IMG_DIM)

    c = idx["clips"][0]
    d = load_file(str(prepared / c["file"]))
    assert d["latents"].shape == (16, 7, SIZE // 8, SIZE // 8) and torch.isfinite(d["latents"]).all()
    assert d["features"].shape == (25, AUDIO_DIM) and d["speaking"].shape == (25,)
    # the silent stretch (0.8-1.2 s) is flagged, speech is not
    spk = load_file(str(prepared / idx["clips"][1]["file"]))["speaking"].bool()  # frames 25..49
    assert not spk[0:5].any() and spk[8:].all()
    r = load_file(str(prepared / c["refs"]))
    assert r["latents"].shape == (3, 16, 4, 4) and r["image_embeds"].shape == (3, 17, IMG_DIM)

    # text: umT5 of the prompt, as diffusers' Wan pipeline: real tokens, then zeros up to 512
    from transformers import AutoTokenizer, UMT5EncoderModel

    alice = [v for v in idx["videos"] if v["source"] == "alice.mp4"][0]
    bob = [v for v in idx["videos"] if v["source"] == "sub/bob.mp4"][0]
    assert alice["text"] != bob["text"]  # alice.txt gives her own prompt
    te = load_file(str(prepared / alice["text"]))["text"]
    tok = AutoTokenizer.from_pretrained(str(wan / "tokenizer"))
    enc = UMT5EncoderModel.from_pretrained(str(wan / "text_encoder")).eval()
    ids = tok(["a woman speaks to the camera"], return_tensors="pt").input_ids  # 6 words + </s>
    assert ids.shape[1] == 7
    with torch.no_grad():
        ref = enc(ids, torch.ones_like(ids)).last_hidden_state[0]
    assert te.shape == (512, TEXT_DIM) and te[7:].abs().max() == 0
    torch.testing.assert_close(te[:7], ref, atol=1e-5, rtol=1e-5)

    # resumable: a second run rewrites nothing and warns once per bad video
    from talkingmachines.cli import main

    mt = {p: p.stat().st_mtime_ns for p in prepared.rglob("*.safetensors")}
    capsys.readouterr()
    assert main(["data", "prep", "--wan", str(wan), "--videos", str(videos), "--out", str(prepared), "--size",
                 str(SIZE), "--clip-chunks", "2", "--refs", "3", "--device", "cpu", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert err.count("warning: skipping") == 3
    assert {p: p.stat().st_mtime_ns for p in prepared.rglob("*.safetensors")} == mt


def test_prep_nothing_usable(world, tmp_path):
    from talkingmachines.errors import InputError
    from talkingmachines.media import write_mp4

    _, wan, _ = world
    (tmp_path / "v").mkdir()
    write_mp4(tmp_path / "v" / "mute.mp4", face_video(30, 25))
    cfg = P.PrepConfig(wan=str(wan), videos=str(tmp_path / "v"), out=str(tmp_path / "d"), size=SIZE, device="cpu",
                       progress=False)
    with pytest.raises(InputError, match="no usable video"):
        P.prep_dataset(cfg)


# ---------------------------------------------------------------------------- training on it
def _config(tmp: Path, **kw) -> Path:
    cfg = {"stage": "teacher", "preset": "wan-i2v-14b-audio", "preset_overrides": PRESET_OVERRIDES, "steps": 3,
           "batch_size": 2, "clip_chunks": 1, "lr": 1e-3, "warmup": 1, "ckpt_every": 2, "held_out": 0.0,
           "log_every": 1, "device": "cpu", "p_drop_audio": 0.0, "p_drop_ref": 0.5, **kw}
    p = tmp / "teacher.json"
    p.write_text(json.dumps(cfg))
    return p


def test_init_reproduces_wan_transformer(world, prepared, tmp_path):
    """Right after `--init-from WAN_DIR`, the teacher (audio layers at their zero init) computes
    exactly what diffusers' WanTransformer3DModel computes, on a real training batch: its
    latents, reference, mask, umT5 text and CLIP image tokens, per-frame timesteps."""
    from diffusers import WanTransformer3DModel

    from talkingmachines.train.config import load_config
    from talkingmachines.pipeline import dit_input
    from talkingmachines.train.real_data import RealBatch
    from talkingmachines.train.teacher import TeacherTrainer

    _, wan, _ = world
    cfg = load_config(_config(tmp_path), data=str(prepared), init_from=str(wan), out=str(tmp_path / "run"))
    t = TeacherTrainer(cfg)
    t.setup()
    model = t.groups["teacher"].module.eval()
    b = t.batch(0)
    assert isinstance(b, RealBatch) and b.text.shape == (2, 512, TEXT_DIM) and b.image.shape == (2, 17, IMG_DIM)
    assert b.audio.abs().sum() > 0
    for n, p in model.named_parameters():
        if n.endswith("audio_attn.to_out.0.weight"):
            assert p.abs().max() == 0
    ref = WanTransformer3DModel.from_pretrained(str(wan / "transformer")).eval()
    x = dit_input(b.z, b.ref)  # clean latents: any input would do
    g = torch.Generator().manual_seed(0)
    x = torch.cat([x[:, :, :1], x[:, :, 1:] + torch.randn(x[:, :, 1:].shape, generator=g)], dim=2)
    T, (h, w) = x.shape[2], x.shape[3:]
    tt = torch.tensor([0.0] + [700.0] * (T - 1)).expand(2, T)
    with torch.no_grad():
        ours = model(x, tt, b.text, image=b.image, audio=b.audio)
        theirs = ref(x, tt.repeat_interleave(h * w // 4, dim=1), b.text, encoder_hidden_states_image=b.image).sample
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    assert ours.abs().mean() > 0.01
    with torch.no_grad():  # the text and image tokens matter (the comparison is not vacuous)
        assert (model(x, tt, b.text, audio=b.audio) - theirs).abs().max() > 1e-2
        d_text = (model(x, tt, torch.zeros_like(b.text), image=b.image, audio=b.audio) - theirs).abs().max()
        assert d_text > 1e-4  # (7 real tokens of 512; float error here is ~1e-6)


def test_train_teacher_on_real_cache(world, prepared, tmp_path):
    from safetensors.torch import load_file

    from talkingmachines.cli import main
    from talkingmachines.model.dit import AudioDiT
    from talkingmachines.model.weights import load_dit, load_pretrained
    from talkingmachines.train.checkpoint import latest_checkpoint

    _, wan, _ = world
    out = tmp_path / "run"
    rc = main(["train", "teacher", "--config", str(_config(tmp_path)), "--preset", "wan-i2v-14b-audio",
               "--init-from", str(wan), "--data", str(prepared), "--out", str(out), "--no-progress"])
    assert rc == 0
    state = json.loads((latest_checkpoint(out) / "state.json").read_text())
    losses = [h["loss"] for h in state["history"]]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    dit = load_dit(out / "final" / "dit")
    assert isinstance(dit, AudioDiT) and dit.config.image_dim == IMG_DIM and dit.config.audio_dim == AUDIO_DIM
    assert type(load_pretrained(out / "final" / "dit")) is AudioDiT
    # the trainable checkpoint loads strictly into the preset's model, and training moved it
    sd = load_file(str(latest_checkpoint(out) / "model.teacher.safetensors"))
    fresh = AudioDiT(dit.config)
    fresh.load_state_dict(sd, strict=True)
    wan_sd = load_file(str(wan / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert not torch.equal(sd["blocks.0.attn1.to_q.weight"], wan_sd["blocks.0.attn1.to_q.weight"])
    assert sd["blocks.0.audio_attn.to_out.0.weight"].abs().max() > 0


def test_guards(world, prepared, tmp_path):
    """A Wan checkpoint of another geometry than the preset is refused with a one-line error."""
    import dataclasses

    from talkingmachines.errors import InputError
    from talkingmachines.train.config import load_config
    from talkingmachines.train.teacher import new_dit

    _, wan, _ = world
    cfg = load_config(_config(tmp_path), data=str(prepared), init_from=str(wan), out=str(tmp_path / "run"))
    p = cfg.make_preset()
    with pytest.raises(InputError, match="num_layers 2 \\(preset 3\\)"):
        new_dit(dataclasses.replace(p, dit=dataclasses.replace(p.dit, num_layers=3)), wan)


def test_student_stages_on_real_cache(world, prepared, tmp_path):
    """`train ode` and `train dmd` run on a `data prep` cache, starting from a teacher initialised
    from the Wan folder: the teacher's ODE pairs are made with the clips' own umT5 and CLIP
    embeddings (stored with the pairs), and the student computes different results without
    them, so they really reach it."""
    from safetensors.torch import load_file

    from talkingmachines.cli import main
    from talkingmachines.config import Preset
    from talkingmachines.model.weights import load_dit
    from talkingmachines.train.checkpoint import latest_checkpoint
    from talkingmachines.train.distributed import Handle
    from talkingmachines.train.real_data import RealClips
    from talkingmachines.pipeline import causal_x0

    _, wan, _ = world
    teacher = tmp_path / "teacher"
    assert main(["train", "teacher", "--config", str(_config(tmp_path)), "--preset", "wan-i2v-14b-audio",
                 "--init-from", str(wan), "--data", str(prepared), "--out", str(teacher), "--no-progress"]) == 0
    ode, dmd = tmp_path / "ode", tmp_path / "dmd"
    ode_cfg = _config(tmp_path, stage="ode", ode_pairs=4, ode_batch=2, ode_steps=3, cfg_audio=2.0, lr=1e-4)
    assert main(["train", "ode", "--config", str(ode_cfg), "--teacher", str(teacher / "final"), "--data",
                 str(prepared), "--out", str(ode), "--no-progress"]) == 0
    pairs = load_file(str(sorted((ode / "pairs").glob("pairs_*.safetensors"))[0]))
    data = RealClips(prepared, 1)
    texts = {tuple(data._text_of(e["text"]).flatten()[:8].tolist()) for e in data.entries}
    assert pairs["text"].shape[1:] == data.get(0)["text"].shape and pairs["image"].shape[1:] == data.get(0)["image"].shape
    assert tuple(pairs["text"][0].flatten()[:8].tolist()) in texts
    dmd_cfg = _config(tmp_path, stage="dmd", steps=4, fake_ratio=1, regression_weight=0.25, cfg_audio=2.0, lr=1e-4)
    assert main(["train", "dmd", "--config", str(dmd_cfg), "--teacher", str(teacher / "final"), "--init-from",
                 str(ode), "--data", str(prepared), "--out", str(dmd), "--no-progress"]) == 0
    hist = json.loads((latest_checkpoint(dmd) / "state.json").read_text())["history"]
    assert len(hist) == 4 and all(math.isfinite(h["loss"]) for h in hist)
    student = load_dit(dmd / "final" / "dit").eval()
    assert student.config.image_dim == IMG_DIM
    # the conditioning reaches the student: without the prompt and image tokens it computes otherwise
    p = Preset.load(dmd / "final" / "preset.json")
    h = Handle(student)
    x = pairs["xs"][:, 0]  # the first step of the 2-step schedule, [B, C, F, h, w]
    s = torch.full((x.shape[0], x.shape[2]), float(pairs["sigmas"][0]))
    with torch.no_grad():
        full = causal_x0(h, x, s, pairs["ref"], pairs["audio"], pairs["x0"], p, pairs["text"], pairs["image"])
        bare = causal_x0(h, x, s, pairs["ref"], pairs["audio"], pairs["x0"], p, torch.zeros_like(pairs["text"]))
    assert (full - bare).abs().max() > 1e-4
