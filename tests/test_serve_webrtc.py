"""End-to-end calls with a plain aiortc client (not the project's code) sending a WAV as its mic.

Fast tests run the server in-process with the fake engine (tests/serve_fakes.py); the
must-show test (`-m slow`) starts `serve --agent mirror` as a separate process on the real
engine (`talkingmachines.stream.generator.load_avatar`).
"""

from __future__ import annotations

import asyncio
import json
import os
import time

import aiohttp
import pytest

from serve_fakes import FakeAvatar
from serve_helpers import Server, aiortc_call, free_port, make_wav, real_engine_or_skip, start_server, stop, wait_healthy


@pytest.fixture(scope="module")
def wav(tmp_path_factory) -> str:
    return str(make_wav(tmp_path_factory.mktemp("wav") / "speech.wav"))


@pytest.mark.timeout(60)
def test_aiortc_call_fake_engine(wav):
    async def main():
        async with Server(avatar=FakeAvatar(compute_s=0.05), agent="mirror") as srv:
            r = await aiortc_call(srv.base, wav, 4.0)
            assert "video" in r["tracks"] and "audio" in r["tracks"]
            assert r["first_frame_s"] < 3.0, r["first_frame_s"]
            assert r["fps"] >= 20, r["fps"]
            assert r["size"] == (128, 128)
            assert r["audio_frames"] > 50
            # mirror: the user's speech comes back on the agent audio track
            assert max(r["audio_rms"]) > 0.01
            async with aiohttp.ClientSession() as s:
                async with s.get(srv.base + "/health") as h:
                    assert h.status == 200 and (await h.json())["status"] == "ok"
                async with s.get(srv.base + "/metrics") as m:
                    text = await m.text()
                    assert "tm_chunks_total" in text and "tm_first_frame_seconds_count 1" in text
            # the client closed its peer connection: the slot is freed well within 5 s
            t = time.monotonic()
            while srv.state.sessions and time.monotonic() - t < 5:
                await asyncio.sleep(0.1)
            assert not srv.state.sessions, "session not freed after hang-up"

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_vanished_client_freed_within_5s(wav):
    """A client that disappears without closing anything (its transport just goes quiet)."""

    async def main():
        async with Server(avatar=FakeAvatar(), agent="mirror", idle_timeout=3.0) as srv:
            r = await aiortc_call(srv.base, wav, 1.5, close=False)
            assert srv.state.sessions
            pc = r["pc"]
            # vanish: stop the ICE transport's socket without any DTLS/SCTP goodbye
            for t in pc.getTransceivers():
                t.sender._stop_rtp = True  # noqa: harmless flag if unused
            for tr in pc._RTCPeerConnection__iceTransports:  # noqa: SLF001 - simulate a dead peer
                for proto in tr._connection._protocols:
                    if proto.transport is not None:
                        proto.transport.close()
            t0 = time.monotonic()
            while srv.state.sessions and time.monotonic() - t0 < 8:
                await asyncio.sleep(0.1)
            freed = time.monotonic() - t0
            assert not srv.state.sessions, "vanished client still holds its session"
            assert freed < 5.0, freed
            try:
                await asyncio.wait_for(pc.close(), 3)
            except Exception:
                pass

    asyncio.run(main())


# ------------------------------------------------------------------------------------------
# must show: the real engine, `serve --agent mirror` as its own process
# ------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_must_show_aiortc_client_real_engine(wav, tmp_path):
    real_engine_or_skip()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_server(port, tmp_path / "serve.log", "mirror")
    log = ""
    try:
        async def main():
            await wait_healthy(base, proc)
            r = await aiortc_call(base, wav, 6.0)
            async with aiohttp.ClientSession() as s:
                async with s.get(base + "/health") as h:
                    health = await h.json()
                    assert h.status == 200
                async with s.get(base + "/metrics") as m:
                    metrics = await m.text()
            return r, health, metrics

        r, health, metrics = asyncio.run(main())
        summary = {k: r.get(k) for k in ("first_frame_s", "fps", "size", "audio_frames", "tracks")}
        print("must-show (real engine):", json.dumps(summary), "\n", metrics)
        assert "audio" in r["tracks"] and "video" in r["tracks"]
        assert r["first_frame_s"] < 3.0, summary
        assert r["fps"] >= 20, summary
        assert r["audio_frames"] > 100, summary
        assert health["status"] == "ok"
    finally:
        log = stop(proc)
        print(log[-3000:])


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_100_connect_disconnect_cycles_keep_memory_flat(wav):
    import gc

    async def main():
        async with Server(avatar=FakeAvatar(compute_s=0.01), agent="mirror", max_sessions=1,
                          offers_per_minute=0) as srv:  # 100 calls in about a minute, all from here
            rss = []
            for i in range(100):
                r = await aiortc_call(srv.base, wav, 0.6)
                assert r["video_t"], f"cycle {i}: no video"
                t = time.monotonic()
                while srv.state.sessions and time.monotonic() - t < 5:
                    await asyncio.sleep(0.05)
                assert not srv.state.sessions, f"cycle {i}: session not freed"
                if i % 10 == 9:
                    gc.collect()
                    rss.append(_rss_mb())
            return rss

    rss = asyncio.run(main())
    print("RSS MB every 10 cycles:", [round(x, 1) for x in rss])
    # flat: after the first 20 cycles (warm-up, allocator pools), growth under 30 MB over 80 cycles
    assert rss[-1] - rss[1] < 30, rss
