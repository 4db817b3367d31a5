"""`talkingmachines serve`: registers the sub-command and its options. The server (app.py, which
needs aiohttp, aiortc and PyAV) is imported only when the command runs, so a machine without
them still runs every other command."""

from __future__ import annotations

import argparse
import os


def add_serve_args(p: argparse.ArgumentParser) -> None:
    from ..stream.options import add_model_args
    from .agents import AGENTS
    from .ratelimit import OFFERS_PER_MINUTE

    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback; others need --token)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--agent", default="mirror", choices=[a for a in AGENTS if a != "silent"],
                   help="voice agent: mirror (speaks your mic), echo (repeats your turns), tts (typed text), "
                        "realtime (OpenAI-Realtime-compatible server)")
    p.add_argument("--image", default=None, help="portrait image (default: the model's shipped portrait)")
    p.add_argument("--align-face", action="store_true",
                   help="frame --image and uploaded portraits so their face sits where the model's training "
                        "faces did (68 landmarks; needs the eval extra): use it for real photos")
    p.add_argument("--max-sessions", type=int, default=2, help="concurrent calls; more get HTTP 503 busy")
    p.add_argument("--token", default=os.environ.get("TM_TOKEN"), help="required bearer token (env TM_TOKEN)")
    add_model_args(p, seed=False, steps=False)
    p.add_argument("--idle-timeout", type=float, default=4.0, help="seconds without any sign of the client before its call is freed")
    p.add_argument("--connect-timeout", type=float, default=6.0,
                   help="seconds an answered offer may take to connect before its slot is freed")
    p.add_argument("--offers-per-minute", type=int, default=OFFERS_PER_MINUTE, metavar="N",
                   help="offers one client address may send in a minute; more get HTTP 429 (0: no limit; behind "
                        "a proxy every client shares its address)")
    p.add_argument("--allow-origin", action="append", default=None, metavar="ORIGIN",
                   help="a web origin (scheme://host[:port]) whose pages may place calls, and whose host name "
                        "this server answers to (e.g. behind a proxy); repeatable. Other origins and DNS names "
                        "are refused")
    g = p.add_argument_group("agents")
    g.add_argument("--voice", default=None, help="espeak-ng voice (tts) or realtime voice name")
    g.add_argument("--greeting", default=None, help="tts: text spoken when a call starts")
    g.add_argument("--realtime-url", default=None, help="realtime websocket URL (env TM_REALTIME_URL)")
    g.add_argument("--realtime-key", default=None, help="realtime API key (env OPENAI_API_KEY)")
    g.add_argument("--realtime-protocol", default="ga", choices=["ga", "beta"])
    g.add_argument("--instructions", default=None, help="realtime: system instructions")


def serve_main(args: argparse.Namespace) -> int:
    from .app import serve_main as run

    return run(args)


def register(sub) -> None:
    p = sub.add_parser("serve", help="FaceTime-style WebRTC page and server")
    add_serve_args(p)
    # a server's log is for its user: its own INFO lines show without -v, with times
    p.set_defaults(fn=serve_main, info_loggers=("talkingmachines.serve",),
                   log_format="%(asctime)s %(levelname)s %(name)s: %(message)s")
