"""Rectified flow (flow matching) as in Wan2.1: schedules, targets and samplers.

Convention (the whole project uses it):

* a noise level ``s`` (called sigma) in [0, 1]; ``x_s = (1 - s) * x0 + s * e`` with ``e ~ N(0, I)``;
* the network predicts the velocity ``v = e - x0`` (so ``dx_s/ds = v``);
* the network's timestep input is ``t = 1000 * s`` (``NUM_TRAIN_TIMESTEPS * s``).

From a velocity: ``x0 = x_s - s * v`` and ``e = x_s + (1 - s) * v``.

Callables used here:

* a *velocity model* ``model_fn(x, t) -> v`` takes the network timestep ``t = 1000 s``
  (a tensor of shape ``[B]``, or ``[B, N]`` for per-token timesteps);
* an *x0 model* ``x0_fn(x, s) -> x0`` takes the sigma ``s`` itself (see :func:`x0_fn_from_v`).

Schedules follow Wan / SD3's shift ``s' = shift * s / (1 + (shift - 1) * s)``, which spends
more steps at high noise for ``shift > 1``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import torch

NUM_TRAIN_TIMESTEPS = 1000

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, t = 1000 s) -> v
X0Fn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, s) -> x0

__all__ = [
    "NUM_TRAIN_TIMESTEPS",
    "shift_sigma",
    "unshift_sigma",
    "sigmas",
    "sigma_to_t",
    "t_to_sigma",
    "add_noise",
    "velocity_target",
    "x0_from_v",
    "eps_from_v",
    "v_from_x0",
    "x0_fn_from_v",
    "flow_matching_loss",
    "guided_model_fn",
    "euler_sample",
    "student_schedule",
    "denoise_chunk",
    "sample_train_timesteps",
]


# ----------------------------------------------------------------------------- schedules
def shift_sigma(s, shift: float):
    """Wan / SD3 timestep shift: ``shift * s / (1 + (shift - 1) * s)``.

    Works on floats, numpy arrays and tensors. Fixes 0 and 1; ``shift = 1`` is the identity.
    """
    return shift * s / (1 + (shift - 1) * s)


def unshift_sigma(s, shift: float):
    """Inverse of :func:`shift_sigma` (it is the shift by ``1 / shift``)."""
    return s / (shift - (shift - 1) * s)


def sigma_to_t(s):
    return s * NUM_TRAIN_TIMESTEPS


def t_to_sigma(t):
    return t / NUM_TRAIN_TIMESTEPS


def sigmas(
    num_steps: int,
    shift: float = 1.0,
    spacing: Literal["diffusers", "wan", "unipc"] = "diffusers",
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Descending sampling sigmas, length ``num_steps + 1``, first 1.0 and last exactly 0.

    ``spacing`` chooses which reference schedule is reproduced (all apply the shift):

    * ``"diffusers"`` (default): exactly ``FlowMatchEulerDiscreteScheduler(shift=shift)
      .set_timesteps(num_steps).sigmas``: ``num_steps`` points linearly spaced from 1 to the
      scheduler's ``sigma_min`` (which is ``shift_sigma(1/1000)``), shifted (again, as diffusers
      does), then a final 0 appended.
    * ``"wan"``: Wan's original ``get_sampling_sigmas``: ``linspace(1, 0, num_steps + 1)``
      shifted (the shift maps 0 to 0). Equals the diffusers Euler scheduler given
      ``sigmas=linspace(1, 0, num_steps + 1)[:-1]``.
    * ``"unipc"``: ``UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=shift)``:
      ``linspace(1, 1/1000, num_steps + 1)[:-1]`` shifted, then 0 (diffusers also nudges
      the first sigma to ``1 - 1e-6`` there; we keep 1.0).

    Returned as float32 (computed in float64).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    n = NUM_TRAIN_TIMESTEPS
    if spacing == "diffusers":
        sigma_min = shift_sigma(torch.tensor(1.0 / n, dtype=torch.float32), shift).item()
        base = torch.linspace(1.0, sigma_min, num_steps, dtype=torch.float64)
    elif spacing == "wan":
        base = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)[:-1]
    elif spacing == "unipc":
        base = torch.linspace(1.0, 1.0 / n, num_steps + 1, dtype=torch.float64)[:-1]
    else:
        raise ValueError(f"unknown spacing {spacing!r}; use 'diffusers', 'wan' or 'unipc'")
    out = torch.cat([shift_sigma(base, shift), base.new_zeros(1)])
    return out.to(dtype=torch.float32, device=device)


# ----------------------------------------------------------------------------- targets
def _expand(s, like: torch.Tensor) -> torch.Tensor:
    """Make ``s`` (scalar, ``[B]``, or ``[B, N, ...]`` leading dims) broadcast against ``like``."""
    s = torch.as_tensor(s, device=like.device)
    if not s.is_floating_point():
        s = s.float()
    if s.ndim > like.ndim:
        raise ValueError(f"sigma of shape {tuple(s.shape)} has more dims than x {tuple(like.shape)}")
    return s.reshape(*s.shape, *([1] * (like.ndim - s.ndim)))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, s) -> torch.Tensor:
    """``x_s = (1 - s) x0 + s e``. ``s`` is a scalar, per sample ``[B]`` or per token ``[B, N]``
    (leading dims of ``x0``; trailing dims are broadcast)."""
    s = _expand(s, x0).to(x0.dtype)
    return (1 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Flow-matching target ``v = e - x0``."""
    return noise - x0


def x0_from_v(x_s: torch.Tensor, v: torch.Tensor, s) -> torch.Tensor:
    """``x0 = x_s - s v``."""
    return x_s - _expand(s, x_s).to(x_s.dtype) * v


def eps_from_v(x_s: torch.Tensor, v: torch.Tensor, s) -> torch.Tensor:
    """``e = x_s + (1 - s) v``."""
    return x_s + (1 - _expand(s, x_s).to(x_s.dtype)) * v


def v_from_x0(x_s: torch.Tensor, x0: torch.Tensor, s) -> torch.Tensor:
    """``v = (x_s - x0) / s`` (undefined at ``s = 0``)."""
    return (x_s - x0) / _expand(s, x_s).to(x_s.dtype)


def x0_fn_from_v(model_fn: ModelFn) -> X0Fn:
    """Turn a velocity model ``model_fn(x, t=1000 s)`` into an x0 model ``x0_fn(x, s)``."""

    def x0_fn(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        s = torch.as_tensor(s, device=x.device, dtype=torch.float32)
        if s.ndim == 0:
            s = s.expand(x.shape[0])
        return x0_from_v(x, model_fn(x, sigma_to_t(s)), s)

    return x0_fn


def flow_matching_loss(
    model_fn: ModelFn,
    x0: torch.Tensor,
    s: torch.Tensor,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Mean squared error between ``model_fn(x_s, 1000 s)`` and ``e - x0``."""
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_s = add_noise(x0, noise, s)
    v = model_fn(x_s, sigma_to_t(s))
    return torch.nn.functional.mse_loss(v.float(), velocity_target(x0, noise).float())


# ----------------------------------------------------------------------------- guidance
def guided_model_fn(
    branches: Mapping[str, ModelFn] | Sequence[tuple[str, ModelFn]],
    scales: Mapping[str, float] | None = None,
) -> ModelFn:
    """Chained (multi-condition) classifier-free guidance.

    ``branches`` is ordered from least to most conditioned, e.g.
    ``{"uncond": f0, "image": f1, "full": f2}`` (image only, then image + audio); the first is
    the base. ``scales`` maps each later branch to its guidance scale (missing: 1.0). The
    guided velocity is ``v = v_0 + sum_i scale_i (v_i - v_{i-1})``, i.e. for the example
    ``v = v_uncond + s_img (v_img - v_uncond) + s_audio (v_full - v_img)``.
    With every scale 1 it is the last branch; with a single branch it is that branch.
    Every branch is evaluated once per call (no batching of branches here).
    """
    items = list(branches.items()) if isinstance(branches, Mapping) else list(branches)
    if not items:
        raise ValueError("guided_model_fn needs at least one branch")
    scales = dict(scales or {})
    unknown = set(scales) - {name for name, _ in items[1:]}
    if unknown:
        raise ValueError(f"scales for unknown or base branches: {sorted(unknown)}")

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        prev = items[0][1](x, t)
        out = prev
        for name, f in items[1:]:
            cur = f(x, t)
            out = out + scales.get(name, 1.0) * (cur - prev)
            prev = cur
        return out

    return fn


# ----------------------------------------------------------------------------- samplers
def _t_batch(s: float, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), sigma_to_t(float(s)), device=x.device, dtype=torch.float32)


@torch.no_grad()
def euler_sample(
    model_fn: ModelFn | Mapping[str, ModelFn],
    noise: torch.Tensor,
    sigmas: torch.Tensor | Sequence[float],
    cfg: Mapping[str, float] | None = None,
    progress: bool = False,
    callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Deterministic Euler ODE sampler (the teacher's sampler).

    ``noise`` is ``x`` at ``sigmas[0]`` (pure noise when ``sigmas[0] == 1``); each step is
    ``x <- x + (s_next - s) v(x, 1000 s)``. ``model_fn`` is a velocity model, or a mapping of
    CFG branches combined by :func:`guided_model_fn` with the scales ``cfg``.
    ``callback(i, x, v)`` is called after each step's model evaluation.
    """
    if isinstance(model_fn, Mapping):
        model_fn = guided_model_fn(model_fn, cfg)
    elif cfg:
        raise ValueError("cfg scales need model_fn to be a mapping of branches")
    sig = [float(v) for v in (sigmas.tolist() if torch.is_tensor(sigmas) else sigmas)]
    x = noise
    steps = range(len(sig) - 1)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="euler", leave=False)
    for i in steps:
        s, s_next = sig[i], sig[i + 1]
        v = model_fn(x, _t_batch(s, x))
        if callback is not None:
            callback(i, x, v)
        x = x + (s_next - s) * v.to(x.dtype)
    return x


def student_schedule(stream_config, steps: int | None = None,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """The student's few-step sigmas, ending with 0 (length ``steps + 1``): the one schedule
    that training (ODE pairs, DMD rollouts), the streaming engine and ``--steps`` use.

    * ``steps`` None or ``student_steps``: the trained schedule. ``student_timesteps`` are
      taken *as given*: they are already network timesteps (shifted sigma x 1000) and are
      **not** shifted again, so the default ``(1000, 500)`` gives ``[1.0, 0.5, 0.0]``. If
      ``student_timesteps`` is empty it is derived as Wan's shifted linear grid,
      ``sigmas(student_steps, flow_shift, spacing="wan")``.
    * any other ``steps`` (``--steps N``, a model run with another number of steps than it
      was distilled for): Wan's shifted linear grid with ``N`` steps, the same rule as the
      derived schedule above.
    """
    trained = int(stream_config.student_steps)
    steps = trained if steps is None else int(steps)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    ts = tuple(getattr(stream_config, "student_timesteps", ()) or ())
    if not ts or steps != trained:
        return sigmas(steps, float(stream_config.flow_shift), spacing="wan", device=device)
    if len(ts) != steps:
        raise ValueError(f"student_timesteps {ts} has {len(ts)} entries but student_steps={steps}")
    s = torch.tensor([t_to_sigma(float(t)) for t in ts] + [0.0], dtype=torch.float32, device=device)
    if not (s[:-1] > 0).all() or not (s[:-1] <= 1).all() or not (s[1:] < s[:-1]).all():
        raise ValueError(f"student_timesteps must be strictly decreasing in (0, 1000]: {ts}")
    return s


def denoise_chunk(
    x0_fn: Callable[[torch.Tensor, float], torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor | Sequence[float],
    noise: Callable[[], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The few-step sampler (DMD / CausVid): the one loop the streaming engine, the training
    rollout and the bench run.

    ``x`` is the input at ``sigmas[0]`` (pure noise when it is 1). At step ``i``:
    ``x0 = x0_fn(x, s_i)`` (``s_i`` a float); if ``s_{i+1} > 0`` the next input is
    ``(1 - s_{i+1}) x0 + s_{i+1} noise()``, else ``x0`` is the result. ``noise()`` returns
    fresh noise shaped like ``x``: the caller owns the random stream, so each path draws in
    its own way (device, generator per sample) and the same draws give the same latents.
    ``sigmas`` (e.g. `student_schedule`) must decrease strictly and end with 0.

    Returns ``(x0, x_last)``: the clean result and the input of the last step (what DMD
    recomputes with gradients). Autograd is left to the caller.
    """
    sig = [float(v) for v in (sigmas.tolist() if torch.is_tensor(sigmas) else sigmas)]
    if len(sig) < 2 or sig[-1] != 0.0 or any(b >= a for a, b in zip(sig, sig[1:])):
        raise ValueError(f"sigmas must decrease strictly to a final 0 (at least one step), got {sig}")
    for i, s in enumerate(sig[:-1]):
        x0 = x0_fn(x, s)
        s_next = sig[i + 1]
        if s_next == 0.0:
            return x0, x
        x = (1 - s_next) * x0 + s_next * noise()  # re-noise with fresh noise
    raise AssertionError("unreachable: the schedule ends with 0")


# ----------------------------------------------------------------------------- training
def sample_train_timesteps(
    batch: int,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    dist: Literal["logit_normal", "uniform"] = "uniform",
    device: torch.device | str | None = None,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    s_min: float = 0.0,
    s_max: float = 1.0,
) -> torch.Tensor:
    """Training sigmas, shape ``[batch]`` float32 in ``[s_min, s_max]``.

    ``u`` is drawn from ``U(0, 1)`` (``"uniform"``, Wan's recipe) or ``sigmoid(N(logit_mean,
    logit_std))`` (``"logit_normal"``, SD3's), then shifted with :func:`shift_sigma`
    (``shift = 1``: no shift), then mapped affinely into ``[s_min, s_max]``.
    The network timestep is ``1000 * s``.
    """
    dev = generator.device if generator is not None else device  # draw where the generator lives
    if dist == "uniform":
        u = torch.rand(batch, generator=generator, device=dev)
    elif dist == "logit_normal":
        u = torch.sigmoid(logit_mean + logit_std * torch.randn(batch, generator=generator, device=dev))
    else:
        raise ValueError(f"unknown dist {dist!r}; use 'uniform' or 'logit_normal'")
    s = shift_sigma(u, shift)
    if s_min != 0.0 or s_max != 1.0:
        s = s_min + (s_max - s_min) * s
    return s.to(torch.float32) if device is None else s.to(device=device, dtype=torch.float32)
