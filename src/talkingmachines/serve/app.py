"""`talkingmachines serve`: aiohttp + aiortc server for FaceTime-style calls with the avatar.

Routes
  GET  /          the call page (static/index.html)
  POST /offer     {"sdp", "type"[, "portrait": data URL]} -> {"sdp", "type", "id", "secret"}   (aiortc convention)
  POST /hangup    {"id", "secret"}: end a call now (the page sends it on hang-up)
  GET  /health    200 JSON (only {"status"} without the token when one is set)
  GET  /metrics   Prometheus text
  GET  /config    what the page needs (agent name, limits)

Loopback only by default; a non-loopback --host needs --token, checked on /offer, /hangup,
/metrics as `Authorization: Bearer T` or `?token=T`.

Hostile local callers and web pages (the loopback default has no token):
* every request's Host must be an IP address, ``localhost``, the --host name or the host of an
  --allow-origin: a DNS-rebinding page (evil.example resolving to 127.0.0.1) is refused;
* a POST carrying an Origin must come from the page's own origin or an --allow-origin: other
  sites cannot place calls with a text/plain "simple" request;
* each call gets a secret in the /offer answer that /hangup must present;
* an offer that never connects is reclaimed after --connect-timeout (6 s), and a client may have
  only one offer connecting at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import errno
import gc
import hmac
import io
import ipaddress
import json
import logging
import math
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit
from typing import Any, Callable

import numpy as np
from aiohttp import web

from .agents import agent_factory
from .cli import add_serve_args  # noqa: F401  (its home is the light cli module; kept importable here)
from .metrics import Metrics
from .ratelimit import OFFERS_PER_MINUTE, OfferRateLimit
from .session import CallSession

log = logging.getLogger("talkingmachines.serve")

STATIC = Path(__file__).parent / "static"
MAX_BODY = 8 * 1024 * 1024  # offer JSON incl. an uploaded portrait
MAX_SDP = 64 * 1024
MAX_PORTRAIT_SIDE = 4096
MAX_CONNECTING_PER_CLIENT = 1  # offers not yet connected, per client address

# refuse-and-forget: do not spend 10 s (aiohttp's default) draining bodies we already refused
RUNNER_KW = {"lingering_time": 1.0}

AVATAR = web.AppKey("avatar", object)
STATE = web.AppKey("state", object)


class ServerState:
    def __init__(self, *, agent: str, agent_kwargs: dict, max_sessions: int, token: str | None,
                 portrait: np.ndarray | None, idle_timeout: float, connect_timeout: float = 6.0,
                 allow_origins: list[str] | None = None, host_names: list[str] | None = None,
                 offers_per_minute: int = OFFERS_PER_MINUTE, align_template: np.ndarray | None = None):
        self.agent_name = agent
        self.make_agent = agent_factory(agent, **agent_kwargs)
        self.max_sessions = max_sessions
        self.token = token
        self.portrait = portrait
        self.align_template = align_template  # uploaded portraits are framed to it (--align-face)
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self.allow_origins = {normalize_origin(o) for o in allow_origins or []}
        self.host_names = {"localhost"} | {h.lower().strip("[]") for h in host_names or []} | {
            urlsplit(o).hostname for o in self.allow_origins}
        self.sessions: dict[str, CallSession] = {}
        self.reserved = 0
        self.reserved_by: dict[str, int] = {}  # offers being set up, per client address
        self.offer_limit = OfferRateLimit(offers_per_minute)
        # one bounded pool of generation threads, reused by every call (see CallSession)
        self.executor = ThreadPoolExecutor(max_sessions, thread_name_prefix="tm-gen")
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


def normalize_origin(origin: str) -> str:
    """``scheme://host[:port]``, lower case; ValueError for anything else."""
    u = urlsplit(origin.strip())
    if u.scheme not in ("http", "https") or not u.hostname or u.path not in ("", "/") or u.query:
        raise ValueError(f"not a web origin (scheme://host[:port]): {origin!r}")
    return f"{u.scheme}://{u.netloc}".lower()


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def foreign_request(request: web.Request, st: ServerState) -> str | None:
    """Why ``request`` does not come from a page of this server (or None when it does)."""
    host = request.headers.get("Host")
    if host is not None:
        try:
            name = urlsplit("//" + host).hostname or ""
        except ValueError:
            name = ""
        # a DNS name is only trusted when it is ours: an attacker's name may resolve here
        if not (_is_ip(name) or name in st.host_names):
            return (f"host {host!r} is not served here (DNS rebinding?); to serve under that name, start "
                    f"with --allow-origin http://{host}")
    if request.method in ("GET", "HEAD", "OPTIONS"):
        return None
    origin = request.headers.get("Origin")
    if origin is None:  # not a browser page: a local program (the token, if set, guards it)
        return None
    try:
        norm = normalize_origin(origin)
    except ValueError:
        norm = None
    if norm is not None and (norm in st.allow_origins or urlsplit(norm).netloc == (host or "").lower()):
        return None
    return f"origin {origin!r} may not use this server; to allow a page there, start with --allow-origin {origin}"


@web.middleware
async def same_origin_only(request: web.Request, handler):
    why = foreign_request(request, request.app[STATE])
    if why is not None:
        log.warning("refused %s %s: %s", request.method, request.path, why)
        return web.json_response({"error": "forbidden", "message": why}, status=403)
    return await handler(request)


async def read_body(request: web.Request, limit: int) -> bytes | None:
    """The whole body, or None when it is longer than ``limit`` (one `read(n)` returns only
    what has arrived so far: a big portrait came in cut)."""
    parts, n = [], 0
    while True:
        b = await request.content.read(256 * 1024)
        if not b:
            return b"".join(parts)
        n += len(b)
        if n > limit:
            return None
        parts.append(b)


def sdp_problem(sdp: str) -> str | None:
    """What an offer's SDP lacks for a call (aiortc would fail later, in the background, with a
    bare AssertionError or AttributeError), or None."""
    from aiortc.sdp import SessionDescription

    try:
        desc = SessionDescription.parse(sdp)
    except Exception as e:
        return f"the SDP cannot be parsed ({type(e).__name__}: {e})"
    if not desc.media:
        return "the SDP has no media sections (m= lines)"
    for m in desc.media:
        where = f"m={m.kind}"
        if m.ice is None or not m.ice.usernameFragment or not m.ice.password:
            return f"{where} has no ICE credentials (a=ice-ufrag / a=ice-pwd)"
        if m.dtls is None:
            return f"{where} has no DTLS role (a=setup)"
        if not m.dtls.fingerprints:
            return f"{where} has no DTLS certificate fingerprint (a=fingerprint)"
    return None


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
    """The portrait at ``path``, whole (the stream frames it), read as `generate` reads one: EXIF
    orientation applied, transparency on white, and a clear InputError for a missing, unreadable,
    tiny or oversized image."""
    from ..media import load_image as read

    return read(path, None)


# ------------------------------------------------------------------------------------------
async def index(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


async def health(request: web.Request) -> web.Response:
    st: ServerState = request.app[STATE]
    status = "ok" if st.avatar is not None else "loading"
    if st.token and not _authorized(request, st.token):
        return web.json_response({"status": status})  # no load or agent details for strangers
    return web.json_response({
        "status": status,
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
    raw = await read_body(request, 4096)
    try:
        body = json.loads((raw or b"").decode() or "{}")
        sid, secret = str(body.get("id", "")), str(body.get("secret", ""))
    except (ValueError, UnicodeDecodeError, AttributeError):
        return _bad("body must be JSON {\"id\": ..., \"secret\": ...}")
    s = st.sessions.get(sid)
    if s is None:
        return web.json_response({"closed": False, "message": "no such session"}, status=404)
    if not hmac.compare_digest(secret.encode(), s.secret.encode()):
        return web.json_response({"error": "forbidden", "message": "wrong or missing call secret"}, status=403)
    await s.close("hang-up")
    return web.json_response({"closed": True})


async def offer(request: web.Request) -> web.Response:
    st: ServerState = request.app[STATE]
    t_offer = time.monotonic()
    if not _authorized(request, st.token):
        return web.json_response({"error": "unauthorized", "message": "missing or wrong token"}, status=401)
    client = request.remote or "?"
    wait = st.offer_limit.retry_after(client)
    if wait is not None:  # before the body is read: a refused offer costs next to nothing
        st.metrics.offers_limited += 1
        resp = web.json_response(
            {"error": "rate limited", "message": f"too many offers from {client}: at most "
             f"{st.offer_limit.per_minute} a minute per address; try again in {math.ceil(wait)} s"},
            status=429, headers={"Retry-After": str(math.ceil(wait))})
        resp.force_close()
        return resp
    if request.content_length is not None and request.content_length > MAX_BODY:
        resp = _bad(f"offer too large ({request.content_length} bytes > {MAX_BODY})", st)
        resp.force_close()  # do not linger reading a body we refuse
        return resp
    body = await read_body(request, MAX_BODY)
    if body is None:
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
    why = sdp_problem(sdp)
    if why is not None:
        log.info("offer refused: %s", why)
        return _bad(f"cannot use this offer: {why}", st)
    if st.avatar is None:
        return web.json_response({"error": "loading", "message": "the model is still loading"}, status=503,
                                 headers={"Retry-After": "5"})
    if len(st.sessions) + st.reserved >= st.max_sessions:
        st.metrics.sessions_rejected += 1
        return web.json_response(
            {"error": "busy", "message": f"all {st.max_sessions} call slots are in use; try again later",
             "max_sessions": st.max_sessions}, status=503, headers={"Retry-After": "5"})
    connecting = st.reserved_by.get(client, 0) + sum(
        1 for s in st.sessions.values() if s.client == client and s.connected_at is None)
    if connecting >= MAX_CONNECTING_PER_CLIENT:
        st.metrics.sessions_rejected += 1
        return web.json_response(
            {"error": "busy", "message": "this client already has a call connecting; wait for it to connect "
                                         "or hang it up"}, status=429, headers={"Retry-After": "2"})
    st.reserved += 1
    st.reserved_by[client] = st.reserved_by.get(client, 0) + 1
    session: CallSession | None = None
    try:
        loop = asyncio.get_running_loop()
        if portrait is None:
            portrait = await loop.run_in_executor(None, st.avatar.default_portrait)
        elif params.get("portrait") and st.align_template is not None:
            from .. import face_align
            from ..errors import InputError

            pr = st.avatar.preset
            try:
                portrait, _ = await loop.run_in_executor(None, lambda: face_align.align_face(
                    portrait, st.align_template, pr.height, pr.width, source="the uploaded portrait"))
            except InputError as e:
                return _bad(str(e), st)
        stream = await loop.run_in_executor(None, st.avatar.new_stream, portrait)

        def _closed(s: CallSession) -> None:
            st.sessions.pop(s.id, None)
            st.metrics.sessions_active = len(st.sessions)
            release_free_memory()

        session = CallSession(stream, st.make_agent(), st.metrics, idle_timeout=st.idle_timeout,
                              connect_timeout=st.connect_timeout, on_closed=_closed, t_offer=t_offer,
                              executor=st.executor, client=client)
        try:
            answer = await session.answer(sdp, typ)
        except ValueError as e:  # aiortc raises ValueError for SDP it cannot use
            await session.close("bad offer")
            log.info("offer refused: %s", e)
            return _bad(f"cannot use this offer: {e}", st)
        except Exception as e:
            await session.close("setup failed")
            if isinstance(e, (OSError, asyncio.TimeoutError)) or type(e).__module__.startswith("aiohttp"):
                log.warning("agent unavailable: %s", e)
                return web.json_response({"error": "agent unavailable", "message": str(e)}, status=502)
            # one line in the log: a client's odd offer is not the server's crash
            log.warning("offer refused: %s: %s", type(e).__name__, e)
            return _bad(f"cannot use this offer ({type(e).__name__}: {e})", st)
        st.sessions[session.id] = session
        st.metrics.sessions_total += 1
        st.metrics.sessions_active = len(st.sessions)
    finally:
        st.reserved -= 1
        st.reserved_by[client] -= 1
        if not st.reserved_by[client]:
            del st.reserved_by[client]
    return web.json_response({"sdp": answer.sdp, "type": answer.type, "id": session.id, "secret": session.secret})


# ------------------------------------------------------------------------------------------
def create_app(*, avatar: Any = None, avatar_loader: Callable[[], Any] | None = None, agent: str = "mirror",
               agent_kwargs: dict | None = None, image: str | np.ndarray | None = None, max_sessions: int = 2,
               token: str | None = None, idle_timeout: float = 4.0, warmup: bool = True,
               connect_timeout: float = 6.0, allow_origins: list[str] | None = None,
               host: str | None = None, offers_per_minute: int = OFFERS_PER_MINUTE,
               align_template: np.ndarray | None = None) -> web.Application:
    """The aiohttp application. Pass a loaded `avatar` (tests) or an `avatar_loader` run at startup.
    ``allow_origins``: other web origins whose pages may place calls (and whose host names this
    server answers to); ``host``: the name it was started with (--host); ``offers_per_minute``: per
    client address, more get HTTP 429 (0: no limit); ``align_template``: the model's face template
    (`face_align`), to which uploaded portraits are framed (``image`` is given framed already)."""
    portrait = load_image(image) if isinstance(image, str) else image
    st = ServerState(agent=agent, agent_kwargs=agent_kwargs or {}, max_sessions=max_sessions, token=token,
                     portrait=portrait, idle_timeout=idle_timeout, connect_timeout=connect_timeout,
                     allow_origins=allow_origins, host_names=[host] if host else None,
                     offers_per_minute=offers_per_minute, align_template=align_template)
    st.avatar = avatar
    app = web.Application(client_max_size=MAX_BODY + 1024, middlewares=[same_origin_only])
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
        st.executor.shutdown(wait=False, cancel_futures=True)

    app.on_startup.append(_startup)
    app.on_shutdown.append(_shutdown)
    return app


def _warmup(avatar: Any, portrait: np.ndarray | None) -> None:
    stream = avatar.new_stream(avatar.default_portrait() if portrait is None else portrait)
    stream.push_audio(np.zeros(16_000, np.float32))
    for _ in range(2):
        stream.next_chunk()


def default_loader(model: str | None, preset: str, device: str, vae_dtype: str = "fp32") -> Callable[[], Any]:
    def _load():
        from ..stream.generator import load_avatar
        from ..stream.options import vae_torch_dtype

        return load_avatar(model=model, preset=preset, device=device, vae_dtype=vae_torch_dtype(vae_dtype))

    return _load


def check_bind(host: str, token: str | None) -> None:
    from ..errors import InputError

    if not is_loopback(host) and not token:
        raise InputError(f"refusing to listen on non-loopback host {host!r} without --token "
                         "(anyone on the network could place calls); pass --token T")


def tame_malloc() -> bool:
    """Keep a long-running server's RSS flat across calls (glibc only; False elsewhere).

    Each call allocates and frees tens of MB of frame, codec and tensor buffers. glibc's
    dynamic mmap threshold rises after the first such free, so later big buffers come from the
    heap, whose free space then cannot go back to the OS around small live blocks: RSS crept
    ~2 MB a call with the real engine while the bytes in use stayed flat (mallinfo2: 142 -> 146
    MB in use, heap 228 -> 302 MB over 30 calls). A fixed 256 KiB threshold (big buffers are
    mmapped and unmapped when freed) and two arenas (`MALLOC_ARENA_MAX=2`) make it flat.
    Settings the user gave in the environment win."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        ok = True
        if not os.environ.get("MALLOC_MMAP_THRESHOLD_"):
            ok &= bool(libc.mallopt(-3, 256 * 1024))  # M_MMAP_THRESHOLD
        if not os.environ.get("MALLOC_ARENA_MAX"):
            ok &= bool(libc.mallopt(-8, 2))  # M_ARENA_MAX
        return ok
    except (OSError, AttributeError):  # not glibc
        return False


def release_free_memory() -> None:
    """When a call ends: collect its garbage now, then hand free heap pages back to the OS.

    A finished call is a web of reference cycles (the peer connection's event handlers hold the
    session, which holds the connection, tracks, codecs and frame buffers). Only a full
    collection frees it, and Python runs one rarely: the server's RSS climbed ~150 MB over 180
    calls, then fell back at once. Collecting here (tens of ms, once per call) frees each call's
    memory as it ends; ``malloc_trim`` returns what glibc would keep."""
    global _LIBC
    gc.collect()
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


def listen_socket(host: str, port: int) -> socket.socket:
    """Bind the port before the (slow) model load, so a busy port is one clear line at once."""
    from ..errors import InputError

    if not 0 <= port <= 65535:  # getaddrinfo would wrap it (99999 -> 34463) and we would print the wrong URL
        raise InputError(f"--port must be 0-65535 (0: any free port), got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise InputError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(128)
    except OSError as e:
        sock.close()
        why = "the port is already in use (another server? pick another --port)" if e.errno == errno.EADDRINUSE \
            else e.strerror
        raise InputError(f"cannot listen on {host}:{port}: {why}") from None
    return sock


def run_server(host: str = "127.0.0.1", port: int = 8000, agent: str = "mirror", image: str | None = None,
               max_sessions: int = 2, token: str | None = None, model: str | None = None, preset: str = "tiny",
               device: str = "cpu", agent_kwargs: dict | None = None, idle_timeout: float = 4.0,
               connect_timeout: float = 6.0, allow_origins: list[str] | None = None,
               offers_per_minute: int = OFFERS_PER_MINUTE, align_face: bool = False, vae_dtype: str = "fp32") -> None:
    check_bind(host, token)
    from ..errors import InputError

    tame_malloc()
    template = None
    if align_face:  # checked, and --image framed, before the model loads: a bad photo fails fast
        from .. import face_align
        from ..stream.options import preset_from_args

        p = preset_from_args(argparse.Namespace(model=model, preset=preset))
        template = face_align.template_for(model, preset)
        if image:
            image = face_align.align_face(load_image(image), template, p.height, p.width, source=image)[0]
    try:
        app = create_app(avatar_loader=default_loader(model, preset, device, vae_dtype), agent=agent,
                         agent_kwargs=agent_kwargs, image=image, max_sessions=max_sessions, token=token,
                         idle_timeout=idle_timeout, connect_timeout=connect_timeout, allow_origins=allow_origins,
                         host=host, offers_per_minute=offers_per_minute, align_template=template)
    except (ValueError, RuntimeError) as e:
        raise InputError(str(e)) from None
    sock = listen_socket(host, port)
    port = sock.getsockname()[1]  # the port it got, for --port 0
    shown = f"[{host}]" if ":" in host else host
    print(f"talkingmachines serve: http://{shown}:{port}/  (agent {agent}, max {max_sessions} calls)", flush=True)
    web.run_app(app, sock=sock, print=None, access_log=None, **RUNNER_KW)


def serve_main(args: argparse.Namespace) -> int:
    """`talkingmachines serve` (its logging is set up by `cli.main`)."""
    if args.max_sessions < 1:
        from ..errors import InputError

        raise InputError("--max-sessions must be >= 1")
    if args.offers_per_minute < 0:
        from ..errors import InputError

        raise InputError("--offers-per-minute must be >= 0 (0: no limit)")
    kw = {k: getattr(args, k) for k in ("voice", "greeting", "realtime_url", "realtime_key",
                                         "realtime_protocol", "instructions")}
    run_server(host=args.host, port=args.port, agent=args.agent, image=args.image, max_sessions=args.max_sessions,
               token=args.token, model=args.model, preset=args.preset, device=args.device, agent_kwargs=kw,
               idle_timeout=args.idle_timeout, connect_timeout=args.connect_timeout, allow_origins=args.allow_origin,
               offers_per_minute=args.offers_per_minute, align_face=args.align_face,
               vae_dtype=args.vae_dtype)
    return 0
