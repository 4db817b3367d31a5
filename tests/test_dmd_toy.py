"""Distribution Matching Distillation on a 2-D toy (talkingmachines.diffusion.dmd).

The proof: a one-step generator, initialised collapsed near the origin, learns a ring of 8
Gaussians from the DMD loss alone. The real score is exact (the closed-form flow-matching
denoiser of a Gaussian mixture), the fake score is a small MLP trained with the
flow-matching loss on the generator's samples, and the two alternate 5:1 as in DMD2.

Set ``TM_PLOTS=<dir>`` to save a before/after scatter plot.
"""

import math
import os
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from talkingmachines.diffusion import dmd, flow

torch.set_num_threads(1)

# ----------------------------------------------------------------------------- the toy target
K, RADIUS, STD = 8, 2.0, 0.15
MU = torch.stack([torch.tensor([RADIUS * math.cos(2 * math.pi * k / K), RADIUS * math.sin(2 * math.pi * k / K)]) for k in range(K)])


def gmm_x0(x_s: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Exact E[x0 | x_s] for x0 ~ (1/K) sum_k N(mu_k, STD^2 I), x_s = (1 - s) x0 + s e.

    Given component k, x_s ~ N((1 - s) mu_k, var I) with var = (1 - s)^2 STD^2 + s^2, so the
    posterior over components is a softmax of Gaussian log-likelihoods, and within component k
    E[x0 | x_s, k] = mu_k + (1 - s) STD^2 / var (x_s - (1 - s) mu_k).
    """
    s = s.reshape(-1, 1, 1).to(x_s.dtype)
    var = (1 - s) ** 2 * STD**2 + s**2
    d = x_s[:, None, :] - (1 - s) * MU[None].to(x_s.dtype)
    w = torch.softmax(-(d**2).sum(-1) / (2 * var[..., 0]), dim=-1)  # [B, K]
    cond = MU[None].to(x_s.dtype) + (1 - s) * STD**2 / var * d
    return (w[..., None] * cond).sum(1)


def gmm_v(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    s = flow.t_to_sigma(t)
    return flow.v_from_x0(x, gmm_x0(x, s), s)


def sample_gmm(n: int, g: torch.Generator) -> torch.Tensor:
    k = torch.randint(0, K, (n,), generator=g)
    return MU[k] + STD * torch.randn(n, 2, generator=g)


def energy_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean())


def sliced_w1(a: torch.Tensor, b: torch.Tensor, n_proj: int = 64, seed: int = 0) -> float:
    th = torch.rand(n_proj, generator=torch.Generator().manual_seed(seed)) * math.pi
    dirs = torch.stack([th.cos(), th.sin()], 1)
    pa, _ = (a @ dirs.T).sort(0)
    pb, _ = (b @ dirs.T).sort(0)
    return float((pa - pb).abs().mean())


def mode_counts(x: torch.Tensor, radius: float = 0.5) -> torch.Tensor:
    d = torch.cdist(x, MU).min(1)
    return torch.bincount(d.indices[d.values < radius], minlength=K)


def mlp(i: int, o: int, width: int = 128, depth: int = 3) -> nn.Sequential:
    layers: list[nn.Module] = []
    for j in range(depth):
        layers += [nn.Linear(i if j == 0 else width, width), nn.SiLU()]
    return nn.Sequential(*layers, nn.Linear(width, o))


class Generator(nn.Module):
    """One-step generator z -> x0 = 0.3 z + MLP(z), MLP's last layer zero: it starts as
    N(0, 0.09 I), collapsed near the origin, far from the ring."""

    def __init__(self):
        super().__init__()
        self.net = mlp(2, 2)
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, z):
        return 0.3 * z + self.net(z)


# ----------------------------------------------------------------------------- the proof
def test_exact_real_score_samples_the_mixture():
    """The analytic denoiser is the mixture's true score: its Euler ODE samples the ring."""
    g = torch.Generator().manual_seed(0)
    x = flow.euler_sample(gmm_v, torch.randn(2000, 2, generator=g), flow.sigmas(40, 3.0))
    ref = sample_gmm(2000, g)
    assert energy_distance(x, ref) < 0.01
    assert (mode_counts(x) > 150).all()


GEN_STEPS = 300
BATCH = 256


def run_dmd_toy():
    torch.manual_seed(0)
    gen, fake = Generator(), mlp(3, 2)
    fake_v = lambda x, t: fake(torch.cat([x, t[:, None] / 1000], 1))  # noqa: E731
    rng = torch.Generator().manual_seed(1)
    trainer = dmd.DMDTrainer(
        sample_fn=lambda batch, g: gen(torch.randn(BATCH, 2, generator=g)),
        real_x0_fn=gmm_x0,
        fake_v_fn=fake_v,
        generator_params=gen,
        fake_params=fake,
        generator_optimizer=torch.optim.Adam(gen.parameters(), lr=5e-4, betas=(0.0, 0.99)),
        fake_optimizer=torch.optim.Adam(fake.parameters(), lr=1e-3, betas=(0.0, 0.99)),
        sigma_sampler=dmd.make_sigma_sampler(0.02, 0.98),
        config=dmd.DMDConfig(fake_updates_per_student_update=5, generator_grad_clip=10.0, fake_grad_clip=10.0),
        rng=rng,
    )
    ev = torch.Generator().manual_seed(123)
    z_eval, ref = torch.randn(2000, 2, generator=ev), sample_gmm(2000, ev)
    with torch.no_grad():
        before = gen(z_eval)
    for _ in range(200):  # warm-up: let the fake score learn the initial generator first
        trainer.fake_step()
    kinds = []
    while sum(k == "generator" for k in kinds) < GEN_STEPS:
        kinds.append(trainer.step()["kind"])
    with torch.no_grad():
        after = gen(z_eval)
    return before, after, ref, kinds


def test_dmd_toy_learns_ring_of_gaussians():
    t0 = time.perf_counter()
    before, after, ref, kinds = run_dmd_toy()
    elapsed = time.perf_counter() - t0
    assert kinds[:6] == ["fake"] * 5 + ["generator"] and len(kinds) == 6 * GEN_STEPS

    e0, e1 = energy_distance(before, ref), energy_distance(after, ref)
    w0, w1 = sliced_w1(before, ref), sliced_w1(after, ref)
    c0, c1 = mode_counts(before), mode_counts(after)
    print(
        f"\nDMD toy ({elapsed:.1f}s): energy distance {e0:.4f} -> {e1:.4f} ({e0 / e1:.1f}x), "
        f"sliced W1 {w0:.4f} -> {w1:.4f} ({w0 / w1:.1f}x), samples per mode before {c0.tolist()} after {c1.tolist()}"
    )
    if os.environ.get("TM_PLOTS"):
        _plot(before, after, ref, Path(os.environ["TM_PLOTS"]) / "dmd_toy.png")

    assert e0 / e1 >= 10.0, (e0, e1)  # measured ~60x; the noise floor of 2000 vs 2000 is ~0.002
    assert w0 / w1 >= 4.0, (w0, w1)
    assert c0.sum() == 0  # starts on no mode at all
    assert (c1 >= 0.04 * len(after)).sum() >= 7  # covers (nearly) every mode, no collapse
    assert c1.sum() >= 0.4 * len(after)  # and concentrates on them


def _plot(before, after, ref, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(8, 4), sharex=True, sharey=True)
    for ax, x, title in ((axes[0], before, "before DMD"), (axes[1], after, "after DMD")):
        ax.scatter(ref[:, 0], ref[:, 1], s=2, c="0.75", label="target")
        ax.scatter(x[:, 0], x[:, 1], s=2, c="C3", label="generator")
        ax.set_title(title)
        ax.set_aspect("equal")
    axes[0].legend(loc="upper right", markerscale=4)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- unit checks
def _const_sampler(value: float):
    return lambda b, device=None, generator=None: torch.full((b,), value)


def test_dmd_loss_gradient_is_the_normalised_score_difference():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    real_shift = torch.randn(4, 3, 5, generator=g, dtype=torch.float64)
    real = lambda x, s: x + real_shift  # noqa: E731
    fake = lambda x, s: 0.5 * x  # noqa: E731
    ng = torch.Generator().manual_seed(7)
    loss, diag = dmd.dmd_generator_loss(x0, real, fake, _const_sampler(0.4), ng)
    loss.backward()
    # recompute by hand with the same noise draw
    e = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    x_s = 0.6 * x0.detach() + 0.4 * e
    r, f = real(x_s, None), fake(x_s, None)
    norm = (x0.detach() - r).abs().mean(dim=(1, 2), keepdim=True)
    grad = (f - r) / norm
    torch.testing.assert_close(x0.grad, grad / x0.numel())
    assert set(diag) >= {"dmd_loss", "dmd_grad_norm", "dmd_normaliser", "dmd_sigma_mean"}
    assert diag["dmd_sigma_mean"] == pytest.approx(0.4)

    x0.grad = None
    loss, _ = dmd.dmd_generator_loss(x0, real, fake, _const_sampler(0.4), torch.Generator().manual_seed(7), reduction="sum")
    loss.backward()
    torch.testing.assert_close(x0.grad, grad)

    # identical scores -> no gradient at all
    x0.grad = None
    dmd.dmd_generator_loss(x0, real, real, _const_sampler(0.4), ng)[0].backward()
    assert torch.count_nonzero(x0.grad) == 0


def test_fake_score_loss_and_regression():
    net = nn.Linear(3, 2)
    gen = nn.Linear(2, 2)
    x0 = gen(torch.randn(8, 2))
    fake_v = lambda x, t: net(torch.cat([x, t[:, None] / 1000], 1))  # noqa: E731
    loss, diag = dmd.fake_score_loss(fake_v, x0, dmd.make_sigma_sampler(), torch.Generator().manual_seed(0))
    loss.backward()
    assert net.weight.grad is not None and gen.weight.grad is None  # never reaches the generator
    assert 0.02 <= diag["fake_sigma_mean"] <= 0.98

    a, b = torch.zeros(2, 3, requires_grad=True), torch.ones(2, 3)
    assert dmd.regression_loss(a, b).item() == pytest.approx(1.0)
    assert dmd.regression_loss(a, 3 * b, kind="l1").item() == pytest.approx(3.0)
    total, parts = dmd.combine_losses({"dmd": torch.tensor(2.0), "regression": torch.tensor(4.0)}, {"regression": 0.25})
    assert total.item() == pytest.approx(3.0) and parts == {"dmd": 2.0, "regression": 1.0, "total": 3.0}
    with pytest.raises(ValueError):
        dmd.combine_losses({"dmd": torch.tensor(1.0)}, {"gan": 1.0})


def test_trainer_alternates_and_keeps_updates_separate():
    torch.manual_seed(0)
    gen, fake = nn.Linear(2, 2), nn.Linear(3, 2)
    fake_v = lambda x, t: fake(torch.cat([x, t[:, None] / 1000], 1))  # noqa: E731
    noise = torch.randn(16, 2)
    reg_calls = []

    def regression_fn(batch):
        reg_calls.append(batch)
        return dmd.regression_loss(gen(noise), torch.zeros(16, 2))

    trainer = dmd.DMDTrainer(
        lambda batch, g: gen(torch.randn(16, 2, generator=g)),
        gmm_x0,
        fake_v,
        gen,
        fake,
        torch.optim.SGD(gen.parameters(), lr=0.1),
        torch.optim.SGD(fake.parameters(), lr=0.1),
        config=dmd.DMDConfig(fake_updates_per_student_update=2, regression_weight=0.5),
        regression_fn=regression_fn,
        rng=torch.Generator().manual_seed(0),
    )
    kinds = []
    for i in range(6):
        g0 = [p.detach().clone() for p in gen.parameters()]
        f0 = [p.detach().clone() for p in fake.parameters()]
        d = trainer.step(batch=i)
        kinds.append(d["kind"])
        gen_moved = any(not torch.equal(a, p) for a, p in zip(g0, gen.parameters()))
        fake_moved = any(not torch.equal(a, p) for a, p in zip(f0, fake.parameters()))
        assert (gen_moved, fake_moved) == ((True, False) if d["kind"] == "generator" else (False, True))
    assert kinds == ["fake", "fake", "generator"] * 2
    assert reg_calls == [2, 5] and "gen_regression" in d and all(p.requires_grad for p in fake.parameters())
    state = trainer.state_dict()
    assert state["step_count"] == 6
    with pytest.raises(ValueError):
        dmd.DMDTrainer(lambda b, g: None, gmm_x0, fake_v, gen, fake, torch.optim.SGD(gen.parameters(), lr=0.1),
                       torch.optim.SGD(fake.parameters(), lr=0.1), config=dmd.DMDConfig(regression_weight=1.0))
