"""The CLI as a user runs it: real processes, real files."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from talkingmachines.media import probe

EXE = [sys.executable, "-m", "talkingmachines.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(*args, cwd=None):
    return subprocess.run([*EXE, *args], capture_output=True, text=True, cwd=cwd, env=ENV, timeout=600)


def write_wav(path, audio, sr=16000, channels=1):
    import av

    with av.open(str(path), "w", format="wav") as c:
        st = c.add_stream("pcm_s16le", rate=sr, layout="mono" if channels == 1 else "stereo")
        data = (np.clip(audio, -1, 1) * 32767).astype(np.int16)
        if channels == 2:
            data = np.stack([data, data], 1)
        fr = av.AudioFrame.from_ndarray(data.reshape(1, -1), format="s16", layout=st.layout.name)
        fr.sample_rate = sr
        for p in st.encode(fr):
            c.mux(p)
        for p in st.encode(None):
            c.mux(p)


def speechy(seconds, sr=16000):
    t = np.arange(int(seconds * sr)) / sr
    env = (np.sin(2 * np.pi * 3 * t) > -0.3).astype(np.float32)
    return (0.3 * env * np.sin(2 * np.pi * 220 * t) * (1 + 0.5 * np.sin(2 * np.pi * 5 * t))).astype(np.float32)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    write_wav(d / "speech.wav", speechy(1.3))
    write_wav(d / "silence.wav", np.zeros(16000, np.float32))
    (d / "noise.wav").write_bytes(os.urandom(5000))
    (d / "empty.wav").write_bytes(b"")
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 160, 3), dtype=np.uint8)).save(d / "face.png")
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(d / "small.png")
    (d / "notimage.png").write_text("hello")
    return d


def test_generate_writes_video_of_audio_length(files, tmp_path):
    out = tmp_path / "out.mp4"
    r = run("generate", "--image", str(files / "face.png"), "--audio", str(files / "speech.wav"), "-o", str(out))
    assert r.returncode == 0, r.stderr
    info = probe(out)
    assert info["has_audio"]
    assert abs(info["video_duration"] - 1.3) <= 0.04 + 1e-6
    assert abs(info["audio_duration"] - 1.3) <= 0.05
    assert info["frames"] == 33  # ceil(1.3 s * 25)
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]


@pytest.mark.parametrize(
    "args, words",
    [
        (["--audio", "{d}/missing.wav"], "missing.wav"),
        (["--audio", "{d}/noise.wav"], "noise.wav"),
        (["--audio", "{d}/empty.wav"], "empty.wav"),
        (["--audio", "{d}/silence.wav"], "silent"),
        (["--audio", "{d}/speech.wav", "--image", "{d}/notimage.png"], "notimage.png"),
        (["--audio", "{d}/speech.wav", "--image", "{d}/small.png"], "too small"),
        (["--audio", "{d}/speech.wav", "--image", "{d}/nothere.png"], "nothere.png"),
    ],
)
def test_bad_input_one_line_exit_2_no_output(files, tmp_path, args, words):
    out = tmp_path / "bad.mp4"
    r = run("generate", *[a.format(d=files) for a in args], "-o", str(out))
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert words in lines[0]
    assert "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_info_counts_parameters_on_meta_device():
    r = run("info", "--preset", "wan-i2v-14b-audio", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    total = info["total"]
    assert 20.0e9 < total < 21.0e9  # Wan2.1-I2V-14B (16.4B with its image branch) + 4.2B audio
    assert 4.1e9 < info["audio_total"] < 4.3e9
    assert 18.0e9 < info["t2v_trunk_plus_audio"] < 18.7e9  # the paper's "18B": 14B trunk + audio


def test_info_unknown_preset_is_one_line():
    r = run("info", "--preset", "nope")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "nope" in lines[0] and "tiny" in lines[0]


def test_an_output_folder_that_cannot_be_made_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    r = run("data", "synth", "--out", str(tmp_path / "file" / "ds"), "--n", "1")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "file/ds" in lines[0], r.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["file"]
    r = run("-v", "data", "synth", "--out", str(tmp_path / "file" / "ds"), "--n", "1")
    assert r.returncode != 0 and "Traceback" in r.stderr  # -v: the traceback, for a bug report


def test_bench_json(tmp_path):
    r = run("bench", "--json", "--chunks", "24", "--plot", str(tmp_path / "lat.png"))
    assert r.returncode == 0, r.stderr
    lines = [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]
    # one line per section as it finishes, then the whole result
    assert [ln["section"] for ln in lines] == ["load", "first_frame", "stream", "kv_cache", "disagg", "baseline", "all"]
    res = lines[-1]
    assert res["chunks"] == 24 and res["fps"] == pytest.approx(25 * res["rtf"], rel=1e-2)
    assert all(res[k] == v for ln in lines[:-1] for k, v in ln.items() if k != "section")
    for k in ("rtf", "first_frame_s", "chunk_ms_early", "chunk_ms_late", "kv_cache_speedup", "rss_growth"):
        assert isinstance(res[k], (int, float)) and res[k] == res[k], k
    assert res["rtf"] > 0 and res["kv_cache_speedup"] > 0
    assert (tmp_path / "lat.png").stat().st_size > 1000


@pytest.fixture(scope="module")
def demo_eval(tmp_path_factory):
    """README step 1 as a new user runs it: `talkingmachines demo` in an empty folder, then
    `talkingmachines eval demo.mp4 --json` (pixel metrics and the face judge)."""
    d = tmp_path_factory.mktemp("demo")
    r = run("demo", cwd=d)
    assert r.returncode == 0, r.stderr
    assert (d / "demo.mp4").is_file()
    r = run("eval", "demo.mp4", "--json", cwd=d)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_demo_mouth_moves_with_speech_and_rests_in_silence(demo_eval):
    """The shipped model's mouth region follows the bundled speech (best lag within 2 frames,
    correlation with the speech energy >= 0.4) and moves at least twice as much in speech as in
    the speech's pauses, measured from the pixels (a secondary measure: it counts blocky
    artifacts in the mouth box as motion)."""
    m = demo_eval
    assert m["lag"] is not None and abs(m["lag"]) <= 2, m
    assert m["confidence"] >= 0.4, m
    assert m["stillness_ratio"] >= 2.0, m


def test_demo_face_is_found_and_talks(demo_eval):
    """Issue 10's bar for `demo`, judged by the packaged landmark model: a face in >= 98 % of
    frames, lip opening following the speech (best lag within 2 frames, correlation >= 0.6) and
    open at least twice as wide in speech as in silence."""
    f = demo_eval["face"]
    assert "unavailable" not in f, f
    assert f["face_found"] >= 0.98, f
    assert f["lag"] is not None and abs(f["lag"]) <= 2 and f["confidence"] >= 0.6, f
    assert f["open_ratio"] is not None and f["open_ratio"] >= 2.0, f


def _commands(parser, prefix=()):
    """(command path, its parser) for every (sub-)command."""
    import argparse

    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, p in a.choices.items():
                yield prefix + (name,), p
                yield from _commands(p, prefix + (name,))


def test_commands_share_one_device_default():
    """Every `--device` means the same by default: auto (the GPU when there is one); the training
    stages' default comes from their config, whose default is auto too. `bench` has all its
    options on its own parser (no options added from elsewhere and read back with defaults)."""
    from talkingmachines.cli import build_parser
    from talkingmachines.train.config import TrainConfig

    cmds = dict(_commands(build_parser()))
    assert {("generate",), ("demo",), ("bench",), ("eval-model",), ("serve",), ("plan",), ("data", "synth")} <= set(cmds)
    devices = {path: next((a.default for a in p._actions if a.dest == "device"), "-") for path, p in cmds.items()}
    with_device = {k: v for k, v in devices.items() if v != "-"}
    assert {("generate",), ("demo",), ("bench",), ("eval-model",), ("serve",)} <= set(with_device)
    assert all(v in ("auto", None) for v in with_device.values()), with_device
    assert TrainConfig().device == "auto"
    bench = {a.dest for a in cmds[("bench",)]._actions}  # bench's own options, all on its parser
    assert {"sections", "compile", "compile_backend", "skip_baseline", "baseline_frames", "decode_device",
            "device", "steps", "seed"} <= bench


def test_device_auto_and_errors():
    import torch

    from talkingmachines.devices import resolve_device
    from talkingmachines.errors import InputError

    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == resolve_device("auto") and resolve_device("cpu") == "cpu"
    with pytest.raises(InputError, match="not a device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA is not available"):
            resolve_device("cuda:1")


def test_data_synth_preview_and_out_required(tmp_path):
    r = run("data", "synth", "--preview", str(tmp_path / "faces.png"), "--size", "64")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "faces.png").read_bytes()[:4] == b"\x89PNG"
    r = run("data", "synth", "--n", "1")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error:") and "--out" in r.stderr


def test_bench_disagg_under_torchrun_and_alone(tmp_path):
    """`torchrun --nproc_per_node 2 -m talkingmachines bench-disagg`: rank 0 the DiT, rank 1 the
    decoder, one JSON line each; run alone it says how to run it, in one line."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
                        "-m", "talkingmachines", "bench-disagg", "--device", "cpu", "--chunks", "3"],
                       capture_output=True, text=True, env=ENV, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = sorted((json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")), key=lambda d: d["rank"])
    assert [(d["rank"], d["stage"], d["chunks"]) for d in lines] == [(0, "dit", 3), (1, "vae", 3)]
    assert all(d["median_ms"] > 0 for d in lines)
    r = run("bench-disagg")
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and "torchrun" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_serve_shows_its_info_log_without_v(tmp_path):
    """`talkingmachines serve` is a server: what it logs at INFO (here: a refused offer) reaches
    its user without -v (the root level is WARNING for every command)."""
    import urllib.error
    import urllib.request

    from serve_helpers import free_port, start_server, stop, wait_for_log

    port = free_port()
    proc = start_server(port, tmp_path / "serve.log")
    try:
        wait_for_log(proc, f"http://127.0.0.1:{port}/")  # listening (the model may still be loading)
        req = urllib.request.Request(f"http://127.0.0.1:{port}/offer", data=json.dumps(
            {"sdp": "v=0\r\n", "type": "offer"}).encode(), headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=30)
        assert e.value.code == 400
        log = wait_for_log(proc, "offer refused", timeout=30)
    finally:
        stop(proc)
    assert "INFO talkingmachines.serve: offer refused: " in log, log


@pytest.mark.parametrize("argv,shown", [
    (["info"], {"talkingmachines.serve": False, "talkingmachines.train": False, "aioice": False}),
    (["-v", "info"], {"talkingmachines.serve": True, "talkingmachines.train": True, "aioice": True}),
    (["serve"], {"talkingmachines.serve": True, "talkingmachines.serve.session": True,
                 "talkingmachines.train": False, "aioice": False}),
])
def test_info_logs_shown_for_serve_or_with_v_only(argv, shown):
    code = ("import json, logging, sys; from talkingmachines.cli import build_parser, configure_logging; "
            "configure_logging(build_parser().parse_args(sys.argv[1:])); "
            f"print(json.dumps({{n: logging.getLogger(n).isEnabledFor(logging.INFO) for n in {sorted(shown)!r}}}))")
    r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == shown


def test_bad_budget_and_eval_counts_are_one_line(tmp_path):
    # a negative budget once started synthesising data; eval-model --n 0 raised a ValueError traceback
    cases = [(("train", "tiny-recipe", "--out", str(tmp_path / "run"), "--budget-minutes", "-5"), "budget_minutes"),
             (("eval-model", "--data", str(tmp_path), "--n", "0"), "--n must be >= 1"),
             (("eval-model", "--data", str(tmp_path), "--long-seconds", "-1"), "--long-seconds must be >= 0"),
             (("eval-model", "--data", str(tmp_path), "--held-out", "1.5"), "--held-out must be a fraction")]
    for argv, says in cases:
        r = run(*argv)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (argv, r.stderr)
        lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and says in lines[0], (argv, r.stderr)
    assert not (tmp_path / "run").exists()  # nothing was started
