"""Command line: `talkingmachines demo | generate | info | bench | serve | ...`.

User errors (`InputError`) print one line and exit with code 2; outputs are written
atomically, so a failed run leaves nothing behind.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import signal
import sys
import threading
from pathlib import Path

from .errors import InputError

ASSETS = Path(__file__).resolve().parent / "assets"
# import name -> pip name of the packages a command may need that a machine may lack (a GPU box
# with PyTorch only): each command imports what it uses when it runs, so only it fails, in one line
PIP_NAMES = {"av": "av", "aiortc": "aiortc", "aiohttp": "aiohttp", "diffusers": "diffusers",
             "livekit": "livekit-agents", "cv2": "opencv-python-headless", "PIL": "pillow",
             "matplotlib": "matplotlib", "transformers": "transformers", "safetensors": "safetensors"}


class _Signalled(KeyboardInterrupt):
    """SIGTERM or SIGHUP during `generate`: unwinds like Ctrl-C, so the temp file goes too."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _stop_on_signals():
    if threading.current_thread() is not threading.main_thread():  # signal handlers live there only
        yield
        return

    def handler(signum, frame):
        raise _Signalled(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def check_output_path(out: Path) -> None:
    """Refuse an output we could not write, before any slow work."""
    if out.suffix.lower() != ".mp4":
        raise InputError(f"{out}: the output must be an .mp4 file")
    if out.is_dir():
        raise InputError(f"{out}: is a directory; give a file name ending in .mp4")
    if out.exists() and not out.is_file():
        raise InputError(f"{out}: exists and is not a regular file")
    if not out.parent.exists():
        raise InputError(f"{out.parent}: output folder does not exist")
    if not out.parent.is_dir():
        raise InputError(f"{out.parent}: is not a folder")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise InputError(f"{out.parent}: output folder is not writable")


def cmd_generate(args) -> int:
    out = Path(args.output)
    try:
        with _stop_on_signals():
            return _generate(args, out)
    except _Signalled as e:
        print(f"stopped by {signal.Signals(e.signum).name}: {out} not written", file=sys.stderr)
        return 128 + e.signum


def _generate(args, out: Path) -> int:
    from tqdm import tqdm

    from .config import SAMPLES_PER_FRAME
    from .media import Mp4Writer, audio_duration, iter_audio, load_image
    from .model.audio import is_silence
    from .stream.options import load_from_args, preset_from_args

    check_output_path(out)
    if args.steps is not None and args.steps < 1:
        raise InputError(f"--steps must be at least 1 (got {args.steps})")
    # validate every input before the (slow) model load; the audio is read twice, piece by
    # piece (here only up to its first sound), so memory stays flat at any length
    if all(is_silence(a) for a in iter_audio(args.audio)):
        raise InputError(f"{args.audio}: the audio is silent; nothing to lip-sync")
    p = preset_from_args(args)
    image = args.image or ASSETS / "portrait.png"
    if args.align_face:
        from . import face_align

        template = face_align.template_for(args.model, args.preset)
        portrait, how = face_align.align_face(load_image(image, None), template, p.height, p.width, source=str(image))
        print(f"aligned the face in {image} to the model's training faces: scale {how['scale']:.3f}, "
              f"rotation {how['rotation_deg']:+.1f} deg", file=sys.stderr)
    else:
        portrait = load_image(image, (p.height, p.width))
        if args.image:
            print("note: for a photo of a real face, --align-face puts its mouth where the model draws one",
                  file=sys.stderr)
    avatar = load_from_args(args)
    stream = avatar.new_stream(portrait, seed=args.seed, steps=args.steps)
    dur = audio_duration(args.audio)
    est = math.ceil(dur * 25 / stream.chunk_video_frames) if dur else None
    seen = 0  # samples decoded so far (the final count once the audio has ended)

    def pieces():
        nonlocal seen
        for a in iter_audio(args.audio):
            seen += a.shape[0]
            yield a

    written = 0
    # as the server does for an endless call: the stream pulls audio as it needs it and drops
    # what it has used, so hours of input cost no more memory than seconds
    with Mp4Writer(out, p.width, p.height) as w, tqdm(total=est, desc="generating", unit="chunk") as bar:
        for c in stream.stream(pieces()):
            k = min(len(c.frames), math.ceil(seen / SAMPLES_PER_FRAME) - written)
            if k <= 0:
                break
            n = max(0, min(k * SAMPLES_PER_FRAME, seen - written * SAMPLES_PER_FRAME))
            w.write(c.frames[:k], c.audio[:n])
            written += k
            bar.update(1)
    print(f"wrote {out} ({written} frames, {seen / 16000:.2f} s, {p.width}x{p.height} @ 25 fps)")
    return 0


ALIGN_HELP = ("frame the photo's face where the model's training faces sat (found by 68 landmarks; needs "
              "the eval extra). Use it for your own photos: otherwise the mouth is drawn where the model "
              "expects one, not where the photo has it")


def cmd_demo(args) -> int:
    args.audio = str(ASSETS / "speech.wav")
    return cmd_generate(args)


def cmd_info(args) -> int:
    from .model.weights import parameter_breakdown
    from .stream.options import preset_from_args

    p = preset_from_args(argparse.Namespace(model=None, preset=args.preset))  # a bad name: one line
    b = parameter_breakdown(p.dit)
    if args.json:
        print(json.dumps({"preset": p.name, **b}))
        return 0
    print(f"preset {p.name}: {p.width}x{p.height} @ 25 fps, chunk {p.stream.chunk_frames} latent frames "
          f"({p.stream.chunk_seconds:.2f} s), {p.stream.student_steps} steps, audio look-ahead "
          f"{p.stream.lookahead_ms:.0f} ms (+ front end)")
    for k, v in b.items():
        print(f"  {k:<28} {v / 1e9:8.3f} B" if isinstance(v, int) else f"  {k:<28} {v}")
    if p.dit.image_dim and p.dit.audio_dim:
        print("  (Wan2.1 '14B' names the trunk without its I2V image branch; the paper's 18B is that "
              "trunk plus the audio layers: t2v_trunk_plus_audio)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .stream.options import add_model_args

    ap = argparse.ArgumentParser(prog="talkingmachines", description=__doc__.splitlines()[0])
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="portrait + speech -> lip-synced MP4")
    g.add_argument("--image", default=None, help="portrait image (default: the bundled portrait)")
    g.add_argument("--audio", required=True, help="speech: wav, mp3, flac, ogg, m4a")
    g.add_argument("-o", "--output", required=True, help="output .mp4")
    g.add_argument("--align-face", action="store_true", help=ALIGN_HELP)
    add_model_args(g)
    g.set_defaults(fn=cmd_generate)

    d = sub.add_parser("demo", help="the bundled portrait speaks the bundled speech -> demo.mp4")
    d.add_argument("-o", "--output", default="demo.mp4")
    d.add_argument("--image", default=None)
    d.add_argument("--align-face", action="store_true", help=ALIGN_HELP)
    add_model_args(d)
    d.set_defaults(fn=cmd_demo)

    i = sub.add_parser("info", help="preset summary and parameter count (meta device, no memory)")
    i.add_argument("--preset", default="tiny")
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=cmd_info)

    import importlib
    import importlib.util

    # the other commands, each registered once, by the package that holds its code
    for name in ("serve.cli", "train.cli", "eval.cli", "eval.quality_cli"):
        if importlib.util.find_spec(f"talkingmachines.{name}") is not None:
            importlib.import_module(f"talkingmachines.{name}").register(sub)
    return ap


def configure_logging(args: argparse.Namespace) -> None:
    """Warnings and errors only (the libraries' INFO chatter, aioice's say, stays hidden), or
    everything from INFO up with -v. A command that reports to its user through logging names its
    loggers in ``info_loggers`` (serve: connections, refused offers), shown at INFO without -v."""
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format=getattr(args, "log_format", "%(message)s"))
    for name in getattr(args, "info_loggers", ()):
        logging.getLogger(name).setLevel(logging.INFO)


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    configure_logging(args)
    try:
        return int(args.fn(args) or 0)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        top = (e.name or "").split(".")[0]
        if top not in PIP_NAMES:
            raise
        print(f"error: `{args.cmd}` needs the Python package {top!r}, which is not installed here "
              f"(pip install {PIP_NAMES[top]})", file=sys.stderr)
        return 2
    except OSError as e:
        # a path the user named that cannot be made, read or written (a missing or read-only folder, a
        # full disk): one line; -v keeps the traceback for when it is our bug
        if e.filename is None or args.verbose:
            raise
        print(f"error: {e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
