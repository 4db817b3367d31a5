"""End-to-end calls with a plain aiortc client (not the project's code) sending a WAV as its mic.

Fast tests run the server in-process with the fake engine (tests/serve_fakes.py); the
must-show test (`-m slow`) starts `serve --agent mirror` as a separate process on the real
engine (`talkingmachines.stream.generator.load_avatar`).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import wave
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from aiohttp import web
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.contrib.media import MediaPlayer

from serve_fakes import FakeAvatar

from talkingmachines.serve.app import RUNNER_KW, STATE, create_app

ROOT = Path(__file__).resolve().parents[1]


def make_wav(path: Path, seconds: float = 6.0, sr: int = 16_000) -> Path:
    """Speech if espeak-ng is here, else a syllable-like modulated tone."""
    if shutil.which("espeak-ng"):
        text = ("Hello there. I am a talking machine, and this is a test of the real time avatar. "
                "The quick brown fox jumps over the lazy dog, again and again.")
        subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(path), text], check=True)
        return path
    t = np.arange(int(seconds * sr)) / sr
    x = 0.3 * np.sin(2 * np.pi * 180 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes((x * 32767).astype("<i2").tobytes())
    return path


async def aiortc_call(base: str, wav: str, seconds: float, *, token: str | None = None,
                      close: bool = True) -> dict:
    """Place a call like any aiortc user would; count what comes back."""
    pc = RTCPeerConnection()
    player = MediaPlayer(wav)
    pc.addTrack(player.audio)
    pc.addTransceiver("video", direction="recvonly")
    res: dict = {"video_t": [], "audio_frames": 0, "audio_rms": [], "size": None, "tracks": []}
    tasks = []

    @pc.on("track")
    def on_track(track):
        res["tracks"].append(track.kind)

        async def consume():
            while True:
                try:
                    f = await track.recv()
                except Exception:
                    return
                if track.kind == "video":
                    res["video_t"].append(time.monotonic())
                    res["size"] = (f.width, f.height)
                else:
                    res["audio_frames"] += 1
                    a = f.to_ndarray().astype(np.float32) / 32768
                    res["audio_rms"].append(float(np.sqrt(np.mean(a ** 2))))

        tasks.append(asyncio.ensure_future(consume()))

    await pc.setLocalDescription(await pc.createOffer())
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    t0 = time.monotonic()
    async with aiohttp.ClientSession() as s:
        async with s.post(base + "/offer", json={"sdp": pc.localDescription.sdp, "type": "offer"},
                          headers=headers) as r:
            ans = await r.json()
            assert r.status == 200, ans
    res["id"] = ans["id"]
    await pc.setRemoteDescription(RTCSessionDescription(sdp=ans["sdp"], type=ans["type"]))
    res["t0"] = t0
    await asyncio.sleep(seconds)
    res["pc"] = pc
    if close:
        await pc.close()
        for t in tasks:
            t.cancel()
    if res["video_t"]:
        res["first_frame_s"] = res["video_t"][0] - t0
        vt = np.array(res["video_t"])
        # steady-state fps over the last part of the call (after the first second of video)
        tail = vt[vt > vt[0] + 1.0]
        res["fps"] = (len(tail) - 1) / (tail[-1] - tail[0]) if len(tail) > 2 else 0.0
    return res


class Server:
    """The app on a real loopback port inside the test's event loop."""

    def __init__(self, **kw):
        self.kw = kw

    async def __aenter__(self):
        self.app = create_app(**self.kw)
        self.runner = web.AppRunner(self.app, **RUNNER_KW)
        await self.runner.setup()
        self.site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await self.site.start()
        port = self.runner.addresses[0][1]
        self.base = f"http://127.0.0.1:{port}"
        self.state = self.app[STATE]
        return self

    async def __aexit__(self, *a):
        await self.runner.cleanup()


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
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def real_engine_or_skip():
    try:
        from talkingmachines.stream.generator import load_avatar  # noqa: F401
    except ImportError:
        pytest.skip("engine not built yet")
    return load_avatar


def start_server_process(port: int, agent: str = "mirror", extra: list[str] | None = None) -> subprocess.Popen:
    code = ("import sys; from talkingmachines.serve.app import add_serve_args, serve_main; import argparse; "
            "p = argparse.ArgumentParser(); add_serve_args(p); sys.exit(serve_main(p.parse_args(sys.argv[1:])))")
    cmd = [sys.executable, "-c", code, "--port", str(port), "--agent", agent] + (extra or [])
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


async def wait_healthy(base: str, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    t0 = time.monotonic()
    async with aiohttp.ClientSession() as s:
        while time.monotonic() - t0 < timeout:
            if proc.poll() is not None:
                raise RuntimeError("server exited:\n" + (proc.stdout.read() if proc.stdout else ""))
            try:
                async with s.get(base + "/health") as r:
                    if r.status == 200 and (await r.json())["status"] == "ok":
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.3)
    raise TimeoutError("server did not become healthy")


def stop(proc: subprocess.Popen) -> str:
    proc.terminate()
    try:
        out, _ = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out or ""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_must_show_aiortc_client_real_engine(wav):
    real_engine_or_skip()
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_server_process(port, "mirror")
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
        async with Server(avatar=FakeAvatar(compute_s=0.01), agent="mirror", max_sessions=1) as srv:
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
