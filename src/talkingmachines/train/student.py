"""Stages 2 and 3: the sparse-causal student (ODE-pair initialisation, then asymmetric DMD).

**ode** (CausVid's student initialisation). The frozen bidirectional teacher samples ODE
trajectories (Euler, ``ode_steps`` shifted steps with the student's sigmas inserted, audio/
image CFG) for ``ode_pairs`` crops: ``OUT/pairs/pairs_XXXXX.safetensors`` hold the
trajectory at the student's sigmas ``xs`` [B, K, C, F, h, w] and the teacher's result ``x0``.
The student (a copy of the teacher) then runs the sparse-causal mask with teacher forcing
(the teacher's clean result is the context chunk i-1 sees) and regresses ``x0`` from
``xs[k]``, with the step ``k`` of the 2-step schedule drawn per chunk.

**dmd** (asymmetric Distribution Matching Distillation). Per update:

* the student rolls out the clip chunk by chunk with its fixed schedule
  (``StreamConfig.student_timesteps``, x0 prediction then re-noising), each chunk seeing the
  sink and its own previous clean chunk, without gradients; with probability
  ``real_context_prob`` the first chunk is the real clip's (a continuation, as in a running
  stream), so training mixes real clips and the student's own rollouts;
* generator update (1 in ``fake_ratio + 1``): the last denoising step of every chunk is
  recomputed with gradients in one ``forward_causal(..., x_clean=detached own outputs)``
  pass; the loss is `dmd.dmd_generator_loss` (re-noise, the frozen teacher with audio CFG
  as the real score, the fake score as the fake one) plus ``regression_weight`` x the ODE
  regression on the ode stage's pairs (batched into the same forward);
* fake-score update (the others): `dmd.fake_score_loss` (flow matching) on fresh rollouts.

The fake score is a bidirectional copy of the teacher. The student and the fake score are
separate trainable groups with their own AdamW and EMA; checkpoints hold both.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..diffusion import dmd as D
from ..diffusion import flow
from ..errors import InputError
from .checkpoint import FINAL
from .config import TrainConfig
from .distributed import Handle
from .rng import GlobalOrder, sample_generator
from ..pipeline import bidirectional_v, causal_x0, guided_v, rollout
from .latents import Batch
from .teacher import DiTStage, new_dit

SALT_PAIRS, SALT_ODE, SALT_DMD, SALT_MODE = 11, 12, 13, 14


def _cond(b) -> tuple:
    """(text, image) embeddings of a batch: a `data prep` batch has them, synthetic ones do not."""
    return getattr(b, "text", None), getattr(b, "image", None)


# ============================================================================ ODE pairs
def _merged_sigmas(steps: int, shift: float, student: list[float]) -> tuple[list[float], list[int]]:
    grid = flow.sigmas(steps, shift, spacing="wan").tolist()
    merged = sorted({round(float(s), 6) for s in grid + list(student)}, reverse=True)
    return merged, [merged.index(round(float(s), 6)) for s in student]


@torch.no_grad()
def make_ode_pairs(teacher: Handle, data, preset, cfg: TrainConfig, out_dir: Path, env) -> Path:
    """Teacher ODE solutions for ``cfg.ode.pairs`` crops, ``cfg.ode.batch`` per file (resumable;
    files are split over ranks)."""
    from tqdm.auto import tqdm

    from ..fileio import atomic_save_safetensors

    out_dir = Path(out_dir)
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    env.barrier()
    student_sig = flow.student_schedule(preset.stream).tolist()[:-1]
    merged, rec = _merged_sigmas(cfg.ode.steps, preset.stream.flow_shift, student_sig)
    n_files = math.ceil(cfg.ode.pairs / cfg.ode.batch)
    order = GlobalOrder(len(data), cfg.ode.batch, cfg.seed + 7919)
    # rounds of `world` files, one per rank; under FSDP every rank must run every forward
    # (the teacher's shards are gathered collectively), so a rank without a file of its own
    # in the last round recomputes one without saving it.
    rounds = math.ceil(n_files / env.world)
    bar = tqdm(total=rounds, desc="ode pairs", unit="round", disable=not (cfg.progress and env.is_main))
    for rnd in range(rounds):
        files = [rnd * env.world + k for k in range(env.world) if rnd * env.world + k < n_files]
        if all((out_dir / f"pairs_{f:05d}.safetensors").is_file() for f in files):
            bar.update(1)
            continue
        f = rnd * env.world + env.rank
        save = f < n_files and not (out_dir / f"pairs_{f:05d}.safetensors").is_file()
        f = f % n_files
        b = data.collate([data.get(*x) for x in order.global_batch(f)]).to(env.device)
        gens = [sample_generator(cfg.seed, f, j, SALT_PAIRS) for j in range(len(b))]
        x1 = torch.stack([torch.randn(tuple(b.z[0, :, 1:].shape), generator=g) for g in gens]).to(env.device)
        text, image = _cond(b)
        fn = guided_v(teacher, b.ref, b.audio, preset, cfg.guidance.audio, cfg.guidance.ref, text=text, image=image,
                      ref_max_sigma=cfg.guidance.ref_max_sigma)
        traj = {}

        def keep(i, x, v):
            if i in rec:
                traj[i] = x.detach().clone()

        x0 = flow.euler_sample(fn, x1, merged, callback=keep)
        xs = torch.stack([traj[i] for i in rec], dim=1)
        if save:
            cond = {k: v for k, v in (("text", text), ("image", image), ("mouth", b.mouth)) if v is not None}
            atomic_save_safetensors({"xs": xs, "x0": x0, "ref": b.ref, "audio": b.audio, "z": b.z[:, :, 1:],
                          "sigmas": torch.tensor(student_sig), **cond}, out_dir / f"pairs_{f:05d}.safetensors",
                         {"clips": json.dumps(b.clips), "ode_steps": str(cfg.ode.steps)})
        bar.update(1)
    bar.close()
    env.barrier()
    if env.is_main:
        from ..fileio import atomic_write_text

        atomic_write_text(out_dir / "DONE.json", json.dumps({"files": n_files, "pairs": n_files * cfg.ode.batch,
                                                             "ode_steps": cfg.ode.steps, "sigmas": merged,
                                                             "cfg_audio": cfg.guidance.audio,
                                                             "cfg_ref": cfg.guidance.ref,
                                                             "cfg_ref_max_sigma": cfg.guidance.ref_max_sigma}))
    env.barrier()
    return out_dir


class OdePairs:
    """All pairs of a pairs folder in memory (small at tiny scale). Pairs made from a `data prep`
    cache also hold the prompt (``text``) and reference CLIP (``image``) embeddings."""

    def __init__(self, root: Path):
        from safetensors.torch import load_file

        files = sorted(Path(root).glob("pairs_*.safetensors"))
        if not files:
            raise InputError(f"{root}: no ODE pairs (run `train ode` first)")
        parts = [load_file(str(f)) for f in files]
        keys = [k for k in ("xs", "x0", "ref", "audio", "z", "text", "image", "mouth") if all(k in p for p in parts)]
        self.t = {k: torch.cat([p[k] for p in parts]) for k in keys}
        self.sigmas = parts[0]["sigmas"].tolist()

    def __len__(self) -> int:
        return self.t["x0"].shape[0]

    def take(self, idx: list[int], device) -> dict:
        i = torch.as_tensor(idx, dtype=torch.long)
        return {k: v[i].to(device) for k, v in self.t.items()}


def regression_inputs(pb: dict, sigmas: list[float], cf: int, gens):
    """Per chunk, a random step k of the schedule: noisy frames ``xs[k]`` at sigma ``s_k``."""
    xs = pb["xs"]  # [B, K, C, F, h, w]
    B, K, C, F = xs.shape[:4]
    ks = torch.stack([torch.randint(K, (F // cf,), generator=g) for g in gens]).repeat_interleave(cf, 1)  # [B, F]
    ks = ks.to(xs.device)
    idx = ks[:, None, None, :, None, None].expand(B, 1, C, F, *xs.shape[-2:])
    x = xs.gather(1, idx)[:, 0]
    s = torch.tensor(sigmas, device=xs.device)[ks]
    return x, s


def mouth_mse(diff: torch.Tensor, mouth: torch.Tensor) -> torch.Tensor:
    """Per-sample mean of ``diff**2`` ([B, C, F, h, w]) over the mouth mask ([B, h, w], 0/1);
    0 for a sample without a mouth box."""
    m = mouth.float()[:, None, None].expand_as(diff)
    return (diff.float().pow(2) * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1.0)


# ============================================================================ ode stage
class OdeTrainer(DiTStage):
    stage = "ode"

    def make_data(self) -> None:
        super().make_data()  # the latent crops (for the pairs)

    def check_pairs(self) -> None:
        if self.cfg.ode.gt_mouth_weight > 0 and "mouth" not in self.pairs.t:
            raise InputError(f"{self.pairs_dir}: ode.gt_mouth_weight needs pairs that hold the mouth box "
                             "(made from synthetic clips by this version; remove the folder to remake them)")

    def build(self) -> None:
        cfg = self.cfg
        if not cfg.teacher:
            raise InputError("no teacher (--teacher RUN_DIR or a DiT folder)")
        teacher = new_dit(self.preset, cfg.teacher, cfg.seed)
        student = new_dit(self.preset, cfg.init_from or cfg.teacher, cfg.seed)
        th = self.add_frozen("teacher", teacher)
        self.pairs_dir = self.out / "pairs"
        make_ode_pairs(th, self.data, self.preset, cfg, self.pairs_dir, self.env)
        self.pairs = OdePairs(self.pairs_dir)
        self.check_pairs()
        del self.frozen["teacher"], th, teacher  # not needed for the regression itself
        self.order = GlobalOrder(len(self.pairs), cfg.batch_size, cfg.seed)
        self.add_group("student", student, cfg.optim.lr)

    def batch(self, step: int):
        glob = self.order.global_batch(step)
        js = list(self.local_indices())
        pb = self.pairs.take([glob[j][0] for j in js], self.device)
        pb["js"] = js
        return pb

    def loss(self, pb: dict, step: int):
        cf = self.preset.stream.chunk_frames
        gens = [sample_generator(self.cfg.seed, step, j, SALT_ODE) for j in pb["js"]]
        x, s = regression_inputs(pb, self.pairs.sigmas, cf, gens)
        x0 = causal_x0(self.groups["student"].handle, x, s, pb["ref"], pb["audio"], pb["x0"], self.preset,
                       pb.get("text"), pb.get("image"))
        per = (x0.float() - pb["x0"].float()).pow(2).flatten(1).mean(1)
        w = self.cfg.ode.gt_mouth_weight
        if w <= 0:
            return "student", per.mean(), {}
        gt = mouth_mse(x0 - pb["z"], pb["mouth"])
        return "student", (per + w * gt).mean(), {"gt_mouth_loss": gt.mean().item()}


# ============================================================================ dmd stage
class DmdTrainer(DiTStage):
    """The DMD stage. What depends on the DiT and the data is in `build`, `_rollout`,
    `_generator_x0`, `_real_x0` and `_fake_v`; `loss` and the `Trainer` loop are the algorithm,
    which tests/test_dmd_toy.py runs unchanged on a 2-D mixture."""

    stage = "dmd"

    def build(self) -> None:
        cfg = self.cfg
        if not cfg.teacher:
            raise InputError("no teacher (--teacher RUN_DIR or a DiT folder)")
        if not cfg.init_from:
            raise InputError("no student to start from (--init-from ODE_RUN_DIR)")
        teacher = new_dit(self.preset, cfg.teacher, cfg.seed)
        fake = new_dit(self.preset, cfg.teacher, cfg.seed)
        student = new_dit(self.preset, cfg.init_from, cfg.seed)
        self.teacher = self.add_frozen("teacher", teacher)
        self.add_group("fake", fake, cfg.dmd.fake_lr or cfg.optim.lr, ema=False)
        self.add_group("student", student, cfg.optim.lr)
        self.sigmas = flow.student_schedule(self.preset.stream).tolist()
        self.sampler = D.make_sigma_sampler(cfg.dmd.s_min, cfg.dmd.s_max)
        self.pairs = None
        if cfg.dmd.regression_weight > 0:
            pdir = Path(cfg.init_from) / "pairs"
            if not pdir.is_dir():
                raise InputError(f"regression_weight > 0 needs the ode run's pairs in {pdir} "
                                 "(or set regression_weight to 0)")
            self.pairs = OdePairs(pdir)
            if self.pairs.t["x0"].shape[2] != cfg.clip_chunks * self.preset.stream.chunk_frames:
                raise InputError("the ODE pairs were made with another clip_chunks than this dmd run")
            self.pair_order = GlobalOrder(len(self.pairs), cfg.batch_size, cfg.seed + 1)

    def expected_updates(self, g) -> int:
        k = self.cfg.dmd.fake_ratio
        n_gen = self.cfg.steps // (k + 1)
        return n_gen if g.name == "student" else self.cfg.steps - n_gen

    def is_generator_step(self, step: int) -> bool:
        k = self.cfg.dmd.fake_ratio
        return step % (k + 1) == k

    def _rollout(self, b: Batch, step: int):
        cfg = self.cfg
        cf = self.preset.stream.chunk_frames
        gens = [sample_generator(cfg.seed, step, j, SALT_DMD) for j in b.js]
        mode = torch.rand(1, generator=sample_generator(cfg.seed, step, 0, SALT_MODE)).item()
        prefix = b.z[:, :, 1: 1 + cf] if (mode < cfg.dmd.real_context_prob and cfg.clip_chunks > 1) else None
        out, last_in = rollout(self.groups["student"].handle, b.ref, b.audio, self.preset, self.sigmas, gens, prefix,
                               *_cond(b))
        return out, last_in, prefix

    def _real_x0(self, b: Batch):
        text, image = _cond(b)
        fn = guided_v(self.teacher, b.ref, b.audio, self.preset, self.cfg.guidance.audio, self.cfg.guidance.ref,
                      text=text, image=image, ref_max_sigma=self.cfg.guidance.ref_max_sigma)
        return flow.x0_fn_from_v(fn)

    def _fake_v(self, b: Batch):
        fake = self.groups["fake"].handle
        text, image = _cond(b)
        return lambda x, t: bidirectional_v(fake, x, t, b.ref, b.audio, self.preset, text=text, image=image)

    def _generator_x0(self, b: Batch, step: int, out, last_in, prefix):
        """The student's output with gradients, for the generator update: every chunk's last
        denoising step recomputed in one causal pass, the ODE regression inputs batched into the
        same forward. Returns the rollout's x0 and ``(x0, target)`` of the regression (or None)."""
        cf = self.preset.stream.chunk_frames
        B, C, F = out.shape[:3]
        s_frames = torch.full((B, F), self.sigmas[-2], device=out.device)
        context = out.detach()
        x, ref, audio = last_in, b.ref, b.audio
        text, image = _cond(b)
        n_reg = 0
        if self.pairs is not None:
            glob = self.pair_order.global_batch(step)
            pb = self.pairs.take([glob[j][0] for j in b.js], out.device)
            rg = [sample_generator(self.cfg.seed, step, j, SALT_ODE) for j in b.js]
            xr, sr = regression_inputs(pb, self.pairs.sigmas, cf, rg)
            x = torch.cat([x, xr])
            s_frames = torch.cat([s_frames, sr])
            ref = torch.cat([ref, pb["ref"]])
            audio = torch.cat([audio, pb["audio"]])
            context = torch.cat([context, pb["x0"]])
            if text is not None:  # pairs from the same prep cache carry their own embeddings
                text = torch.cat([text, pb["text"]])
            if image is not None:
                image = torch.cat([image, pb["image"]])
            n_reg = len(xr)
        x0_all = causal_x0(self.groups["student"].handle, x, s_frames, ref, audio, context, self.preset, text, image)
        x0_gen = x0_all[:B]
        if prefix is not None:  # the real first chunk is given, not generated
            x0_gen = torch.cat([prefix, x0_gen[:, :, prefix.shape[2]:]], dim=2)
        return x0_gen, ((x0_all[B:], pb["x0"]) if n_reg else None)

    def loss(self, b: Batch, step: int):
        """DMD2's two time-scale alternation: ``fake_ratio`` fake-score updates (flow matching on
        fresh rollouts), then one generator update (the DMD loss, plus the weighted regression)."""
        cfg = self.cfg
        out, last_in, prefix = self._rollout(b, step)
        g = sample_generator(cfg.seed, step, self.env.rank, SALT_DMD + 100)  # per rank
        if not self.is_generator_step(step):
            loss, diag = D.fake_score_loss(self._fake_v(b), out, self.sampler, g)
            return "fake", loss, {"fake_loss": diag["fake_loss"]}
        x0_gen, reg = self._generator_x0(b, step, out, last_in, prefix)
        dmd_loss, diag = D.dmd_generator_loss(x0_gen, self._real_x0(b), flow.x0_fn_from_v(self._fake_v(b)),
                                              self.sampler, g)
        losses, weights = {"dmd": dmd_loss}, {"dmd": cfg.dmd.weight}
        if reg is not None:
            losses["regression"], weights["regression"] = D.regression_loss(*reg), cfg.dmd.regression_weight
        total, parts = D.combine_losses(losses, weights)
        logs = {"dmd_loss": parts["dmd"], "gen_real_gap": diag["gen_real_gap"], "real_fake_gap": diag["real_fake_gap"]}
        if reg is not None:
            logs["regression_loss"] = float(losses["regression"].detach())
        return "student", total, logs


def train_ode(cfg: TrainConfig) -> Path:
    return OdeTrainer.run_to_end(cfg)


def train_dmd(cfg: TrainConfig) -> Path:
    return DmdTrainer.run_to_end(cfg)


__all__ = ["OdeTrainer", "DmdTrainer", "train_ode", "train_dmd", "make_ode_pairs", "OdePairs", "FINAL"]
