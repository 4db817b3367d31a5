"""Servers and clients for the serve tests, in one place.

`Server`: the app on a loopback port inside the test's event loop (usually with the fake engine,
serve_fakes.py). `start_server`: `talkingmachines serve` as users run it, its own process on the
real engine, with its log in a file. `aiortc_call`: a call from a plain aiortc client (not the
project's code) with a WAV as its mic.
"""

from __future__ import annotations

import asyncio
import contextlib
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


@contextlib.asynccontextmanager
async def fake_server(**kw):
    """`Server` with the fake engine, and an HTTP client session: ``(srv, session)``."""
    async with Server(avatar=FakeAvatar(), **kw) as srv, aiohttp.ClientSession() as s:
        yield srv, s


async def client_offer() -> tuple[RTCPeerConnection, str]:
    """An aiortc peer (audio both ways, video to receive) and its offer's SDP."""
    pc = RTCPeerConnection()
    pc.addTransceiver("audio", direction="sendrecv")
    pc.addTransceiver("video", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    return pc, pc.localDescription.sdp


async def post_offer(s: aiohttp.ClientSession, srv: Server, sdp: str, headers: dict | None = None,
                     **fields) -> tuple[int, dict]:
    """POST ``{"sdp", "type": "offer", **fields}`` to /offer: its status and JSON body."""
    async with s.post(srv.base + "/offer", json={"sdp": sdp, "type": "offer", **fields}, headers=headers) as r:
        return r.status, await r.json()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def real_engine_or_skip():
    try:
        from talkingmachines.stream.generator import load_avatar  # noqa: F401
    except ImportError:
        pytest.skip("engine not built yet")
    return load_avatar


def start_server(port: int, log_path: str | os.PathLike, agent: str = "mirror",
                 extra: list[str] | None = None) -> subprocess.Popen:
    """`python -m talkingmachines serve` with its output going to ``log_path``, not a pipe: a
    pipe nobody drains fills after ~64 KB and then blocks the server on its next log line.
    `server_log` reads it back."""
    cmd = [sys.executable, "-m", "talkingmachines", "serve", "--port", str(port), "--agent", agent, *(extra or [])]
    return popen_logged(cmd, log_path, cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"))


def popen_logged(cmd: list[str], log_path: str | os.PathLike, **kw) -> subprocess.Popen:
    """A child process whose stdout and stderr go to ``log_path`` (read back by `server_log`)."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, **kw)
    proc.log_path = Path(log_path)
    return proc


def server_log(proc: subprocess.Popen) -> str:
    return proc.log_path.read_text(errors="replace")


def wait_for_log(proc: subprocess.Popen, text: str, timeout: float = 120.0) -> str:
    """The server's log once it holds ``text``; RuntimeError if the server exits first."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        log = server_log(proc)
        if text in log:
            return log
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}):\n" + server_log(proc))
        time.sleep(0.1)
    raise TimeoutError(f"{text!r} not in the server log after {timeout} s:\n" + server_log(proc))


async def wait_healthy(base: str, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    t0 = time.monotonic()
    async with aiohttp.ClientSession() as s:
        while time.monotonic() - t0 < timeout:
            if proc.poll() is not None:
                raise RuntimeError("server exited:\n" + server_log(proc))
            try:
                async with s.get(base + "/health") as r:
                    if r.status == 200 and (await r.json())["status"] == "ok":
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.3)
    raise TimeoutError("server did not become healthy")


def stop(proc: subprocess.Popen) -> str:
    """Stop a `popen_logged` process (SIGTERM, then SIGKILL after 10 s); its whole log."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return server_log(proc)
