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
    r = run_without(tmp_path, ["av", "aiortc"], "info", "--preset", "wan-1.3b-audio", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["total"] > 1e9
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
