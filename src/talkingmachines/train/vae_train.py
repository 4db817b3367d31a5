"""Training of the `tiny` preset's video VAE (`TinyVAE`).

`train_tiny_vae(videos, out_dir, ...)` trains on uint8 clips ``[T, H, W, 3]`` with
``T = 1 + 4k``: L1 + a small MSE + an edge (spatial gradient) L1 that keeps mouths and eyes
sharp + a tiny KL, and optionally (``temporal_weight``) an L1 on the frame-to-frame change, so
the 4 frames decoded from one latent do not wobble where the video is still. AdamW, warmup
then cosine decay, gradient clipping.

``init_from`` + ``freeze_encoder`` fine-tune only the decoder of a trained VAE: the encoder,
its latent statistics and so every latent a DiT was trained on stay exactly as they were, so
the new decoder drops into an existing model folder.

Reproducible and resumable:
* the batch of step ``s`` depends only on ``(seed, s)`` (random indices into an indexable data
  set, a flip, the posterior noise), so a run killed and resumed equals an uninterrupted one;
  a plain iterable is consumed in order (and fast-forwarded on resume);
* checkpoints ``out_dir/checkpoints/step_XXXXXXXX/`` hold ``model.safetensors`` +
  ``config.json`` (a loadable TinyVAE folder), ``optimizer.safetensors`` and ``state.json``
  (step, loss history) and ``manifest.json`` (every file's sha256), written and verified by the
  training stages' own functions (`common.write_checkpoint`, `common.intact_checkpoint`): a
  hidden temp folder renamed into place, ``checkpoints/latest`` replaced atomically, and a
  damaged latest checkpoint skipped with a warning for the newest intact one. Nothing is pickled.

When training ends, the per-channel latent mean/std over a few batches are stored in the
config (so `encode_video` gives ~unit-variance latents), the model is saved to ``out_dir``
(``load_vae("tiny", out_dir)``) with ``losses.json`` and a loss curve ``loss.png``.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from ..fileio import atomic_save_safetensors, atomic_write
from ..model.vae import TinyVAE, TinyVAEConfig, video_to_tensor
from .common import CKPT_DIR, intact_checkpoint, latest_checkpoint, write_checkpoint

__all__ = ["train_tiny_vae", "VAETrainResult", "vae_loss", "latest_checkpoint", "load_checkpoint"]

_SEED_MUL = 1_000_003


@dataclass
class VAETrainResult:
    vae: TinyVAE
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) for every step run
    start_step: int = 0
    step: int = 0
    out_dir: Path | None = None


# ----------------------------------------------------------------------------- loss


def _edges(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[..., 1:, :] - x[..., :-1, :], x[..., :, 1:] - x[..., :, :-1]


def vae_loss(rec: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor,
             mse_weight: float = 0.25, edge_weight: float = 0.5, kl_weight: float = 1e-4,
             temporal_weight: float = 0.0) -> tuple[torch.Tensor, dict]:
    """rec, x [B, 3, T, H, W]. ``temporal``: L1 between the reconstruction's and the clip's
    frame-to-frame differences (0 when T = 1)."""
    l1 = (rec - x).abs().mean()
    mse = F.mse_loss(rec, x)
    ry, rx = _edges(rec)
    xy, xx = _edges(x)
    edge = 0.5 * ((ry - xy).abs().mean() + (rx - xx).abs().mean())
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
    if x.shape[2] > 1:
        temporal = ((rec[:, :, 1:] - rec[:, :, :-1]) - (x[:, :, 1:] - x[:, :, :-1])).abs().mean()
    else:
        temporal = rec.new_zeros(())
    total = l1 + mse_weight * mse + edge_weight * edge + kl_weight * kl + temporal_weight * temporal
    return total, {"l1": l1.item(), "mse": mse.item(), "edge": edge.item(), "kl": kl.item(),
                   "temporal": temporal.item()}


# ----------------------------------------------------------------------------- data


def _is_indexable(videos: Any) -> bool:
    return hasattr(videos, "__getitem__") and hasattr(videos, "__len__")


def _gen(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((int(seed) * _SEED_MUL + int(step)) % (2**63 - 1))


class _Batches:
    """Batch of step s: indexable data -> indices drawn from (seed, s); iterable -> in order."""

    def __init__(self, videos: Any, batch_size: int, seed: int, start_step: int) -> None:
        self.videos = videos
        self.batch_size = batch_size
        self.seed = seed
        self.indexable = _is_indexable(videos)
        if self.indexable and len(videos) == 0:
            raise ValueError("empty video data set")
        if not self.indexable:
            self.it = iter(videos)
            for _ in range(start_step * batch_size):  # fast-forward a plain iterable
                self._next()

    def _next(self) -> Any:
        try:
            return next(self.it)
        except StopIteration:
            self.it = iter(self.videos)
            try:
                return next(self.it)
            except StopIteration:
                raise ValueError("empty video iterable") from None

    def get(self, step: int) -> list:
        if self.indexable:
            idx = torch.randint(len(self.videos), (self.batch_size,), generator=_gen(self.seed, step))
            return [self.videos[int(i)] for i in idx]
        return [self._next() for _ in range(self.batch_size)]


def _clip_array(c: Any) -> torch.Tensor:
    if isinstance(c, dict):  # tolerate data sets that yield dicts
        c = c.get("video", c.get("frames"))
    if isinstance(c, (tuple, list)):
        c = c[0]
    if isinstance(c, np.ndarray):
        c = torch.from_numpy(np.ascontiguousarray(c))
    if not isinstance(c, torch.Tensor) or c.dtype != torch.uint8 or c.ndim != 4 or c.shape[-1] != 3:
        raise ValueError("each clip must be uint8 [T, H, W, 3]")
    return c


def _to_batch(clips: list, device: torch.device, flip: torch.Tensor | None) -> torch.Tensor:
    arrs = [_clip_array(c) for c in clips]
    t = min(a.shape[0] for a in arrs)
    t = 1 + 4 * ((t - 1) // 4)
    x = video_to_tensor(torch.stack([a[:t] for a in arrs]), device)
    if flip is not None and bool(flip.any()):
        f = flip.to(device).view(-1, 1, 1, 1, 1)
        x = torch.where(f, x.flip(-1), x)
    return x


# ----------------------------------------------------------------------------- checkpoints


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{pid}.{k}"] = v.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(pid), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    for pid, st in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(st)
    return {"state": state, "param_groups": meta["param_groups"]}


def _save_checkpoint(out_dir: Path, model: TinyVAE, opt: torch.optim.Optimizer, state: dict, keep: int) -> Path:
    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tensors, meta = _flatten_optimizer(opt)
        atomic_save_safetensors(tensors, tmp / "optimizer.safetensors")
        (tmp / "optimizer.json").write_text(json.dumps(meta))
        (tmp / "state.json").write_text(json.dumps(state))

    return write_checkpoint(out_dir / CKPT_DIR, f"step_{state['step']:08d}", write, keep)


def load_checkpoint(ckpt: str | os.PathLike, model: TinyVAE | None = None,
                    opt: torch.optim.Optimizer | None = None) -> tuple[TinyVAE, dict]:
    """Load a checkpoint folder into ``model`` (or a new TinyVAE) and ``opt``; returns (model, state)."""
    from safetensors.torch import load_file

    ckpt = Path(ckpt)
    if model is None:
        model = TinyVAE.from_pretrained(ckpt)
    else:
        dev = model.device
        model.load_state_dict({k: v.to(dev) for k, v in load_file(str(ckpt / "model.safetensors")).items()})
        cfg = json.loads((ckpt / "config.json").read_text())
        model.set_latent_stats(cfg["latents_mean"], cfg["latents_std"])
    if opt is not None:
        tensors = load_file(str(ckpt / "optimizer.safetensors"))
        meta = json.loads((ckpt / "optimizer.json").read_text())
        opt.load_state_dict(_unflatten_optimizer(tensors, meta))
    return model, json.loads((ckpt / "state.json").read_text())


# ----------------------------------------------------------------------------- training


def _lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    if steps <= warmup:
        return lr
    p = min(1.0, (step - warmup) / max(1, steps - warmup))
    return lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * p)))


@torch.no_grad()
def compute_latent_stats(model: TinyVAE, batches: _Batches, n_batches: int, seed: int,
                         device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean/std of the encoder's raw latent means over a few batches."""
    c = model.latent_channels
    s1 = torch.zeros(c, dtype=torch.float64)
    s2 = torch.zeros(c, dtype=torch.float64)
    n = 0
    for i in range(n_batches):
        x = _to_batch(batches.get(10**9 + i), device, None)
        mean, _ = model.encode_moments(x)
        m = mean.double().transpose(0, 1).reshape(c, -1).cpu()
        s1 += m.sum(1)
        s2 += (m * m).sum(1)
        n += m.shape[1]
    mu = s1 / n
    std = (s2 / n - mu * mu).clamp_min(1e-12).sqrt().clamp_min(1e-4)
    return mu.float(), std.float()


def _plot_losses(losses: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not losses:
        return
    steps = np.array([s for s, _ in losses])
    vals = np.array([v for _, v in losses])
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, vals, lw=0.6, alpha=0.4, label="loss")
    k = max(1, len(vals) // 50)
    if k > 1:
        sm = np.convolve(vals, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], sm, lw=1.5, label=f"mean of {k}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("TinyVAE training")
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)


def train_tiny_vae(
    videos: Iterable | Any,
    out_dir: str | os.PathLike,
    steps: int = 20_000,
    batch_size: int = 8,
    lr: float = 1e-3,
    resume: bool = True,
    log_every: int = 50,
    device: str | torch.device = "cpu",
    *,
    config: TinyVAEConfig | None = None,
    seed: int = 0,
    ckpt_every: int = 500,
    keep_checkpoints: int = 2,
    warmup: int | None = None,
    weight_decay: float = 1e-4,
    mse_weight: float = 0.25,
    edge_weight: float = 0.5,
    kl_weight: float = 1e-4,
    temporal_weight: float = 0.0,
    init_from: str | os.PathLike | None = None,
    freeze_encoder: bool = False,
    grad_clip: float = 1.0,
    flip: bool = True,
    stat_batches: int = 4,
    progress: bool = True,
) -> VAETrainResult:
    """Train a TinyVAE on uint8 clips ``[T, H, W, 3]`` (``T = 1 + 4k``, H and W divisible by 8).

    ``videos``: an indexable data set (``len`` + ``[i]``; sampled by ``(seed, step)``) or any
    iterable (consumed in order, restarted when exhausted). With ``resume=True`` training
    continues from ``out_dir/checkpoints/latest``; a finished run returns at once. The final
    model (with latent statistics) is saved to ``out_dir``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    ckpt = intact_checkpoint(out) if resume else None
    if config is None and ckpt is not None:
        config = TinyVAEConfig.from_dict(json.loads((ckpt / "config.json").read_text()))
    if freeze_encoder and init_from is None:
        raise ValueError("freeze_encoder needs init_from (a trained VAE folder)")
    if init_from is not None:
        model = TinyVAE.from_pretrained(init_from, device=device)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the initial weights depend on the seed only
            model = TinyVAE(config or TinyVAEConfig()).to(device)
    if freeze_encoder:
        model.encoder.requires_grad_(False)
    if warmup is None:
        warmup = min(200, steps // 10)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.99),
                            weight_decay=weight_decay)

    start, history = 0, []
    if ckpt is not None:
        _, state = load_checkpoint(ckpt, model, opt)
        if state.get("seed", seed) != seed:
            raise ValueError(f"checkpoint {ckpt} was trained with seed {state.get('seed')}, not {seed}")
        start = int(state["step"])
        history = [tuple(x) for x in state.get("losses", [])]

    batches = _Batches(videos, batch_size, seed, start)
    run_losses: list[tuple[int, float]] = []

    def state_dict(step: int) -> dict:
        return {"step": step, "seed": seed, "losses": history, "time": time.time(),
                "batch_size": batch_size, "lr": lr, "steps": steps}

    from tqdm.auto import tqdm

    bar = tqdm(total=steps, initial=min(start, steps), disable=not progress, desc="tiny-vae", dynamic_ncols=True)
    model.train()
    step = start
    try:
        while step < steps:
            g = _gen(seed, step)
            clips = batches.get(step)
            fl = torch.rand(len(clips), generator=g) < 0.5 if flip else None
            x = _to_batch(clips, device, fl)
            for pg in opt.param_groups:
                pg["lr"] = _lr_at(step, steps, lr, warmup)
            eps = None
            if freeze_encoder:  # the decoder learns to decode what `encode_video` gives: the mean
                with torch.no_grad():
                    model.encoder.eval()
                    mean, logvar = model.encode_moments(x)
                rec = model.decode_raw(mean)
            else:
                mean, logvar = model.encode_moments(x)
                eps = torch.randn(mean.shape, generator=g).to(device=device, dtype=mean.dtype)
                rec = model.decode_raw(mean + eps * torch.exp(0.5 * logvar))
            loss, parts = vae_loss(rec, x, mean, logvar, mse_weight, edge_weight, kl_weight, temporal_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            opt.step()
            step += 1
            lv = float(loss.item())
            if not math.isfinite(lv):
                raise FloatingPointError(f"non-finite VAE loss at step {step}")
            history.append((step, lv))
            run_losses.append((step, lv))
            bar.update(1)
            if log_every and (step % log_every == 0 or step == steps):
                bar.set_postfix(loss=f"{lv:.4f}", l1=f"{parts['l1']:.4f}", edge=f"{parts['edge']:.4f}")
            if ckpt_every and step % ckpt_every == 0 and step < steps:
                _save_checkpoint(out, model, opt, state_dict(step), keep_checkpoints)
    finally:
        bar.close()

    model.eval()
    if run_losses or not (out / "model.safetensors").is_file():
        if not freeze_encoder:  # a frozen encoder keeps its statistics: the latents stay the same
            mu, std = compute_latent_stats(model, batches, stat_batches, seed, device)
            model.set_latent_stats(mu, std)
        _save_checkpoint(out, model, opt, state_dict(step), keep_checkpoints)
        model.save_pretrained(out)
        atomic_write(out / "losses.json", lambda p: Path(p).write_text(json.dumps(history)))
        _plot_losses(history, out / "loss.png")
    return VAETrainResult(vae=model, losses=run_losses, start_step=start, step=step, out_dir=out)
