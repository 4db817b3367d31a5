"""`generate` under faults: signals, bad output paths and bad --steps. Real processes, real files;
after each fault the previous output file is intact and no temp file is left."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import time

import pytest
from test_cli import ENV, EXE, run, speechy, write_wav


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    d = tmp_path_factory.mktemp("faults")
    write_wav(d / "long.wav", speechy(60.0))  # long enough to be mid-generation when signalled
    write_wav(d / "short.wav", speechy(1.0))
    return d


def _digest(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_signal_mid_generation_leaves_no_temp_and_keeps_old_output(speech, tmp_path, sig):
    out = tmp_path / "out.mp4"
    out.write_bytes(b"the previous output")
    before = _digest(out)
    # SIGINT at its default and unblocked, as in a terminal: a test run started in the background (e.g.
    # `cmd &` in a script) inherits SIGINT ignored, and Python then installs no KeyboardInterrupt
    # handler; a signal mask is inherited too (one clean-clone run got SIGINT ignored to the end)
    def as_in_a_terminal():
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})

    p = subprocess.Popen([*EXE, "generate", "--audio", str(speech / "long.wav"), "-o", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                         preexec_fn=as_in_a_terminal)
    deadline = time.time() + 300
    while not list(tmp_path.glob(".out.mp4.*.tmp.mp4")) and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert p.poll() is None, p.communicate()
    time.sleep(0.5)  # a few chunks into the video
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + sig, err
    assert "Traceback" not in err, err
    assert [q.name for q in tmp_path.iterdir()] == ["out.mp4"], list(tmp_path.iterdir())
    assert _digest(out) == before


def test_output_that_is_a_directory_is_refused_first(speech, tmp_path):
    out = tmp_path / "out.mp4"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    # the --model folder is checked after the output: its error would come first otherwise
    r = run("generate", "--audio", str(speech / "short.wav"), "-o", str(out), "--model", str(tmp_path / "nomodel"))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "is a directory" in lines[0], r.stderr
    assert [q.name for q in out.iterdir()] == ["keep.txt"]


def test_output_folder_not_writable_is_refused(speech, tmp_path):
    import os

    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as root: every folder is writable")
        r = run("generate", "--audio", str(speech / "short.wav"), "-o", str(ro / "x.mp4"))
    finally:
        os.chmod(ro, 0o755)
    assert r.returncode == 2 and r.stderr.startswith("error:") and "not writable" in r.stderr, r.stderr


@pytest.mark.parametrize("steps", ["-3", "0"])
def test_bad_steps_one_line_error(speech, tmp_path, steps):
    out = tmp_path / "o.mp4"
    r = run("generate", "--audio", str(speech / "short.wav"), "-o", str(out), "--steps", steps)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "--steps" in lines[0], r.stderr
    assert list(tmp_path.iterdir()) == []
