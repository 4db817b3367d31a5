"""Soak: `serve` on the real tiny engine (its own process, as users run it) through 200 calls
after a warm-up; its RSS must stay flat within 5 %. Before the fix it crept 1-2 MB a call:
glibc heap fragmentation from big per-call buffers (see `serve.app.tame_malloc`)."""

from __future__ import annotations

import asyncio
import json
import os
import time

import aiohttp
import pytest

from serve_helpers import aiortc_call, free_port, make_wav, real_engine_or_skip, server_log, start_server, stop, wait_healthy

WARMUP, CYCLES = int(os.environ.get("TM_SOAK_WARMUP", 20)), int(os.environ.get("TM_SOAK_CYCLES", 200))


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
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_server(port, tmp_path / "serve.log", "mirror", ["--max-sessions", "1", "--offers-per-minute", "0"])
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
        print("server log:", server_log(proc)[-4000:])
        raise
    stop(proc)
    print("server RSS MB (calls, RSS):", json.dumps(series))
    base_rss, end = series[0][1], series[-1][1]
    assert end <= base_rss * 1.05, series
