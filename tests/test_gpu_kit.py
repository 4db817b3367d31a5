"""The GPU session kit on a machine like the lent GPU box (PyTorch, no PyAV, no aiortc): each
command imports only what it uses, and the bundled speech needs no PyAV."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from talkingmachines.audio_io import SPEECH_WAV, read_wav, speech_like

SRC = Path(__file__).resolve().parents[1] / "src"


def blocker(folder: Path, *names: str) -> Path:
    """A folder that, first on PYTHONPATH, makes `import NAME` fail as if NAME were not installed."""
    for n in names:
        (folder / n).mkdir(parents=True, exist_ok=True)
        (folder / n / "__init__.py").write_text(f"raise ModuleNotFoundError(\"No module named '{n}'\", name='{n}')\n")
    return folder


def run_without(tmp_path, names, *args, code=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(blocker(tmp_path / "blocked", *names)), str(SRC)])}
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "talkingmachines", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def test_commands_without_pyav_and_aiortc_run_and_serve_fails_in_one_line(tmp_path):
    r = run_without(tmp_path, ["av", "aiortc"], "info", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["total"] > 1e6
    r = run_without(tmp_path, ["av", "aiortc"], "plan", "--preset", "tiny", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["fits"], r.stderr
    r = run_without(tmp_path, ["av", "aiortc"], "serve", "--port", "0")
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: `serve` needs the Python package"), r.stderr
    r = run_without(tmp_path, ["aiortc"], "serve", "--help")  # its options need none of the server
    assert r.returncode == 0 and "--agent" in r.stdout


def test_bundled_speech_reads_without_pyav(tmp_path):
    code = ("from talkingmachines.audio_io import speech_like; import sys; a = speech_like(3.0); "
            "sys.exit(0 if len(a) == 48000 and a.std() > 0.01 else 1)")
    r = run_without(tmp_path, ["av"], code=code)
    assert r.returncode == 0, r.stderr
    a = read_wav(SPEECH_WAV)
    assert len(speech_like(20.0)) == 320000 and np.array_equal(speech_like(1.0), a[:16000])
    pytest.importorskip("av")
    from talkingmachines.media import load_audio

    b = load_audio(SPEECH_WAV)  # the PyAV path gives the same samples
    assert len(a) == len(b) and np.abs(a - b).max() < 1e-4


def test_compile_makes_one_set_of_graphs_for_all_blocks():
    """One compiled function serves every block: the graphs depend on the shape variants, not on
    the number of layers, and no block falls back to eager (a recompile-limit hit fails the
    warm-up). The eager backend traces exactly as inductor would, without its code generation."""
    import torch

    from talkingmachines.model.compiled import compile_dit
    from talkingmachines.stream.generator import load_avatar

    torch._dynamo.reset()
    a = load_avatar(None, "tiny", "cpu")
    ref = a.new_stream(seed=1)
    ref.push_audio(speech_like(2.0))
    want = [ref.next_chunk().frames for _ in range(3)]
    info = compile_dit(a.dit, a.device, warm=a, backend="eager")
    assert info["compiled"], info
    assert len(a.dit.blocks) == 6 and 2 <= info["compile_graphs"] <= 6, info  # 2 per shape variant, not per layer
    s = a.new_stream(seed=1)
    s.push_audio(speech_like(2.0))
    got = [s.next_chunk().frames for _ in range(3)]
    assert all(np.array_equal(x, y) for x, y in zip(want, got))


def test_device_emulation_runs_every_gpu_check(tmp_path):
    """scripts/gpu_checks.sh as on the lent GPU box, on this CPU: PyAV, aiortc and diffusers
    unimportable except diffusers from the carried wheel (fetched from PyPI by
    scripts/fetch_gpu_wheels.sh, installed with --no-index --no-deps), no network for the hub,
    the tiny preset standing in for the big ones. Every step must succeed, its figures must reach
    gpu.jsonl, and what comes back ($OUT) must fit the device tool's 8 files."""
    import tarfile

    repo = SRC.parent
    wheels = tmp_path / "whl"
    r = subprocess.run(["bash", str(repo / "scripts" / "fetch_gpu_wheels.sh")], capture_output=True, text=True,
                       env={**os.environ, "WHEELS": str(wheels), "PYTHON": sys.executable}, timeout=300)
    assert r.returncode == 0, r.stderr
    assert [w.name.split("-")[0] for w in wheels.glob("*.whl")] == ["diffusers"]
    out, site = tmp_path / "out", tmp_path / "site"
    blocked = blocker(tmp_path / "blocked", "av", "aiortc", "diffusers", "livekit")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(blocked), "PYTHON": sys.executable,
           "OUT": str(out), "SITE": str(site), "WHEELS": str(wheels), "DEVICE": "cpu", "P13": "tiny", "P18": "tiny",
           "N13": "4", "N18": "4", "COMPILE_BACKEND": "eager", "BASELINE_STEPS": "2",
           "BASELINE_FRAMES": "5"}
    r = subprocess.run(["bash", str(repo / "scripts" / "gpu_checks.sh")], capture_output=True, text=True, env=env,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "0 step(s) failed" in r.stdout and (site / "diffusers").is_dir()
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8, files
    lines = [json.loads(ln) for ln in (out / "gpu.jsonl").read_text().splitlines()]
    by_step = {}
    for ln in lines:
        by_step.setdefault(ln["step"], []).append(ln)
    assert set(by_step) == {"bench_13b", "bench_18b", "bench_13b_vae_bf16", "bench_13b_compile"}
    assert by_step["bench_13b_vae_bf16"][-1]["vae_dtype"] == "bfloat16" and by_step["bench_13b"][-1]["vae_dtype"] == "float32"
    assert [ln["section"] for ln in by_step["bench_13b"]][-2:] == ["baseline", "all"]
    for step in by_step.values():
        res = step[-1]
        assert res["section"] == "all" and res["chunks"] == 4 and res["fps"] > 0
    assert by_step["bench_18b"][-1]["kv_cache_speedup"] > 0 and by_step["bench_18b"][-1]["disagg_overlap"] is not None
    comp = by_step["bench_13b_compile"][-1]
    assert [ln["section"] for ln in by_step["bench_13b_compile"]] == ["load", "compile", "first_frame", "stream", "all"]
    assert comp["compiled"] and comp["compile_graphs"] > 0 and comp["recompiled_in_stream"] == 0
    with tarfile.open(out / "logs.tgz") as t:
        names = {n.lstrip("./") for n in t.getnames()}
    assert {"env.log", "cuda_tests.log", "plan.log", "bench_13b.log", "bench_18b.log",
            "bench_13b_compile.log"} <= names
    summary = (out / "summary.txt").read_text()
    assert "0 step(s) failed" in summary


def test_avshim_resamples_like_pyav():
    """scripts/gpu_capacity's PyAV stand-in (the box has no PyAV) gives the speech PyAV gives."""
    pytest.importorskip("av")
    from script_loader import load_script

    from talkingmachines.train.synth.speech import resample

    shim = load_script("scripts/gpu_capacity/avshim/av.py")
    x = np.random.default_rng(0).standard_normal(22050 * 2).astype(np.float32) * 0.1
    want = resample(x, 22050, 16000)
    fr = shim.AudioFrame.from_ndarray(x[None])
    fr.sample_rate = 22050
    got = shim.AudioResampler(rate=16000).resample(fr)[0].to_ndarray().reshape(-1)
    assert got.shape == want.shape and shim.AudioResampler().resample(None) == []
    assert np.corrcoef(got[100:-100], want[100:-100])[0, 1] > 0.98


@pytest.mark.slow
def test_capacity_kit_dry_run_on_cpu(tmp_path):
    """scripts/gpu_capacity/run.sh as on the GPU box (no PyAV: the shim resamples; diffusers from
    the carried wheel), shrunk to a CPU: data synthesised, latent cache built once, two depths
    trained side by side, ODE-distilled, exported, and what comes back fits the device tool's
    limits and unpacks into model folders the stream loads."""
    repo = SRC.parent
    from talkingmachines.train.synth import espeak_available

    if not espeak_available():
        pytest.skip("espeak-ng is not installed")
    kit, out, runs = tmp_path / "kit", tmp_path / "out", tmp_path / "runs"
    r = subprocess.run(["bash", str(repo / "scripts" / "fetch_gpu_wheels.sh")], capture_output=True, text=True,
                       env={**os.environ, "WHEELS": str(kit / "whl"), "PYTHON": sys.executable}, timeout=300)
    assert r.returncode == 0, r.stderr
    blocked = blocker(tmp_path / "blocked", "av", "aiortc", "diffusers")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(blocked), "PYTHON": sys.executable,
           "KIT": str(kit), "OUT": str(out), "RUNS": str(runs), "SITE": str(tmp_path / "site"), "NO_DEB": "1",
           "DEVICE": "cpu", "N": "24", "WORKERS": "2", "STEPS": "4", "MIN_STEPS": "2", "VARIANTS": "ctrl6 d10",
           "ODE_PAIRS": "8", "ODE_TRAIN_STEPS": "2", "DEADLINE": "600", "TAIL": "100"}
    r = subprocess.run(["bash", str(repo / "scripts" / "gpu_capacity" / "run.sh")], capture_output=True, text=True,
                       env=env, timeout=900, cwd=repo)
    log = (out / "driver.log").read_text()
    assert r.returncode == 0 and "done" in log, r.stdout[-3000:] + r.stderr[-2000:]
    assert "ctrl6: exit 0" in log and "d10: exit 0" in log, log
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8 and all(p.stat().st_size < 16 * 2**20 for p in files), files
    assert {p.name for p in files} >= {"ctrl6_dit.part0", "d10_dit.part0", "d10_teacher.part0", "meta.tgz"}
    r = subprocess.run([sys.executable, str(repo / "scripts" / "gpu_capacity" / "unpack.py"), str(out),
                        str(tmp_path / "models")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    from talkingmachines.stream.generator import load_avatar

    for v, layers in (("ctrl6", 6), ("d10", 10)):
        a = load_avatar(str(tmp_path / "models" / v / "model"), "tiny", "cpu")
        assert len(a.dit.blocks) == layers
        s = a.new_stream(seed=0)
        s.push_audio(speech_like(1.0))
        assert np.isfinite(s.next_chunk().frames).all()
