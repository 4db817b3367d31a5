"""The training config: one flat `TrainConfig` for every stage, read from JSON/YAML (the shipped
ones are in `talkingmachines.configs`) with command-line overrides."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..config import Preset, get_preset
from ..errors import InputError


@dataclass
class TrainConfig:
    """One flat config for every stage (JSON or YAML files under ``configs/``; unknown keys
    are an error). Paths may be relative to the working directory."""

    stage: str = "teacher"
    preset: str = "tiny"
    preset_overrides: dict = field(default_factory=dict)  # e.g. {"dit": {"num_layers": 2}, "height": 32}
    data: str | None = None  # a ClipDataset folder (synth output)
    vae: str | None = None  # VAE folder (TinyVAE, or a Wan VAE / WAN_DIR)
    out: str | None = None
    init_from: str | None = None  # teacher: Wan2.1 dir or our DiT folder; ode: teacher run; dmd: ode run
    teacher: str | None = None  # ode / dmd: the teacher run folder (or a DiT folder)
    cache: str | None = None  # latent cache folder (default: OUT/../cache/latents-<vae id>)
    steps: int = 1000
    batch_size: int = 8  # global: the same whatever the world size
    clip_chunks: int = 2  # crops of 1 + 12 n video frames
    lr: float = 2e-4
    lr_schedule: str = "constant"  # constant | cosine (after warmup)
    warmup: int = 50
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.99)
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    ckpt_every: int = 200
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    device: str = "auto"  # auto: cuda if available
    dist_mode: str = "auto"  # auto (fsdp when distributed) | fsdp | ddp
    grad_checkpointing: bool = False
    held_out: float = 0.1  # fraction of clips never trained on (evaluation)
    progress: bool = True
    # --- teacher (bidirectional flow matching) ---
    p_drop_audio: float = 0.1
    p_drop_ref: float = 0.05
    t_dist: str = "uniform"  # uniform | logit_normal, then Wan's shift (preset.stream.flow_shift)
    # extra loss weight on the mouth box (synthetic clips know it; real ones get none): the mouth
    # is a few % of the latent pixels, so a plain MSE leaves it under-fitted (mushy lips that
    # twitch in silence). Per-pixel weights do not change the optimum, only where capacity goes.
    mouth_weight: float = 0.0
    # --- teacher sampling (ODE pairs, real score) ---
    ode_steps: int = 20
    cfg_audio: float = 2.5
    cfg_ref: float = 1.0  # 1.0: no image guidance (saves a forward)
    ode_pairs: int = 64
    ode_batch: int = 4
    # --- dmd ---
    fake_ratio: int = 5  # fake-score updates per student update
    fake_lr: float | None = None  # default: lr
    dmd_weight: float = 1.0
    regression_weight: float = 0.25
    real_context_prob: float = 0.25  # student context = the real clip instead of its own rollout
    dmd_s_min: float = 0.02
    dmd_s_max: float = 0.98
    export_ema: bool = True

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names - {"_comment", "comment", "stages"})
        if unknown:
            raise InputError(f"unknown config keys: {', '.join(unknown)}")
        kw = {k: v for k, v in d.items() if k in names}
        if "betas" in kw:
            kw["betas"] = tuple(kw["betas"])
        return cls(**kw)

    def replace(self, **kw) -> "TrainConfig":
        return dataclasses.replace(self, **{k: v for k, v in kw.items() if v is not None})

    def make_preset(self) -> Preset:
        try:
            p = get_preset(self.preset)
        except ValueError as e:
            raise InputError(str(e)) from None
        if self.preset_overrides:
            d = p.to_dict()
            for k, v in self.preset_overrides.items():
                if isinstance(v, dict) and isinstance(d.get(k), dict):
                    d[k] = {**d[k], **v}
                else:
                    d[k] = v
            p = Preset.from_dict(d)
        return p


def read_config_file(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: config file not found")
    text = p.read_text()
    if p.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:  # pragma: no cover
            raise InputError(f"{p}: YAML configs need PyYAML (pip install pyyaml), or use JSON") from None
        d = yaml.safe_load(text) or {}
    else:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise InputError(f"{p}: a config must be a mapping")
    return d


def load_config(path: str | os.PathLike | None = None, **overrides) -> TrainConfig:
    d = read_config_file(path) if path else {}
    d.pop("stages", None)
    cfg = TrainConfig.from_dict(d)
    return cfg.replace(**overrides)

