"""A training run killed with SIGKILL (no chance to clean up) resumes from its last checkpoint with
the same data order: the resumed run ends with exactly the parameters of an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from train_fixtures import make_clips, make_vae, micro_config

from talkingmachines.train.checkpoint import latest_checkpoint
from talkingmachines.train.teacher import TeacherTrainer

STEPS, EVERY = 40, 4

RUNNER = """
import sys, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
from pathlib import Path
from train_fixtures import micro_config
from talkingmachines.train.teacher import TeacherTrainer
t = TeacherTrainer(micro_config(Path({work!r}), "teacher", "killed", steps={steps}, ckpt_every={every}))
t.run()
"""


def _step(run: Path) -> int:
    ck = latest_checkpoint(run)
    return json.loads((ck / "state.json").read_text())["step"] if ck else 0


def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    torch.set_num_threads(1)
    make_clips(tmp_path / "data")
    make_vae(tmp_path / "vae")
    script = RUNNER.format(tests=str(Path(__file__).parent), work=str(tmp_path), steps=STEPS, every=EVERY)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while _step(tmp_path / "killed") < 2 * EVERY and p.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL, p.stderr.read().decode()[-2000:]
    killed_at = _step(tmp_path / "killed")
    assert 2 * EVERY <= killed_at < STEPS  # killed mid-run, after a few checkpoints
    assert not (tmp_path / "killed" / "final").exists()

    resumed = TeacherTrainer(micro_config(tmp_path, "teacher", "killed", steps=STEPS, ckpt_every=EVERY))
    resumed.setup()
    assert resumed.resume() and resumed.step == killed_at
    resumed.run()
    TeacherTrainer(micro_config(tmp_path, "teacher", "whole", steps=STEPS, ckpt_every=EVERY)).run()

    a = load_file(str(latest_checkpoint(tmp_path / "whole") / "model.teacher.safetensors"))
    b = load_file(str(latest_checkpoint(tmp_path / "killed") / "model.teacher.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    ha = json.loads((latest_checkpoint(tmp_path / "whole") / "state.json").read_text())["history"]
    hb = json.loads((latest_checkpoint(tmp_path / "killed") / "state.json").read_text())["history"]
    assert [h["loss"] for h in ha] == [h["loss"] for h in hb]
