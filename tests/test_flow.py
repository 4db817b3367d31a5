"""Rectified-flow schedule, targets and samplers (talkingmachines.diffusion.flow)."""

import numpy as np
import pytest
import torch

from talkingmachines.config import StreamConfig
from talkingmachines.diffusion import flow

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- shift
def test_shift_identities():
    s = torch.linspace(0, 1, 101, dtype=torch.float64)
    for shift in (1.0, 3.0, 5.0, 8.0):
        sh = flow.shift_sigma(s, shift)
        assert sh[0] == 0 and sh[-1] == 1
        assert torch.all(sh[1:] > sh[:-1])  # monotone
        if shift > 1:
            assert torch.all(sh[1:-1] > s[1:-1])  # more time at high noise
        torch.testing.assert_close(flow.unshift_sigma(sh, shift), s)
        # shifting by a then b is shifting by a*b; shift 1 is the identity
        torch.testing.assert_close(flow.shift_sigma(flow.shift_sigma(s, shift), 2.0), flow.shift_sigma(s, 2 * shift))
    torch.testing.assert_close(flow.shift_sigma(s, 1.0), s)
    assert flow.shift_sigma(0.5, 5.0) == pytest.approx(5 / 6)


@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0])
@pytest.mark.parametrize("n", [1, 2, 4, 50])
def test_sigmas_match_diffusers(shift, n):
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    ours = flow.sigmas(n, shift)
    assert ours.shape == (n + 1,) and ours[0] == 1.0 and ours[-1] == 0.0
    assert torch.all(ours[1:] < ours[:-1])

    sch = FlowMatchEulerDiscreteScheduler(shift=shift)
    sch.set_timesteps(n)
    torch.testing.assert_close(ours, sch.sigmas.float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(flow.sigma_to_t(ours[:-1]), sch.timesteps.float(), atol=1e-3, rtol=0)

    # Wan's own grid == diffusers' Euler scheduler given the unshifted linear sigmas
    sch = FlowMatchEulerDiscreteScheduler(shift=shift)
    sch.set_timesteps(sigmas=np.linspace(1, 0, n + 1)[:-1])
    torch.testing.assert_close(flow.sigmas(n, shift, spacing="wan"), sch.sigmas.float(), atol=1e-6, rtol=0)

    # Wan's diffusers scheduler (UniPC with flow sigmas); diffusers nudges sigma[0] by 1e-6
    sch = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift)
    sch.set_timesteps(n)
    torch.testing.assert_close(flow.sigmas(n, shift, spacing="unipc"), sch.sigmas.float(), atol=2e-6, rtol=0)


# ----------------------------------------------------------------------------- targets
def test_targets_roundtrip_and_broadcast():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
    e = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
    for s in (torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64), torch.rand(3, 5, generator=g, dtype=torch.float64), 0.3):
        x_s = flow.add_noise(x0, e, s)
        v = flow.velocity_target(x0, e)
        torch.testing.assert_close(flow.x0_from_v(x_s, v, s), x0)
        torch.testing.assert_close(flow.eps_from_v(x_s, v, s), e)
        torch.testing.assert_close(flow.v_from_x0(x_s, x0, s), v)
    # per-token s: token (b, n) uses its own sigma
    s = torch.rand(3, 5, generator=g, dtype=torch.float64)
    x_s = flow.add_noise(x0, e, s)
    torch.testing.assert_close(x_s[1, 2], (1 - s[1, 2]) * x0[1, 2] + s[1, 2] * e[1, 2])
    assert torch.equal(flow.add_noise(x0, e, torch.zeros(3, dtype=torch.float64)), x0)
    assert torch.equal(flow.add_noise(x0, e, torch.ones(3, dtype=torch.float64)), e)

    # x0_fn_from_v passes t = 1000 s to the model
    seen = {}

    def model(x, t):
        seen["t"] = t
        return torch.zeros_like(x)

    out = flow.x0_fn_from_v(model)(x0, torch.tensor([0.25, 0.5, 1.0]))
    torch.testing.assert_close(seen["t"], torch.tensor([250.0, 500.0, 1000.0]))
    assert torch.equal(out, x0)


# ----------------------------------------------------------------------------- sampling
def gaussian_velocity(m: float, std: float):
    """Exact flow-matching velocity E[e - x0 | x_s] for x0 ~ N(m, std^2), e ~ N(0, 1)."""

    def v(x, t):
        s = flow.t_to_sigma(t).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        var = (1 - s) ** 2 * std**2 + s**2
        return (s - (1 - s) * std**2) / var * (x - (1 - s) * m) - m

    return v


@pytest.mark.parametrize("shift", [1.0, 5.0])
def test_euler_recovers_gaussian(shift):
    m, std = 2.0, 0.5
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(20000, 1, generator=g, dtype=torch.float64)
    exact = m + std * noise  # the probability-flow ODE of a Gaussian is this affine transport
    errs = {}
    for n in (200, 400):
        x = flow.euler_sample(gaussian_velocity(m, std), noise, flow.sigmas(n, shift).double())
        errs[n] = (x - exact).abs().max().item()
    assert x.mean().item() == pytest.approx(exact.mean().item(), abs=0.01)
    assert x.std().item() == pytest.approx(exact.std().item(), rel=0.015)
    assert abs(x.std().item() - std) < 0.02 and abs(x.mean().item() - m) < 0.02
    assert errs[400] < 0.03
    assert 1.7 < errs[200] / errs[400] < 2.3  # Euler: first order in the step size


def test_euler_cfg_branches():
    noise = torch.zeros(4, 2)
    fu = lambda x, t: torch.full_like(x, 1.0)  # noqa: E731
    fi = lambda x, t: torch.full_like(x, 2.0)  # noqa: E731
    ff = lambda x, t: torch.full_like(x, 4.0)  # noqa: E731
    guided = flow.guided_model_fn({"uncond": fu, "image": fi, "full": ff}, {"image": 3.0, "full": 2.0})
    v = guided(noise, torch.zeros(4))
    assert torch.allclose(v, torch.full_like(v, 1 + 3 * (2 - 1) + 2 * (4 - 2)))
    # all scales 1 -> last branch; single branch -> itself
    assert torch.allclose(flow.guided_model_fn({"u": fu, "f": ff})(noise, torch.zeros(4)), torch.full((4, 2), 4.0))
    assert torch.allclose(flow.guided_model_fn([("u", fu)])(noise, torch.zeros(4)), torch.full((4, 2), 1.0))
    with pytest.raises(ValueError):
        flow.guided_model_fn({"u": fu, "f": ff}, {"u": 2.0})
    # euler with a branch mapping: constant v integrates to -v over s in [1, 0]
    out = flow.euler_sample({"uncond": fu, "image": fi, "full": ff}, noise, flow.sigmas(3, 3.0), cfg={"image": 3.0, "full": 2.0})
    torch.testing.assert_close(out, torch.full((4, 2), -8.0))
    with pytest.raises(ValueError):
        flow.euler_sample(fu, noise, flow.sigmas(3), cfg={"full": 2.0})


def test_student_schedule():
    s = flow.student_schedule(StreamConfig())
    torch.testing.assert_close(s, torch.tensor([1.0, 0.5, 0.0]))
    s = flow.student_schedule(StreamConfig(student_steps=4, student_timesteps=(1000.0, 750.0, 500.0, 250.0)))
    torch.testing.assert_close(s, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    derived = flow.student_schedule(StreamConfig(student_steps=2, student_timesteps=(), flow_shift=5.0))
    torch.testing.assert_close(derived, torch.tensor([1.0, 5 / 6, 0.0]))
    with pytest.raises(ValueError):
        flow.student_schedule(StreamConfig(student_steps=3))
    with pytest.raises(ValueError):
        flow.student_schedule(StreamConfig(student_timesteps=(500.0, 1000.0)))


def test_steps_other_than_trained_use_the_derived_rule():
    """`--steps N` (N != student_steps) is Wan's shifted grid, the rule training derives its
    schedule by; N == student_steps (or None) is the trained schedule itself."""
    cfg = StreamConfig(student_steps=2, student_timesteps=(1000.0, 500.0), flow_shift=5.0)
    torch.testing.assert_close(flow.student_schedule(cfg, 2), torch.tensor([1.0, 0.5, 0.0]))
    torch.testing.assert_close(flow.student_schedule(cfg, None), torch.tensor([1.0, 0.5, 0.0]))
    for n in (1, 3, 4):
        torch.testing.assert_close(flow.student_schedule(cfg, n), flow.sigmas(n, 5.0, spacing="wan"))
        derived = StreamConfig(student_steps=n, student_timesteps=(), flow_shift=5.0)
        torch.testing.assert_close(flow.student_schedule(cfg, n), flow.student_schedule(derived))
    with pytest.raises(ValueError):
        flow.student_schedule(cfg, 0)


def test_denoise_chunk():
    sig = flow.student_schedule(StreamConfig())
    target = torch.tensor([1.5, -0.5])
    seen = []

    def x0_exact(x, s):  # the exact denoiser of a point mass at `target`
        seen.append(s)
        return target.expand_as(x)

    g = torch.Generator().manual_seed(2)
    noise = torch.randn(6, 2, generator=torch.Generator().manual_seed(1))
    out, last = flow.denoise_chunk(x0_exact, noise, sig, lambda: torch.randn(6, 2, generator=g))
    torch.testing.assert_close(out, target.expand(6, 2))
    assert seen == [1.0, 0.5]
    # the last step's input is the x0 of the first step re-noised to 0.5 with the next draw
    e = torch.randn(6, 2, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(last, 0.5 * target + 0.5 * e)

    # same noise stream, same result; another stream, another result
    net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.SiLU(), torch.nn.Linear(16, 2))

    def x0_net(x, s):
        return x - s * net(torch.cat([x, torch.full((len(x), 1), s)], 1))

    def run(seed):
        gg = torch.Generator().manual_seed(seed)
        return flow.denoise_chunk(x0_net, noise, sig, lambda: torch.randn(6, 2, generator=gg))[0]

    a, b, c = run(3), run(3), run(4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # one step: the input is the last step's input; gradients flow when the caller wants them
    out, last = flow.denoise_chunk(x0_net, noise, [1.0, 0.0], lambda: None)
    assert torch.equal(last, noise) and out.requires_grad
    for bad in ([1.0], [1.0, 0.5], [0.5, 1.0, 0.0], [1.0, 1.0, 0.0]):
        with pytest.raises(ValueError):
            flow.denoise_chunk(x0_net, noise, bad, lambda: None)


def test_sample_train_timesteps():
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    u = flow.sample_train_timesteps(50000, 1.0, g(), dist="uniform")
    assert u.shape == (50000,) and u.dtype == torch.float32
    assert 0 <= u.min() and u.max() <= 1 and u.mean().item() == pytest.approx(0.5, abs=0.01)
    sh = flow.sample_train_timesteps(50000, 5.0, g(), dist="uniform")
    torch.testing.assert_close(sh, flow.shift_sigma(u, 5.0))  # same draws, shifted
    ln = flow.sample_train_timesteps(50000, 1.0, g(), dist="logit_normal")
    assert ln.median().item() == pytest.approx(0.5, abs=0.01) and ln.std() < u.std()
    assert torch.equal(ln, flow.sample_train_timesteps(50000, 1.0, g(), dist="logit_normal"))
    r = flow.sample_train_timesteps(1000, 3.0, g(), s_min=0.02, s_max=0.98)
    assert r.min() >= 0.02 and r.max() <= 0.98
    with pytest.raises(ValueError):
        flow.sample_train_timesteps(4, 1.0, g(), dist="beta")


def test_flow_matching_loss_minimised_by_true_velocity():
    g = torch.Generator().manual_seed(0)
    x0 = 2.0 + 0.5 * torch.randn(20000, 1, generator=g, dtype=torch.float64)
    s = flow.sample_train_timesteps(20000, 3.0, g, s_min=0.05, s_max=0.95).double()
    noise = torch.randn(20000, 1, generator=g, dtype=torch.float64)
    exact = flow.flow_matching_loss(gaussian_velocity(2.0, 0.5), x0, s, noise)
    wrong = flow.flow_matching_loss(lambda x, t: gaussian_velocity(2.0, 0.5)(x, t) + 0.1, x0, s, noise)
    assert exact < wrong
