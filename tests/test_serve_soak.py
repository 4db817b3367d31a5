"""Soak: `serve` on the real tiny engine (its own process, as users run it) through 200 calls
after a warm-up; its RSS must stay flat within 5 %. Before the fix it crept 1-2 MB a call:
glibc heap fragmentation from big per-call buffers (see `serve.app.tame_malloc`)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import aiohttp
import pytest

from test_serve_webrtc import ROOT, _free_port, aiortc_call, make_wav, real_engine_or_skip, wait_healthy

WARMUP, CYCLES = int(os.environ.get("TM_SOAK_WARMUP", 20)), int(os.environ.get("TM_SOAK_CYCLES", 200))


def start_server(port: int, log_path) -> subprocess.Popen:
    """`serve` with its log going to a file: a pipe nobody reads fills after ~64 KB (some 50
    calls of aioice INFO lines) and then blocks the server's event loop on its next log line."""
    code = ("import sys; from talkingmachines.cli import main; sys.exit(main(['serve'] + sys.argv[1:]))")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_path, "w") as log:
        return subprocess.Popen([sys.executable, "-c", code, "--port", str(port), "--agent", "mirror",
                                 "--max-sessions", "1"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_real_engine_rss_flat_over_200_calls(tmp_path):
    real_engine_or_skip()
    wav = str(make_wav(tmp_path / "speech.wav"))
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "serve.log"
    proc = start_server(port, log_path)
    series = []
    try:
        async def main():
            await wait_healthy(base, proc)
            async with aiohttp.ClientSession() as s:
                for i in range(WARMUP + CYCLES):
                    # each call lasts until its first video frame (a loaded machine may take
                    # seconds), plus half a second of streaming
                    r = await aiortc_call(base, wav, 0.5, close=False)
                    t = time.monotonic()
                    while not r["video_t"] and time.monotonic() - t < 20:
                        await asyncio.sleep(0.05)
                    assert r["video_t"], f"call {i}: no video"
                    await asyncio.sleep(0.5)
                    await r["pc"].close()
                    t = time.monotonic()
                    while time.monotonic() - t < 10:
                        async with s.get(base + "/health") as h:
                            if (await h.json())["sessions"] == 0:
                                break
                        await asyncio.sleep(0.05)
                    else:
                        raise AssertionError(f"call {i}: session not freed")
                    if i >= WARMUP - 1 and (i - WARMUP + 1) % 20 == 0:
                        series.append((i + 1, round(rss_mb(proc.pid), 1)))

        asyncio.run(main())
    except BaseException:
        stop(proc)
        print("server log:", log_path.read_text()[-4000:])
        raise
    stop(proc)
    print("server RSS MB (calls, RSS):", json.dumps(series))
    base_rss, end = series[0][1], series[-1][1]
    assert end <= base_rss * 1.05, series
