"""HTTP surface: health, metrics, busy 503, bad offers 400, token and bind rules, the page."""

from __future__ import annotations

import argparse
import asyncio
import base64
import io

import numpy as np
import pytest
from aiortc import RTCPeerConnection

from serve_fakes import FakeAvatar
from serve_helpers import Server, client_offer
from talkingmachines.errors import InputError
from talkingmachines.serve.app import add_serve_args, check_bind, decode_portrait, is_loopback


def run(coro):
    return asyncio.run(coro)


def test_health_metrics_page_config():
    import aiohttp

    async def main():
        async with Server(avatar=FakeAvatar(), agent="mirror") as srv, aiohttp.ClientSession() as s:
            async with s.get(srv.base + "/health") as r:
                assert r.status == 200 and (await r.json())["status"] == "ok"
            async with s.get(srv.base + "/metrics") as r:
                t = await r.text()
                assert r.status == 200 and "# TYPE tm_sessions_active gauge" in t and "tm_rtf " in t
            async with s.get(srv.base + "/") as r:
                assert r.status == 200 and "<video" in await r.text()
            for f in ("app.js", "style.css"):
                async with s.get(srv.base + "/static/" + f) as r:
                    assert r.status == 200
            async with s.get(srv.base + "/config") as r:
                assert (await r.json())["agent"] == "mirror"

    run(main())


@pytest.mark.parametrize("body,msg", [
    (b"not json", "JSON"),
    (b"[1,2]", "object"),
    (b'{"type":"offer"}', "sdp"),
    (b'{"sdp":"v=0\\r\\n","type":"answer"}', "offer"),
    (b'{"sdp":"hello","type":"offer"}', "v=0"),
    (b'{"sdp":"v=0\\r\\no=- 1 1 IN IP4 0.0.0.0\\r\\nm=bogus\\r\\n","type":"offer"}', "offer"),
    (b'{"sdp":"v=0\\r\\n' + b"a" * 70000 + b'","type":"offer"}', "too large"),
    (b'{"sdp":"v=0","type":"offer","portrait":"data:image/png;base64,AAAA"}', "portrait"),
])
def test_bad_offers_get_400_with_message(body, msg):
    import aiohttp

    async def main():
        async with Server(avatar=FakeAvatar()) as srv, aiohttp.ClientSession() as s:
            async with s.post(srv.base + "/offer", data=body, headers={"Content-Type": "application/json"}) as r:
                j = await r.json()
                assert r.status == 400, j
                assert msg.lower() in j["message"].lower(), j
            assert not srv.state.sessions
            async with s.get(srv.base + "/health") as r:
                assert r.status == 200

    run(main())


def test_oversized_body_400():
    """Refused from the Content-Length at once (raw socket: the answer comes before the body is read)."""

    async def main():
        async with Server(avatar=FakeAvatar()) as srv:
            port = int(srv.base.rsplit(":", 1)[1])
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"POST /offer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 9437184\r\n\r\n" + b"x" * 65536)
            await w.drain()
            head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 400")
            body = await asyncio.wait_for(r.readexactly(int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])), 5)
            assert b"too large" in body
            w.transport.abort()

    run(main())


def test_offer_without_video_400():
    import aiohttp

    async def main():
        pc = RTCPeerConnection()
        pc.addTransceiver("audio", direction="sendrecv")
        await pc.setLocalDescription(await pc.createOffer())
        async with Server(avatar=FakeAvatar()) as srv, aiohttp.ClientSession() as s:
            async with s.post(srv.base + "/offer", json={"sdp": pc.localDescription.sdp, "type": "offer"}) as r:
                j = await r.json()
                assert r.status == 400 and "video" in j["message"]
            assert not srv.state.sessions
        await pc.close()

    run(main())


def test_max_sessions_busy_503_then_free_again():
    import aiohttp

    async def main():
        async with Server(avatar=FakeAvatar(), max_sessions=1) as srv, aiohttp.ClientSession() as s:
            pc1, sdp1 = await client_offer()
            async with s.post(srv.base + "/offer", json={"sdp": sdp1, "type": "offer"}) as r:
                assert r.status == 200
                ans = await r.json()
            pc2, sdp2 = await client_offer()
            async with s.post(srv.base + "/offer", json={"sdp": sdp2, "type": "offer"}) as r:
                j = await r.json()
                assert r.status == 503 and j["error"] == "busy" and r.headers["Retry-After"]
            async with s.get(srv.base + "/metrics") as r:
                assert "tm_sessions_rejected_total 1" in await r.text()
            async with s.post(srv.base + "/hangup", json={"id": ans["id"], "secret": ans["secret"]}) as r:
                assert r.status == 200
            assert not srv.state.sessions
            pc3, sdp3 = await client_offer()
            async with s.post(srv.base + "/offer", json={"sdp": sdp3, "type": "offer"}) as r:
                assert r.status == 200
            for pc in (pc1, pc2, pc3):
                await pc.close()

    run(main())


def test_token_rule():
    import aiohttp

    async def main():
        async with Server(avatar=FakeAvatar(), token="s3cret") as srv, aiohttp.ClientSession() as s:
            pc, sdp = await client_offer()
            async with s.post(srv.base + "/offer", json={"sdp": sdp, "type": "offer"}) as r:
                assert r.status == 401
            async with s.post(srv.base + "/offer", json={"sdp": sdp, "type": "offer"},
                              headers={"Authorization": "Bearer wrong"}) as r:
                assert r.status == 401
            async with s.get(srv.base + "/metrics") as r:
                assert r.status == 401
            async with s.get(srv.base + "/metrics?token=s3cret") as r:
                assert r.status == 200
            async with s.get(srv.base + "/health") as r:
                assert r.status == 200
            async with s.post(srv.base + "/offer", json={"sdp": sdp, "type": "offer"},
                              headers={"Authorization": "Bearer s3cret"}) as r:
                assert r.status == 200
            await pc.close()

    run(main())


def test_bind_rules_and_cli_args():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")
    check_bind("127.0.0.1", None)
    check_bind("0.0.0.0", "tok")
    with pytest.raises(InputError, match="token"):
        check_bind("0.0.0.0", None)
    p = argparse.ArgumentParser()
    add_serve_args(p)
    a = p.parse_args([])
    assert a.host == "127.0.0.1" and a.port == 8000 and a.agent == "mirror"
    from talkingmachines.serve.app import serve_main

    with pytest.raises(InputError):
        serve_main(p.parse_args(["--host", "0.0.0.0", "--token", ""]))
    assert a.offers_per_minute == 30
    with pytest.raises(InputError, match="--offers-per-minute"):
        serve_main(p.parse_args(["--offers-per-minute", "-1"]))


def test_portrait_upload_decodes():
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((40, 30, 3), 200, np.uint8)).save(buf, format="PNG")
    img = decode_portrait("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    assert img.shape == (40, 30, 3) and img.dtype == np.uint8
    with pytest.raises(ValueError):
        decode_portrait("data:image/png;base64,AAAA")
