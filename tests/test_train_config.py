"""`TrainConfig`: nested typed sections, read from nested mappings and from the flat keys every
shipped config uses, to the same config."""

import json
from pathlib import Path

import pytest

from talkingmachines import configs
from talkingmachines.errors import InputError
from talkingmachines.train.config import FLAT_KEYS, SECTIONS, TrainConfig, load_config, read_config_file

FLAT = {"stage": "dmd", "steps": 7, "lr": 3e-4, "lr_schedule": "wsd", "lr_decay": 4, "warmup": 3, "weight_decay": 0.0,
        "betas": [0.0, 0.95], "grad_clip": 2.0, "ema_decay": 0.9, "export_ema": False, "ckpt_every": 5,
        "keep_checkpoints": 1, "dist_mode": "ddp", "grad_checkpointing": True, "p_drop_audio": 0.2,
        "p_drop_ref": 0.1, "t_dist": "logit_normal", "mouth_weight": 3.0, "dark_mouth_weight": 9.0, "cfg_audio": 4.5, "cfg_ref": 1.5, "cfg_ref_max_sigma": 0.6,
        "ode_steps": 8, "ode_pairs": 16, "ode_batch": 2, "ode_gt_mouth_weight": 0.5, "fake_ratio": 3, "fake_lr": 1e-3, "dmd_weight": 0.5,
        "regression_weight": 0.1, "real_context_prob": 0.5, "dmd_s_min": 0.1, "dmd_s_max": 0.9}
NESTED = {"stage": "dmd", "steps": 7,
          "optim": {"lr": 3e-4, "lr_schedule": "wsd", "decay": 4, "warmup": 3, "weight_decay": 0.0, "betas": [0.0, 0.95],
                    "grad_clip": 2.0},
          "ema": {"decay": 0.9, "export": False}, "checkpoint": {"every": 5, "keep": 1},
          "parallel": {"mode": "ddp", "grad_checkpointing": True},
          "flow": {"p_drop_audio": 0.2, "p_drop_ref": 0.1, "t_dist": "logit_normal", "mouth_weight": 3.0,
                   "dark_mouth_weight": 9.0},
          "guidance": {"audio": 4.5, "ref": 1.5, "ref_max_sigma": 0.6}, "ode": {"steps": 8, "pairs": 16, "batch": 2, "gt_mouth_weight": 0.5},
          "dmd": {"fake_ratio": 3, "fake_lr": 1e-3, "weight": 0.5, "regression_weight": 0.1,
                  "real_context_prob": 0.5, "s_min": 0.1, "s_max": 0.9}}


def test_flat_and_nested_read_to_the_same_config():
    a, b = TrainConfig.from_dict(FLAT), TrainConfig.from_dict(NESTED)
    assert a == b
    assert a.optim.lr == 3e-4 and a.optim.betas == (0.0, 0.95) and a.dmd.s_max == 0.9 and a.ode.steps == 8
    assert a.guidance.audio == 4.5 and a.checkpoint.keep == 1 and a.parallel.mode == "ddp" and a.steps == 7
    # every field of every section is reachable from a flat key, and every flat key was set above
    assert {(s, f) for s, f in FLAT_KEYS.values()} == {(s, f) for s, c in SECTIONS.items()
                                                       for f in c.__dataclass_fields__}
    assert set(FLAT) - {"stage", "steps"} == set(FLAT_KEYS)
    # mixed: some flat, some nested
    mixed = {**{k: v for k, v in FLAT.items() if FLAT_KEYS.get(k, ("",))[0] != "dmd"}, "dmd": NESTED["dmd"]}
    assert TrainConfig.from_dict(mixed) == a


def test_round_trip():
    c = TrainConfig.from_dict(FLAT)
    assert TrainConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    assert TrainConfig.from_dict(json.loads(json.dumps(c.to_flat_dict()))) == c
    assert c.to_dict()["optim"]["lr"] == 3e-4 and c.to_flat_dict()["dmd_s_min"] == 0.1
    assert TrainConfig.from_dict(TrainConfig().to_dict()) == TrainConfig()


def test_unknown_keys_and_bad_sections_are_input_errors():
    with pytest.raises(InputError, match="unknown config keys: learning_rate"):
        TrainConfig.from_dict({"learning_rate": 1e-3})
    with pytest.raises(InputError, match=r"unknown config keys: optim\.rate"):
        TrainConfig.from_dict({"optim": {"rate": 1e-3}})
    with pytest.raises(InputError, match="unknown config keys: decay"):  # a section's field is not a top-level key
        TrainConfig.from_dict({"decay": 0.9})
    with pytest.raises(InputError, match="'optim' must be a mapping"):
        TrainConfig.from_dict({"optim": 1e-3})
    with pytest.raises(InputError, match=r"optim\.lr twice"):
        TrainConfig.from_dict({"lr": 1e-3, "optim": {"lr": 2e-3}})
    with pytest.raises(InputError, match="unknown config override 'rate'"):
        TrainConfig().replace(rate=1.0)


def test_overrides_take_flat_keys():
    c = TrainConfig.from_dict(NESTED).replace(lr=1e-2, steps=9, dist_mode="fsdp", seed=None, betas=[0.5, 0.6])
    assert c.optim.lr == 1e-2 and c.steps == 9 and c.parallel.mode == "fsdp" and c.seed == 0
    assert c.optim.betas == (0.5, 0.6) and c.optim.warmup == 3  # the rest of the section stays


@pytest.mark.parametrize("name", ["teacher", "ode", "dmd"])
def test_shipped_stage_configs_read(name):
    """The shipped flat configs read as before: every key lands on its field."""
    raw = read_config_file(configs.shipped(name))
    cfg = load_config(configs.shipped(name))
    flat = cfg.to_flat_dict()
    for k, v in raw.items():
        if k in ("_comment", "comment", "stages"):
            continue
        assert flat[k] == (list(v) if isinstance(v, tuple) else v), k


# ---------------------------------------------------------------- the recipe's config
def test_recipe_config_is_typed_and_merged():
    from talkingmachines.train.config import RecipeConfig, StageSection, SynthSection, VAESection
    from talkingmachines.train.recipe import load_recipe, recipe_config

    shipped = read_config_file(configs.shipped("tiny-recipe"))
    r = recipe_config()
    assert isinstance(r, RecipeConfig) and isinstance(r.synth, SynthSection) and isinstance(r.vae, VAESection)
    assert all(isinstance(r.stage(s), StageSection) for s in RecipeConfig.STAGES)
    assert r.vae.steps == shipped["vae"]["steps"] and r.vae.latent_channels is None  # None: TinyVAEConfig's
    assert r.teacher.share == shipped["teacher"]["share"] and r.ode.pairs_share == shipped["ode"]["pairs_share"]
    assert r.synth.n == shipped["synth"]["n"] and r.synth.version == 1 and r.budget_minutes is None
    # the --config file merges onto the shipped recipe, then the overrides
    face = recipe_config("tiny-face", device="cpu", budget_minutes=None)
    raw = read_config_file(configs.shipped("tiny-face"))
    assert face.vae.latent_channels == raw["vae"]["latent_channels"] and face.synth.version == raw["synth"]["version"]
    assert face.vae.steps == raw["vae"]["steps"] != shipped["vae"]["steps"] and face.device == "cpu"
    assert face == RecipeConfig.from_dict(load_recipe("tiny-face", device="cpu"))
    # a stage's TrainConfig: common, then the stage, then the recipe's own fields
    tc = face.stage_config("dmd", Path("/run"))
    assert tc.guidance.audio == raw["dmd"]["cfg_audio"] and tc.steps == raw["dmd"]["steps"]
    assert tc.checkpoint.every == shipped["dmd"]["ckpt_every"]  # the stage's beats common's
    assert tc.batch_size == shipped["common"]["batch_size"] and tc.dmd.fake_lr == shipped["dmd"]["fake_lr"]
    assert (tc.stage, tc.out, tc.init_from, tc.teacher) == ("dmd", "/run/dmd", "/run/ode", "/run/teacher")
    assert tc.device == "cpu"
    assert face.stage_config("teacher", Path("/run"), steps=5).steps == 5


def test_recipe_stage_settings_flat_or_nested_and_plan_set():
    from talkingmachines.train.config import RecipeConfig
    from talkingmachines.train.recipe import load_recipe

    d = load_recipe()
    nested = json.loads(json.dumps(d))
    nested["ode"] = {k: v for k, v in d["ode"].items() if k not in ("ode_steps", "ode_pairs", "ode_batch", "lr")}
    nested["ode"].update(ode={"steps": d["ode"]["ode_steps"], "pairs": d["ode"]["ode_pairs"],
                              "batch": d["ode"]["ode_batch"]}, optim={"lr": d["ode"]["lr"]})
    a, b = RecipeConfig.from_dict(d), RecipeConfig.from_dict(nested)
    assert a.stage_config("ode", Path("o")) == b.stage_config("ode", Path("o"))
    # a budget plan sets flat keys onto either form
    for r in (a, b):
        r.ode.set(steps=7, ode_pairs=16)
        c = r.stage_config("ode", Path("o"))
        assert (c.steps, c.ode.pairs, c.ode.batch) == (7, 16, d["ode"]["ode_batch"])


def test_bad_counts_are_input_errors():
    for key, bad in (("steps", -3), ("batch_size", 0), ("clip_chunks", 0), ("steps", 2.5), ("steps", "10"),
                     ("dark_skin_repeat", 0), ("held_out", 1.0), ("held_out", -0.1)):
        with pytest.raises(InputError, match=f"config {key} must be"):
            TrainConfig.from_dict({key: bad})
    assert TrainConfig.from_dict({"steps": 0, "held_out": 0}).steps == 0  # 0 steps: export the init as it is


def test_recipe_errors_are_input_errors():
    from talkingmachines.train.config import RecipeConfig
    from talkingmachines.train.recipe import load_recipe

    d = load_recipe()
    with pytest.raises(InputError, match="unknown recipe keys: budget"):
        RecipeConfig.from_dict({**d, "budget": 3})
    with pytest.raises(InputError, match="unknown keys in recipe section 'vae': step"):
        RecipeConfig.from_dict({**d, "vae": {**d["vae"], "step": 3}})
    with pytest.raises(InputError, match="recipe section 'teacher': unknown config keys: learning_rate"):
        RecipeConfig.from_dict({**d, "teacher": {**d["teacher"], "learning_rate": 1.0}})
    with pytest.raises(InputError, match="recipe section 'synth' lacks n"):
        RecipeConfig.from_dict({**d, "synth": {"seconds": [1, 2]}})
    with pytest.raises(InputError, match="recipe lacks dmd"):
        RecipeConfig.from_dict({k: v for k, v in d.items() if k != "dmd"})
    for bad in (-5, 0, "ten", True):
        with pytest.raises(InputError, match="budget_minutes must be a number of minutes > 0"):
            RecipeConfig.from_dict({**d, "budget_minutes": bad})
    assert RecipeConfig.from_dict({**d, "budget_minutes": 90}).budget_minutes == 90
    dec = {**d["decoder"], "steps": 100}
    for key, bad in (("refine_steps", -1), ("refine_steps", 1.5), ("refine_steps", True), ("refine_latent_noise", -0.1),
                     ("refine_latent_noise", "low"), ("adv_weight", -0.5), ("adv_weight", "yes"), ("adv_start", -1),
                     ("adv_start", 2.5), ("ref", 1), ("ref", "yes"), ("latent_blur", 1.5), ("latent_blur", -0.1),
                     ("latent_blur", "soft")):
        with pytest.raises(InputError, match=f"decoder.{key} must be"):
            RecipeConfig.from_dict({**d, "decoder": {**dec, key: bad}})
    with pytest.raises(InputError, match=r"decoder.refine_steps needs decoder.steps > 0"):
        RecipeConfig.from_dict({**d, "decoder": {**dec, "steps": 0, "refine_steps": 10}})
    assert RecipeConfig.from_dict({**d, "decoder": {**dec, "refine_steps": 10}}).decoder.refine_steps == 10
    assert RecipeConfig.from_dict({**d, "decoder": {**dec, "adv_weight": 0.5}}).decoder.adv_weight == 0.5
    ok = RecipeConfig.from_dict({**d, "decoder": {**dec, "ref": True, "latent_blur": 0.7}}).decoder
    assert ok.ref is True and ok.latent_blur == 0.7
    for key, bad in (("layers", -1), ("layers", 2.5), ("layers", True), ("heads", -2), ("steps", -3), ("steps", "many")):
        with pytest.raises(InputError, match=f"grow.{key} must be a whole number"):
            RecipeConfig.from_dict({**d, "grow": {"layers": 12, "steps": 10, key: bad}})
    for shape in ({"layers": 12}, {"heads": 8}):
        with pytest.raises(InputError, match=r"grow.layers or grow.heads needs grow.steps > 0"):
            RecipeConfig.from_dict({**d, "grow": shape})
    with pytest.raises(InputError, match="recipe section 'grow': unknown config keys: learning_rate"):
        RecipeConfig.from_dict({**d, "grow": {"layers": 12, "steps": 10, "learning_rate": 1.0}})
    assert not RecipeConfig.from_dict(d).grow.enabled  # no grow section: no grown teacher


def test_grow_stage_configs(tmp_path):
    """``grow``: a teacher stage into OUT/teacher_grow, started from OUT/teacher, with the teacher's settings
    and grow's over them; the student stages distil the grown teacher and have its depth."""
    from talkingmachines.train.config import RecipeConfig
    from talkingmachines.train.recipe import load_recipe

    d = load_recipe()
    r = RecipeConfig.from_dict({**d, "teacher": {**d["teacher"], "lr": 3e-4, "mouth_weight": 5.0},
                                "grow": {"layers": 9, "heads": 8, "steps": 40, "lr_schedule": "wsd", "lr_decay": 10}})
    r.data = str(tmp_path / "data")
    t, g, o, m = (r.stage_config(s, tmp_path) for s in ("teacher", "grow", "ode", "dmd"))
    first = t.make_preset().dit
    assert t.out == str(tmp_path / "teacher") and (first.num_layers, first.num_attention_heads, first.dim) == (6, 4, 128)
    assert g.stage == "teacher" and g.out == str(tmp_path / "teacher_grow") and g.steps == 40
    grown = g.make_preset().dit
    assert g.init_from == str(tmp_path / "teacher") and (grown.num_layers, grown.dim) == (9, 256)
    assert grown.ffn_dim == 2 * first.ffn_dim
    assert g.optim.lr == 3e-4 and g.flow.mouth_weight == 5.0 and g.optim.lr_schedule == "wsd" and g.optim.decay == 10
    assert t.optim.lr_schedule == "constant"
    for c in (o, m):
        assert c.teacher == str(tmp_path / "teacher_grow") and c.make_preset().dit == grown


def test_lr_schedules():
    from talkingmachines.train.optim import lr_at
    lr = 1e-3
    assert lr_at(0, lr, 10, "constant", 100) == pytest.approx(1e-4)  # warmup
    assert lr_at(50, lr, 10, "constant", 100) == lr
    assert lr_at(100, lr, 10, "cosine", 100) == pytest.approx(0.1 * lr)
    # wsd: constant until the last `decay` updates, whatever the total, then cosine to 0.1 lr;
    # so a run extended from 600 to 1000 updates matches the shorter one on its stable part
    for total in (600, 1000):
        assert [lr_at(n, lr, 10, "wsd", total, 200) for n in (10, 399)] == [lr, lr]
        assert lr_at(total - 200, lr, 10, "wsd", total, 200) == lr
        assert lr_at(total - 100, lr, 10, "wsd", total, 200) == pytest.approx(0.55 * lr)
        assert lr_at(total, lr, 10, "wsd", total, 200) == pytest.approx(0.1 * lr)
    with pytest.raises(InputError, match="wsd needs lr_decay > 0"):
        TrainConfig.from_dict({"lr_schedule": "wsd"})
    with pytest.raises(InputError, match="lr_schedule must be"):
        TrainConfig.from_dict({"lr_schedule": "linear"})


def test_token_bottleneck_flags_patches_wider_than_the_dit():
    """proj_out maps dim features to out_channels x patch values: the shipped geometries fit, the
    tiny-face5-x4 recipe's (patch 4 on a 16-channel 4x VAE, 256 values from 128) does not."""
    from talkingmachines.config import get_preset
    from talkingmachines.train.recipe import recipe_config

    for name in ("tiny", "wan-1.3b-audio", "wan-i2v-14b-audio"):
        assert get_preset(name).dit.token_bottleneck() is None, name
    x4 = recipe_config(configs.shipped("tiny-face5-x4"))
    why = x4.stage_config("teacher", Path("unused")).make_preset().dit.token_bottleneck()
    assert why and why.startswith("each token predicts 256 latent values (patch 1x4x4 x 16 channels) from 128")


def test_every_shipped_recipe_config_reads():
    """Each ``tiny-*`` config a user can name (`--config tiny-face-dec160`, ...) reads into a typed
    RecipeConfig: no unknown key, no setting of the wrong kind."""
    from talkingmachines.train.recipe import recipe_config

    names = [n for n in configs.names() if n.startswith("tiny-")]
    assert "tiny-face" in names and "tiny-face-dec160" in names
    for name in names:
        r = recipe_config(configs.resolve(name))
        assert r.synth.n > 0, name
    assert recipe_config(configs.resolve("tiny-face-dec160")).decoder.dec_widths == [160, 80, 40]


def test_recipe_config_base_chain(tmp_path):
    """A config that names ``"base"`` holds only its difference: it is merged onto that config (a
    shipped name, or a path beside the file), which is merged onto tiny-recipe.json. A loop or a
    bad base is a one-line InputError."""
    from talkingmachines.train.recipe import load_recipe

    face = load_recipe("tiny-face")
    old = load_recipe("tiny-face-ode16")  # {"base": "tiny-face", "ode": {...}, "decoder": {...}}
    four = load_recipe("tiny-face-ode4")  # shipped as {"base": "tiny-face-ode16", "ode": {"ode_steps": 4}}
    assert "base" not in four and four["ode"]["ode_steps"] == 4 and old["ode"]["ode_steps"] == 16
    assert {**four, "ode": None, "_comment": None} == {**old, "ode": None, "_comment": None}
    assert {**four["ode"], "ode_steps": None} == {**old["ode"], "ode_steps": None}
    # two levels down, everything but the two sections ode16 names still comes from tiny-face
    assert face["ode"]["ode_steps"] == 2 and face["decoder"]["dec_widths"] == [160, 80, 40]
    assert four["decoder"]["dec_widths"] is None and four["decoder"]["steps"] == 1000
    assert {**four, "ode": None, "decoder": None, "_comment": None} == {**face, "ode": None, "decoder": None, "_comment": None}
    seven = load_recipe("tiny-face7")  # based on tiny-face-ode16: measured with 16-step pairs
    assert seven["synth"]["version"] == 7 and seven["ode"]["ode_steps"] == 16
    # a user's file: a base by path (beside it) whose own base is a shipped name
    (tmp_path / "mid.json").write_text(json.dumps({"base": "tiny-face", "teacher": {"steps": 7}}))
    (tmp_path / "top.json").write_text(json.dumps({"base": "mid.json", "synth": {"n": 12}}))
    top = load_recipe(tmp_path / "top.json", device="cpu")
    assert top["teacher"]["steps"] == 7 and top["synth"]["n"] == 12 and top["device"] == "cpu"
    assert top["vae"] == face["vae"] and top["synth"]["version"] == face["synth"]["version"]
    (tmp_path / "a.json").write_text(json.dumps({"base": "b.json"}))
    (tmp_path / "b.json").write_text(json.dumps({"base": "a.json"}))
    with pytest.raises(InputError, match="loop"):
        load_recipe(tmp_path / "a.json")
    (tmp_path / "bad.json").write_text(json.dumps({"base": 3}))
    with pytest.raises(InputError, match="'base' must be"):
        load_recipe(tmp_path / "bad.json")
    (tmp_path / "gone.json").write_text(json.dumps({"base": "no-such-config"}))
    with pytest.raises(InputError, match="'no-such-config' is neither a file beside it nor a shipped config"):
        load_recipe(tmp_path / "gone.json")
