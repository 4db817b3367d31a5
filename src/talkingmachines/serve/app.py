"""`talkingmachines serve`: aiohttp + aiortc server for FaceTime-style calls with the avatar.

Routes
  GET  /          the call page (static/index.html)
  POST /offer     {"sdp", "type"[, "portrait": data URL]} -> {"sdp", "type", "id"}   (aiortc convention)
  POST /hangup    {"id"}: end a call now (the page sends it on hang-up)
  GET  /health    200 JSON
  GET  /metrics   Prometheus text
  GET  /config    what the page needs (agent name, limits)

Loopback only by default; a non-loopback --host needs --token, checked on /offer, /hangup,
/metrics as `Authorization: Bearer T` or `?token=T`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import hmac
import io
import ipaddress
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from aiohttp import web

from .agents import agent_factory
from .cli import add_serve_args  # noqa: F401  (its home is the light cli module; kept importable here)
from .metrics import Metrics
from .session import CallSession

log = logging.getLogger("talkingmachines.serve")

STATIC = Path(__file__).parent / "static"
MAX_BODY = 8 * 1024 * 1024  # offer JSON incl. an uploaded portrait
MAX_SDP = 64 * 1024
MAX_PORTRAIT_SIDE = 4096

# refuse-and-forget: do not spend 10 s (aiohttp's default) draining bodies we already refused
RUNNER_KW = {"lingering_time": 1.0}

AVATAR = web.AppKey("avatar", object)
STATE = web.AppKey("state", object)


class ServerState:
    def __init__(self, *, agent: str, agent_kwargs: dict, max_sessions: int, token: str | None,
                 portrait: np.ndarray | None, idle_timeout: float):
        self.agent_name = agent
        self.make_agent = agent_factory(agent, **agent_kwargs)
        self.max_sessions = max_sessions
        self.token = token
        self.portrait = portrait
        self.idle_timeout = idle_timeout
        self.sessions: dict[str, CallSession] = {}
        self.reserved = 0
        self.metrics = Metrics()
        self.avatar: Any = None
        self.started = time.time()


def is_loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _bad(msg: str, state: ServerState | None = None, status: int = 400) -> web.Response:
    if state is not None and status == 400:
        state.metrics.offers_bad += 1
    return web.json_response({"error": "bad request" if status == 400 else "error", "message": msg}, status=status)


def _authorized(request: web.Request, token: str | None) -> bool:
    if not token:
        return True
    got = request.query.get("token", "")
    auth = request.headers.get("Authorization", "")
    if auth.startswith("Bearer "):
        got = auth[7:].strip()
    return hmac.compare_digest(got.encode(), token.encode())


def decode_portrait(data: str) -> np.ndarray:
    """A data URL or bare base64 image -> uint8 [H, W, 3] RGB. Raises ValueError."""
    from PIL import Image

    if "," in data and data.startswith("data:"):
        data = data.split(",", 1)[1]
    try:
        raw = base64.b64decode(data, validate=False)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"portrait is not valid base64: {e}") from None
    try:
        img = Image.open(io.BytesIO(raw))
        if max(img.size) > MAX_PORTRAIT_SIDE:
            raise ValueError(f"portrait is larger than {MAX_PORTRAIT_SIDE} px")
        img = img.convert("RGB")
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"portrait is not a readable image: {e}") from None
    return np.asarray(img, dtype=np.uint8)


def load_image(path: str) -> np.ndarray:
    from PIL import Image

    from ..errors import InputError

    try:
        return np.asarray(Image.open(path).convert("RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise InputError(f"image not found: {path}") from None
    except Exception as e:
        raise InputError(f"cannot read image {path}: {e}") from None


# ------------------------------------------------------------------------------------------
async def index(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


async def health(request: web.Request) -> web.Response:
    st: ServerState = request.app[STATE]
    return web.json_response({
        "status": "ok" if st.avatar is not None else "loading",
        "sessions": len(st.sessions), "max_sessions": st.max_sessions, "agent": st.agent_name,
        "chunks": st.metrics.chunks, "uptime_s": round(time.time() - st.started, 1),
    })


async def metrics(request: web.Request) -> web.Response:
    st: ServerState = request.app[STATE]
    if not _authorized(request, st.token):
        return web.json_response({"error": "unauthorized"}, status=401)
    st.metrics.sessions_active = len(st.sessions)
    return web.Response(text=st.metrics.render(), content_type="text/plain", charset="utf-8",
                        headers={"X-Content-Type": "text/plain; version=0.0.4"})


async def config(request: web.Request) -> web.Response:
    st: ServerState = request.app[STATE]
    return web.json_response({"agent": st.agent_name, "max_sessions": st.max_sessions,
                              "token_required": bool(st.token), "text_input": st.agent_name in ("tts", "realtime")})


async def hangup(request: web.Request) -> web.Response:
    st: ServerState = request.app[STATE]
    if not _authorized(request, st.token):
        return web.json_response({"error": "unauthorized"}, status=401)
    try:
        body = json.loads((await request.content.read(4096)).decode() or "{}")
        sid = str(body.get("id", ""))
    except (ValueError, UnicodeDecodeError, AttributeError):
        return _bad("body must be JSON {\"id\": ...}")
    s = st.sessions.get(sid)
    if s is None:
        return web.json_response({"closed": False, "message": "no such session"}, status=404)
    await s.close("hang-up")
    return web.json_response({"closed": True})


async def offer(request: web.Request) -> web.Response:
    st: ServerState = request.app[STATE]
    t_offer = time.monotonic()
    if not _authorized(request, st.token):
        return web.json_response({"error": "unauthorized", "message": "missing or wrong token"}, status=401)
    if request.content_length is not None and request.content_length > MAX_BODY:
        resp = _bad(f"offer too large ({request.content_length} bytes > {MAX_BODY})", st)
        resp.force_close()  # do not linger reading a body we refuse
        return resp
    body = await request.content.read(MAX_BODY + 1)
    if len(body) > MAX_BODY:
        return _bad(f"offer too large (> {MAX_BODY} bytes)", st)
    try:
        params = json.loads(body.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        return _bad(f"offer must be JSON: {e}", st)
    if not isinstance(params, dict):
        return _bad("offer must be a JSON object {\"sdp\", \"type\"}", st)
    sdp, typ = params.get("sdp"), params.get("type")
    if typ != "offer":
        return _bad("\"type\" must be \"offer\"", st)
    if not isinstance(sdp, str) or not sdp.strip():
        return _bad("\"sdp\" must be a non-empty string", st)
    if len(sdp) > MAX_SDP:
        return _bad(f"sdp too large ({len(sdp)} > {MAX_SDP} characters)", st)
    if not sdp.lstrip().startswith("v=0"):
        return _bad("sdp must start with v=0", st)
    portrait = st.portrait
    if params.get("portrait"):
        if not isinstance(params["portrait"], str):
            return _bad("\"portrait\" must be a data URL string", st)
        try:
            portrait = decode_portrait(params["portrait"])
        except ValueError as e:
            return _bad(str(e), st)
    if st.avatar is None:
        return web.json_response({"error": "loading", "message": "the model is still loading"}, status=503,
                                 headers={"Retry-After": "5"})
    if len(st.sessions) + st.reserved >= st.max_sessions:
        st.metrics.sessions_rejected += 1
        return web.json_response(
            {"error": "busy", "message": f"all {st.max_sessions} call slots are in use; try again later",
             "max_sessions": st.max_sessions}, status=503, headers={"Retry-After": "5"})
    st.reserved += 1
    session: CallSession | None = None
    try:
        loop = asyncio.get_running_loop()
        if portrait is None:
            portrait = await loop.run_in_executor(None, st.avatar.default_portrait)
        stream = await loop.run_in_executor(None, st.avatar.new_stream, portrait)

        def _closed(s: CallSession) -> None:
            st.sessions.pop(s.id, None)
            st.metrics.sessions_active = len(st.sessions)

        session = CallSession(stream, st.make_agent(), st.metrics, idle_timeout=st.idle_timeout,
                              on_closed=_closed, t_offer=t_offer)
        try:
            answer = await session.answer(sdp, typ)
        except ValueError as e:  # aiortc raises ValueError for SDP it cannot use
            await session.close("bad offer")
            return _bad(f"cannot use this offer: {e}", st)
        except Exception as e:
            await session.close("setup failed")
            if isinstance(e, (OSError, asyncio.TimeoutError)) or type(e).__module__.startswith("aiohttp"):
                return web.json_response({"error": "agent unavailable", "message": str(e)}, status=502)
            log.exception("offer failed")
            return _bad(f"cannot use this offer: {type(e).__name__}: {e}", st)
        st.sessions[session.id] = session
        st.metrics.sessions_total += 1
        st.metrics.sessions_active = len(st.sessions)
    finally:
        st.reserved -= 1
    return web.json_response({"sdp": answer.sdp, "type": answer.type, "id": session.id})


# ------------------------------------------------------------------------------------------
def create_app(*, avatar: Any = None, avatar_loader: Callable[[], Any] | None = None, agent: str = "mirror",
               agent_kwargs: dict | None = None, image: str | np.ndarray | None = None, max_sessions: int = 2,
               token: str | None = None, idle_timeout: float = 4.0, warmup: bool = True) -> web.Application:
    """The aiohttp application. Pass a loaded `avatar` (tests) or an `avatar_loader` run at startup."""
    portrait = load_image(image) if isinstance(image, str) else image
    st = ServerState(agent=agent, agent_kwargs=agent_kwargs or {}, max_sessions=max_sessions, token=token,
                     portrait=portrait, idle_timeout=idle_timeout)
    st.avatar = avatar
    app = web.Application(client_max_size=MAX_BODY + 1024)
    app[STATE] = st
    app.router.add_get("/", index)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/config", config)
    app.router.add_post("/offer", offer)
    app.router.add_post("/hangup", hangup)
    app.router.add_static("/static/", STATIC, append_version=False)

    async def _startup(app: web.Application) -> None:
        if st.avatar is None and avatar_loader is not None:
            loop = asyncio.get_running_loop()
            avatar = await loop.run_in_executor(None, avatar_loader)
            if warmup:  # first-call costs (kernel selection, allocator) paid before /health says ok
                t = time.perf_counter()
                await loop.run_in_executor(None, _warmup, avatar, st.portrait)
                log.info("warm-up chunk in %.2f s", time.perf_counter() - t)
            st.avatar = avatar

    async def _shutdown(app: web.Application) -> None:
        await asyncio.gather(*(s.close("server shutdown") for s in list(st.sessions.values())),
                             return_exceptions=True)

    app.on_startup.append(_startup)
    app.on_shutdown.append(_shutdown)
    return app


def _warmup(avatar: Any, portrait: np.ndarray | None) -> None:
    stream = avatar.new_stream(avatar.default_portrait() if portrait is None else portrait)
    stream.push_audio(np.zeros(16_000, np.float32))
    for _ in range(2):
        stream.next_chunk()


def default_loader(model: str | None, preset: str, device: str) -> Callable[[], Any]:
    def _load():
        from ..stream.generator import load_avatar

        return load_avatar(model=model, preset=preset, device=device)

    return _load


def check_bind(host: str, token: str | None) -> None:
    from ..errors import InputError

    if not is_loopback(host) and not token:
        raise InputError(f"refusing to listen on non-loopback host {host!r} without --token "
                         "(anyone on the network could place calls); pass --token T")


def run_server(host: str = "127.0.0.1", port: int = 8000, agent: str = "mirror", image: str | None = None,
               max_sessions: int = 2, token: str | None = None, model: str | None = None, preset: str = "tiny",
               device: str = "cpu", agent_kwargs: dict | None = None, idle_timeout: float = 4.0) -> None:
    check_bind(host, token)
    from ..errors import InputError

    try:
        app = create_app(avatar_loader=default_loader(model, preset, device), agent=agent,
                         agent_kwargs=agent_kwargs, image=image, max_sessions=max_sessions, token=token,
                         idle_timeout=idle_timeout)
    except (ValueError, RuntimeError) as e:
        raise InputError(str(e)) from None
    shown = f"[{host}]" if ":" in host else host
    print(f"talkingmachines serve: http://{shown}:{port}/  (agent {agent}, max {max_sessions} calls)", flush=True)
    web.run_app(app, host=host, port=port, print=None, access_log=None, **RUNNER_KW)


def serve_main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.max_sessions < 1:
        from ..errors import InputError

        raise InputError("--max-sessions must be >= 1")
    kw = {k: getattr(args, k, None) for k in ("voice", "greeting", "realtime_url", "realtime_key",
                                               "realtime_protocol", "instructions")}
    run_server(host=args.host, port=args.port, agent=args.agent, image=args.image, max_sessions=args.max_sessions,
               token=args.token, model=args.model, preset=args.preset, device=args.device, agent_kwargs=kw,
               idle_timeout=args.idle_timeout)
    return 0
