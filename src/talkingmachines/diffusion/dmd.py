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
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

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
    "DMDConfig",
    "DMDTrainer",
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


# ----------------------------------------------------------------------------- trainer
@dataclass
class DMDConfig:
    fake_updates_per_student_update: int = 5
    generator_grad_clip: float | None = 1.0
    fake_grad_clip: float | None = 1.0
    dmd_weight: float = 1.0
    regression_weight: float = 0.0


def _params(p: Iterable[torch.nn.Parameter] | torch.nn.Module) -> list[torch.nn.Parameter]:
    return list(p.parameters() if isinstance(p, torch.nn.Module) else p)


class DMDTrainer:
    """Alternating DMD / DMD2 optimisation, generic over models and batches.

    * ``sample_fn(batch, generator) -> x0_gen``: the student's rollout (with autograd when
      grad is enabled), e.g. :func:`~talkingmachines.diffusion.flow.few_step_sample` of the
      student from noise, chunk by chunk for the causal student.
    * ``real_x0_fn(x_s, s)``: the frozen teacher (real score), as an x0 model.
    * ``fake_v_fn(x_s, t)``: the trainable fake score, a velocity model; its x0 is
      ``x_s - s v``.
    * ``regression_fn(batch) -> loss`` (optional): the regression term, used when
      ``config.regression_weight > 0``.

    :meth:`step` performs one optimiser update and chooses which by a counter: a cycle is
    ``fake_updates_per_student_update`` fake-score updates followed by one generator update
    (DMD2's two time-scale rule). The fake score's parameters are frozen during the
    generator update, so the generator update does not touch them.
    """

    def __init__(
        self,
        sample_fn: Callable[[Any, torch.Generator | None], torch.Tensor],
        real_x0_fn: X0Fn,
        fake_v_fn: VFn,
        generator_params: Iterable[torch.nn.Parameter] | torch.nn.Module,
        fake_params: Iterable[torch.nn.Parameter] | torch.nn.Module,
        generator_optimizer: torch.optim.Optimizer,
        fake_optimizer: torch.optim.Optimizer,
        sigma_sampler: SigmaSampler | None = None,
        config: DMDConfig | None = None,
        regression_fn: Callable[[Any], torch.Tensor] | None = None,
        rng: torch.Generator | None = None,
        fake_sigma_sampler: SigmaSampler | None = None,
    ):
        self.sample_fn = sample_fn
        self.real_x0_fn = real_x0_fn
        self.fake_v_fn = fake_v_fn
        self.generator_params = _params(generator_params)
        self.fake_params = _params(fake_params)
        self.generator_optimizer = generator_optimizer
        self.fake_optimizer = fake_optimizer
        self.sigma_sampler = sigma_sampler or make_sigma_sampler()
        self.fake_sigma_sampler = fake_sigma_sampler or self.sigma_sampler
        self.config = config or DMDConfig()
        if self.config.fake_updates_per_student_update < 0:
            raise ValueError("fake_updates_per_student_update must be >= 0")
        if self.config.regression_weight > 0 and regression_fn is None:
            raise ValueError("regression_weight > 0 needs a regression_fn")
        self.regression_fn = regression_fn
        self.rng = rng
        self.step_count = 0

    def fake_x0_fn(self, x_s: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        v = self.fake_v_fn(x_s, sigma_to_t(s))
        return x_s - s.reshape(*s.shape, *([1] * (x_s.ndim - s.ndim))).to(x_s.dtype) * v

    @property
    def next_is_generator(self) -> bool:
        k = self.config.fake_updates_per_student_update
        return self.step_count % (k + 1) == k

    @staticmethod
    def _clip(params: list[torch.nn.Parameter], max_norm: float | None) -> float:
        if max_norm is None:
            grads = [p.grad for p in params if p.grad is not None]
            return float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))) if grads else 0.0
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def fake_step(self, batch: Any = None) -> dict[str, float]:
        """One fake-score update on fresh (detached) generator samples."""
        with torch.no_grad():
            x0 = self.sample_fn(batch, self.rng)
        self.fake_optimizer.zero_grad(set_to_none=True)
        loss, diag = fake_score_loss(self.fake_v_fn, x0, self.fake_sigma_sampler, self.rng)
        loss.backward()
        diag["fake_grad_norm"] = self._clip(self.fake_params, self.config.fake_grad_clip)
        self.fake_optimizer.step()
        return diag

    def generator_step(self, batch: Any = None) -> dict[str, float]:
        """One generator update with the DMD loss (plus the regression term if weighted)."""
        flags = [p.requires_grad for p in self.fake_params]
        for p in self.fake_params:
            p.requires_grad_(False)
        try:
            self.generator_optimizer.zero_grad(set_to_none=True)
            x0 = self.sample_fn(batch, self.rng)
            dmd, diag = dmd_generator_loss(x0, self.real_x0_fn, self.fake_x0_fn, self.sigma_sampler, self.rng)
            losses = {"dmd": dmd}
            if self.regression_fn is not None and self.config.regression_weight > 0:
                losses["regression"] = self.regression_fn(batch)
            total, parts = combine_losses(
                losses, {"dmd": self.config.dmd_weight, "regression": self.config.regression_weight}
                if "regression" in losses else {"dmd": self.config.dmd_weight}
            )
            total.backward()
            diag.update({f"gen_{k}": v for k, v in parts.items()})
            diag["gen_grad_norm"] = self._clip(self.generator_params, self.config.generator_grad_clip)
            self.generator_optimizer.step()
        finally:
            for p, f in zip(self.fake_params, flags):
                p.requires_grad_(f)
        return diag

    def step(self, batch: Any = None) -> dict[str, Any]:
        """One update: a fake-score or a generator update, by the alternation counter."""
        if self.next_is_generator:
            diag: dict[str, Any] = self.generator_step(batch)
            diag["kind"] = "generator"
        else:
            diag = self.fake_step(batch)
            diag["kind"] = "fake"
        self.step_count += 1
        return diag

    def state_dict(self) -> dict[str, Any]:
        return {
            "step_count": self.step_count,
            "generator_optimizer": self.generator_optimizer.state_dict(),
            "fake_optimizer": self.fake_optimizer.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step_count = int(state["step_count"])
        self.generator_optimizer.load_state_dict(state["generator_optimizer"])
        self.fake_optimizer.load_state_dict(state["fake_optimizer"])
