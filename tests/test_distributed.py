"""torch.distributed on CPU (gloo, 2 processes): one training step gives the same loss and the
same (averaged, clipped, gathered) gradients as one process on the same global batch, for FSDP2
(`fully_shard`) and DDP."""

from __future__ import annotations

import faulthandler
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from train_fixtures import make_clips, make_vae, micro_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_step(cfg, stage: str) -> tuple[float, dict]:
    from talkingmachines.train.student import OdeTrainer
    from talkingmachines.train.teacher import TeacherTrainer

    tr = (TeacherTrainer if stage == "teacher" else OdeTrainer)(cfg)
    tr.setup()
    logs = tr.train_step(0)
    # the update's (clipped) gradients stay on the parameters until the next one; gathered
    # from the shards under FSDP (a collective: every rank calls it)
    grads = {k: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone().cpu()
             for k, p in tr.groups[logs["group"]].module.named_parameters() if p.grad is not None}
    tr.cleanup()
    return logs["loss"], grads


def _worker(rank: int, world: int, port: int, tmp: str, mode: str, stage: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    faulthandler.dump_traceback_later(300, exit=True)  # a hung collective fails the test, with a traceback
    tmp = Path(tmp)
    extra = {"teacher": str(tmp / "teacher")} if stage == "ode" else {}
    cfg = micro_config(tmp, stage, f"{stage}_{mode}_{world}", dist_mode=mode, device="cpu", **extra)
    loss, grads = _one_step(cfg, stage)
    if rank == 0:
        torch.save({"loss": loss, "grads": grads}, tmp / f"result_{stage}_{mode}.pt")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from talkingmachines.train.teacher import train_teacher

    tmp = tmp_path_factory.mktemp("dist")
    make_clips(tmp / "data")
    make_vae(tmp / "vae")
    train_teacher(micro_config(tmp, "teacher", "teacher", steps=1))
    return tmp


@pytest.mark.parametrize("stage,mode", [("teacher", "fsdp"), ("teacher", "ddp"), ("ode", "fsdp")])
def test_two_processes_equal_one(work, stage, mode):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        assert k not in os.environ
    extra = {"teacher": str(work / "teacher")} if stage == "ode" else {}
    loss1, g1 = _one_step(micro_config(work, stage, f"{stage}_single", device="cpu", **extra), stage)
    mp.spawn(_worker, args=(2, _free_port(), str(work), mode, stage), nprocs=2, join=True)
    r = torch.load(work / f"result_{stage}_{mode}.pt")
    assert abs(r["loss"] - loss1) < 1e-5, (r["loss"], loss1)
    assert set(r["grads"]) == set(g1)
    for k, g in g1.items():
        torch.testing.assert_close(r["grads"][k], g, rtol=1e-4, atol=1e-5, msg=k)


def test_torchrun_cli(work, tmp_path):
    """The documented launch: `torchrun --nproc-per-node 2 -m talkingmachines train teacher ...`
    joins a gloo group, trains, checkpoints and exports once (rank 0)."""
    import dataclasses
    import json
    import subprocess
    import sys

    cfg = dataclasses.asdict(micro_config(work, "teacher", "unused"))
    for k in ("out", "data", "vae", "stage"):
        cfg.pop(k)
    cfg_file = tmp_path / "teacher.json"
    cfg_file.write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    out = tmp_path / "run"
    # faulthandler: a rank that dies of a signal prints its Python stack (one rank segfaulted once,
    # 2026-12-04, under load, and did not again in nine reruns; the stack says where if it does)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                        str(_free_port()), "-m", "talkingmachines", "train", "teacher", "--config", str(cfg_file),
                        "--data", str(work / "data"), "--vae", str(work / "vae"), "--out", str(out),
                        "--dist-mode", "fsdp", "--no-progress"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-8000:]
    from talkingmachines.model.weights import load_dit
    from talkingmachines.train.checkpoint import latest_checkpoint

    state = json.loads((latest_checkpoint(out) / "state.json").read_text())
    assert len(state["history"]) == cfg["steps"] and state["world_size"] == 2
    assert load_dit(out / "final" / "dit").config.num_layers == 2
