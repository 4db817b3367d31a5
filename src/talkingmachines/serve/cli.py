"""`talkingmachines serve`: registers the sub-command (the server itself is in app.py)."""


def register(sub) -> None:
    from .app import add_serve_args, serve_main

    p = sub.add_parser("serve", help="FaceTime-style WebRTC page and server")
    add_serve_args(p)
    p.set_defaults(fn=serve_main)
