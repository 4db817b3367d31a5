"""Issue 10's capacity lever (run by scripts/gpu_capacity/run.sh) on a lent GPU, in one call: synthesise the face recipe's 1200 clips,
then continue the shipped teacher at 6 (control), 10 and 14 blocks side by side for the same
number of steps (fitted to the time left), ODE-distil and export each, and put the students
(and the 10-block teacher) in $OUT. Experiment-only: not part of the package."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

T0 = time.time()
OUT = Path(os.environ["OUT"])
R = Path(os.environ.get("RUNS", "/tmp/runs"))
DATA = R / "data"
N = int(os.environ.get("N", 1200))
WORKERS = int(os.environ.get("WORKERS", 16))
VARIANTS = os.environ.get("VARIANTS", "ctrl6 d10 d14").split()
STEPS = int(os.environ.get("STEPS", 8000))
DEVICE = os.environ.get("DEVICE", "cuda")
DEADLINE = float(os.environ.get("DEADLINE", 540))  # s after start: every run must be exported by then
TAIL = float(os.environ.get("TAIL", 75))  # s kept for ODE + export after the teacher
PY = sys.executable
SHIPPED = Path("src/talkingmachines/weights/tiny")


def log(msg):
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


def synth():
    """The recipe's own synth stage on the control's config: the clips the CPU recipe makes."""
    from talkingmachines.train.recipe import recipe_config, run_synth
    from talkingmachines.train.synth import espeak_available

    assert espeak_available(), "espeak-ng not found"
    r = recipe_config(os.path.join(os.environ.get("KIT", ".gpukit"), f"cfg_{VARIANTS[0]}.json"), data=str(DATA))
    r.synth.n, r.synth.workers = N, WORKERS
    run_synth(r)


def write_configs(steps):
    subprocess.run([PY, str(Path(__file__).with_name("make_configs.py")), str(steps)], check=True)


def launch(v):
    (R / v).mkdir(parents=True, exist_ok=True)
    if not (R / v / "vae").exists():
        shutil.copytree(SHIPPED / "vae", R / v / "vae")  # same files -> same latent cache id for all runs
    env = dict(os.environ, OMP_NUM_THREADS="4")
    f = open(R / f"{v}.log", "w")
    return subprocess.Popen([PY, "-m", "talkingmachines", "train", "tiny-recipe", "--config", os.path.join(os.environ.get("KIT", ".gpukit"), f"cfg_{v}.json"),
                             "--out", str(R / v), "--data", str(DATA), "--stages", "teacher,ode,dmd,export",
                             "--device", DEVICE], stdout=f, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def progress(v, stage="teacher"):
    try:
        txt = (R / f"{v}.log").read_bytes()[-4000:].decode("utf8", "replace")
    except OSError:
        return 0
    hits = re.findall(stage + r":\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)", txt)
    return int(hits[-1][0]) if hits else 0


def kill(p):
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait()


def package(v):
    m = R / v / "model"
    if not (m / "dit" / "model.safetensors").is_file():
        return
    limit = 15_500_000
    names = [("dit", f"{v}_dit")] + ([("teacher", f"{v}_teacher")] if v == "d10" else [])
    for sub, name in names:
        src = m / sub / "model.safetensors"
        b = src.read_bytes()
        for k in range(0, len(b), limit):
            (OUT / f"{name}.part{k // limit}").write_bytes(b[k:k + limit])
    log(f"{v}: packaged")


def meta():
    files = []
    for v in VARIANTS:
        for f in ["model/preset.json", "model/card.md", "model/dit/config.json", "model/teacher/config.json",
                  "model/loss_teacher.png", "model/loss_ode.png", "timings.json", "teacher/final/DONE.json",
                  "ode/final/DONE.json", "teacher/held_out.json"]:
            if (R / v / f).is_file():
                files.append(f"{v}/{f}")
        if (R / f"{v}.log").is_file():
            files.append(f"{v}.log")
    subprocess.run(["tar", "czf", str(OUT / "meta.tgz"), "-C", str(R), *files], check=False)


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    write_configs(STEPS)
    if not (DATA / "index.json").is_file():
        synth()
    log(f"data: {len(json.loads((DATA / 'index.json').read_text())['clips'])} clips")
    # the first run builds the latent cache; the others start once it is there
    procs = {VARIANTS[0]: launch(VARIANTS[0])}
    cache = None
    while cache is None:
        time.sleep(2)
        found = [d for d in DATA.glob("latents-*") if (d / "index.json").is_file()]
        cache = found[0] if found else None
        if procs[VARIANTS[0]].poll() is not None:
            log(open(R / f"{VARIANTS[0]}.log").read()[-2000:])
            raise SystemExit("first run died")
    log(f"latent cache ready: {cache.name}")
    for v in VARIANTS[1:]:
        procs[v] = launch(v)
    # fit the step count to the time left, from the rates the three runs make together
    time.sleep(40)
    a = {v: progress(v) for v in VARIANTS}
    ta = time.time()
    time.sleep(20)
    b = {v: progress(v) for v in VARIANTS}
    rate = {v: (b[v] - a[v]) / (time.time() - ta) for v in VARIANTS}
    log(f"steps/s: {json.dumps({v: round(r, 1) for v, r in rate.items()})}, at {b}")
    left = DEADLINE - TAIL - (time.time() - T0)
    fits = all(b[v] + rate[v] * left >= STEPS for v in VARIANTS)
    if not fits:
        steps = max(int(os.environ.get("MIN_STEPS", 500)), int(min(rate[v] * (left - 25) for v in VARIANTS) // 100 * 100))
        log(f"{STEPS} steps do not fit in {left:.0f} s: restarting with {steps}")
        for p in procs.values():
            kill(p)
        for v in VARIANTS:
            shutil.rmtree(R / v / "teacher", ignore_errors=True)
        write_configs(steps)
        procs = {v: launch(v) for v in VARIANTS}
    else:
        log(f"{STEPS} steps fit")
    done = set()
    while len(done) < len(VARIANTS) and time.time() - T0 < DEADLINE + 30:
        time.sleep(5)
        for v, p in procs.items():
            if v not in done and p.poll() is not None:
                done.add(v)
                log(f"{v}: exit {p.returncode}; {(R / f'{v}.log').read_bytes()[-300:].decode('utf8', 'replace')!r}")
                package(v)
        if int(time.time() - T0) % 60 < 5:
            log("progress " + json.dumps({v: [progress(v), progress(v, 'ode')] for v in VARIANTS}))
    for v, p in procs.items():
        if v not in done:
            log(f"{v}: killed at the deadline (teacher {progress(v)}, ode {progress(v, 'ode')})")
            kill(p)
    meta()
    log("done")


if __name__ == "__main__":
    main()
