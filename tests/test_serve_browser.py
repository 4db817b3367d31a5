"""Headless Chromium places a call from the page (fake mic from a WAV) and sees the avatar play.

Driven over the DevTools protocol with aiohttp websockets (no npm). Loopback only.
`test_browser_call_real_engine` is the must-show test (real engine, `-m slow`);
`test_browser_call_fake_engine` checks the page itself with the test double (also `-m slow`:
starting Chromium takes a few seconds).
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import aiohttp
import pytest

from serve_fakes import FakeAvatar
from serve_helpers import (ROOT, Server, free_port, make_wav, popen_logged, real_engine_or_skip, server_log,
                           start_server, stop, wait_healthy)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
SCREENSHOT = ROOT / "docs" / "screenshot_call.png"


class CDP:
    def __init__(self, ws):
        self.ws = ws
        self.n = 0
        self.pending: dict[int, asyncio.Future] = {}
        self.task = asyncio.ensure_future(self._reader())

    async def _reader(self):
        async for msg in self.ws:
            d = json.loads(msg.data)
            if "id" in d and d["id"] in self.pending:
                self.pending.pop(d["id"]).set_result(d)

    async def call(self, method, **params):
        self.n += 1
        fut = asyncio.get_running_loop().create_future()
        self.pending[self.n] = fut
        await self.ws.send_str(json.dumps({"id": self.n, "method": method, "params": params}))
        d = await asyncio.wait_for(fut, 30)
        if "error" in d:
            raise RuntimeError(f"{method}: {d['error']}")
        return d["result"]

    async def eval(self, expr, gesture=False):
        r = await self.call("Runtime.evaluate", expression=expr, awaitPromise=True, returnByValue=True,
                            userGesture=gesture)
        if "exceptionDetails" in r:
            raise RuntimeError(json.dumps(r["exceptionDetails"])[:500])
        return r["result"].get("value")


def launch_chromium(wav: str, profile: str, width: int = 1100, height: int = 720) -> subprocess.Popen:
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={wav}", f"--user-data-dir={profile}",
            "--autoplay-policy=no-user-gesture-required", "--allow-loopback-in-peer-connection",
            "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
            f"--window-size={width},{height}", "about:blank"]
    return popen_logged(args, Path(profile) / "chromium.log")


async def browser_call(base: str, wav: str, screenshot: Path | None, seconds: float = 6.0) -> dict:
    profile = tempfile.mkdtemp(prefix="tm-chromium-")
    proc = launch_chromium(wav, profile)
    try:
        port_file = Path(profile) / "DevToolsActivePort"
        t0 = time.monotonic()
        while not port_file.exists() or not port_file.read_text().strip():
            if proc.poll() is not None:
                raise RuntimeError("chromium exited: " + server_log(proc))
            if time.monotonic() - t0 > 30:
                raise TimeoutError("chromium did not open its DevTools port")
            await asyncio.sleep(0.1)
        dport = int(port_file.read_text().split()[0])
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{dport}/json/list") as r:
                pages = [t for t in await r.json() if t["type"] == "page"]
            async with http.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                cdp = CDP(ws)
                await cdp.call("Page.enable")
                await cdp.call("Runtime.enable")
                await cdp.call("Page.navigate", url=base + "/")
                for _ in range(100):
                    if await cdp.eval("!!(window.tm && document.readyState === 'complete')"):
                        break
                    await asyncio.sleep(0.1)
                t_call = time.monotonic()
                await cdp.eval("document.getElementById('call').click(), true", gesture=True)
                samples = []
                first_frame = None
                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    s = await cdp.eval("(() => { const v = document.getElementById('avatar');"
                                       " const q = v.getVideoPlaybackQuality ? v.getVideoPlaybackQuality() : {};"
                                       " return {t: v.currentTime, w: v.videoWidth, h: v.videoHeight, paused: v.paused,"
                                       " frames: q.totalVideoFrames || 0, state: tm.state, rtf: tm.rtf,"
                                       " latency: tm.latencyMs, ttff: tm.firstFrameMs, msg: document.getElementById('message').textContent,"
                                       " audio: v.srcObject ? v.srcObject.getAudioTracks().length : 0}; })()")
                    s["wall"] = time.monotonic() - t_call
                    samples.append(s)
                    if first_frame is None and s["w"] > 0 and s["frames"] > 0:
                        first_frame = s["wall"]
                    await asyncio.sleep(0.25)
                if screenshot is not None:
                    shot = await cdp.call("Page.captureScreenshot", format="png")
                    screenshot.parent.mkdir(parents=True, exist_ok=True)
                    screenshot.write_bytes(base64.b64decode(shot["data"]))
                await cdp.eval("tm.hangup(), true")
                await asyncio.sleep(0.5)
                cdp.task.cancel()
        return {"samples": samples, "first_frame_s": first_frame}
    finally:
        stop(proc)
        shutil.rmtree(profile, ignore_errors=True)


def check_playing(res: dict) -> None:
    s = res["samples"]
    last = s[-1]
    assert last["w"] > 0 and last["h"] > 0, last
    playing = [x for x in s if x["w"] > 0]
    assert len(playing) >= 4, s[-3:]
    assert playing[-1]["t"] - playing[0]["t"] > 1.0, (playing[0], playing[-1])  # currentTime advances
    assert playing[-1]["frames"] > playing[0]["frames"], (playing[0], playing[-1])
    assert not last["paused"], last
    assert last["audio"] == 1, last  # the agent's audio track is there too
    assert last["state"] in ("listening", "speaking"), last


pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_browser_call_fake_engine(tmp_path):
    wav = str(make_wav(tmp_path / "mic.wav"))

    async def main():
        async with Server(avatar=FakeAvatar(compute_s=0.05), agent="mirror") as srv:
            res = await browser_call(srv.base, wav, tmp_path / "shot.png", seconds=5.0)
            for _ in range(30):
                if not srv.state.sessions:
                    break
                await asyncio.sleep(0.1)
            assert not srv.state.sessions, "hang-up did not free the session"
            return res

    res = asyncio.run(main())
    print(json.dumps(res["samples"][-1]), res["first_frame_s"])
    check_playing(res)
    assert (tmp_path / "shot.png").stat().st_size > 5000


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_browser_call_real_engine(tmp_path):
    """Must show: the page in headless Chromium places a call to `serve --agent mirror` (real engine)."""
    real_engine_or_skip()
    wav = str(make_wav(tmp_path / "mic.wav"))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_server(port, tmp_path / "serve.log", "mirror")
    try:
        async def main():
            await wait_healthy(base, proc)
            res = await browser_call(base, wav, SCREENSHOT, seconds=8.0)
            async with aiohttp.ClientSession() as s:
                async with s.get(base + "/health") as h:
                    assert h.status == 200
            return res

        res = asyncio.run(main())
        print("browser (real engine):", json.dumps(res["samples"][-1]), "first frame", res["first_frame_s"])
        check_playing(res)
        assert SCREENSHOT.exists()
    finally:
        print(stop(proc)[-3000:])
