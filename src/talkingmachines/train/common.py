"""What every training stage shares: config, torch.distributed, checkpoints, data order, the loop.

The loop (`Trainer.run`) reads top to bottom, as in torchtitan::

    setup()                      # distributed, device, preset, data, models, optimizers
    resume()                     # the last checkpoint in OUT/checkpoints, if any
    for step in range(start, steps):
        batch = batch(step)      # deterministic in (seed, step): same order after a resume
        group, loss, logs = loss(batch, step)     # the stage's forward (which optimiser)
        loss.backward(); clip; optimiser.step(); EMA update; log (tqdm)
        every ckpt_every steps: save()
    save(); finish()             # final checkpoint, exported weights, loss curves (PNG)

Stages subclass `Trainer` and implement `build()` (models and optimisers, via `add_group` and
`add_frozen`) and `loss()`; `export()` writes their product into ``OUT/final``.

**Determinism.** Nothing draws from a global RNG: the clip order is a permutation per epoch
from ``(seed, epoch)``, each sample's noise/timestep/dropout comes from
`sample_generator(seed, step, j)` where ``j`` is the sample's index in the *global* batch,
so a resumed run, and a run on any number of processes, computes the same thing.

**Distributed.** Launched by torchrun (``WORLD_SIZE > 1``) the process group is gloo on CPU,
nccl on CUDA; trainable and frozen DiTs are sharded with FSDP2 (`fully_shard` per block and on the root, see
`parallelize`; extra entry points such as ``forward_causal`` are registered with
`register_fsdp_forward_method`) or replicated with DDP (``dist_mode="ddp"``, through a
dispatcher so any method goes through DDP's hooks). Each rank takes ``batch_size / world``
consecutive samples of the global batch; gradients are averaged, so the update equals the
single-process one on the same global batch.

**Checkpoints** (``OUT/checkpoints/step_XXXXXXXX/``): per group ``model.NAME.safetensors``,
``ema.NAME.safetensors``, ``optim.NAME.safetensors`` (+ ``optim.NAME.json`` for the
non-tensor part), and ``state.json`` (step, seed, data position, RNG, metric history,
config), and ``manifest.json`` (the sha256 and size of every other file). Written into a temp
folder on rank 0, synced, then renamed into place (`os.replace`); ``checkpoints/latest`` names
the newest one and is itself replaced atomically. A ``kill -9`` at any moment leaves the
previous checkpoint intact. Resume verifies the manifest (`intact_checkpoint`): a damaged
checkpoint (truncated, flipped bytes, a file missing) is named in a warning and the newest
intact one is used; with none intact it refuses with one line. The VAE trainer
(`vae_train`) writes and verifies its checkpoints with the same functions.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from ..config import Preset, get_preset
from ..errors import InputError
from ..fileio import atomic_save_safetensors, atomic_write, atomic_write_text

CKPT_DIR = "checkpoints"
LATEST = "latest"
MANIFEST = "manifest.json"
FINAL = "final"


# ============================================================================ config
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


# ============================================================================ distributed
@dataclass
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    mode: str = "none"  # none | fsdp | ddp
    mesh: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def mean(self, x: float | torch.Tensor) -> float:
        """Average a scalar over ranks."""
        if not self.distributed:
            return float(x)
        t = torch.tensor([float(x)], dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        torch.distributed.all_reduce(t)
        return float(t.item()) / self.world


def init_distributed(device: str = "auto", dist_mode: str = "auto") -> DistEnv:
    """Join the process group when launched by torchrun (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {device}: CUDA is not available")
        if dev.index is None:
            dev = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    env = DistEnv(rank, world, local, dev, "none")
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        env.rank, env.world = dist.get_rank(), dist.get_world_size()
        mode = dist_mode
        if mode == "auto":
            mode = "fsdp" if _fully_shard() is not None else "ddp"
        if mode not in ("fsdp", "ddp"):
            raise InputError(f"dist_mode must be auto, fsdp or ddp, got {dist_mode!r}")
        env.mode = mode
        if mode == "fsdp" and _fully_shard() is not None:
            from torch.distributed.device_mesh import init_device_mesh

            env.mesh = init_device_mesh(dev.type, (env.world,))
    return env


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # pragma: no cover - older torch
        return None
    return fully_shard


FORWARD_METHODS = ("forward_causal", "encode_context", "prefill_sink", "forward_chunk")


class _Dispatch(nn.Module):
    """Lets DDP wrap any method: ``ddp("forward_causal", ...)`` goes through DDP's hooks."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, method: str, *args, **kwargs):
        return getattr(self.model, method)(*args, **kwargs)


class Handle:
    """A model as the stages call it: ``h("forward_causal", ...)`` / ``h(...)`` (forward),
    whatever the parallel wrapping. ``module`` is the model (sharded in place under FSDP2)."""

    def __init__(self, module: nn.Module, ddp: nn.Module | None = None):
        self.module = module
        self.ddp = ddp

    def __call__(self, *args, **kwargs):
        return self.call("forward", *args, **kwargs)

    def call(self, method: str, *args, **kwargs):
        if self.ddp is not None:
            return self.ddp(method, *args, **kwargs)
        fn = self.module if method == "forward" else getattr(self.module, method)
        return fn(*args, **kwargs)


def parallelize(model: nn.Module, env: DistEnv, trainable: bool) -> Handle:
    """Shard (FSDP2) or replicate (DDP) a DiT for ``env``."""
    model.to(env.device)
    if not env.distributed:
        return Handle(model)
    if env.mode == "fsdp":
        from torch.distributed.fsdp import register_fsdp_forward_method

        fully_shard = _fully_shard()
        # One FSDP unit per block (only one block's parameters are gathered at a time), and
        # one for the rest. The blocks' cross-attention K/V are computed outside their forward
        # (`AudioDiT.encode_context`), through `cross_kv`, registered to gather like a forward.
        for blk in getattr(model, "blocks", []):
            fully_shard(blk, mesh=env.mesh)
            if hasattr(blk, "cross_kv"):
                register_fsdp_forward_method(blk, "cross_kv")
        fully_shard(model, mesh=env.mesh)
        for m in FORWARD_METHODS:
            if hasattr(model, m):
                register_fsdp_forward_method(model, m)
        return Handle(model)
    if not trainable:
        return Handle(model)
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [env.device.index] if env.device.type == "cuda" else None
    return Handle(model, DDP(_Dispatch(model), device_ids=ids, broadcast_buffers=False))


# ============================================================================ determinism
_MIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix-style), stable across processes and runs."""
    h = 0
    for i, p in enumerate(parts):
        h = (h ^ ((int(p) + 1) * _MIX[i % 3])) & 0xFFFFFFFFFFFFFFFF
        h = ((h ^ (h >> 31)) * _MIX[(i + 1) % 3]) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


def sample_generator(seed: int, step: int, j: int, salt: int = 0) -> torch.Generator:
    """The RNG of sample ``j`` of the global batch of ``step`` (CPU generator)."""
    return torch.Generator().manual_seed(mix_seed(seed, step, j, salt))


def randn(shape, gen: torch.Generator, device) -> torch.Tensor:
    return torch.randn(shape, generator=gen).to(device)


class GlobalOrder:
    """Which clips make up the global batch of each step: epoch ``e`` is a permutation from
    ``(seed, e)``; position ``p = step * batch + j`` is clip ``perm_{p // N}[p % N]``."""

    def __init__(self, n: int, batch_size: int, seed: int):
        if n < 1:
            raise InputError("the data set is empty")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._perm: dict[int, np.ndarray] = {}

    def perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm:
            if len(self._perm) > 4:
                self._perm.clear()
            self._perm[epoch] = np.random.default_rng([self.seed, epoch, 3]).permutation(self.n)
        return self._perm[epoch]

    def global_batch(self, step: int) -> list[tuple[int, int]]:
        """[(clip index, epoch)] for the whole global batch of ``step``."""
        out = []
        for j in range(self.batch_size):
            p = step * self.batch_size + j
            e = p // self.n
            out.append((int(self.perm(e)[p % self.n]), e))
        return out

    def position(self, step: int) -> dict:
        p = step * self.batch_size
        return {"epoch": p // self.n, "offset": p % self.n, "samples_seen": p}


def local_slice(batch_size: int, env: DistEnv) -> range:
    if batch_size % env.world:
        raise InputError(f"batch_size {batch_size} is not divisible by the world size {env.world}")
    k = batch_size // env.world
    return range(env.rank * k, (env.rank + 1) * k)


# ============================================================================ EMA
class EMA:
    """Exponential moving average of a model's parameters (kept in fp32, sharded like them).
    The effective decay warms up as ``min(decay, (1 + n) / (10 + n))``."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = float(decay)
        self.shadow = {k: p.detach().float().clone() for k, p in model.named_parameters()}
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, p in model.named_parameters():
            self.shadow[k].lerp_(p.detach().float(), 1.0 - d)
        self.updates += 1

    def full_state(self) -> dict[str, torch.Tensor]:
        out = {}
        for k, v in self.shadow.items():
            out[k] = (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu()
        return out

    def load_full(self, sd: dict[str, torch.Tensor]) -> None:
        for k, v in self.shadow.items():
            src = sd[k]
            if hasattr(v, "device_mesh"):
                from torch.distributed.tensor import distribute_tensor

                src = distribute_tensor(src.to(v.device), v.device_mesh, v.placements)
                v.copy_(src)
            else:
                v.copy_(src.to(v.device))

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for k, p in model.named_parameters():
            p.copy_(self.shadow[k].to(p.dtype))


# ============================================================================ checkpoint I/O
def _opts(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kw)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict on CPU (a collective under FSDP: every rank must call it; only
    rank 0 gets the tensors)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_opts(full_state_dict=True, cpu_offload=True))


def load_full_model_state(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, sd, options=_opts(full_state_dict=True))


def optimizer_to_flat(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    sd = get_optimizer_state_dict(model, opt, options=_opts(full_state_dict=True, cpu_offload=True))
    tensors, scalars = {}, {}
    for name, st in sd.get("state", {}).items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{name}::{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(name, {})[k] = v
    groups = []
    for g in sd.get("param_groups", []):
        g = dict(g)
        g["betas"] = list(g["betas"]) if "betas" in g else None
        groups.append(g)
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_flat(model: nn.Module, opt: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    state: dict[str, dict] = {}
    for key, v in tensors.items():
        name, k = key.rsplit("::", 1)
        state.setdefault(name, {})[k] = v
    for name, st in meta.get("scalars", {}).items():
        state.setdefault(name, {}).update(st)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if g.get("betas") is not None:
            g["betas"] = tuple(g["betas"])
        else:
            g.pop("betas", None)
        groups.append(g)
    set_optimizer_state_dict(model, opt, {"state": state, "param_groups": groups}, options=_opts(full_state_dict=True))


def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    """The newest checkpoint folder (``latest``, else the highest step), intact or not: use
    `intact_checkpoint` to resume from one."""
    root = Path(out) / CKPT_DIR
    lf = root / LATEST
    if lf.is_file():
        p = root / lf.read_text().strip()
        if (p / "state.json").is_file():
            return p
    cands = sorted(p for p in root.glob("step_*") if (p / "state.json").is_file()) if root.is_dir() else []
    return cands[-1] if cands else None


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_checkpoint(root: Path, name: str, write: Callable[[Path], object], keep: int) -> Path:
    """Build checkpoint ``root/name`` atomically: ``write(tmp_folder)`` fills a temp folder, a
    manifest of every file's sha256 is added, the files are synced, the folder is renamed into
    place and ``latest`` points at it; then all but the newest ``keep`` checkpoints go."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp_{name}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    write(tmp)
    files = {}
    for f in sorted(tmp.iterdir()):
        with open(f, "rb") as fh:  # on disk before the rename, or a power cut could leave it short
            os.fsync(fh.fileno())
        files[f.name] = {"sha256": _sha256(f), "bytes": f.stat().st_size}
    (tmp / MANIFEST).write_text(json.dumps({"version": 1, "files": files}, indent=1))
    path = root / name
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    atomic_write_text(root / LATEST, name)
    olds = sorted(p for p in root.glob("step_*") if p != path)
    for old in olds[: max(0, len(olds) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp_*"):
        shutil.rmtree(stale, ignore_errors=True)
    return path


def checkpoint_problem(ck: Path) -> str | None:
    """What is wrong with checkpoint folder ``ck`` (naming the file), or None when every file
    matches its manifest. A checkpoint from before manifests is checked as far as it can be:
    its JSON parses and its safetensors headers match their sizes."""
    ck = Path(ck)
    man = ck / MANIFEST
    if not man.is_file():
        if not (ck / "state.json").is_file():
            return f"{ck / 'state.json'}: missing"
        return _legacy_problem(ck)
    try:
        files = json.loads(man.read_text())["files"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        return f"{man}: unreadable ({e})"
    for name, want in files.items():
        f = ck / name
        if not f.is_file():
            return f"{f}: missing"
        size = f.stat().st_size
        if size != want.get("bytes"):
            return f"{f}: {size} bytes, the manifest says {want.get('bytes')} (truncated or replaced)"
        if _sha256(f) != want.get("sha256"):
            return f"{f}: checksum mismatch (damaged data)"
    return None


def _legacy_problem(ck: Path) -> str | None:
    from safetensors import safe_open

    for f in sorted(ck.iterdir()):
        try:
            if f.suffix == ".json":
                json.loads(f.read_text())
            elif f.suffix == ".safetensors":
                with safe_open(str(f), "pt") as h:
                    h.keys()
        except Exception as e:
            return f"{f}: unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    return None


def intact_checkpoint(out: str | os.PathLike, is_main: bool = True) -> Path | None:
    """The newest checkpoint in ``out/checkpoints`` that passes `checkpoint_problem`, or None if
    there is none. Each damaged newer one gets a warning naming the file (on stderr, from the
    main rank); when checkpoints exist but none is intact this raises a one-line InputError."""
    root = Path(out) / CKPT_DIR
    if not root.is_dir():
        return None
    cands = sorted((p for p in root.glob("step_*") if p.is_dir()), reverse=True)
    problems = []
    for ck in cands:
        why = checkpoint_problem(ck)
        if why is None:
            if problems and is_main:
                print(f"warning: resuming from {ck.name}: the newer checkpoint is damaged ({problems[-1]})",
                      file=sys.stderr, flush=True)
            return ck
        problems.append(why)
        if is_main:
            print(f"warning: checkpoint {ck.name} is damaged: {why}", file=sys.stderr, flush=True)
    if problems:
        raise InputError(f"no intact checkpoint in {root} to resume from: {'; '.join(problems)} "
                         "(move the folder away to start over)")
    return None


def final_done(out: str | os.PathLike) -> bool:
    """True once a stage has finished and exported (``OUT/final/DONE.json``)."""
    return (Path(out) / FINAL / "DONE.json").is_file()


def _rng_state() -> dict:
    return {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
            "numpy": np.random.get_state()[1][:4].tolist()}


# ============================================================================ plots
def plot_history(history: list[dict], path: Path, title: str) -> None:
    """One panel per metric (log scale when positive); raw and running mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = []
    for h in history:
        for k, v in h.items():
            if k not in ("step", "group", "lr", "time") and isinstance(v, (int, float)) and k not in keys:
                keys.append(k)
    keys = keys[:9]
    if not keys:
        return
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), dpi=100, squeeze=False)
    for ax, k in zip(axes.flat, keys):
        pts = [(h["step"], h[k]) for h in history if k in h and math.isfinite(h[k])]
        if not pts:
            continue
        s = np.array([p[0] for p in pts])
        v = np.array([p[1] for p in pts])
        ax.plot(s, v, lw=0.6, alpha=0.4)
        w = max(1, len(v) // 40)
        if w > 1:
            ax.plot(s[w - 1:], np.convolve(v, np.ones(w) / w, mode="valid"), lw=1.5)
        if (v > 0).all():
            ax.set_yscale("log")
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)


# ============================================================================ the trainer
@dataclass
class Group:
    """A trainable model with its optimiser, EMA and learning rate."""

    name: str
    handle: Handle
    opt: torch.optim.Optimizer
    lr: float
    ema: EMA | None = None
    updates: int = 0

    @property
    def module(self) -> nn.Module:
        return self.handle.module


class Trainer:
    """The loop. Subclasses: ``build()``, ``loss(batch, step) -> (group, loss, logs)``,
    ``export(final_dir)``; optionally ``make_data()``/``batch(step)``."""

    stage = "train"

    def __init__(self, cfg: TrainConfig):
        if not cfg.out:
            raise InputError("no output folder (--out)")
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.groups: dict[str, Group] = {}
        self.frozen: dict[str, Handle] = {}
        self.history: list[dict] = []
        self.step = 0
        self.capture_grads = False  # tests: keep full gradients of the last backward
        self.captured: dict[str, dict[str, torch.Tensor]] = {}
        self.stop_after: int | None = None  # tests: stop (as if killed) after this step
        self._t0 = time.time()
        self.wall_before = 0.0  # training seconds of earlier (resumed) runs
        self.saved_step: int | None = None  # the step of the last checkpoint written or resumed from
        self.resumed_from: Path | None = None

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        self.env = init_distributed(cfg.device, cfg.dist_mode)
        self.device = self.env.device
        self.preset = cfg.make_preset()
        if self.env.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.env.barrier()
        self.make_data()
        self.build()
        if not self.groups:
            raise RuntimeError(f"{type(self).__name__}.build() added no trainable group")

    def make_data(self) -> None:  # pragma: no cover - stages override
        raise NotImplementedError

    def build(self) -> None:  # pragma: no cover
        raise NotImplementedError

    def loss(self, batch, step: int):  # pragma: no cover
        raise NotImplementedError

    def export(self, final: Path) -> None:  # pragma: no cover
        raise NotImplementedError

    def autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def add_group(self, name: str, model: nn.Module, lr: float, ema: bool = True) -> Group:
        cfg = self.cfg
        if cfg.grad_checkpointing and hasattr(model, "gradient_checkpointing"):
            model.gradient_checkpointing = True
        model.train()
        h = parallelize(model, self.env, trainable=True)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, betas=tuple(cfg.betas),
                                weight_decay=cfg.weight_decay)
        g = Group(name, h, opt, lr, EMA(model, cfg.ema_decay) if ema and cfg.ema_decay > 0 else None)
        self.groups[name] = g
        return g

    def add_frozen(self, name: str, model: nn.Module) -> Handle:
        model.eval().requires_grad_(False)
        h = parallelize(model, self.env, trainable=False)
        self.frozen[name] = h
        return h

    def local_indices(self) -> range:
        return local_slice(self.cfg.batch_size, self.env)

    # ------------------------------------------------------------------ checkpoints
    def state_json(self) -> dict:
        return {"stage": self.stage, "step": self.step, "seed": self.cfg.seed, "world_size": self.env.world,
                "data_position": self.data_position(self.step), "rng": _rng_state(),
                "group_updates": {k: g.updates for k, g in self.groups.items()},
                "ema_updates": {k: g.ema.updates for k, g in self.groups.items() if g.ema},
                "wall_seconds": self.wall_before + (time.time() - self._t0), "time": time.time(),
                "config": self.cfg.to_dict(), "history": self.history}

    def data_position(self, step: int) -> dict:
        order = getattr(self, "order", None)
        return order.position(step) if order is not None else {"step": step}

    def save(self) -> Path | None:
        """Write a checkpoint of the current step (every rank must call: gathers under FSDP)."""
        files: dict[str, tuple[dict, dict | None]] = {}
        metas: dict[str, dict] = {}
        for name, g in self.groups.items():
            files[f"model.{name}.safetensors"] = (full_model_state(g.module), None)
            t, meta = optimizer_to_flat(g.module, g.opt)
            files[f"optim.{name}.safetensors"] = (t, None)
            metas[f"optim.{name}.json"] = meta
            if g.ema is not None:
                files[f"ema.{name}.safetensors"] = (g.ema.full_state(), None)
        path = None
        if self.env.is_main:
            def write(tmp: Path) -> None:
                for fn, (tensors, md) in files.items():
                    atomic_save_safetensors(tensors, tmp / fn, md)
                for fn, meta in metas.items():
                    (tmp / fn).write_text(json.dumps(meta))
                (tmp / "state.json").write_text(json.dumps(self.state_json()))

            path = write_checkpoint(self.out / CKPT_DIR, f"step_{self.step:08d}", write, self.cfg.keep_checkpoints)
        self.saved_step = self.step
        self.env.barrier()
        return path

    def resume(self) -> bool:
        ck = intact_checkpoint(self.out, self.env.is_main)
        if ck is None:
            return False
        self.resumed_from = ck
        from safetensors.torch import load_file

        state = json.loads((ck / "state.json").read_text())
        if state.get("seed") != self.cfg.seed:
            raise InputError(f"{ck}: trained with seed {state.get('seed')}, not {self.cfg.seed}")
        for name, g in self.groups.items():
            load_full_model_state(g.module, load_file(str(ck / f"model.{name}.safetensors")))
            optimizer_from_flat(g.module, g.opt, load_file(str(ck / f"optim.{name}.safetensors")),
                                json.loads((ck / f"optim.{name}.json").read_text()))
            if g.ema is not None and (ck / f"ema.{name}.safetensors").is_file():
                g.ema.load_full(load_file(str(ck / f"ema.{name}.safetensors")))
                g.ema.updates = int(state.get("ema_updates", {}).get(name, 0))
            g.updates = int(state.get("group_updates", {}).get(name, 0))
        self.step = int(state["step"])
        self.history = list(state.get("history", []))
        self.wall_before = float(state.get("wall_seconds", 0.0))
        self._t0 = time.time()
        self.saved_step = self.step
        return True

    # ------------------------------------------------------------------ the loop
    def lr_at(self, g: Group) -> float:
        cfg = self.cfg
        n = g.updates
        if cfg.warmup > 0 and n < cfg.warmup:
            return g.lr * (n + 1) / cfg.warmup
        if cfg.lr_schedule == "cosine":
            total = max(1, self.expected_updates(g) - cfg.warmup)
            p = min(1.0, (n - cfg.warmup) / total)
            return g.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))
        return g.lr

    def expected_updates(self, g: Group) -> int:
        return self.cfg.steps

    def train_step(self, step: int) -> dict:
        """One optimiser update: batch, forward, backward, clip, step, EMA."""
        batch = self.batch(step)
        with self.autocast():
            name, loss, logs = self.loss(batch, step)
        g = self.groups[name]
        g.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.capture_grads:
            self.captured[name] = {k: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad)
                                   .detach().clone().cpu() for k, p in g.module.named_parameters()
                                   if p.grad is not None}
        params = [p for p in g.module.parameters() if p.grad is not None]
        gn = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip if self.cfg.grad_clip else float("inf"))
        gn = float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn)
        lr = self.lr_at(g)
        for pg in g.opt.param_groups:
            pg["lr"] = lr
        g.opt.step()
        g.updates += 1
        if g.ema is not None:
            g.ema.update(g.module)
        lv = self.env.mean(loss.detach())
        if not math.isfinite(lv):
            raise FloatingPointError(f"{self.stage}: non-finite loss at step {step} ({name})")
        out = {"step": step + 1, "group": name, "loss": lv, "grad_norm": gn, "lr": lr}
        out.update({k: self.env.mean(v) for k, v in logs.items()})
        return out

    def batch(self, step: int):  # pragma: no cover
        raise NotImplementedError

    def run(self) -> Path:
        """setup -> resume -> steps -> final checkpoint -> export. Returns OUT/final."""
        cfg = self.cfg
        self.setup()
        resumed = self.resume()
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=min(self.step, cfg.steps), desc=self.stage, dynamic_ncols=True,
                   disable=not (cfg.progress and self.env.is_main))
        if resumed and self.env.is_main:
            bar.write(f"{self.stage}: resumed at step {self.step} from {self.resumed_from}")
        try:
            while self.step < cfg.steps:
                logs = self.train_step(self.step)
                self.step += 1
                logs["time"] = round(self.wall_before + time.time() - self._t0, 3)
                self.history.append(logs)
                bar.update(1)
                if cfg.log_every and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
                    bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items()
                                     if k in ("loss", "grad_norm") or k.endswith("_loss")}, refresh=False)
                if cfg.ckpt_every and self.step % cfg.ckpt_every == 0 and self.step < cfg.steps:
                    self.save()
                    self.plot()
                if self.stop_after is not None and self.step >= self.stop_after:
                    raise _Stop()
        except _Stop:
            bar.close()
            return self.out
        bar.close()
        if self.saved_step != self.step:
            self.save()
        self.plot()
        final = self.out / FINAL
        if self.env.is_main:
            final.mkdir(parents=True, exist_ok=True)
        self.export(final)
        if self.env.is_main:
            done = {"stage": self.stage, "steps": self.step, "wall_seconds": self.wall_before + time.time() - self._t0,
                    "last": self.history[-1] if self.history else None, "config": cfg.to_dict()}
            atomic_write_text(final / "DONE.json", json.dumps(done, indent=1))
        self.env.barrier()
        return final

    def plot(self) -> None:
        if self.env.is_main and self.history:
            try:
                plot_history(self.history, self.out / "loss.png", f"{self.stage} ({self.preset.name})")
            except Exception as e:  # a plot must never kill training
                print(f"warning: loss plot failed: {e}")

    def full_weights(self, name: str, ema: bool = True) -> dict[str, torch.Tensor]:
        """Full weights of a group (EMA if kept and ``ema``); a collective under FSDP."""
        g = self.groups[name]
        if ema and g.ema is not None:
            return g.ema.full_state()
        return full_model_state(g.module)

    def cleanup(self) -> None:
        if self.env.distributed and torch.distributed.is_initialized():
            # DDP's reducer and FSDP's state talk to the process group when they are freed:
            # free them on every rank (after a barrier) before the group goes, or a rank can hang
            import gc

            torch.distributed.barrier()
            self.groups.clear()
            self.frozen.clear()
            gc.collect()
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


class _Stop(Exception):
    pass
