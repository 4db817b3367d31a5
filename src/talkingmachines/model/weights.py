"""Checkpoints for AudioDiT: Wan2.1 base weights (diffusers or original layout) and our own format.

Only safetensors are read (never pickle: `.bin`/`.pt`/`.pth`/`.ckpt` are refused), lazily, one
tensor at a time through `safetensors.safe_open`, so a 14B checkpoint never sits in memory twice.

Layouts understood by `load_wan_into` / `from_wan`:

- **diffusers** (`WanTransformer3DModel`, e.g. the `transformer/` folder of
  `Wan-AI/Wan2.1-I2V-14B-480P-Diffusers`): our parameter names are diffusers' names, so keys map
  one to one (the unused `norm_added_q`, which diffusers also ignores, is skipped).
- **original** Wan2.1 release (`patch_embedding`, `blocks.N.self_attn.q`, `head.head`, ...,
  optionally prefixed `model.diffusion_model.`): renamed with diffusers' own
  `convert_wan_transformer_to_diffusers` (applied to the *names* only, so loading stays lazy).
  Note that the cross-attention norm is `norm3` there and `norm2` in diffusers.

Files: a single `.safetensors`, a folder with one, a sharded folder with an index json
(`diffusion_pytorch_model.safetensors.index.json`, `model.safetensors.index.json`), or a
diffusers pipeline root (its `transformer/` subfolder is used).

Our format (`save_dit`/`load_dit`): `config.json` (a `DiTConfig`, marked `"_format":
"talkingmachines-dit"`) and `model.safetensors`, or `model-0000K-of-0000N.safetensors` shards
plus `model.safetensors.index.json` above a size limit; every file is written to a temporary
name and moved into place with `os.replace`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..config import DiTConfig
from ..errors import InputError
from ..fileio import atomic_write
from .dit import AudioDiT

FORMAT = "talkingmachines-dit"
FORMAT_VERSION = 1
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}
AUDIO_KEY_RE = re.compile(r"^(audio_embedder\.|blocks\.\d+\.(norm_audio|audio_attn)\.)")
# keys some Wan checkpoints carry that no model uses (diffusers: _keys_to_ignore_on_load_unexpected)
IGNORED_KEY_RE = re.compile(r"(^|\.)norm_added_q\.")
DEFAULT_MAX_SHARD = 4 * 2**30

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": getattr(torch, "float8_e4m3fn", None), "F8_E5M2": getattr(torch, "float8_e5m2", None),
}


class WeightsError(InputError):
    """A checkpoint that cannot be read or does not fit the model (one-line message)."""


def is_audio_key(key: str) -> bool:
    return AUDIO_KEY_RE.match(key) is not None


# ============================================================================ reading
def resolve_weight_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files making up a checkpoint at `path` (file, folder, sharded folder)."""
    p = Path(path)
    if not p.exists():
        raise WeightsError(f"{p}: no such file or folder")
    if p.is_file():
        if p.suffix.lower() in PICKLE_SUFFIXES:
            raise WeightsError(f"{p}: refusing to read a pickle checkpoint ({p.suffix}); only .safetensors are "
                               "loaded (pickle can run arbitrary code): convert it to safetensors first")
        if p.name.endswith(".index.json"):
            return _files_from_index(p)
        if p.suffix != ".safetensors":
            raise WeightsError(f"{p}: not a .safetensors file")
        return [p]
    if (p / "transformer").is_dir() and not any(p.glob("*.safetensors")):  # diffusers pipeline root
        return resolve_weight_files(p / "transformer")
    indexes = sorted(p.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        preferred = [i for i in indexes if i.name in ("diffusion_pytorch_model.safetensors.index.json",
                                                      "model.safetensors.index.json")]
        if len(preferred) != 1:
            raise WeightsError(f"{p}: several index files ({', '.join(i.name for i in indexes)}); pass one")
        indexes = preferred
    if indexes:
        return _files_from_index(indexes[0])
    files = sorted(p.glob("*.safetensors"))
    if len(files) == 1:
        return files
    if not files:
        pickles = sorted(f.name for f in p.iterdir() if f.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise WeightsError(f"{p}: only pickle checkpoints here ({', '.join(pickles[:3])}); refusing to read "
                               "them: convert to safetensors first")
        raise WeightsError(f"{p}: no .safetensors weights in this folder")
    # several files without an index: accept only one complete shard set
    shard = re.compile(r"^(.*)-(\d+)-of-(\d+)\.safetensors$")
    ms = [shard.match(f.name) for f in files]
    if all(ms) and len({(m.group(1), m.group(3)) for m in ms}) == 1 and len(files) == int(ms[0].group(3)):
        return files
    raise WeightsError(f"{p}: {len(files)} .safetensors files and no index json; pass the file to load")


def _files_from_index(index: Path) -> list[Path]:
    try:
        wm = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError) as e:
        raise WeightsError(f"{index}: unreadable index json ({e})") from None
    files = []
    for name in dict.fromkeys(wm.values()):
        f = index.parent / name
        if not f.is_file():
            raise WeightsError(f"{index}: shard {name} is missing")
        files.append(f)
    return files


class LazyCheckpoint:
    """Tensor names, shapes and dtypes of a (sharded) safetensors checkpoint; tensors on demand.

    Use as a context manager (keeps the files open); `get(key, dtype, device)` reads one tensor."""

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu"):
        self.path = Path(path)
        self.files = resolve_weight_files(path)
        self.device = str(torch.device(device))
        self._stack = contextlib.ExitStack()
        self._where: dict[str, object] = {}
        self.metadata: dict = {}
        try:
            for f in self.files:
                h = self._stack.enter_context(safe_open(str(f), framework="pt", device=self.device))
                self.metadata.update(h.metadata() or {})
                for k in h.keys():
                    if k in self._where:
                        raise WeightsError(f"{self.path}: tensor {k} appears in two shards")
                    self._where[k] = h
        except WeightsError:
            self._stack.close()
            raise
        except Exception as e:  # header parse errors etc.
            self._stack.close()
            raise WeightsError(f"{self.path}: not a readable safetensors checkpoint ({e})") from None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self._stack.close()

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key):
        return key in self._where

    def shape(self, key) -> tuple[int, ...]:
        return tuple(self._where[key].get_slice(key).get_shape())

    def dtype(self, key) -> torch.dtype | None:
        return _ST_DTYPES.get(self._where[key].get_slice(key).get_dtype())

    def get(self, key, dtype: torch.dtype | None = None) -> torch.Tensor:
        t = self._where[key].get_tensor(key)
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        return t


# ============================================================================ layouts
def detect_layout(keys) -> str:
    """'original' (Wan2.1 release names) or 'diffusers' (also ours)."""
    for k in keys:
        k = k.removeprefix("model.diffusion_model.")
        if k.startswith(("head.head", "head.modulation", "time_embedding.", "text_embedding.", "img_emb.")) or (
            k.startswith("blocks.") and (".self_attn." in k or ".cross_attn." in k or k.endswith(".modulation"))
        ):
            return "original"
    return "diffusers"


def original_to_diffusers_names(keys) -> dict[str, str]:
    """{diffusers name: original name}, through diffusers' own `convert_wan_transformer_to_diffusers`
    (fed the names instead of tensors, so nothing is read)."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    keys = list(keys)
    if any("face_adapter" in k or "motion_encoder" in k for k in keys):
        raise WeightsError("this is a Wan-Animate checkpoint (face_adapter/motion_encoder): not a Wan2.1 T2V/I2V model")
    if any(k.removeprefix("model.diffusion_model.").startswith(("vace_", "before_proj", "after_proj")) for k in keys):
        raise WeightsError("this is a Wan VACE checkpoint: not a Wan2.1 T2V/I2V model")
    # the converter strips the prefix by renaming keys of its input: map original names through it
    named = {k: k for k in keys}
    conv = convert_wan_transformer_to_diffusers(named)
    if len(conv) != len(keys):
        raise WeightsError("original-layout checkpoint: two tensors map to the same diffusers name")
    return dict(conv)


def checkpoint_names(ckpt: LazyCheckpoint) -> tuple[str, dict[str, str]]:
    """(layout, {model name: stored name}) for a checkpoint."""
    keys = ckpt.keys()
    layout = detect_layout(keys)
    if layout == "original":
        return layout, original_to_diffusers_names(keys)
    return layout, {k: k for k in keys}


# ============================================================================ configs
def dit_config_from_diffusers(cfg: dict, **overrides) -> DiTConfig:
    """A diffusers `WanTransformer3DModel` config.json (dict) -> DiTConfig (+ our audio fields)."""
    cls = cfg.get("_class_name", "WanTransformer3DModel")
    if cls != "WanTransformer3DModel":
        raise WeightsError(f"config is a {cls}, not a WanTransformer3DModel (Wan2.1 T2V/I2V)")
    if cfg.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads":
        raise WeightsError(f"unsupported qk_norm={cfg['qk_norm']!r} (Wan2.1 uses rms_norm_across_heads)")
    if cfg.get("pos_embed_seq_len") is not None:
        raise WeightsError("pos_embed_seq_len is set (Wan FLF2V): first/last-frame models are not supported")
    heads = cfg.get("num_attention_heads", 40)
    head_dim = cfg.get("attention_head_dim", 128)
    image_dim = cfg.get("image_dim")
    added = cfg.get("added_kv_proj_dim")
    if (image_dim is None) != (added is None) or (added is not None and added != heads * head_dim):
        raise WeightsError(f"unsupported image branch: image_dim={image_dim}, added_kv_proj_dim={added} "
                           f"(expected both unset, or added_kv_proj_dim = inner dim {heads * head_dim})")
    in_ch = cfg.get("in_channels", 16)
    kw = dict(
        patch_size=tuple(cfg.get("patch_size", (1, 2, 2))), num_attention_heads=heads, attention_head_dim=head_dim,
        in_channels=in_ch, out_channels=cfg.get("out_channels") or in_ch, text_dim=cfg.get("text_dim", 4096),
        freq_dim=cfg.get("freq_dim", 256), ffn_dim=cfg.get("ffn_dim", 13824), num_layers=cfg.get("num_layers", 40),
        cross_attn_norm=cfg.get("cross_attn_norm", True), eps=cfg.get("eps", 1e-6), image_dim=image_dim,
        rope_max_seq_len=cfg.get("rope_max_seq_len", 1024),
    )
    return dataclasses.replace(DiTConfig(**kw), **overrides)


def dit_config_from_original(cfg: dict, **overrides) -> DiTConfig:
    """The original Wan2.1 release's config.json (`WanModel`: dim, num_heads, in_dim, model_type...)."""
    mt = cfg.get("model_type", "t2v")
    if mt not in ("t2v", "i2v"):
        raise WeightsError(f"Wan model_type {mt!r} is not supported (t2v or i2v)")
    dim, heads = cfg["dim"], cfg["num_heads"]
    if not cfg.get("qk_norm", True):
        raise WeightsError("qk_norm=false is not supported (Wan2.1 uses RMS-normed q/k)")
    kw = dict(
        patch_size=tuple(cfg.get("patch_size", (1, 2, 2))), num_attention_heads=heads, attention_head_dim=dim // heads,
        in_channels=cfg.get("in_dim", 16), out_channels=cfg.get("out_dim", 16), text_dim=cfg.get("text_dim", 4096),
        freq_dim=cfg.get("freq_dim", 256), ffn_dim=cfg.get("ffn_dim", 13824), num_layers=cfg.get("num_layers", 40),
        cross_attn_norm=cfg.get("cross_attn_norm", True), eps=cfg.get("eps", 1e-6),
        image_dim=1280 if mt == "i2v" else None,
    )
    return dataclasses.replace(DiTConfig(**kw), **overrides)


def dit_config_from_json(cfg: dict, **overrides) -> DiTConfig:
    """Any of: our config.json, diffusers' `WanTransformer3DModel` config, the original `WanModel` config."""
    if cfg.get("_format") == FORMAT:
        return dataclasses.replace(DiTConfig.from_dict(cfg), **overrides)
    if "num_heads" in cfg and "dim" in cfg:
        return dit_config_from_original(cfg, **overrides)
    return dit_config_from_diffusers(cfg, **overrides)


def dit_config_from_weights(shapes: dict[str, tuple], attention_head_dim: int = 128, **overrides) -> DiTConfig:
    """Infer the geometry from tensor shapes (diffusers names), for checkpoints shipped without a
    config. Heads are not visible in shapes: `attention_head_dim` (128 in every Wan2.1) decides."""
    try:
        dim, in_ch, *patch = shapes["patch_embedding.weight"]
        n_layers = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("blocks."))
        img = shapes.get("condition_embedder.image_embedder.norm1.weight")
        kw = dict(
            patch_size=tuple(patch), num_attention_heads=dim // attention_head_dim, attention_head_dim=attention_head_dim,
            in_channels=in_ch, out_channels=shapes["proj_out.weight"][0] // (patch[0] * patch[1] * patch[2]),
            text_dim=shapes["condition_embedder.text_embedder.linear_1.weight"][1],
            freq_dim=shapes["condition_embedder.time_embedder.linear_1.weight"][1],
            ffn_dim=shapes["blocks.0.ffn.net.0.proj.weight"][0], num_layers=n_layers,
            cross_attn_norm="blocks.0.norm2.weight" in shapes, image_dim=img[0] if img else None,
        )
    except (KeyError, ValueError) as e:
        raise WeightsError(f"cannot infer the model geometry from the weights (missing {e}); add a config.json") from None
    if dim % attention_head_dim:
        raise WeightsError(f"model dim {dim} is not a multiple of attention_head_dim={attention_head_dim}")
    return dataclasses.replace(DiTConfig(**kw), **overrides)


def _config_json_near(path: Path) -> Path | None:
    for d in ([path] if path.is_dir() else []) + [path.parent if path.is_file() else path / "transformer"]:
        if (d / "config.json").is_file():
            return d / "config.json"
    return None


def wan_config(path: str | os.PathLike, **overrides) -> DiTConfig:
    """DiTConfig for the checkpoint at `path`: from its config.json, else inferred from the shapes."""
    p = Path(path)
    cj = _config_json_near(p)
    if cj is not None:
        try:
            raw = json.loads(cj.read_text())
        except ValueError as e:
            raise WeightsError(f"{cj}: bad json ({e})") from None
        return dit_config_from_json(raw, **overrides)
    with LazyCheckpoint(p) as ck:
        _, names = checkpoint_names(ck)
        shapes = {m: ck.shape(s) for m, s in names.items()}
    return dit_config_from_weights(shapes, **overrides)


# ============================================================================ loading Wan
@dataclass
class LoadReport:
    path: str
    layout: str  # "original" | "diffusers"
    files: list[str]
    loaded: int = 0  # tensors loaded
    numel: int = 0  # parameters loaded
    missing_audio: list[str] = field(default_factory=list)  # audio keys left at their initialisation
    ignored: list[str] = field(default_factory=list)  # checkpoint keys no model uses (norm_added_q)

    def __str__(self):
        s = (f"{self.path}: {self.layout} layout, {len(self.files)} file(s), {self.loaded} tensors "
             f"({self.numel / 1e9:.3f} B parameters)")
        if self.missing_audio:
            s += f"; {len(self.missing_audio)} audio tensors not in the checkpoint (zero-initialised output)"
        if self.ignored:
            s += f"; ignored {len(self.ignored)} unused tensors"
        return s


def _few(keys, n=4) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def _plan(model: AudioDiT, ck: LazyCheckpoint, strict_base: bool) -> tuple[LoadReport, dict[str, str]]:
    """Match checkpoint names to the model's; check keys and shapes. Returns (report, {model: stored})."""
    layout, names = checkpoint_names(ck)
    report = LoadReport(str(ck.path), layout, [str(f) for f in ck.files])
    expected = model.state_dict(keep_vars=True)  # meta tensors are fine here
    report.ignored = sorted(m for m in names if m not in expected and IGNORED_KEY_RE.search(m))
    for m in report.ignored:
        names.pop(m)
    unexpected = [m for m in names if m not in expected]
    if unexpected:
        hint = ""
        if any(".add_k_proj." in k or "image_embedder" in k for k in unexpected) and not model.config.image_dim:
            hint = " (the checkpoint has an image branch: an I2V model; build the model with image_dim set)"
        raise WeightsError(f"{ck.path}: {len(unexpected)} unexpected tensors for this model: {_few(unexpected)}{hint}")
    missing = [k for k in expected if k not in names]
    missing_base = [k for k in missing if not is_audio_key(k)]
    if missing_base and strict_base:
        hint = ""
        if any("image_embedder" in k or ".add_k_proj." in k for k in missing_base) and all(
            "image_embedder" in k or "add_" in k or "norm_added" in k for k in missing_base
        ):
            hint = " (the checkpoint has no image branch: a T2V model; build the model with image_dim=None)"
        raise WeightsError(f"{ck.path}: {len(missing_base)} model tensors missing from the checkpoint: "
                           f"{_few(missing_base)}{hint}")
    report.missing_audio = sorted(k for k in missing if is_audio_key(k))
    for m, s in names.items():
        want, got = tuple(expected[m].shape), ck.shape(s)
        if want != got:
            where = m if m == s else f"{m} (stored as {s})"
            raise WeightsError(f"{ck.path}: shape mismatch for {where}: checkpoint {got} vs model {want}")
    return report, names


def load_wan_into(model: AudioDiT, path: str | os.PathLike, strict_base: bool = True) -> LoadReport:
    """Load Wan2.1 base weights (diffusers or original layout; our own checkpoints too) into `model`,
    tensor by tensor, cast to each parameter's dtype and device. Every base tensor must be in the
    checkpoint (unless `strict_base=False`); audio tensors may be missing (they keep their
    initialisation: zero output projection, so the model computes exactly what Wan computed);
    unexpected tensors and shape mismatches raise `WeightsError` naming the key."""
    params = model.state_dict(keep_vars=True)
    if any(t.is_meta for t in params.values()):
        raise WeightsError("model is on the meta device: use from_wan() to build and load in one go")
    with LazyCheckpoint(path) as ck:
        report, names = _plan(model, ck, strict_base)
        with torch.no_grad():
            for m, s in names.items():
                dst = params[m]
                dst.copy_(ck.get(s).to(dst.device))
                report.loaded += 1
                report.numel += dst.numel()
    return report


def _materialize(model: AudioDiT, device, dtype) -> list[str]:
    """Give meta parameters (audio layers absent from a checkpoint) real storage and AudioDiT's
    initialisation: default `reset_parameters`, zero audio output projections, zero positions."""
    done = []
    for mod_name, mod in model.named_modules():
        own = list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False))
        if not any(t.is_meta for _, t in own):
            continue
        if not all(t.is_meta for _, t in own):
            raise WeightsError(f"{mod_name}: partly loaded module (some tensors missing from the checkpoint)")
        if any(t.is_meta for t in mod.buffers(recurse=False)):
            raise WeightsError(f"{mod_name}: has buffers the checkpoint does not provide; cannot initialise them here")
        mod.to_empty(device=device, recurse=False)
        if mod_name.endswith("audio_attn.to_out.0") or not hasattr(mod, "reset_parameters"):
            with torch.no_grad():
                for pn, p in mod.named_parameters(recurse=False):
                    if not (mod_name.endswith("audio_attn.to_out.0") or pn == "pos_embed"):
                        raise WeightsError(f"don't know how to initialise {mod_name}.{pn}")
                    p.zero_()
        else:
            mod.reset_parameters()
        if dtype is not None:  # (to_empty replaced the tensors: look them up again)
            for t in list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False)):
                if t.is_floating_point():
                    t.data = t.data.to(dtype)
        done += [f"{mod_name}.{n}" for n, _ in own]
    return done


def from_wan(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
             config: DiTConfig | None = None, strict_base: bool = True, **overrides) -> tuple[AudioDiT, LoadReport]:
    """Build an AudioDiT from a Wan2.1 checkpoint (a diffusers `transformer/` folder or pipeline
    root, the original release folder, or a single file) without ever holding two copies of the
    weights: the model is created on the meta device and the loaded tensors become its parameters.

    `config`: the geometry (default: from the config.json next to the weights, diffusers' or the
    original release's, else inferred from shapes); `overrides`: DiTConfig fields such as
    `audio_dim`/`audio_window` (audio layers not in the checkpoint get their initialisation, with
    a zero output projection). `dtype=None` keeps the checkpoint's floating dtype."""
    cfg = config if config is not None else wan_config(path, **overrides)
    with torch.device("meta"):
        model = AudioDiT(cfg)
    with LazyCheckpoint(path, device=device) as ck:
        report, names = _plan(model, ck, strict_base)
        if dtype is None:
            fl = [ck.dtype(s) for s in names.values()]
            fl = [d for d in fl if d is not None and d.is_floating_point]
            dtype = max(set(fl), key=fl.count) if fl else torch.float32
        sd = {}
        for m, s in names.items():
            sd[m] = ck.get(s, dtype)
            report.loaded += 1
            report.numel += sd[m].numel()
        model.load_state_dict(sd, strict=False, assign=True)
        del sd
    _materialize(model, torch.device(device), dtype)
    return model, report


# ============================================================================ our format
def _parse_size(s: int | str) -> int:
    if isinstance(s, int):
        return s
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", s, re.I)
    if not m:
        raise ValueError(f"bad size {s!r}")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    return int(float(m.group(1)) * base ** "BKMGT".index(unit[0]))


def save_dit(model: AudioDiT, directory: str | os.PathLike, max_shard_size: int | str = DEFAULT_MAX_SHARD) -> Path:
    """Write `config.json` + `model.safetensors` (or shards + `model.safetensors.index.json` when the
    weights exceed `max_shard_size`, bytes or "5GB"). Each file is written atomically; shards of an
    earlier save that the new one does not use are removed. Returns the folder."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    limit = _parse_size(max_shard_size)
    sd = model.state_dict()
    shards: list[list[str]] = [[]]
    size = 0
    for k, t in sd.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += n
    meta = {"format": "pt", "talkingmachines": FORMAT}
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, keys in zip(names, shards):
        part = {k: sd[k].detach().to("cpu").contiguous() for k in keys}
        atomic_write(d / name, lambda p, part=part: save_file(part, str(p), metadata=meta))
        del part
    index = d / "model.safetensors.index.json"
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in sd.values())
        wm = {k: name for name, keys in zip(names, shards) for k in keys}
        atomic_write(index, lambda p: p.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": wm},
                                                               indent=1)))
    elif index.exists():
        index.unlink()
    for old in d.glob("model*.safetensors"):
        if old.name not in names:
            old.unlink()
    cfg = {"_format": FORMAT, "_version": FORMAT_VERSION, **model.config.to_dict()}
    atomic_write(d / "config.json", lambda p: p.write_text(json.dumps(cfg, indent=2)))
    return d


def read_dit_config(directory: str | os.PathLike) -> DiTConfig:
    cj = Path(directory) / "config.json"
    if not cj.is_file():
        raise WeightsError(f"{directory}: no config.json (not a saved AudioDiT)")
    raw = json.loads(cj.read_text())
    if raw.get("_format") != FORMAT:
        raise WeightsError(f"{cj}: not a talkingmachines DiT config (a Wan checkpoint? use from_wan)")
    if raw.get("_version", 1) > FORMAT_VERSION:
        raise WeightsError(f"{cj}: format version {raw['_version']} is newer than this code ({FORMAT_VERSION})")
    return DiTConfig.from_dict(raw)


def load_dit(directory: str | os.PathLike, device: str | torch.device = "cpu",
             dtype: torch.dtype | None = None) -> AudioDiT:
    """Load a folder written by `save_dit`: every tensor must be present (audio included)."""
    cfg = read_dit_config(directory)
    with torch.device("meta"):
        model = AudioDiT(cfg)
    with LazyCheckpoint(directory, device=device) as ck:
        _, names = _plan(model, ck, strict_base=True)
        missing = [k for k in model.state_dict() if k not in names]
        if missing:
            raise WeightsError(f"{directory}: {len(missing)} tensors missing: {_few(missing)}")
        sd = {m: ck.get(s, dtype) for m, s in names.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    return model


def load_pretrained(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                    **overrides) -> AudioDiT:
    """Our format when `path` holds our config.json, otherwise a Wan2.1 checkpoint (`from_wan`)."""
    p = Path(path)
    cj = p / "config.json"
    if p.is_dir() and cj.is_file() and json.loads(cj.read_text()).get("_format") == FORMAT:
        if overrides:
            raise WeightsError("config overrides only apply to Wan checkpoints")
        return load_dit(p, device, dtype)
    return from_wan(p, device=device, dtype=dtype, **overrides)[0]


# ============================================================================ parameter counts
def _category(name: str) -> str:
    if is_audio_key(name):
        return "audio.cross_attn" if ".audio_attn." in name else "audio.norm_embed"
    if name.startswith("condition_embedder.image_embedder.") or re.search(r"\.attn2\.(add_[kv]_proj|norm_added_k)\.", name):
        return "trunk.image_cross_attn_kv"
    if ".attn1." in name or ".norm1." in name:
        return "trunk.self_attn"
    if ".attn2." in name or ".norm2." in name:
        return "trunk.text_cross_attn"
    if ".ffn." in name:
        return "trunk.ffn"
    return "trunk.modulation_embed_head"


def parameter_breakdown(cfg: DiTConfig) -> dict:
    """Parameter counts by part, on the meta device (nothing allocated).

    trunk.*: the Wan2.1 model (self-attention, text cross-attention, the I2V image branch: CLIP
    embedder + per-block image K/V, FFN, adaLN modulation + patch/time/text embedders + head);
    audio.*: what TalkingMachines adds. `t2v_trunk` is the same geometry as Wan's text-to-video
    model (no image branch, 16 input channels): the paper's "18B" is `t2v_trunk + audio_total`
    (Wan2.1-14B's ~14B plus ~4.2B of audio cross-attention); with the I2V image branch the actual
    model here is `total`."""
    with torch.device("meta"):
        m = AudioDiT(cfg)
        t2v = AudioDiT(dataclasses.replace(cfg, image_dim=None, in_channels=cfg.out_channels, audio_dim=None))
    cats = ["trunk.self_attn", "trunk.text_cross_attn", "trunk.image_cross_attn_kv", "trunk.ffn",
            "trunk.modulation_embed_head", "audio.cross_attn", "audio.norm_embed"]
    out = dict.fromkeys(cats, 0)
    for n, p in m.named_parameters():
        out[_category(n)] += p.numel()
    trunk = sum(v for k, v in out.items() if k.startswith("trunk."))
    audio = out["audio.cross_attn"] + out["audio.norm_embed"]
    t2v_n = sum(p.numel() for p in t2v.parameters())
    t2v_blocks = sum(p.numel() for n, p in t2v.named_parameters() if n.startswith("blocks."))
    out.update({
        "trunk_total": trunk,
        "audio_total": audio,
        "total": trunk + audio,
        "t2v_trunk": t2v_n,
        "t2v_trunk.blocks_only": t2v_blocks,
        "t2v_trunk_plus_audio": t2v_n + audio,
    })
    return out


def grow_depth(model: AudioDiT, small: AudioDiT) -> AudioDiT:
    """Load ``small`` into ``model``, a DiT of the same config but more blocks: small's blocks
    become the first ones, and every new block starts as the identity (the output projections
    of its self-attention, cross-attention, audio attention and FFN are zero, so each residual
    branch adds nothing). The grown model computes exactly what ``small`` did, and training
    continues from there with the extra capacity (a deeper tiny teacher without starting over)."""
    a, b = dataclasses.asdict(small.config), dataclasses.asdict(model.config)
    n_small, n = a.pop("num_layers"), b.pop("num_layers")
    if a != b:
        diff = sorted(k for k in a if a[k] != b.get(k))
        raise WeightsError(f"cannot grow: the configs differ in {', '.join(diff)} (only num_layers may)")
    if n_small > n:
        raise WeightsError(f"cannot grow {n_small} blocks into {n}")
    missing, unexpected = model.load_state_dict(small.state_dict(), strict=False)
    new = {f"blocks.{i}." for i in range(n_small, n)}
    stray = [k for k in missing if not any(k.startswith(p) for p in new)]
    if stray or unexpected:
        raise WeightsError(f"cannot grow: keys {(stray + list(unexpected))[:3]} do not match")
    with torch.no_grad():
        for blk in model.blocks[n_small:]:
            ffn_out = [m for m in blk.ffn.net if isinstance(m, torch.nn.Linear)][-1]
            outs = [blk.attn1.to_out[0], blk.attn2.to_out[0], ffn_out]
            if blk.has_audio:
                outs.append(blk.audio_attn.to_out[0])
            for lin in outs:
                lin.weight.zero_()
                lin.bias.zero_()
    return model


def grow_width(model: AudioDiT, small: AudioDiT, seed: int = 0) -> AudioDiT:
    """Load ``small`` into ``model``, a DiT of the same config but twice the attention heads (same head
    size, so the same RoPE) and twice the FFN width: twice the features per token, computing exactly
    what ``small`` did (Net2Net's function-preserving widening, made exact for LayerNorm). Every doubled
    activation holds its small counterpart twice, ``[a, a]``: a layer norm over ``[a, a]`` equals the
    small one's twice over, and so do the q/k RMS norms across heads, and the doubled heads attend alike.
    So each weight that writes a doubled activation has its rows repeated, and each linear layer that
    reads one has its columns split in two parts, ``alpha`` and ``1 - alpha`` of the small column
    (``alpha`` drawn per column from U(0.25, 0.75) with ``seed``): the two copies then get different
    gradients, and training tells them apart. Biases, norm weights and modulation tables are repeated."""
    a, b = dataclasses.asdict(small.config), dataclasses.asdict(model.config)
    doubled = {"num_attention_heads", "ffn_dim"} | ({"audio_proj_dim"} if a.get("audio_proj_dim") else set())
    diff = sorted(k for k in a if (b[k] != 2 * a[k] if k in doubled else a[k] != b[k]))
    if diff:
        raise WeightsError(f"cannot widen: the wide DiT must have twice the heads and FFN width and "
                           f"the rest the same (it differs in {', '.join(diff)})")
    if small.config.image_dim:
        raise WeightsError("cannot widen a DiT with the I2V image branch (no tiny model has one)")
    kinds = {n: type(m) for n, m in small.named_modules()}
    gen = torch.Generator().manual_seed(seed)
    target = model.state_dict()
    out = {}
    for name, w in small.state_dict().items():
        want, kind = target[name].shape, kinds.get(name.rsplit(".", 1)[0])
        if kind in (torch.nn.Linear, torch.nn.Conv3d):
            if name.startswith("condition_embedder.time_proj."):  # its output is 6 modulation vectors of D
                w = torch.cat([w.unflatten(0, (6, -1))] * 2, 1).flatten(0, 1)
            elif w.shape[0] * 2 == want[0]:
                w = torch.cat([w, w], 0)  # a doubled output: the rows twice
            if kind is torch.nn.Linear and w.ndim == 2 and w.shape[1] * 2 == want[1]:
                alpha = torch.rand(w.shape[1], generator=gen) * 0.5 + 0.25  # a doubled input: columns split
                w = torch.cat([w * alpha, w * (1 - alpha)], 1)
        elif w.shape[-1] * 2 == want[-1]:
            w = torch.cat([w, w], -1)  # norm weights, scale_shift_table, pos_embed: over the model width
        if w.shape != want:
            raise WeightsError(f"cannot widen {name}: {tuple(w.shape)} does not become {tuple(want)}")
        out[name] = w
    model.load_state_dict(out)
    return model
