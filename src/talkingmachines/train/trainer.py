"""The training loop every stage shares (`Trainer`), read top to bottom as in torchtitan::

    setup()                      # distributed, device, preset, the checkpoint to resume, data, models
    resume()                     # load that checkpoint, if any
    for step in range(start, steps):
        batch = batch(step)      # deterministic in (seed, step): same order after a resume
        group, loss, logs = loss(batch, step)     # the stage's forward (which optimiser)
        loss.backward(); clip; optimiser.step(); EMA update; log (tqdm)
        every ckpt_every steps: save()
    save(); export()             # final checkpoint, the stage's product, loss curves (PNG)

Stages subclass `Trainer` and implement `make_data()`, `batch(step)`, `build()` (models and
optimisers, via `add_group` and `add_frozen`), `loss()` and `export()`. The components live in
their own modules: `config` (TrainConfig), `distributed` (process group, FSDP2/DDP),
`rng` (data order, per-sample generators), `ema`, `optim` (AdamW, LR schedule, optimiser
state), `checkpoint` (atomic, verified checkpoints), `plots` (loss curves).
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import InputError
from ..fileio import atomic_save_safetensors, atomic_write_text
from .checkpoint import (CKPT_DIR, FINAL, full_model_state, intact_checkpoint, load_full_model_state,
                         write_checkpoint)
from .config import TrainConfig
from .distributed import Handle, init_distributed, local_slice, parallelize
from .ema import EMA
from .optim import adamw, lr_at, optimizer_from_flat, optimizer_to_flat
from .plots import plot_history
from .rng import rng_state


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
    """The loop. Subclasses: ``make_data()``, ``batch(step)``, ``build()``,
    ``loss(batch, step) -> (group, loss, logs)``, ``export(final_dir)``."""

    stage = "train"

    def __init__(self, cfg: TrainConfig):
        if not cfg.out:
            raise InputError("no output folder (--out)")
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.final = self.out / FINAL  # where export() writes and DONE.json goes
        self.groups: dict[str, Group] = {}
        self.frozen: dict[str, Handle] = {}
        self.history: list[dict] = []
        self.step = 0
        self.start_step = 0  # the step this run began at (after a resume)
        self._t0 = time.time()
        self.wall_before = 0.0  # training seconds of earlier (resumed) runs
        self.saved_step: int | None = None  # the step of the last checkpoint written or resumed from
        self.resume_from: Path | None = None  # the intact checkpoint `resume` loads (found by `setup`)
        self.resumed_from: Path | None = None

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        self.env = init_distributed(cfg.device, cfg.parallel.mode)
        self.device = self.env.device
        self.preset = cfg.make_preset()
        if self.env.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.env.barrier()
        self.resume_from = self.find_checkpoint()  # before build(): a model may take its shape from it
        self.make_data()
        self.build()
        if not self.groups:
            raise RuntimeError(f"{type(self).__name__}.build() added no trainable group")

    def find_checkpoint(self) -> Path | None:
        return intact_checkpoint(self.out, self.env.is_main)

    def make_data(self) -> None:  # pragma: no cover - stages override
        raise NotImplementedError

    def build(self) -> None:  # pragma: no cover
        raise NotImplementedError

    def batch(self, step: int):  # pragma: no cover
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
        if cfg.parallel.grad_checkpointing and hasattr(model, "gradient_checkpointing"):
            model.gradient_checkpointing = True
        model.train()
        h = parallelize(model, self.env, trainable=True)
        opt = adamw(model, lr, cfg.optim.betas, cfg.optim.weight_decay)
        g = Group(name, h, opt, lr, EMA(model, cfg.ema.decay) if ema and cfg.ema.decay > 0 else None)
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
                "data_position": self.data_position(self.step), "rng": rng_state(),
                "group_updates": {k: g.updates for k, g in self.groups.items()},
                "ema_updates": {k: g.ema.updates for k, g in self.groups.items() if g.ema},
                "wall_seconds": self.wall_before + (time.time() - self._t0), "time": time.time(),
                "config": self.cfg.to_dict(), "history": self.history}

    def data_position(self, step: int) -> dict:
        order = getattr(self, "order", None)
        return order.position(step) if order is not None else {"step": step}

    def save_extra(self, folder: Path) -> None:
        """Stage-specific files for a checkpoint being written (rank 0): none by default."""

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
                self.save_extra(tmp)

            path = write_checkpoint(self.out / CKPT_DIR, f"step_{self.step:08d}", write, self.cfg.checkpoint.keep)
        self.saved_step = self.step
        self.env.barrier()
        return path

    def resume(self) -> bool:
        """Load the checkpoint `setup` found (`resume_from`); False when there is none."""
        ck = self.resume_from
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
        self.step = self.start_step = int(state["step"])
        self.history = list(state.get("history", []))
        self.wall_before = float(state.get("wall_seconds", 0.0))
        self._t0 = time.time()
        self.saved_step = self.step
        return True

    # ------------------------------------------------------------------ the loop
    def lr_at(self, g: Group) -> float:
        cfg = self.cfg
        return lr_at(g.updates, g.lr, cfg.optim.warmup, cfg.optim.lr_schedule, self.expected_updates(g),
                     cfg.optim.decay)

    def expected_updates(self, g: Group) -> int:
        return self.cfg.steps

    def train_step(self, step: int) -> dict:
        """One optimiser update: batch, forward, backward, clip, step, EMA. The gradients stay on
        the parameters until the next update."""
        batch = self.batch(step)
        with self.autocast():
            name, loss, logs = self.loss(batch, step)
        g = self.groups[name]
        g.opt.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for p in g.module.parameters() if p.grad is not None]
        clip = self.cfg.optim.grad_clip
        gn = torch.nn.utils.clip_grad_norm_(params, clip if clip else float("inf"))
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

    def run(self) -> Path:
        """setup -> resume -> steps -> final checkpoint -> export. Returns the final folder."""
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
                if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and self.step < cfg.steps:
                    self.save()
                    self.plot()
        finally:
            bar.close()
        if self.saved_step != self.step:
            self.save()
        self.plot()
        final = self.final
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
        env = getattr(self, "env", None)  # None: setup failed before joining a group
        if env is not None and env.distributed and torch.distributed.is_initialized():
            # DDP's reducer and FSDP's state talk to the process group when they are freed:
            # free them on every rank (after a barrier) before the group goes, or a rank can hang
            import gc

            torch.distributed.barrier()
            self.groups.clear()
            self.frozen.clear()
            gc.collect()
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
