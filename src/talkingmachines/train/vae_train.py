"""Training of the `tiny` preset's video VAE (`TinyVAE`), by the training stages' own `Trainer`.

`train_tiny_vae(videos, out_dir, ...)` trains on uint8 clips ``[T, H, W, 3]`` with
``T = 1 + 4k``: L1 + a small MSE + an edge (spatial gradient) L1 that keeps mouths and eyes
sharp + a tiny KL, and optionally (``temporal_weight``) an L1 on the frame-to-frame change, so
the 4 frames decoded from one latent do not wobble where the video is still. With
``feature_weight`` > 0 and clips that come as ``{"video", "features"}`` (a uint8 [H, W] mask of
the eyes and mouth, `synth.features_mask_from_face`), the pixel, MSE and edge terms count
those pixels ``1 + feature_weight`` times: they are about a quarter of the frame and what a face
landmark model reads. AdamW, warmup then cosine decay, gradient clipping, in fp32.

``init_from`` + ``freeze_encoder`` fine-tune only the decoder of a trained VAE: the encoder,
its latent statistics and so every latent a DiT was trained on stay exactly as they were, so
the new decoder drops into an existing model folder. With ``latent_noise`` > 0 the decoder
learns to forgive small latent errors: each clip's latents get Gaussian noise of a std drawn
uniformly from [0, ``latent_noise``] (in the DiT's normalised units) and it must still give the
clean clip. A generator's latents are never exactly on the encoder's manifold, and a decoder
that has only seen clean latents turns those errors into streaks over the face.
With ``dec_widths`` / ``dec_res_blocks`` the decoder is a fresh, larger one (the encoder and its
statistics stay ``init_from``'s), for a sharper decoder under a DiT that is already trained.
With ``adv_weight`` > 0 the decoder also trains against a patch discriminator (`discriminator.py`):
steps alternate between the discriminator (hinge loss, real frames against decoded ones) and the
decoder, whose adversarial term VQGAN's adaptive weight balances against the reconstruction's.
With ``decoder_ref`` the decoder also sees a reference latent, clean, as a stream's decoder sees the
portrait's (`TinyVAEConfig.decoder_ref`): the clip's ``"ref"`` frame when it comes as a dict with one (the
recipe gives the DiT stages' reference, a listening frame outside the crop, so the decoder cannot learn to
copy the mouth from it), else its first frame; ``latent_blur`` smudges the latents it decodes, so that it
learns to take what does not move from the reference.

Reproducible and resumable as every stage (`trainer.Trainer`): an indexable data set is read
in the `rng.GlobalOrder` of ``(seed, step)`` (a plain iterable is consumed in order, and
fast-forwarded on resume), the flip and posterior noise of step ``s`` come from
`rng.sample_generator`; checkpoints ``out_dir/checkpoints/step_XXXXXXXX/`` are the stages'
(``model.vae.safetensors``, ``optim.vae.*``, ``state.json``, ``manifest.json``) plus the
TinyVAE's ``config.json``, written and verified by `checkpoint`. Checkpoints of the VAE trainer
before it used `Trainer` (``model.safetensors`` + ``optimizer.safetensors``) are refused with
one line.

When training ends, the per-channel latent mean/std over a few batches are stored in the
config (so `encode_video` gives ~unit-variance latents), and the model is saved to ``out_dir``
(``load_vae("tiny", out_dir)``) with ``losses.json``, ``DONE.json`` and the loss curves ``loss.png``.
"""

from __future__ import annotations

import json
import os
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError
from ..fileio import atomic_write_text
from ..model.vae import TinyVAE, TinyVAEConfig, video_to_tensor
from .config import CheckpointConfig, EMAConfig, OptimConfig, TrainConfig
from .discriminator import PatchDiscriminator, adaptive_weight, frames_of, hinge_d_loss
from .rng import GlobalOrder, sample_generator
from .trainer import Trainer

__all__ = ["train_tiny_vae", "VAETrainer", "VAEOptions", "VAETrainResult", "vae_loss"]

SALT_VAE = 21
STATS_STEP = 10**9  # the latent statistics read "steps" far past training: other clips' order


@dataclass
class VAETrainResult:
    vae: TinyVAE
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) for every step run
    start_step: int = 0
    step: int = 0
    out_dir: Path | None = None


@dataclass
class VAEOptions:
    """What the VAE stage adds to `TrainConfig`: its model, loss weights and fine-tuning."""

    config: TinyVAEConfig | None = None  # None: the resumed checkpoint's, else TinyVAEConfig()
    mse_weight: float = 0.25
    edge_weight: float = 0.5
    kl_weight: float = 1e-4
    temporal_weight: float = 0.0
    init_from: str | None = None  # a trained TinyVAE folder
    freeze_encoder: bool = False  # train the decoder only (needs init_from)
    latent_noise: float = 0.0  # decoder-only: max std of the noise added to the normalised latents
    # decoder-only: a fresh decoder of these widths / res blocks in place of init_from's (None: keep it)
    dec_widths: tuple[int, ...] | None = None
    dec_res_blocks: int | None = None
    feature_weight: float = 0.0  # extra weight of the eyes' and mouth's pixels (clips with a "features" mask)
    # decoder-only: a patch discriminator's hinge loss, scaled by VQGAN's adaptive weight times this
    # (0: none); steps then alternate, discriminator (even) and decoder (odd)
    adv_weight: float = 0.0
    adv_start: int = 0  # decoder updates before the adversarial term counts (the discriminator trains throughout)
    disc_lr: float = 2e-4
    # decoder-only: the decoder also sees a reference latent, clean, as a stream's decoder sees the portrait's
    # (`TinyVAEConfig.decoder_ref`; a decoder without it is grown to it, starting as itself): the clip's "ref"
    # frame, else its first frame
    decoder_ref: bool = False
    # decoder-only: per clip, the latents blended this far at most (uniform in [0, latent_blur]) toward a
    # 3x3 spatial average of themselves: the smudge of a DiT that cannot tell where a feature sits, which
    # a reference decoder can undo from the reference and a plain one cannot
    latent_blur: float = 0.0
    flip: bool = True  # random horizontal flips
    stat_batches: int = 4  # batches for the latent statistics
    resume: bool = True


# ----------------------------------------------------------------------------- loss


def _edges(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[..., 1:, :] - x[..., :-1, :], x[..., :, 1:] - x[..., :, :-1]


def vae_loss(rec: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor,
             mse_weight: float = 0.25, edge_weight: float = 0.5, kl_weight: float = 1e-4,
             temporal_weight: float = 0.0, weight: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """rec, x [B, 3, T, H, W]. ``temporal``: L1 between the reconstruction's and the clip's
    frame-to-frame differences (0 when T = 1). ``weight`` [B, 1, 1, H, W] (or None: all 1)
    weights each pixel in the L1, MSE and edge terms."""
    w = torch.ones_like(x[:, :1, :1]) if weight is None else weight.to(x)
    l1 = ((rec - x).abs() * w).mean()
    mse = ((rec - x).pow(2) * w).mean()
    ry, rx = _edges(rec)
    xy, xx = _edges(x)
    wy, wx = torch.maximum(w[..., 1:, :], w[..., :-1, :]), torch.maximum(w[..., :, 1:], w[..., :, :-1])
    edge = 0.5 * (((ry - xy).abs() * wy).mean() + ((rx - xx).abs() * wx).mean())
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


def _to_batch(clips: list, device: torch.device, flip: torch.Tensor | None,
              feature_weight: float = 0.0, refs: bool = False):
    """The clips as [B, 3, T, H, W] in [-1, 1], with ``feature_weight`` > 0 the per-pixel loss
    weight [B, 1, 1, H, W] (1 + feature_weight on a clip's "features" mask; 1 where it has none),
    and with ``refs`` each clip's reference frame [B, 3, 1, H, W] (its "ref", else its first
    frame), all flipped alike: (x, w, ref), w and ref None when not asked for."""
    arrs = [_clip_array(c) for c in clips]
    t = min(a.shape[0] for a in arrs)
    t = 1 + 4 * ((t - 1) // 4)
    x = video_to_tensor(torch.stack([a[:t] for a in arrs]), device)
    w = None
    if feature_weight > 0:
        H, W = x.shape[-2:]
        masks = [c.get("features") if isinstance(c, dict) else None for c in clips]
        w = torch.stack([torch.zeros(H, W) if m is None else torch.as_tensor(np.asarray(m), dtype=torch.float32)
                         for m in masks]).to(device)
        w = (1.0 + feature_weight * w).view(len(clips), 1, 1, H, W)
    ref = None
    if refs:  # a clip without its own reference frame is decoded beside its first frame
        frames = [c.get("ref") if isinstance(c, dict) else None for c in clips]
        ref = torch.stack([a[0] if f is None else torch.as_tensor(np.asarray(f)) for f, a in zip(frames, arrs)])
        ref = video_to_tensor(ref[:, None], device)
    if flip is not None and bool(flip.any()):
        f = flip.to(device).view(-1, 1, 1, 1, 1)
        x = torch.where(f, x.flip(-1), x)
        if w is not None:
            w = torch.where(f, w.flip(-1), w)
        if ref is not None:
            ref = torch.where(f, ref.flip(-1), ref)
    return x, w, ref


# ----------------------------------------------------------------------------- the stage


class VAETrainer(Trainer):
    """One trainable group, ``vae``, without EMA; the product is the model folder ``OUT``."""

    stage = "vae"

    def __init__(self, cfg: TrainConfig, videos: Iterable | Any, opts: VAEOptions):
        super().__init__(cfg)
        if opts.freeze_encoder and opts.init_from is None:
            raise InputError("freeze_encoder needs init_from (a trained VAE folder)")
        if opts.latent_noise < 0 or (opts.latent_noise > 0 and not opts.freeze_encoder):
            raise InputError("latent_noise must be >= 0 and needs freeze_encoder (a decoder-only fine-tune)")
        for name in ("decoder_ref", "latent_blur"):
            if getattr(opts, name) and not opts.freeze_encoder:
                raise InputError(f"{name} needs freeze_encoder (a decoder-only fine-tune)")
        if not 0 <= opts.latent_blur <= 1:
            raise InputError(f"latent_blur must be in [0, 1], got {opts.latent_blur!r}")
        if opts.adv_weight < 0 or (opts.adv_weight > 0 and not opts.freeze_encoder):
            raise InputError("adv_weight must be >= 0 and needs freeze_encoder (a decoder-only fine-tune)")
        if (opts.dec_widths is not None or opts.dec_res_blocks is not None) and not (opts.freeze_encoder and opts.init_from):
            raise InputError("dec_widths / dec_res_blocks need init_from and freeze_encoder (a new decoder for a trained encoder)")
        self.videos, self.opts = videos, opts
        self.final = self.out  # a loadable TinyVAE folder: load_vae("tiny", OUT)
        self._it = None

    def find_checkpoint(self) -> Path | None:
        return super().find_checkpoint() if self.opts.resume else None

    def make_data(self) -> None:
        self.indexable = _is_indexable(self.videos)
        if self.indexable:
            self.order = GlobalOrder(len(self.videos), self.cfg.batch_size, self.cfg.seed)

    def build(self) -> None:
        opts, ck = self.opts, self.resume_from
        if ck is not None and not (ck / "model.vae.safetensors").is_file() and (ck / "model.safetensors").is_file():
            raise InputError(f"{ck}: a checkpoint of the older VAE trainer (model.safetensors, optimizer.safetensors), "
                             "which this version does not resume; move the checkpoints folder away to train again")
        config = opts.config
        if config is None and ck is not None:
            config = TinyVAEConfig.from_dict(json.loads((ck / "config.json").read_text()))
        if opts.init_from is not None:
            model = TinyVAE.from_pretrained(opts.init_from, device=self.device)
            try:
                widths = model.config.dec_widths if opts.dec_widths is None else tuple(opts.dec_widths)
                blocks = model.config.dec_res_blocks if opts.dec_res_blocks is None else opts.dec_res_blocks
                if (widths, blocks) != (model.config.dec_widths, model.config.dec_res_blocks):
                    model = model.with_new_decoder(widths, blocks, seed=self.cfg.seed)
            except (TypeError, ValueError) as e:  # widths that do not fit the VAE's spatial factor, a bad count
                raise InputError(f"the new decoder (dec_widths, dec_res_blocks): {e}") from None
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.cfg.seed)  # the initial weights depend on the seed only
                model = TinyVAE(config or TinyVAEConfig()).to(self.device)
        if opts.decoder_ref and not model.config.decoder_ref:
            model = model.with_ref_decoder()
        if opts.freeze_encoder:
            model.encoder.requires_grad_(False)
        self.vae = model
        self.add_group("vae", model, self.cfg.optim.lr, ema=False)
        if opts.adv_weight > 0:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.cfg.seed + 1)
                disc = PatchDiscriminator().to(self.device)
            self.add_group("disc", disc, opts.disc_lr, ema=False)

    def expected_updates(self, g) -> int:
        if self.opts.adv_weight <= 0:
            return self.cfg.steps
        return self.cfg.steps // 2 if g.name == "vae" else self.cfg.steps - self.cfg.steps // 2

    def is_decoder_step(self, step: int) -> bool:
        return self.opts.adv_weight <= 0 or step % 2 == 1

    def clips(self, step: int) -> list:
        """The clips of ``step``: from the global order, or the iterable's next ones."""
        if self.indexable:
            return [self.videos[i] for i, _ in self.order.global_batch(step)]
        if self._it is None:  # consumed in order: skip what the steps before a resume read
            self._it = iter(self.videos)
            for _ in range(self.step * self.cfg.batch_size):
                self._next()
        return [self._next() for _ in range(self.cfg.batch_size)]

    def _next(self) -> Any:
        try:
            return next(self._it)
        except StopIteration:
            self._it = iter(self.videos)
            try:
                return next(self._it)
            except StopIteration:
                raise InputError("empty video iterable") from None

    def batch(self, step: int):
        g = sample_generator(self.cfg.seed, step, 0, SALT_VAE)
        clips = self.clips(step)
        flip = torch.rand(len(clips), generator=g) < 0.5 if self.opts.flip else None
        x, w, ref = _to_batch(clips, self.device, flip, self.opts.feature_weight, self.vae.config.decoder_ref)
        return x, w, g, ref

    def autocast(self):
        return nullcontext()  # fp32: a VAE's fine detail is what bf16 rounds away

    def _reconstruct(self, x, g, ref_frames=None):
        """(reconstruction, raw latent mean, logvar) of a batch, as the decoder sees it in training
        (a reference decoder beside ``ref_frames``' latents, else beside the first frame's)."""
        model, o = self.vae, self.opts
        if o.freeze_encoder:  # the decoder learns to decode what `encode_video` gives: the mean
            with torch.no_grad():
                model.encoder.eval()
                mean, logvar = model.encode_moments(x)
                z = mean
                if o.latent_blur > 0:  # per clip, toward the 3x3 average of each latent frame
                    b, c, t, h, w = mean.shape
                    avg = F.avg_pool2d(frames_of(mean), 3, 1, 1, count_include_pad=False)
                    avg = avg.view(b, t, c, h, w).permute(0, 2, 1, 3, 4)
                    a = torch.rand(b, 1, 1, 1, 1, generator=g).to(mean) * o.latent_blur
                    z = z + a * (avg - z)
                if o.latent_noise > 0:  # per clip, a noise level in [0, latent_noise] of the latents' std
                    level = torch.rand(mean.shape[0], 1, 1, 1, 1, generator=g) * o.latent_noise
                    eps = torch.randn(mean.shape, generator=g)
                    z = z + (level * eps).to(mean) * model.latents_std
                ref = None
                if model.config.decoder_ref:  # clean, as a stream's portrait latent
                    ref = mean[:, :, :1] if ref_frames is None else model.encode_moments(ref_frames)[0]
            return model.decode_raw(z, ref=ref), mean, logvar
        mean, logvar = model.encode_moments(x)
        eps = torch.randn(mean.shape, generator=g).to(device=x.device, dtype=mean.dtype)
        return model.decode_raw(mean + eps * torch.exp(0.5 * logvar)), mean, logvar

    def loss(self, batch, step: int):
        x, w, g, ref = batch
        o = self.opts
        if not self.is_decoder_step(step):  # the discriminator: real frames against decoded ones
            with torch.no_grad():
                rec = self._reconstruct(x, g, ref)[0].clamp(-1, 1)
            disc = self.groups["disc"].handle
            loss = hinge_d_loss(disc(frames_of(x)), disc(frames_of(rec)))
            return "disc", loss, {"d_loss": loss.item()}
        rec, mean, logvar = self._reconstruct(x, g, ref)
        loss, parts = vae_loss(rec, x, mean, logvar, o.mse_weight, o.edge_weight, o.kl_weight, o.temporal_weight, w)
        if o.adv_weight > 0:
            adv = -self.groups["disc"].handle(frames_of(rec)).mean()
            on = self.groups["vae"].updates >= o.adv_start
            lam = adaptive_weight(loss, adv, self.vae.decoder.conv_out.weight) if on else loss.new_zeros(())
            parts.update(adv=adv.item(), adv_lambda=float(lam))
            loss = loss + o.adv_weight * lam * adv
        return "vae", loss, parts

    def save_extra(self, folder: Path) -> None:
        (folder / "config.json").write_text(json.dumps(self.vae.config.to_dict()))

    def state_json(self) -> dict:
        opts = {k: v for k, v in asdict(self.opts).items() if k != "config"}
        return {**super().state_json(), "vae": opts}

    @torch.no_grad()
    def latent_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean/std of the encoder's raw latent means over a few batches."""
        model = self.vae
        c = model.latent_channels
        s1 = torch.zeros(c, dtype=torch.float64)
        s2 = torch.zeros(c, dtype=torch.float64)
        n = 0
        for i in range(self.opts.stat_batches):
            mean, _ = model.encode_moments(_to_batch(self.clips(STATS_STEP + i), self.device, None)[0])
            m = mean.double().transpose(0, 1).reshape(c, -1).cpu()
            s1 += m.sum(1)
            s2 += (m * m).sum(1)
            n += m.shape[1]
        mu = s1 / n
        std = (s2 / n - mu * mu).clamp_min(1e-12).sqrt().clamp_min(1e-4)
        return mu.float(), std.float()

    def export(self, final: Path) -> None:
        self.vae.eval()
        if not self.opts.freeze_encoder:  # a frozen encoder keeps its statistics: the latents stay the same
            self.vae.set_latent_stats(*self.latent_stats())
        self.vae.save_pretrained(final)
        atomic_write_text(final / "losses.json",
                          json.dumps([[h["step"], h["loss"]] for h in self.history if h.get("group", "vae") == "vae"]))


def train_tiny_vae(
    videos: Iterable | Any,
    out_dir: str | os.PathLike,
    steps: int = 20_000,
    batch_size: int = 8,
    lr: float = 1e-3,
    resume: bool = True,
    log_every: int = 50,
    device: str | torch.device = "auto",
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
    latent_noise: float = 0.0,
    feature_weight: float = 0.0,
    adv_weight: float = 0.0,
    adv_start: int = 0,
    decoder_ref: bool = False,
    latent_blur: float = 0.0,
    dec_widths: tuple[int, ...] | None = None,
    dec_res_blocks: int | None = None,
    grad_clip: float = 1.0,
    flip: bool = True,
    stat_batches: int = 4,
    progress: bool = True,
) -> VAETrainResult:
    """Train a TinyVAE on uint8 clips ``[T, H, W, 3]`` (``T = 1 + 4k``, H and W divisible by 8).

    ``videos``: an indexable data set (``len`` + ``[i]``; read in the global order of
    ``(seed, step)``) or any iterable (consumed in order, restarted when exhausted). With
    ``resume=True`` training continues from the newest intact checkpoint in
    ``out_dir/checkpoints``; a finished run only exports again. The final model (with latent
    statistics) is saved to ``out_dir``.
    """
    cfg = TrainConfig(stage="vae", out=str(out_dir), steps=steps, batch_size=batch_size, log_every=log_every,
                      seed=seed, device=str(device), progress=progress,
                      optim=OptimConfig(lr=lr, lr_schedule="cosine", weight_decay=weight_decay, betas=(0.9, 0.99),
                                        warmup=min(200, steps // 10) if warmup is None else warmup,
                                        grad_clip=grad_clip),
                      ema=EMAConfig(decay=0.0), checkpoint=CheckpointConfig(every=ckpt_every, keep=keep_checkpoints))
    opts = VAEOptions(config=config, mse_weight=mse_weight, edge_weight=edge_weight, kl_weight=kl_weight,
                      temporal_weight=temporal_weight, init_from=None if init_from is None else str(init_from),
                      freeze_encoder=freeze_encoder, latent_noise=latent_noise, feature_weight=feature_weight,
                      adv_weight=adv_weight, adv_start=adv_start, decoder_ref=decoder_ref, latent_blur=latent_blur,
                      dec_widths=dec_widths, dec_res_blocks=dec_res_blocks,
                      flip=flip, stat_batches=stat_batches, resume=resume)
    tr = VAETrainer(cfg, videos, opts)
    try:
        tr.run()
    finally:
        tr.cleanup()
    run = [(h["step"], h["loss"]) for h in tr.history if h["step"] > tr.start_step and h.get("group", "vae") == "vae"]
    return VAETrainResult(vae=tr.vae, losses=run, start_step=tr.start_step, step=tr.step, out_dir=tr.out)
