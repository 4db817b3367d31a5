"""Checkpoint loading: Wan2.1 in diffusers and original layouts (sharded), our own format, refusals."""

import dataclasses
import json
import re

import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import load_file, save_file

from talkingmachines.config import DiTConfig, get_preset
from talkingmachines.errors import InputError
from talkingmachines.model import weights as W
from talkingmachines.model.dit import AudioDiT

HEADS, HEAD_DIM, TEXT_DIM, IMG_DIM = 2, 12, 20, 24
DIM = HEADS * HEAD_DIM


def make_ref(i2v=True, seed=0):
    torch.manual_seed(seed)
    ref = WanTransformer3DModel(
        num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=36 if i2v else 16, out_channels=16,
        text_dim=TEXT_DIM, freq_dim=16, ffn_dim=40, num_layers=2,
        image_dim=IMG_DIM if i2v else None, added_kv_proj_dim=DIM if i2v else None,
    ).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.1)
    return ref


def inputs(i2v=True, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 36 if i2v else 16, 5, 8, 8, generator=g)
    text = torch.randn(1, 512, TEXT_DIM, generator=g)  # diffusers' I2V splits image tokens at shape[1] - 512
    img = torch.randn(1, 7, IMG_DIM, generator=g) if i2v else None
    audio = torch.randn(1, 5, 8, 10, generator=g)
    return x, torch.tensor([500.0]), text, img, audio


def ref_out(ref, i2v=True):
    x, t, text, img, _ = inputs(i2v)
    with torch.no_grad():
        return ref(x, t, text, encoder_hidden_states_image=img).sample


def our_out(model, i2v=True, with_audio=True):
    x, t, text, img, audio = inputs(i2v)
    with torch.no_grad():
        return model(x, t, text, img, audio=audio if with_audio else None)


# ---------------------------------------------------------------- original layout (inverse of diffusers')
_TO_ORIGINAL = [  # (regex on a diffusers name, replacement), applied in order
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^condition_embedder\.image_embedder\.norm1\.", "img_emb.proj.0."),
    (r"^condition_embedder\.image_embedder\.ff\.net\.0\.proj\.", "img_emb.proj.1."),
    (r"^condition_embedder\.image_embedder\.ff\.net\.2\.", "img_emb.proj.3."),
    (r"^condition_embedder\.image_embedder\.norm2\.", "img_emb.proj.4."),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^proj_out\.", "head.head."),
    (r"\.scale_shift_table$", ".modulation"),
    (r"\.attn1\.", ".self_attn."),
    (r"\.attn2\.", ".cross_attn."),
    (r"\.to_out\.0\.", ".o."),
    (r"\.to_([qkv])\.", r".\1."),
    (r"\.add_([kv])_proj\.", r".\1_img."),
    (r"\.norm_added_k\.", ".norm_k_img."),
    (r"\.ffn\.net\.0\.proj\.", ".ffn.0."),
    (r"\.ffn\.net\.2\.", ".ffn.2."),
    (r"^(blocks\.\d+)\.norm2\.", r"\1.norm3."),  # the cross-attention norm: norm3 in the original layout
]


def to_original(sd, prefix=""):
    out = {}
    for k, v in sd.items():
        o = k
        for pat, rep in _TO_ORIGINAL:
            o = re.sub(pat, rep, o)
        out[prefix + o] = v
    return out


def write_sharded(sd, folder, stem="diffusion_pytorch_model", n=3):
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(sd)
    parts = [keys[i::n] for i in range(n)]
    wm = {}
    for i, ks in enumerate(parts):
        name = f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file({k: sd[k].contiguous() for k in ks}, str(folder / name))
        wm.update({k: name for k in ks})
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))


def test_inverse_mapping_matches_diffusers_converter():
    sd = make_ref().state_dict()
    orig = to_original(sd)
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    back = convert_wan_transformer_to_diffusers({k: k for k in orig})
    assert set(back) == set(sd)
    assert W.detect_layout(orig) == "original" and W.detect_layout(sd) == "diffusers"
    assert "blocks.0.norm3.weight" in orig and "blocks.0.norm2.weight" in sd  # the swap


# ---------------------------------------------------------------- diffusers layout
def test_from_wan_diffusers_sharded(tmp_path):
    ref = make_ref()
    ref.save_pretrained(tmp_path / "transformer", max_shard_size="50KB")
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors.index.json").exists()
    assert len(list((tmp_path / "transformer").glob("*.safetensors"))) > 1
    (tmp_path / "model_index.json").write_text("{}")
    model, report = W.from_wan(tmp_path, audio_dim=10)  # a pipeline root: uses transformer/
    assert report.layout == "diffusers" and len(report.files) > 1
    assert model.config.image_dim == IMG_DIM and model.config.in_channels == 36 and model.config.audio_dim == 10
    assert report.missing_audio and all("audio" in k for k in report.missing_audio)
    assert not any(p.is_meta for p in model.parameters())
    for b in model.blocks:  # audio layers start as the identity
        assert b.audio_attn.to_out[0].weight.abs().sum() == 0 and b.audio_attn.to_out[0].bias.abs().sum() == 0
    # the audio layers materialised after a meta-device load get AudioDiT's own initialisation
    fresh = dict(AudioDiT(model.config).named_parameters())
    for k in report.missing_audio:
        p, q = dict(model.named_parameters())[k], fresh[k]
        assert p.shape == q.shape and (p == 0).all() == (q == 0).all() and (p == 1).all() == (q == 1).all(), k
    r = ref_out(ref)
    assert (our_out(model) - r).abs().max() < 1e-4
    assert (our_out(model, with_audio=False) - r).abs().max() < 1e-4


def test_from_wan_dtype_and_load_into_existing(tmp_path):
    ref = make_ref(i2v=False)
    ref.save_pretrained(tmp_path)
    model, _ = W.from_wan(tmp_path, dtype=torch.bfloat16, audio_dim=10)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    cfg = W.wan_config(tmp_path, audio_dim=10)
    assert cfg.image_dim is None and cfg.in_channels == 16
    fresh = AudioDiT(cfg).eval()
    rep = W.load_wan_into(fresh, tmp_path)
    assert rep.loaded == len(ref.state_dict())
    assert (our_out(fresh, i2v=False) - ref_out(ref, i2v=False)).abs().max() < 1e-4


# ---------------------------------------------------------------- original layout
def test_from_wan_original_sharded(tmp_path):
    ref = make_ref()
    write_sharded(to_original(ref.state_dict()), tmp_path)  # no config.json: geometry from the shapes
    model, report = W.from_wan(tmp_path, attention_head_dim=HEAD_DIM, audio_dim=10)
    assert report.layout == "original" and len(report.files) == 3
    assert model.config.num_attention_heads == HEADS and model.config.image_dim == IMG_DIM
    assert (our_out(model) - ref_out(ref)).abs().max() < 1e-4


def test_from_wan_original_single_file_with_prefix_and_config(tmp_path):
    ref = make_ref(i2v=False)
    save_file(to_original(ref.state_dict(), prefix="model.diffusion_model."), str(tmp_path / "wan.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({
        "_class_name": "WanModel", "model_type": "t2v", "dim": DIM, "num_heads": HEADS, "in_dim": 16, "out_dim": 16,
        "ffn_dim": 40, "freq_dim": 16, "num_layers": 2, "text_dim": TEXT_DIM, "eps": 1e-6}))
    model = AudioDiT.from_pretrained(tmp_path / "wan.safetensors", audio_dim=None)
    assert model.audio_embedder is None
    assert (our_out(model, i2v=False) - ref_out(ref, i2v=False)).abs().max() < 1e-4


# ---------------------------------------------------------------- our format
def test_save_load_roundtrip_sharded_then_single(tmp_path):
    cfg = DiTConfig(num_attention_heads=2, attention_head_dim=12, in_channels=36, out_channels=16, text_dim=TEXT_DIM,
                    freq_dim=16, ffn_dim=40, num_layers=2, image_dim=IMG_DIM, audio_dim=10, audio_window=8)
    torch.manual_seed(0)
    m = AudioDiT(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.1)  # audio layers included, so they matter
    m.save_pretrained(tmp_path, max_shard_size="40KB")
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    assert not list(tmp_path.glob(".*tmp*"))
    m2 = W.load_dit(tmp_path)
    assert m2.config == cfg
    for (k, a), (k2, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert torch.equal(our_out(m), our_out(m2.eval()))
    # re-save below the limit: one file, stale shards and index gone
    W.save_dit(m, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    m3 = AudioDiT.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in m3.parameters()} == {torch.bfloat16}
    assert json.loads((tmp_path / "config.json").read_text())["_format"] == W.FORMAT


def test_load_dit_requires_audio_keys(tmp_path):
    cfg = DiTConfig(num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16, text_dim=TEXT_DIM,
                    freq_dim=16, ffn_dim=40, num_layers=1, image_dim=None, audio_dim=10)
    W.save_dit(AudioDiT(cfg), tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    del sd["blocks.0.audio_attn.to_q.weight"]
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(W.WeightsError, match="blocks.0.audio_attn.to_q.weight"):
        W.load_dit(tmp_path)


# ---------------------------------------------------------------- refusals and clear errors
def test_pickle_refused(tmp_path):
    f = tmp_path / "diffusion_pytorch_model.bin"
    f.write_bytes(b"\x80\x04not really a pickle")
    for path in (f, tmp_path):
        with pytest.raises(InputError, match="pickle"):
            W.from_wan(path)
    pt = tmp_path / "w.pt"
    pt.write_bytes(b"x")
    with pytest.raises(W.WeightsError, match="pickle"):
        W.load_wan_into(AudioDiT(get_preset("tiny").dit), pt)


def _tiny_ckpt(tmp_path, i2v=False):
    ref = make_ref(i2v=i2v)
    ref.save_pretrained(tmp_path)
    return tmp_path / "diffusion_pytorch_model.safetensors", ref.state_dict()


def test_missing_key_error(tmp_path):
    f, sd = _tiny_ckpt(tmp_path)
    del sd["blocks.1.attn1.to_k.weight"]
    save_file(dict(sd), str(f))
    with pytest.raises(W.WeightsError, match=r"missing.*blocks\.1\.attn1\.to_k\.weight"):
        W.from_wan(tmp_path)


def test_shape_error_names_key(tmp_path):
    f, sd = _tiny_ckpt(tmp_path)
    sd = dict(sd)
    sd["blocks.0.ffn.net.2.weight"] = torch.zeros(DIM, 41)
    save_file(sd, str(f))
    model = AudioDiT(W.wan_config(tmp_path))
    with pytest.raises(W.WeightsError) as e:
        W.load_wan_into(model, tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "blocks.0.ffn.net.2.weight" in msg and "(24, 41)" in msg and "(24, 40)" in msg


def test_shape_error_names_original_key(tmp_path):
    sd = to_original(make_ref(i2v=False).state_dict())
    sd["blocks.0.norm3.weight"] = torch.ones(DIM + 1)
    save_file(sd, str(tmp_path / "w.safetensors"))
    with pytest.raises(W.WeightsError, match=r"blocks\.0\.norm2\.weight \(stored as blocks\.0\.norm3\.weight\)"):
        W.from_wan(tmp_path / "w.safetensors", attention_head_dim=HEAD_DIM)


def test_unexpected_and_wrong_variant_errors(tmp_path):
    f, sd = _tiny_ckpt(tmp_path / "t2v")
    sd = dict(sd)
    sd["blocks.0.something_new.weight"] = torch.zeros(3)
    save_file(sd, str(tmp_path / "extra.safetensors"))
    with pytest.raises(W.WeightsError, match="unexpected.*something_new"):
        W.from_wan(tmp_path / "extra.safetensors", attention_head_dim=HEAD_DIM)
    # an I2V checkpoint into a T2V model, and a T2V checkpoint into an I2V model
    i2v, _ = _tiny_ckpt(tmp_path / "i2v", i2v=True)
    t2v_cfg = W.wan_config(tmp_path / "t2v")
    with pytest.raises(W.WeightsError, match="I2V"):
        W.load_wan_into(AudioDiT(dataclasses.replace(t2v_cfg, in_channels=36)), i2v)
    with pytest.raises(W.WeightsError, match="T2V"):
        W.load_wan_into(AudioDiT(dataclasses.replace(t2v_cfg, image_dim=IMG_DIM)), f)


def test_norm_added_q_is_ignored(tmp_path):
    f, sd = _tiny_ckpt(tmp_path, i2v=True)
    sd = dict(sd)
    sd["blocks.0.attn2.norm_added_q.weight"] = torch.ones(DIM)
    save_file(sd, str(f))
    model, rep = W.from_wan(tmp_path)
    assert rep.ignored == ["blocks.0.attn2.norm_added_q.weight"]


def test_diffusers_config_checks():
    base = {"_class_name": "WanTransformer3DModel", "num_attention_heads": 40, "attention_head_dim": 128,
            "in_channels": 36, "out_channels": 16, "image_dim": 1280, "added_kv_proj_dim": 5120}
    cfg = W.dit_config_from_diffusers(base)
    assert cfg == get_preset("wan-i2v-14b-audio").dit
    with pytest.raises(W.WeightsError, match="FLF2V"):
        W.dit_config_from_diffusers({**base, "pos_embed_seq_len": 514})
    with pytest.raises(W.WeightsError, match="WanVACE"):
        W.dit_config_from_diffusers({**base, "_class_name": "WanVACETransformer3DModel"})
    with pytest.raises(W.WeightsError, match="added_kv_proj_dim"):
        W.dit_config_from_diffusers({**base, "added_kv_proj_dim": None})


# ---------------------------------------------------------------- parameter counts
def test_parameter_breakdown_14b():
    b = W.parameter_breakdown(get_preset("wan-i2v-14b-audio").dit)
    assert b["trunk_total"] == pytest.approx(16.4e9, rel=0.02)  # Wan2.1-I2V-14B with its image branch
    assert b["audio.cross_attn"] == pytest.approx(4 * 5120**2 * 40, rel=0.01)
    assert b["audio_total"] == pytest.approx(4.2e9, rel=0.02)
    assert b["total"] == b["trunk_total"] + b["audio_total"]
    assert sum(v for k, v in b.items() if k.startswith(("trunk.", "audio."))) == b["total"]
    assert b["t2v_trunk.blocks_only"] == pytest.approx(14.06e9, rel=0.005)
    assert b["t2v_trunk"] == pytest.approx(14.29e9, rel=0.005)  # + embedders and head
    # the paper's "18B" = the 14B trunk + ~4.2B of audio cross-attention
    assert b["t2v_trunk_plus_audio"] == pytest.approx(18.25e9, rel=0.02)
    assert b["t2v_trunk.blocks_only"] + b["audio_total"] == pytest.approx(18.25e9, rel=0.02)
    assert b["total"] == sum(p.numel() for p in _meta(get_preset("wan-i2v-14b-audio").dit).parameters())


def _meta(cfg):
    with torch.device("meta"):
        return AudioDiT(cfg)
