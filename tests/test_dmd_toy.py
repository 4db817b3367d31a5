"""Distribution Matching Distillation on a 2-D toy: the real DMD stage (`train.student.DmdTrainer`:
its loss, DMD2 alternation, optimisers and `Trainer` loop) with the toy's models.

The proof: a one-step generator, initialised collapsed near the origin, learns a ring of 8
Gaussians from the DMD loss alone. The real score is exact (the closed-form flow-matching
denoiser of a Gaussian mixture), the fake score is a small MLP trained with the
flow-matching loss on the generator's samples, and the two alternate 5:1 as in DMD2.
Only what touches the DiT and the video data is swapped (`ToyDmd`).

Set ``TM_PLOTS=<dir>`` to save a before/after scatter plot.
"""

import math
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from talkingmachines.diffusion import dmd, flow
from talkingmachines.train.config import TrainConfig
from talkingmachines.train.rng import sample_generator
from talkingmachines.train.student import SALT_DMD, DmdTrainer

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


class FakeScore(nn.Module):
    """Velocity model v(x, t) of the generator's current distribution."""

    def __init__(self):
        super().__init__()
        self.net = mlp(3, 2)

    def forward(self, x, t):
        return self.net(torch.cat([x, t[:, None] / 1000], 1))


class ToyDmd(DmdTrainer):
    """`DmdTrainer` with the toy's models: a one-step generator of points (its "rollout" is one
    forward from noise, recomputed with gradients for the generator update), the exact mixture
    denoiser as the real score, an MLP fake score; no data set, no regression term."""

    def make_data(self) -> None:
        pass

    def build(self) -> None:
        torch.manual_seed(self.cfg.seed)
        self.add_group("fake", FakeScore(), self.cfg.dmd.fake_lr, ema=False)
        self.add_group("student", Generator(), self.cfg.optim.lr, ema=False)
        self.sampler = dmd.make_sigma_sampler(self.cfg.dmd.s_min, self.cfg.dmd.s_max)
        self.pairs = None

    def batch(self, step: int):
        return SimpleNamespace(js=list(self.local_indices()))

    def _rollout(self, b, step: int):
        z = torch.randn(len(b.js), 2, generator=sample_generator(self.cfg.seed, step, 0, SALT_DMD))
        with torch.no_grad():
            return self.groups["student"].handle(z), z, None

    def _generator_x0(self, b, step, out, last_in, prefix):
        return self.groups["student"].handle(last_in), None

    def _real_x0(self, b):
        return gmm_x0

    def _fake_v(self, b):
        return self.groups["fake"].handle

    def export(self, final: Path) -> None:
        pass


GEN_STEPS = 300
BATCH = 256


def toy_config(out: Path, **kw) -> TrainConfig:
    d = dict(stage="dmd", out=str(out), device="cpu", seed=0, batch_size=BATCH, steps=6 * GEN_STEPS, fake_ratio=5,
             lr=5e-4, fake_lr=1e-3, betas=(0.0, 0.99), weight_decay=0.0, warmup=0, grad_clip=10.0,
             ckpt_every=0, log_every=0, progress=False, regression_weight=0.0)
    d.update(kw)
    return TrainConfig.from_dict(d)  # flat keys, as the shipped configs


def run_dmd_toy(out: Path):
    tr = ToyDmd(toy_config(out))
    ev = torch.Generator().manual_seed(123)
    z_eval, ref = torch.randn(2000, 2, generator=ev), sample_gmm(2000, ev)
    tr.setup()
    with torch.no_grad():
        before = tr.groups["student"].module(z_eval)
    tr.run()  # the stage's own loop (setup again, nothing to resume), to the final checkpoint
    with torch.no_grad():
        after = tr.groups["student"].module(z_eval)
    return before, after, ref, [h["group"] for h in tr.history]


def test_dmd_toy_learns_ring_of_gaussians(tmp_path):
    t0 = time.perf_counter()
    before, after, ref, kinds = run_dmd_toy(tmp_path / "toy")
    elapsed = time.perf_counter() - t0
    assert kinds[:6] == ["fake"] * 5 + ["student"] and len(kinds) == 6 * GEN_STEPS

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


def test_trainer_alternates_and_keeps_updates_separate(tmp_path):
    tr = ToyDmd(toy_config(tmp_path / "alt", steps=6, fake_ratio=2, batch_size=16))
    tr.setup()
    kinds = []
    for step in range(6):
        g0 = [p.detach().clone() for p in tr.groups["student"].module.parameters()]
        f0 = [p.detach().clone() for p in tr.groups["fake"].module.parameters()]
        logs = tr.train_step(step)
        kinds.append(logs["group"])
        gen_moved = any(not torch.equal(a, p) for a, p in zip(g0, tr.groups["student"].module.parameters()))
        fake_moved = any(not torch.equal(a, p) for a, p in zip(f0, tr.groups["fake"].module.parameters()))
        assert (gen_moved, fake_moved) == ((True, False) if logs["group"] == "student" else (False, True))
        assert ("dmd_loss" in logs) == (logs["group"] == "student")
    assert kinds == ["fake", "fake", "student"] * 2
    assert tr.expected_updates(tr.groups["student"]) == 2 and tr.expected_updates(tr.groups["fake"]) == 4
