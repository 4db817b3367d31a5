"""The training configs: a `TrainConfig` for every stage, with nested typed sections in the
manner of torchtitan's JobConfig (`optim`, `ema`, `checkpoint`, `parallel`, `flow`, `guidance`,
`ode`, `dmd`), read from JSON/YAML (the shipped ones are in `talkingmachines.configs`) with
command-line overrides.

A config file may give a section as a mapping (``{"optim": {"lr": 1e-3}}``) or use the flat
keys every shipped config uses (``{"lr": 1e-3}``); `FLAT_KEYS` maps each flat key to its
section and field. Both read to the same `TrainConfig`; unknown keys are an error.

`RecipeConfig` is `train tiny-recipe`'s config, typed: `SynthSection`, `VAESection`, and a
`StageSection` for each DiT stage (its budget share and its `TrainConfig` settings)."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..config import Preset, get_preset
from ..errors import InputError


def _is_number(v, kind: type | tuple = (int, float)) -> bool:
    """A JSON number of ``kind``; not a bool, which Python counts as an int."""
    return isinstance(v, kind) and not isinstance(v, bool)


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule (`optim.adamw`, `optim.lr_at`)."""

    lr: float = 2e-4
    lr_schedule: str = "constant"  # constant | cosine (after warmup) | wsd (constant, then cosine over `decay`)
    warmup: int = 50
    decay: int = 0  # wsd: the last `decay` updates anneal to 0.1 lr
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.99)
    grad_clip: float = 1.0

    def __post_init__(self):
        if self.lr_schedule not in ("constant", "cosine", "wsd"):
            raise InputError(f"lr_schedule must be constant, cosine or wsd, not {self.lr_schedule!r}")
        if self.lr_schedule == "wsd" and not (isinstance(self.decay, int) and self.decay > 0):
            raise InputError(f"lr_schedule wsd needs lr_decay > 0 (updates to anneal over), got {self.decay!r}")


@dataclass
class EMAConfig:
    decay: float = 0.999  # 0: no EMA
    export: bool = True  # export the EMA weights (else the raw ones)


@dataclass
class CheckpointConfig:
    every: int = 200  # steps between checkpoints (0: none but the final export)
    keep: int = 2  # checkpoints kept on disk


@dataclass
class ParallelConfig:
    mode: str = "auto"  # auto (fsdp when distributed) | fsdp | ddp
    grad_checkpointing: bool = False


@dataclass
class FlowConfig:
    """The teacher's flow-matching loss (bidirectional)."""

    p_drop_audio: float = 0.1
    p_drop_ref: float = 0.05
    t_dist: str = "uniform"  # uniform | logit_normal, then Wan's shift (preset.stream.flow_shift)
    # extra loss weight on the mouth box (synthetic clips know it; real ones get none): the mouth
    # is a few % of the latent pixels, so a plain MSE leaves it under-fitted (mushy lips that
    # twitch in silence). Per-pixel weights do not change the optimum, only where capacity goes.
    mouth_weight: float = 0.0
    # the mouth weight on synthetic clips whose face has dark skin (`synth.face.skin_band`); None:
    # mouth_weight. Every stage loses dark faces' lips most, on training faces too (docs/face_recipe.md).
    dark_mouth_weight: float | None = None


@dataclass
class GuidanceConfig:
    """Classifier-free guidance of the teacher when it samples (ODE pairs, DMD's real score)."""

    audio: float = 2.5
    ref: float = 1.0  # 1.0: no image guidance (saves a forward)
    ref_max_sigma: float = 1.0  # the reference guidance only at sigma <= this (1.0: at every step)


@dataclass
class ODEConfig:
    """The teacher's ODE pairs for the student's initialisation."""

    steps: int = 20
    pairs: int = 64
    batch: int = 4
    # weight of a second regression, in the mouth box only, onto the clip's own latents (the
    # ground truth), beside the one onto the teacher's ODE solution; 0: off. The synthetic mouth
    # is a function of the audio, so the truth says where the teacher's mouth is wrong.
    gt_mouth_weight: float = 0.0


@dataclass
class DMDConfig:
    fake_ratio: int = 5  # fake-score updates per student update
    fake_lr: float | None = None  # default: optim.lr
    weight: float = 1.0
    regression_weight: float = 0.25
    real_context_prob: float = 0.25  # student context = the real clip instead of its own rollout
    s_min: float = 0.02
    s_max: float = 0.98


SECTIONS = {"optim": OptimConfig, "ema": EMAConfig, "checkpoint": CheckpointConfig, "parallel": ParallelConfig,
            "flow": FlowConfig, "guidance": GuidanceConfig, "ode": ODEConfig, "dmd": DMDConfig}

# flat key (the shipped configs, recipe stage dicts, CLI overrides) -> (section, field)
FLAT_KEYS: dict[str, tuple[str, str]] = {
    "lr": ("optim", "lr"), "lr_schedule": ("optim", "lr_schedule"), "warmup": ("optim", "warmup"),
    "lr_decay": ("optim", "decay"),
    "weight_decay": ("optim", "weight_decay"), "betas": ("optim", "betas"), "grad_clip": ("optim", "grad_clip"),
    "ema_decay": ("ema", "decay"), "export_ema": ("ema", "export"),
    "ckpt_every": ("checkpoint", "every"), "keep_checkpoints": ("checkpoint", "keep"),
    "dist_mode": ("parallel", "mode"), "grad_checkpointing": ("parallel", "grad_checkpointing"),
    "p_drop_audio": ("flow", "p_drop_audio"), "p_drop_ref": ("flow", "p_drop_ref"), "t_dist": ("flow", "t_dist"),
    "mouth_weight": ("flow", "mouth_weight"), "dark_mouth_weight": ("flow", "dark_mouth_weight"),
    "cfg_audio": ("guidance", "audio"), "cfg_ref": ("guidance", "ref"),
    "cfg_ref_max_sigma": ("guidance", "ref_max_sigma"),
    "ode_steps": ("ode", "steps"), "ode_pairs": ("ode", "pairs"), "ode_batch": ("ode", "batch"),
    "ode_gt_mouth_weight": ("ode", "gt_mouth_weight"),
    "fake_ratio": ("dmd", "fake_ratio"), "fake_lr": ("dmd", "fake_lr"), "dmd_weight": ("dmd", "weight"),
    "regression_weight": ("dmd", "regression_weight"), "real_context_prob": ("dmd", "real_context_prob"),
    "dmd_s_min": ("dmd", "s_min"), "dmd_s_max": ("dmd", "s_max"),
}
IGNORED_KEYS = {"_comment", "comment", "stages"}


@dataclass
class TrainConfig:
    """The config of every stage (JSON or YAML files under ``configs/``, nested sections or flat
    keys; unknown keys are an error). Paths may be relative to the working directory."""

    stage: str = "teacher"
    preset: str = "tiny"
    preset_overrides: dict = field(default_factory=dict)  # e.g. {"dit": {"num_layers": 2}, "height": 32}
    data: str | None = None  # a ClipDataset folder (synth output)
    vae: str | None = None  # VAE folder (TinyVAE, or a Wan VAE / WAN_DIR)
    out: str | None = None
    init_from: str | None = None  # teacher: Wan2.1 dir or our DiT folder; ode: teacher run; dmd: ode run
    teacher: str | None = None  # ode / dmd: the teacher run folder (or a DiT folder)
    cache: str | None = None  # latent cache folder (default: DATA/latents-<vae id>, `latents.cache_dir`)
    steps: int = 1000
    batch_size: int = 8  # global: the same whatever the world size
    clip_chunks: int = 2  # crops of 1 + 12 n video frames
    log_every: int = 10
    seed: int = 0
    device: str = "auto"  # auto: cuda if available
    held_out: float = 0.1  # fraction of clips never trained on (evaluation)
    # synthetic clips whose face's skin colour is in the "dark" band (`synth.face.skin_band`)
    # come this many times per epoch: the models lose dark faces far more often than light ones
    dark_skin_repeat: int = 1
    progress: bool = True
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)  # teacher
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)  # teacher sampling (ODE pairs, real score)
    ode: ODEConfig = field(default_factory=ODEConfig)
    dmd: DMDConfig = field(default_factory=DMDConfig)

    def __post_init__(self):
        # a bad count would otherwise surface deep in a stage (an empty batch, an endless epoch)
        for name, low in (("steps", 0), ("batch_size", 1), ("clip_chunks", 1), ("log_every", 0),
                          ("dark_skin_repeat", 1)):
            v = getattr(self, name)
            if not _is_number(v, int) or v < low:
                raise InputError(f"config {name} must be a whole number >= {low} (got {v!r})")
        if not _is_number(self.held_out) or not 0 <= self.held_out < 1:
            raise InputError(f"config held_out must be a fraction in [0, 1) (got {self.held_out!r})")
        dmw = self.flow.dark_mouth_weight
        if dmw is not None and (not _is_number(dmw) or dmw < 0):
            raise InputError(f"config dark_mouth_weight must be a number >= 0 or null (got {dmw!r})")

    def to_dict(self) -> dict:
        """Nested: one mapping per section (`from_dict` reads it back)."""
        d = dataclasses.asdict(self)
        d["optim"]["betas"] = list(self.optim.betas)
        return d

    def to_flat_dict(self) -> dict:
        """Flat: the keys of the shipped configs (`FLAT_KEYS`)."""
        d = {k: v for k, v in self.to_dict().items() if k not in SECTIONS}
        for flat, (sec, name) in FLAT_KEYS.items():
            v = getattr(getattr(self, sec), name)
            d[flat] = list(v) if isinstance(v, tuple) else v
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Read nested sections and/or flat keys (`FLAT_KEYS`); a field given twice, an unknown
        key or a section that is not a mapping is an InputError."""
        top = {f.name for f in dataclasses.fields(cls)} - set(SECTIONS)
        kw: dict = {}
        sec_kw: dict[str, dict] = {s: {} for s in SECTIONS}
        where: dict[tuple[str, str], str] = {}
        unknown = []

        def put(sec: str, name: str, v, key: str) -> None:
            if (sec, name) in where:
                raise InputError(f"config gives {sec}.{name} twice: as {where[sec, name]!r} and as {key!r}")
            where[sec, name] = key
            sec_kw[sec][name] = v

        for k, v in d.items():
            if k in IGNORED_KEYS:
                continue
            if k in SECTIONS:
                if not isinstance(v, dict):
                    raise InputError(f"config section {k!r} must be a mapping, got {type(v).__name__}")
                names = {f.name for f in dataclasses.fields(SECTIONS[k])}
                for name, x in v.items():
                    if name in names:
                        put(k, name, x, f"{k}.{name}")
                    else:
                        unknown.append(f"{k}.{name}")
            elif k in FLAT_KEYS:
                put(*FLAT_KEYS[k], v, k)
            elif k in top:
                kw[k] = v
            else:
                unknown.append(k)
        if unknown:
            raise InputError(f"unknown config keys: {', '.join(sorted(unknown))}")
        if "betas" in sec_kw["optim"]:
            sec_kw["optim"]["betas"] = tuple(sec_kw["optim"]["betas"])
        return cls(**kw, **{s: SECTIONS[s](**sec_kw[s]) for s in SECTIONS})

    def replace(self, **kw) -> "TrainConfig":
        """A copy with the non-None `kw` set: top-level fields and flat keys (`FLAT_KEYS`)."""
        kw = {k: v for k, v in kw.items() if v is not None}
        top, secs = {}, {}
        for k, v in kw.items():
            if k in FLAT_KEYS:
                sec, name = FLAT_KEYS[k]
                secs.setdefault(sec, {})[name] = tuple(v) if name == "betas" else v
            elif k in SECTIONS or k not in {f.name for f in dataclasses.fields(self)}:
                raise InputError(f"unknown config override {k!r}")
            else:
                top[k] = v
        for sec, changes in secs.items():
            top[sec] = dataclasses.replace(getattr(self, sec), **changes)
        return dataclasses.replace(self, **top)

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


def nest(d: dict) -> dict:
    """`d` (TrainConfig keys, flat and/or nested) with every flat key moved into its section:
    the form in which partial configs merge (a later ``lr`` then replaces an earlier
    ``optim.lr``). Checked as `TrainConfig.from_dict` checks."""
    TrainConfig.from_dict(d)
    out: dict = {}
    for k, v in d.items():
        if k in IGNORED_KEYS:
            continue
        if k in FLAT_KEYS:
            sec, name = FLAT_KEYS[k]
            out.setdefault(sec, {})[name] = v
        elif k in SECTIONS:
            out.setdefault(k, {}).update(v)
        else:
            out[k] = v
    return out


def merge(a: dict, b: dict) -> dict:
    """`b` merged onto `a`, mappings key by key."""
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# ============================================================================ the recipe's config
def stage_folder(stage: str) -> str:
    """The run folder's subfolder of a DiT stage: ``grow`` trains in ``teacher_grow`` (it is a
    teacher stage, beside the first teacher); the others in a folder of their own name."""
    return "teacher_grow" if stage == "grow" else stage


def _section(cls, name: str, d) -> object:
    """`cls` from the mapping `d` (the recipe section `name`); unknown keys are an InputError."""
    if not isinstance(d, dict):
        raise InputError(f"recipe section {name!r} must be a mapping, got {type(d).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names - IGNORED_KEYS)
    if unknown:
        raise InputError(f"unknown keys in recipe section {name!r}: {', '.join(unknown)}")
    missing = sorted(f.name for f in dataclasses.fields(cls) if f.name not in d
                     and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
    if missing:
        raise InputError(f"recipe section {name!r} lacks {', '.join(missing)}")
    return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class SynthSection:
    """The synthetic clips (`synth.synth_dataset`)."""

    n: int
    seconds: tuple  # (min, max) clip length
    workers: int = 1
    speech: str = "auto"  # auto | espeak | babble
    video: bool = True
    version: int = 1  # data version (synth.DATA_VERSIONS)


def _check_dark_repeat(section: str, k) -> None:
    if not _is_number(k, int) or k < 1:
        raise InputError(f"{section}.dark_skin_repeat must be a whole number >= 1 (got {k!r})")


@dataclass
class VAESection:
    """The TinyVAE stage (`vae_train.train_tiny_vae`) and its share of a budget."""

    steps: int
    batch_size: int
    clip_frames: int
    lr: float
    share: float | None = None  # of the time left, with a budget
    min_steps: int = 1
    max_steps: int = 10**9
    temporal_weight: float = 0.0
    latent_channels: int | None = None  # None: TinyVAEConfig's
    feature_weight: float = 0.0  # extra loss weight on synthetic faces' eyes and mouth (vae_train)
    dark_skin_repeat: int = 1  # dark-skinned synthetic clips listed this many times (as the DiT stages')
    spatial: int | None = None  # pixels per latent pixel (8 or 4; None: 8); the DiT stages' preset follows it
    enc_widths: list | None = None  # None: TinyVAEConfig's (which suit spatial 8)
    dec_widths: list | None = None
    # a trained VAE folder taken as this stage's result instead of training one: a fine-tune of a
    # shipped model keeps its encoder, so its DiT's latents (and what the DiT learned) still hold
    init_from: str | None = None

    def __post_init__(self):
        _check_dark_repeat("vae", self.dark_skin_repeat)
        if self.init_from is not None and not (isinstance(self.init_from, str) and self.init_from):
            raise InputError(f"vae.init_from must be a VAE folder's path (got {self.init_from!r})")


@dataclass
class DecoderSection:
    """The optional decoder-only fine-tune of the trained VAE on latents + noise
    (`vae_train.VAEOptions.latent_noise`); ``steps`` 0 skips it. Its defaults are
    ``configs/tiny-recipe.json``'s, as every section's."""

    steps: int
    batch_size: int
    lr: float
    latent_noise: float  # max std of the noise, in normalised latent units
    feature_weight: float = 0.0  # extra loss weight on synthetic faces' eyes and mouth (vae_train)
    dark_skin_repeat: int = 1  # dark-skinned synthetic clips listed this many times (as the DiT stages')
    # a fresh, larger decoder under the same encoder (and so the same DiT); None: fine-tune the VAE's own
    dec_widths: list | None = None
    dec_res_blocks: int | None = None
    # then a second fine-tune of that decoder at lower noise (into OUT/decoder_refine): the first one's high
    # noise teaches it to draw a face from the student's slightly-off latents, the second sharpens it again
    refine_steps: int = 0
    refine_latent_noise: float = 0.1
    # a patch discriminator's loss in every decoder phase (`vae_train.VAEOptions.adv_weight`; 0: none),
    # counted after `adv_start` decoder updates; steps alternate discriminator / decoder
    adv_weight: float = 0.0
    adv_start: int = 50
    # the decoder also sees the stream's first latent (the portrait's; `TinyVAEConfig.decoder_ref`), trained on
    # latents smudged up to `latent_blur` (`vae_train.VAEOptions.latent_blur`) so that it learns to use it
    ref: bool = False
    latent_blur: float = 0.0

    def __post_init__(self):
        _check_dark_repeat("decoder", self.dark_skin_repeat)
        if not isinstance(self.ref, bool):
            raise InputError(f"decoder.ref must be true or false (got {self.ref!r})")
        if not _is_number(self.latent_blur) or not 0 <= self.latent_blur <= 1:
            raise InputError(f"decoder.latent_blur must be a number in [0, 1] (got {self.latent_blur!r})")
        if not _is_number(self.adv_weight) or self.adv_weight < 0:
            raise InputError(f"decoder.adv_weight must be a number >= 0 (got {self.adv_weight!r})")
        if not _is_number(self.adv_start, int) or self.adv_start < 0:
            raise InputError(f"decoder.adv_start must be a whole number >= 0 (got {self.adv_start!r})")
        if not _is_number(self.refine_steps, int) or self.refine_steps < 0:
            raise InputError(f"decoder.refine_steps must be a whole number >= 0 (got {self.refine_steps!r})")
        if not _is_number(self.refine_latent_noise) or self.refine_latent_noise < 0:
            raise InputError(f"decoder.refine_latent_noise must be a number >= 0 (got {self.refine_latent_noise!r})")
        if self.refine_steps > 0 and not (_is_number(self.steps, int) and self.steps > 0):
            raise InputError("decoder.refine_steps needs decoder.steps > 0 (it refines that stage's decoder)")


@dataclass
class StageSection:
    """A DiT stage (teacher, ode, dmd): its share of a budget and its `TrainConfig` settings
    (`settings`, nested form: merged onto the recipe's ``common``)."""

    share: float | None = None
    min_steps: int = 1
    max_steps: int = 10**9
    pairs_share: float = 0.5  # ode: the part of its share that makes the teacher's ODE pairs
    settings: dict = field(default_factory=dict)

    PLAN_KEYS = ("share", "min_steps", "max_steps", "pairs_share")

    @classmethod
    def from_dict(cls, name: str, d) -> "StageSection":
        if not isinstance(d, dict):
            raise InputError(f"recipe section {name!r} must be a mapping, got {type(d).__name__}")
        try:
            settings = nest({k: v for k, v in d.items() if k not in cls.PLAN_KEYS})
        except InputError as e:
            raise InputError(f"recipe section {name!r}: {e}") from None
        return cls(**{k: d[k] for k in cls.PLAN_KEYS if k in d}, settings=settings)

    def set(self, **flat) -> None:
        """Set TrainConfig keys (flat, e.g. ``steps=``, ``ode_pairs=``), as a budget plan does."""
        self.settings = merge(self.settings, nest(flat))


@dataclass
class GrowSection:
    """The optional second phase of the teacher (``OUT/teacher_grow``): the finished teacher grown to
    ``layers`` blocks (`weights.grow_depth`: its blocks first, each new one starting as the identity)
    and/or to ``heads`` attention heads, twice its own (`weights.grow_width`: twice the features per
    token, the same function), then trained ``steps`` more with the teacher's settings, ``settings``
    (TrainConfig keys) merged over them. The student stages then distil the grown teacher and have its
    shape. ``layers`` and ``heads`` 0 skip it."""

    layers: int = 0
    heads: int = 0
    steps: int = 0
    settings: dict = field(default_factory=dict)

    KEYS = ("layers", "heads", "steps")

    @classmethod
    def from_dict(cls, d) -> "GrowSection":
        if not isinstance(d, dict):
            raise InputError(f"recipe section 'grow' must be a mapping, got {type(d).__name__}")
        kw = {k: d.get(k, 0) for k in cls.KEYS}
        for k, v in kw.items():
            if not _is_number(v, int) or v < 0:
                raise InputError(f"grow.{k} must be a whole number >= 0 (got {v!r})")
        if (kw["layers"] or kw["heads"]) and kw["steps"] == 0:
            raise InputError("grow.layers or grow.heads needs grow.steps > 0 (the steps that train the grown teacher)")
        try:
            settings = nest({k: v for k, v in d.items() if k not in cls.KEYS and k not in IGNORED_KEYS})
        except InputError as e:
            raise InputError(f"recipe section 'grow': {e}") from None
        return cls(**kw, settings=settings)

    @property
    def enabled(self) -> bool:
        return bool(self.layers or self.heads)


@dataclass
class RecipeConfig:
    """`train tiny-recipe`'s config: the shipped ``configs/tiny-recipe.json`` with the
    ``--config`` file and the overrides merged onto it (`recipe.recipe_config`)."""

    preset: str
    seed: int
    held_out: float
    synth: SynthSection
    vae: VAESection
    teacher: StageSection
    ode: StageSection
    dmd: StageSection
    decoder: DecoderSection
    grow: GrowSection = field(default_factory=GrowSection)
    device: str = "auto"
    budget_minutes: float | None = None
    export_teacher: bool = True
    preset_overrides: dict = field(default_factory=dict)
    data: str | None = None  # the clip folder (default: OUT/data, synthesised)
    common: dict = field(default_factory=dict)  # TrainConfig settings of every DiT stage (nested form)
    config_path: str | None = None  # the --config given (the card's reproduce line)
    device_name: str | None = None  # the device the run uses (the card)

    STAGES = ("teacher", "ode", "dmd")

    def __post_init__(self):
        b = self.budget_minutes
        if b is not None and (not _is_number(b) or not b > 0):
            raise InputError(f"budget_minutes must be a number of minutes > 0 (got {b!r})")

    @classmethod
    def from_dict(cls, d: dict) -> "RecipeConfig":
        sections = {"synth", "vae", "decoder", "grow", "common", *cls.STAGES}
        top = {f.name for f in dataclasses.fields(cls)} - sections - {"config_path", "device_name"}
        unknown = sorted(set(d) - top - sections - IGNORED_KEYS)
        if unknown:
            raise InputError(f"unknown recipe keys: {', '.join(unknown)}")
        try:
            common = nest(d.get("common", {}))
        except InputError as e:
            raise InputError(f"recipe section 'common': {e}") from None
        kw = {k: v for k, v in d.items() if k in top}
        missing = sorted({"preset", "seed", "held_out", "synth", "vae", "decoder", *cls.STAGES} - set(d))
        if missing:
            raise InputError(f"recipe lacks {', '.join(missing)}")
        return cls(**kw, common=common, synth=_section(SynthSection, "synth", d["synth"]),
                   vae=_section(VAESection, "vae", d["vae"]),
                   decoder=_section(DecoderSection, "decoder", d["decoder"]),
                   grow=GrowSection.from_dict(d.get("grow", {})),
                   **{s: StageSection.from_dict(s, d[s]) for s in cls.STAGES})

    def stage(self, name: str) -> StageSection:
        return getattr(self, name)

    def teacher_dir(self, out: Path) -> Path:
        """The run's final teacher: the grown one when there is a ``grow`` phase."""
        return out / stage_folder("grow" if self.grow.enabled else "teacher")

    def grown_dit(self, teacher_dit) -> dict:
        """The preset overrides (``dit`` section) of the grown teacher and the student stages, given the
        first teacher's DiTConfig: its depth, and twice its heads and FFN width when it is widened."""
        d = {}
        if self.grow.layers:
            d["num_layers"] = int(self.grow.layers)
        if self.grow.heads:
            d["num_attention_heads"] = int(self.grow.heads)
            d["ffn_dim"] = int(teacher_dit.ffn_dim * self.grow.heads // teacher_dit.num_attention_heads)
        return d

    def stage_config(self, stage: str, out: Path, steps: int | None = None) -> TrainConfig:
        """The `TrainConfig` of DiT stage `stage` (teacher, grow, ode, dmd) in run folder `out`:
        ``common``, then the stage's settings, then what the recipe decides (paths, seed, device,
        held-out split). ``grow`` is a teacher stage: the teacher's settings, then grow's."""
        folder = stage_folder(stage)
        job = dict(stage="teacher" if stage == "grow" else stage, preset=self.preset, seed=self.seed,
                   device=self.device, held_out=self.held_out, data=str(self.data), vae=str(out / "vae"),
                   out=str(out / folder))
        overrides = dict(self.preset_overrides)
        if self.vae.spatial is not None:  # the DiT works on the VAE's latent grid
            overrides["vae_spatial"] = int(self.vae.spatial)
        if self.grow.enabled and stage != "teacher":  # every DiT after the grown teacher has its shape
            first = self.stage_config("teacher", out).make_preset().dit
            overrides["dit"] = {**overrides.get("dit", {}), **self.grown_dit(first)}
        if overrides:
            job["preset_overrides"] = overrides
        if stage == "grow":
            job["init_from"] = str(out / "teacher")
            job["steps"] = int(self.grow.steps)
        if stage in ("ode", "dmd"):
            job["teacher"] = str(self.teacher_dir(out))
        if stage == "dmd":
            job["init_from"] = str(out / "ode")
        if steps is not None:
            job["steps"] = int(steps)
        settings = merge(self.teacher.settings, self.grow.settings) if stage == "grow" else self.stage(stage).settings
        return TrainConfig.from_dict(merge(merge(self.common, settings), job))


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

