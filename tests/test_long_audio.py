"""Long audio: `iter_audio` gives `load_audio`'s samples piece by piece, and `generate` streams
them, so its memory does not grow with the input's length and inputs over 2 h are accepted."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time
import wave

import numpy as np
import pytest
from test_cli import ENV, EXE
from test_media import encode_audio

from talkingmachines.media import iter_audio, load_audio


@pytest.mark.parametrize("name,codec,rate,fmt,cfmt", [("a.wav", "pcm_s16le", 16000, "s16", None),
                                                     ("a.m4a", "aac", 22050, "fltp", "ipod"),
                                                     ("a.flac", "flac", 44100, "s16", None)])
def test_iter_audio_pieces_join_to_load_audio(tmp_path, name, codec, rate, fmt, cfmt):
    path = tmp_path / name
    encode_audio(path, codec, rate, "mono", fmt, seconds=3.3, container_format=cfmt)
    pieces = list(iter_audio(path, piece_seconds=0.5))
    assert len(pieces) >= 6 and all(p.dtype == np.float32 and p.shape[0] <= 8000 for p in pieces)
    assert all(p.shape[0] == 8000 for p in pieces[:-1])
    np.testing.assert_array_equal(np.concatenate(pieces), load_audio(path))


def write_speechy_wav(path, seconds: float, rate: int = 8000) -> None:
    """8-bit 8 kHz (small on disk even for hours), speech-like bursts of a tone."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(1)
        w.setframerate(rate)
        block = rate * 60
        for i in range(0, int(seconds * rate), block):
            t = np.arange(i, min(int(seconds * rate), i + block)) / rate
            x = 0.3 * (np.sin(2 * np.pi * 3 * t) > -0.3) * np.sin(2 * np.pi * 220 * t)
            w.writeframes((128 + 127 * x).astype(np.uint8).tobytes())


def peak_rss_mb_while_generating(wav, out_dir, seconds: float) -> float:
    """Run `generate`, let it write for `seconds` after its temp MP4 appears, stop it (SIGTERM);
    the child's peak RSS."""
    p = subprocess.Popen([*EXE, "generate", "--audio", str(wav), "-o", str(out_dir / "o.mp4")], env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.time()
    while not glob.glob(str(out_dir / ".o.mp4.*.tmp.mp4")) and p.poll() is None and time.time() - t0 < 600:
        time.sleep(0.1)
    assert p.poll() is None, p.stderr.read().decode()[-2000:]
    time.sleep(seconds)
    p.send_signal(signal.SIGTERM)
    _, status, ru = os.wait4(p.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 128 + signal.SIGTERM, p.stderr.read().decode()[-2000:]
    return ru.ru_maxrss / 1024


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_generate_memory_does_not_grow_with_length(tmp_path):
    """A 2.2 h input (over the old 2 h cap) is accepted and peaks within 10 % of a 1 min one."""
    short, long = tmp_path / "short.wav", tmp_path / "long.wav"
    write_speechy_wav(short, 60)
    write_speechy_wav(long, 2.2 * 3600)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    rss_short = peak_rss_mb_while_generating(short, tmp_path / "a", 15)
    rss_long = peak_rss_mb_while_generating(long, tmp_path / "b", 15)
    print(f"peak RSS: 1 min input {rss_short:.0f} MB, 2.2 h input {rss_long:.0f} MB")
    assert rss_long <= 1.10 * rss_short, (rss_short, rss_long)
    assert not glob.glob(str(tmp_path / "*" / ".*.tmp.mp4"))
