"""`TrainConfig`: nested typed sections, read from nested mappings and from the flat keys every
shipped config uses, to the same config."""

import json

import pytest

from talkingmachines import configs
from talkingmachines.errors import InputError
from talkingmachines.train.config import FLAT_KEYS, SECTIONS, TrainConfig, load_config, read_config_file

FLAT = {"stage": "dmd", "steps": 7, "lr": 3e-4, "lr_schedule": "cosine", "warmup": 3, "weight_decay": 0.0,
        "betas": [0.0, 0.95], "grad_clip": 2.0, "ema_decay": 0.9, "export_ema": False, "ckpt_every": 5,
        "keep_checkpoints": 1, "dist_mode": "ddp", "grad_checkpointing": True, "p_drop_audio": 0.2,
        "p_drop_ref": 0.1, "t_dist": "logit_normal", "mouth_weight": 3.0, "cfg_audio": 4.5, "cfg_ref": 1.5,
        "ode_steps": 8, "ode_pairs": 16, "ode_batch": 2, "fake_ratio": 3, "fake_lr": 1e-3, "dmd_weight": 0.5,
        "regression_weight": 0.1, "real_context_prob": 0.5, "dmd_s_min": 0.1, "dmd_s_max": 0.9}
NESTED = {"stage": "dmd", "steps": 7,
          "optim": {"lr": 3e-4, "lr_schedule": "cosine", "warmup": 3, "weight_decay": 0.0, "betas": [0.0, 0.95],
                    "grad_clip": 2.0},
          "ema": {"decay": 0.9, "export": False}, "checkpoint": {"every": 5, "keep": 1},
          "parallel": {"mode": "ddp", "grad_checkpointing": True},
          "flow": {"p_drop_audio": 0.2, "p_drop_ref": 0.1, "t_dist": "logit_normal", "mouth_weight": 3.0},
          "guidance": {"audio": 4.5, "ref": 1.5}, "ode": {"steps": 8, "pairs": 16, "batch": 2},
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
