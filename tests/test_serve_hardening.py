"""The server under bad input and hostile local callers: big bodies, other origins, DNS
rebinding, someone else's hang-up, offers that never connect, broken SDP, a busy port."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from aiortc import RTCPeerConnection

from serve_fakes import FakeAvatar
from serve_helpers import client_offer, fake_server, post_offer


def run(coro):
    return asyncio.run(coro)


def big_portrait_data_url() -> str:
    """A real photo-sized PNG of noise (incompressible): a 2-5 MB data URL."""
    from PIL import Image

    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (900, 900, 3), dtype=np.uint8)).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    assert 1_000_000 < len(url) < 5_000_000, len(url)
    return url


def test_big_portrait_offer_is_read_whole():
    async def main():
        url = big_portrait_data_url()
        async with fake_server() as (srv, s):
            pc, sdp = await client_offer()
            status, j = await post_offer(s, srv, sdp, portrait=url)
            assert status == 200, j
            assert j["id"] in srv.state.sessions
            await pc.close()

    run(main())


def test_cross_origin_post_is_refused():
    async def main():
        async with fake_server() as (srv, s):
            pc, sdp = await client_offer()
            body = json.dumps({"sdp": sdp, "type": "offer"})
            # what a web page elsewhere can send without a CORS preflight
            async with s.post(srv.base + "/offer", data=body, headers={"Content-Type": "text/plain",
                                                                        "Origin": "http://evil.example"}) as r:
                j = await r.json()
                assert r.status == 403 and "origin" in j["message"].lower(), j
            async with s.post(srv.base + "/offer", data=body, headers={"Origin": "null"}) as r:
                assert r.status == 403
            assert not srv.state.sessions
            # the page itself (same origin) may
            async with s.post(srv.base + "/offer", data=body, headers={"Origin": srv.base}) as r:
                assert r.status == 200, await r.text()
            await pc.close()

    run(main())


def test_dns_rebinding_host_is_refused_unless_allowed():
    async def main():
        async with fake_server() as (srv, s):
            port = srv.base.rsplit(":", 1)[1]
            evil = {"Host": f"rebind.evil.example:{port}"}
            for path in ("/", "/config", "/health"):
                async with s.get(srv.base + path, headers=evil) as r:
                    assert r.status == 403, path
            pc, sdp = await client_offer()
            assert (await post_offer(s, srv, sdp, headers=evil))[0] == 403
            for host in (f"127.0.0.1:{port}", f"localhost:{port}"):
                async with s.get(srv.base + "/config", headers={"Host": host}) as r:
                    assert r.status == 200, host
            assert not srv.state.sessions
            await pc.close()
        async with fake_server(allow_origins=["https://avatar.example.com"]) as (srv, s):
            pc, sdp = await client_offer()
            status, j = await post_offer(s, srv, sdp, headers={"Host": "avatar.example.com",
                                                               "Origin": "https://avatar.example.com"})
            assert status == 200, j
            await pc.close()

    run(main())


def test_hangup_needs_the_calls_secret():
    async def main():
        async with fake_server() as (srv, s):
            pc, sdp = await client_offer()
            _, ans = await post_offer(s, srv, sdp)
            assert len(ans["secret"]) >= 16
            for body in ({"id": ans["id"]}, {"id": ans["id"], "secret": "guess"}):
                async with s.post(srv.base + "/hangup", json=body) as r:
                    assert r.status == 403, body
            assert ans["id"] in srv.state.sessions
            async with s.post(srv.base + "/hangup", json={"id": ans["id"], "secret": ans["secret"]}) as r:
                assert r.status == 200 and (await r.json())["closed"]
            assert not srv.state.sessions
            await pc.close()

    run(main())


def test_never_connected_offer_is_reclaimed_and_limited_per_client():
    async def main():
        async with fake_server(max_sessions=2, connect_timeout=1.5) as (srv, s):
            pc1, sdp1 = await client_offer()
            assert (await post_offer(s, srv, sdp1))[0] == 200  # the answer is never applied: it never connects
            pc2, sdp2 = await client_offer()
            status, j = await post_offer(s, srv, sdp2)
            assert status == 429 and "connecting" in j["message"], j  # one pending offer per client
            t0 = time.monotonic()
            while srv.state.sessions and time.monotonic() - t0 < 6:
                await asyncio.sleep(0.1)
            assert not srv.state.sessions  # reclaimed after connect_timeout
            assert (await post_offer(s, srv, sdp2))[0] == 200
            for pc in (pc1, pc2):
                await pc.close()

    run(main())


def test_default_connect_timeout_is_short():
    from talkingmachines.serve.app import create_app, STATE

    app = create_app(avatar=FakeAvatar())
    assert app[STATE].connect_timeout <= 8.0


def test_health_says_less_with_a_token():
    async def main():
        async with fake_server(token="s3cret") as (srv, s):
            async with s.get(srv.base + "/health") as r:
                assert r.status == 200 and await r.json() == {"status": "ok"}
            async with s.get(srv.base + "/health", headers={"Authorization": "Bearer s3cret"}) as r:
                j = await r.json()
                assert j["status"] == "ok" and "sessions" in j and "agent" in j

    run(main())


def _sdp_without(sdp: str, prefix: str) -> str:
    return "\r\n".join(ln for ln in sdp.split("\r\n") if not ln.startswith(prefix))


@pytest.mark.parametrize("drop,words", [("a=fingerprint", "fingerprint"), ("a=setup", "setup"),
                                        ("a=ice-ufrag", "ice")])
def test_broken_sdp_clear_400_and_no_traceback(caplog, drop, words):
    async def main():
        async with fake_server() as (srv, s):
            pc, sdp = await client_offer()
            status, j = await post_offer(s, srv, _sdp_without(sdp, drop))
            assert status == 400, j
            assert words in j["message"].lower() and "Error" not in j["message"], j
            await asyncio.sleep(1.0)  # give any background task the time to fail
            assert not srv.state.sessions
            await pc.close()

    with caplog.at_level(logging.INFO):
        run(main())
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records if r.exc_info]


def test_port_in_use_is_a_one_line_error():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "talkingmachines", "serve", "--port", str(port)],
                           capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and str(port) in lines[0], r.stderr
    assert "in use" in lines[0]


def test_port_out_of_range_is_a_one_line_error():
    # the resolver would wrap 99999 to 34463 and the server would print a URL it does not serve
    r = subprocess.run([sys.executable, "-m", "talkingmachines", "serve", "--port", "99999"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "99999" in lines[0], r.stderr
    assert "http://" not in r.stdout


def test_offer_rate_limit_per_address_slides():
    from talkingmachines.serve.ratelimit import OfferRateLimit

    now = [100.0]
    lim = OfferRateLimit(3, clock=lambda: now[0])
    for _ in range(3):
        assert lim.retry_after("10.0.0.1") is None
        now[0] += 10
    assert lim.retry_after("10.0.0.1") == pytest.approx(30.0)  # the first offer leaves the window at 160
    assert lim.retry_after("10.0.0.2") is None  # another address has its own budget
    now[0] = 160.0
    assert lim.retry_after("10.0.0.1") is None  # the refused offer was not counted
    assert lim.retry_after("10.0.0.1") == pytest.approx(10.0)
    unlimited = OfferRateLimit(0, clock=lambda: now[0])
    assert all(unlimited.retry_after("10.0.0.1") is None for _ in range(1000))


def test_too_many_offers_from_one_address_get_429():
    async def main():
        async with fake_server(offers_per_minute=3) as (srv, s):
            for _ in range(3):  # every attempt counts, bad ones too
                assert (await post_offer(s, srv, "v=0\r\n"))[0] == 400
            pc, sdp = await client_offer()
            async with s.post(srv.base + "/offer", json={"sdp": sdp, "type": "offer"}) as r:
                j = await r.json()
                assert r.status == 429, j
                assert "too many offers from 127.0.0.1" in j["message"] and "3 a minute" in j["message"], j
                assert 0 < int(r.headers["Retry-After"]) <= 60
            assert not srv.state.sessions
            async with s.get(srv.base + "/metrics") as m:
                assert "tm_offers_rate_limited_total 1" in await m.text()
            await pc.close()

    run(main())


def test_serve_image_is_read_like_generates(tmp_path):
    """`serve --image` reads its portrait as `generate` does (media.load_image, whole): EXIF
    orientation applied, and a clear InputError, not a traceback, for a missing or tiny file."""
    from PIL import Image

    from talkingmachines.errors import InputError
    from talkingmachines.serve.app import load_image

    img = Image.fromarray(np.arange(120 * 80 * 3, dtype=np.uint8).reshape(80, 120, 3))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    img.save(tmp_path / "turned.jpg", exif=exif)
    assert load_image(str(tmp_path / "turned.jpg")).shape == (120, 80, 3)  # displayed upright: tall
    Image.new("RGB", (40, 40)).save(tmp_path / "tiny.png")
    for bad, words in ((tmp_path / "nope.png", "not found"), (tmp_path / "tiny.png", "too small")):
        with pytest.raises(InputError, match=words):
            load_image(str(bad))
