"""Distribution Matching Distillation (DMD, Yin et al. 2024; DMD2, 2024; as used by CausVid and
TalkingMachines) on generic tensors and callables.

The student (generator) produces clean samples ``x0_gen``. To move its distribution towards
the data distribution, DMD re-noises them at a random level ``s`` and compares two denoisers:

* the *real score*: the frozen teacher's x0 prediction (with CFG if wanted, hidden inside
  the callable), which points towards the data distribution;
* the *fake score*: a trainable denoiser that keeps tracking the generator's current
  distribution with the ordinary flow-matching loss on the generator's (detached) samples.

The generator's gradient is ``(fake_x0 - real_x0) / normaliser`` with the per-sample
normaliser ``mean |x0_gen - real_x0|`` (DMD's weighting), applied through the surrogate
``0.5 * mse(x0_gen, (x0_gen - grad).detach())``. With the default ``reduction="mean"`` (as in
the DMD / CausVid code) its gradient w.r.t. ``x0_gen`` is ``grad / x0_gen.numel()``;
``reduction="sum"`` gives exactly ``grad``.

Callable conventions (see :mod:`talkingmachines.diffusion.flow`):

* x0 models ``x0_fn(x_s, s) -> x0`` take the sigma ``s`` (shape ``[B]``);
* velocity models ``v_fn(x_s, t) -> v`` take the network timestep ``t = 1000 s``;
* a sigma sampler ``sigma_sampler(batch, device, generator) -> s`` returns ``[B]`` sigmas
  (see :func:`make_sigma_sampler`).

Wrap a velocity network into an x0 model with :func:`talkingmachines.diffusion.flow.x0_fn_from_v`.
The alternation of fake-score and generator updates is the training stage's
(`train.student.DmdTrainer`, proven on a toy in tests/test_dmd_toy.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

from .flow import add_noise, sample_train_timesteps, sigma_to_t, velocity_target

X0Fn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
VFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SigmaSampler = Callable[[int, torch.device, "torch.Generator | None"], torch.Tensor]

__all__ = [
    "make_sigma_sampler",
    "dmd_generator_loss",
    "fake_score_loss",
    "regression_loss",
    "combine_losses",
]


def make_sigma_sampler(
    s_min: float = 0.02,
    s_max: float = 0.98,
    shift: float = 1.0,
    dist: str = "uniform",
) -> SigmaSampler:
    """A sigma sampler: ``u`` uniform (or logit-normal), shifted, mapped into ``[s_min, s_max]``.

    DMD samples the re-noising level uniformly in ``[0.02, 0.98]`` (timesteps 20..980);
    pass ``shift`` to match the teacher's training distribution.
    """

    def sampler(batch: int, device: torch.device | str | None = None, generator: torch.Generator | None = None):
        s = sample_train_timesteps(batch, shift, generator=generator, dist=dist, s_min=s_min, s_max=s_max,
                                   device=generator.device if generator is not None else device)
        return s.to(device) if device is not None else s

    return sampler


def _randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).mean(dim=1)


def dmd_generator_loss(
    x0_gen: torch.Tensor,
    real_x0_fn: X0Fn,
    fake_x0_fn: X0Fn,
    sigma_sampler: SigmaSampler,
    noise_generator: torch.Generator | None = None,
    reduction: str = "mean",
    eps: float = 1e-6,
) -> tuple[torch.Tensor, dict[str, float]]:
    """DMD generator loss for a batch of generated clean samples ``x0_gen`` (``[B, ...]``).

    Re-noise (no grad): ``x_s = (1 - s) x0_gen + s e``; ``real = real_x0_fn(x_s, s)``,
    ``fake = fake_x0_fn(x_s, s)``; ``grad = (fake - real) / mean_per_sample|x0_gen - real|``;
    loss ``0.5 * mse(x0_gen, (x0_gen - grad).detach())`` (``reduction`` ``"mean"`` or ``"sum"``).
    Descending it moves ``x0_gen`` along ``real - fake``: towards the data, away from the
    generator's own distribution. Returns the loss and float diagnostics.
    """
    b = x0_gen.shape[0]
    with torch.no_grad():
        x0 = x0_gen.detach()
        s = sigma_sampler(b, x0.device, noise_generator).to(device=x0.device, dtype=torch.float32)
        noise = _randn_like(x0, noise_generator)
        x_s = add_noise(x0, noise, s)
        real = real_x0_fn(x_s, s).to(x0.dtype)
        fake = fake_x0_fn(x_s, s).to(x0.dtype)
        ct = torch.promote_types(x0.dtype, torch.float32)  # at least fp32 for bf16 models
        normaliser = _per_sample_mean((x0 - real).abs().to(ct)).clamp_min(eps)
        normaliser = normaliser.reshape(b, *([1] * (x0.ndim - 1)))
        grad = torch.nan_to_num((fake - real).to(ct) / normaliser)
        target = (x0.to(ct) - grad).detach()
    loss = 0.5 * F.mse_loss(x0_gen.to(ct), target, reduction=reduction)
    diag = {
        "dmd_loss": float(loss.detach()),
        "dmd_grad_norm": float(grad.norm() / b**0.5),  # per-sample RMS norm of the direction
        "dmd_normaliser": float(normaliser.mean()),
        "dmd_sigma_mean": float(s.mean()),
        "real_fake_gap": float((real - fake).float().pow(2).mean()),
        "gen_real_gap": float((x0 - real).float().pow(2).mean()),
    }
    return loss, diag


def fake_score_loss(
    fake_v_fn: VFn,
    x0_gen_detached: torch.Tensor,
    sigma_sampler: SigmaSampler,
    noise_generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Flow-matching loss of the fake score on the generator's samples.

    ``mse(fake_v_fn(x_s, 1000 s), e - x0)`` with ``x0 = x0_gen_detached`` (detached here too:
    the fake-score update must not reach the generator).
    """
    x0 = x0_gen_detached.detach()
    s = sigma_sampler(x0.shape[0], x0.device, noise_generator).to(device=x0.device, dtype=torch.float32)
    noise = _randn_like(x0, noise_generator)
    x_s = add_noise(x0, noise, s)
    v = fake_v_fn(x_s, sigma_to_t(s))
    loss = F.mse_loss(v.float(), velocity_target(x0, noise).float())
    return loss, {"fake_loss": float(loss.detach()), "fake_sigma_mean": float(s.mean())}


def regression_loss(x0_student: torch.Tensor, x0_teacher_ode: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """The paper's regression term: the student's output from a noise vs the teacher's ODE
    solution from the same noise (CausVid's ODE pairs). ``kind``: ``"mse"`` or ``"l1"``."""
    target = x0_teacher_ode.detach().to(x0_student.dtype)
    if kind == "mse":
        return F.mse_loss(x0_student.float(), target.float())
    if kind == "l1":
        return F.l1_loss(x0_student.float(), target.float())
    raise ValueError(f"unknown regression kind {kind!r}; use 'mse' or 'l1'")


def combine_losses(
    losses: Mapping[str, torch.Tensor], weights: Mapping[str, float] | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted sum ``sum_k w_k * loss_k`` (missing weights: 1.0; weight 0 drops the term).
    Returns the total and the weighted terms as floats (plus ``"total"``)."""
    weights = dict(weights or {})
    unknown = set(weights) - set(losses)
    if unknown:
        raise ValueError(f"weights for unknown losses: {sorted(unknown)}")
    total = None
    parts: dict[str, float] = {}
    for k, v in losses.items():
        w = float(weights.get(k, 1.0))
        if w == 0.0:
            continue
        term = w * v
        parts[k] = float(term.detach())
        total = term if total is None else total + term
    if total is None:
        raise ValueError("every loss has weight 0")
    parts["total"] = float(total.detach())
    return total, parts
