"""Reading and writing media: audio in, portrait in, MP4 (H.264 + AAC) out.

Everything user-facing raises `talkingmachines.errors.InputError` with a one-line message
that names the file and what is wrong; PyAV / PIL exceptions never escape as tracebacks.

* `load_audio(path)` -> float32 mono 16 kHz in [-1, 1] (WAV, MP3, FLAC, OGG, M4A, ... via PyAV);
  `iter_audio(path)` gives the same samples piece by piece (flat memory at any length).
* `load_image(path, size=(height, width))` -> uint8 [H, W, 3] RGB, centre-cropped + LANCZOS (size None: as it is).
* `write_mp4(path, frames, audio)` / `Mp4Writer(...)`: atomic H.264 (libx264, yuv420p) + AAC
  MP4 writer (temp file in the same directory, `os.replace` on success, removed on error).
* `read_video(path)` -> (frames, audio, fps); `probe(path)` -> durations and counts.

Note: the PyAV wheels bundle a GPL build of x264.
"""

from __future__ import annotations

import math
import os
import tempfile
import warnings
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from talkingmachines.config import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME
from talkingmachines.errors import InputError
from talkingmachines.fileio import ordinary_permissions

# `load_audio` holds the whole clip in memory (2 h: 460 MB of float32), so it keeps a cap;
# `iter_audio` (what `generate` uses) decodes piece by piece and has none.
MAX_AUDIO_SECONDS = 2 * 60 * 60  # 2 h
MIN_IMAGE_SIDE = 64
MAX_IMAGE_SIDE = 12_000
MAX_IMAGE_PIXELS = 100_000_000  # 100 MP

__all__ = [
    "load_audio",
    "iter_audio",
    "load_image",
    "write_mp4",
    "Mp4Writer",
    "read_video",
    "probe",
    "MAX_AUDIO_SECONDS",
]


def _av():
    import av  # imported lazily: keeps `import talkingmachines` light

    return av


def _short(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    if len(msg) > 160:
        msg = msg[:157] + "..."
    return msg or type(e).__name__


def _check_file(path, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise InputError(f"{what} file not found: {p}")
    if p.is_dir():
        raise InputError(f"{what} path is a directory, not a file: {p}")
    if not os.access(p, os.R_OK):
        raise InputError(f"{what} file is not readable (permission denied): {p}")
    if p.stat().st_size == 0:
        raise InputError(f"{what} file is empty (0 bytes): {p}")
    return p


# ----------------------------------------------------------------------------- audio in


def _open_input(p: Path, what: str):
    av = _av()
    try:
        return av.open(str(p), mode="r")
    except Exception as e:  # av.error.InvalidDataError, OSError, ...
        raise InputError(f"cannot read {what} file {p}: not a media file PyAV can decode ({_short(e)})") from None


class _AudioDecoder:
    """Decode one audio stream, packet by packet, to float32 mono at SAMPLE_RATE.

    Channels are averaged. The end is trimmed to the last packet's pts + duration, which
    drops the zero padding of a final AAC frame (FFmpeg's decoders return it in full).
    Decoded samples wait in ``out`` until taken (`take`), so a caller can stream them.
    """

    TAIL = SAMPLE_RATE // 10  # kept back until the end: the most `finish` may trim

    def __init__(self, stream, p: Path, max_seconds: float | None):
        av = _av()
        self.stream, self.p = stream, p
        self.resampler = av.AudioResampler(format="fltp", layout=None, rate=SAMPLE_RATE)
        self.out: list[np.ndarray] = []
        self.pending = 0  # samples in `out`
        self.total = 0
        self.max_seconds = max_seconds
        self.limit = None if max_seconds is None else int(max_seconds * SAMPLE_RATE)
        self.start = None  # pts of the first packet with pts >= 0 (priming has pts < 0)
        self.end = None  # max(pts + duration)
        self.error: str | None = None

    def _take(self, frames) -> None:
        for g in frames:
            a = g.to_ndarray()  # [channels, n] planar float
            a = a.reshape(1, -1) if a.ndim == 1 else a
            m = a.mean(axis=0, dtype=np.float64).astype(np.float32) if a.shape[0] > 1 else a[0].astype(np.float32)
            self.out.append(m)
            self.pending += m.shape[0]
            self.total += m.shape[0]
            if self.limit is not None and self.total > self.limit:
                raise InputError(
                    f"audio file {self.p} is too long (more than {self.max_seconds / 3600:g} h); "
                    "split it into shorter parts"
                )

    def feed(self, packet) -> None:
        if self.error is not None:
            return
        if packet.pts is not None and packet.size:
            if self.start is None or (packet.pts >= 0 and packet.pts < self.start):
                self.start = max(packet.pts, 0)
            if packet.duration:
                e = packet.pts + packet.duration
                self.end = e if self.end is None else max(self.end, e)
        try:
            for frame in packet.decode():
                try:
                    self._take(self.resampler.resample(frame))
                except ValueError:
                    # channel layout / rate changed mid-stream: start a new resampler
                    self._take(self.resampler.resample(None))
                    self.resampler = _av().AudioResampler(format="fltp", layout=None, rate=SAMPLE_RATE)
                    self._take(self.resampler.resample(frame))
        except InputError:
            raise
        except Exception as e:
            self.error = _short(e)

    def take(self, n: int) -> np.ndarray | None:
        """The next ``n`` samples once more than ``n`` + TAIL are decoded (else None)."""
        if self.pending < n + self.TAIL:
            return None
        a = np.concatenate(self.out)
        head, rest = a[:n], a[n:]
        self.out, self.pending = [rest], rest.shape[0]
        np.clip(head, -1.0, 1.0, out=head)
        return head

    def finish(self) -> np.ndarray:
        """Flush the decoder: the samples not yet taken, trimmed of encoder padding."""
        if self.error is None:
            try:
                self._take(self.resampler.resample(None))
            except InputError:
                raise
            except Exception as e:
                self.error = _short(e)
        if self.error is not None:
            if self.total == 0:
                raise InputError(f"cannot decode audio in {self.p}: {self.error}")
            warnings.warn(
                f"audio in {self.p}: decoding stopped early ({self.error}); using the first "
                f"{self.total / SAMPLE_RATE:.2f} s"
            )
        audio = np.concatenate(self.out) if self.out else np.zeros(0, np.float32)
        self.out, self.pending = [], 0
        tb = self.stream.time_base
        if self.end is not None and self.start is not None and tb:
            want = int(round(float((self.end - self.start) * tb) * SAMPLE_RATE))
            # trim encoder padding only (never pad, never cut more than one codec frame)
            cut = self.total - want
            if 0 < want and 0 < cut <= min(self.TAIL, audio.shape[0]):
                audio = audio[: audio.shape[0] - cut]
        np.clip(audio, -1.0, 1.0, out=audio)
        return audio


def audio_duration(path) -> float | None:
    """The duration in seconds that the file's header states (None when it states none)."""
    p = _check_file(path, "audio")
    container = _open_input(p, "audio")
    try:
        if not container.streams.audio:
            raise InputError(f"audio file {p} has no audio stream")
        return _header_duration(container, container.streams.audio[0])
    finally:
        container.close()


def _header_duration(container, stream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000
    return None


def iter_audio(path, piece_seconds: float = 10.0, max_seconds: float | None = None) -> Iterator[np.ndarray]:
    """Decode an audio (or video-with-audio) file piece by piece: float32 mono 16 kHz arrays
    of ``piece_seconds`` (the last one shorter), so memory stays flat at any length. Same
    samples and errors as `load_audio` (which joins them), checked as they come: a file that
    turns out too short, undecodable or non-finite raises `InputError` from the iterator."""
    p = _check_file(path, "audio")
    container = _open_input(p, "audio")
    try:
        if not container.streams.audio:
            raise InputError(f"audio file {p} has no audio stream")
        stream = container.streams.audio[0]
        # cheap early rejection from the header (the decode-time check is authoritative)
        dur = _header_duration(container, stream)
        if max_seconds is not None and dur is not None and dur > max_seconds * 1.01:
            raise InputError(f"audio file {p} is too long ({dur / 3600:.1f} h, the limit is {max_seconds / 3600:g} h); "
                             "split it into shorter parts")
        n = max(1, int(piece_seconds * SAMPLE_RATE))
        dec = _AudioDecoder(stream, p, max_seconds)
        total = 0

        def checked(a: np.ndarray) -> np.ndarray:
            if not np.isfinite(a).all():
                raise InputError(f"audio file {p} decodes to non-finite samples (NaN/inf)")
            return a

        try:
            for packet in container.demux(stream):
                dec.feed(packet)
                while (a := dec.take(n)) is not None:
                    total += a.shape[0]
                    yield checked(a)
        except InputError:
            raise
        except Exception as e:
            dec.error = dec.error or _short(e)
        rest = dec.finish()
        if total + rest.shape[0] < SAMPLES_PER_FRAME:
            raise InputError(
                f"audio file {p} is empty or too short ({(total + rest.shape[0]) / SAMPLE_RATE * 1000:.0f} ms; "
                f"need at least {1000 // FPS} ms)"
            )
        for i in range(0, rest.shape[0], n):
            yield checked(rest[i: i + n])
    finally:
        container.close()


def load_audio(path) -> np.ndarray:
    """Decode any audio (or video-with-audio) file to float32 mono 16 kHz in [-1, 1].

    Channels are averaged (not the -3 dB sum FFmpeg's mono downmix gives). Raises
    `InputError` for a missing/unreadable/undecodable file, no audio stream, audio shorter
    than one video frame (40 ms) or longer than 2 h (`iter_audio` streams longer files).
    """
    pieces = list(iter_audio(path, piece_seconds=60.0, max_seconds=MAX_AUDIO_SECONDS))
    return np.concatenate(pieces) if len(pieces) != 1 else pieces[0]


# ----------------------------------------------------------------------------- image in


def load_image(path, size: tuple[int, int] | None) -> np.ndarray:
    """Load a portrait as uint8 [H, W, 3] RGB, centre-cropped to the target aspect and resized.

    `size` is `(height, width)` (numpy order, the shape of the result), or None for the image
    as it is (`face_align` frames it itself). EXIF orientation is
    applied; transparency is composited onto white. Raises `InputError` for non-images,
    images under 64 px on the short side, over 12000 px on a side or over 100 MP.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if size is not None:
        height, width = int(size[0]), int(size[1])
        if height <= 0 or width <= 0:
            raise ValueError(f"bad target size {size!r}")
    p = _check_file(path, "image")
    try:
        with warnings.catch_warnings():
            # our own limits below are stricter than PIL's warning threshold; PIL's hard
            # DecompressionBombError (> 2x its limit) is caught and reported as InputError.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(p)
    except Image.DecompressionBombError:
        raise InputError(f"image {p} is too large (decompression-bomb guard: over {MAX_IMAGE_PIXELS // 10**6} MP)") from None
    except UnidentifiedImageError:
        raise InputError(f"cannot read image {p}: not an image file PIL understands") from None
    except Exception as e:
        raise InputError(f"cannot read image {p}: {_short(e)}") from None
    with im:
        w0, h0 = im.size
        if w0 > MAX_IMAGE_SIDE or h0 > MAX_IMAGE_SIDE or w0 * h0 > MAX_IMAGE_PIXELS:
            raise InputError(
                f"image {p} is too large ({w0}x{h0}); the limit is {MAX_IMAGE_SIDE} px a side and "
                f"{MAX_IMAGE_PIXELS // 10**6} MP"
            )
        if min(w0, h0) < MIN_IMAGE_SIDE:
            raise InputError(f"image {p} is too small ({w0}x{h0}); need at least {MIN_IMAGE_SIDE} px on the short side")
        try:
            im.load()
            im = ImageOps.exif_transpose(im)
            if im.mode in ("P", "PA") or (im.mode == "L" and "transparency" in im.info):
                im = im.convert("RGBA")
            if im.mode in ("RGBA", "LA", "RGBa", "La"):
                rgba = im.convert("RGBA")
                bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                im = Image.alpha_composite(bg, rgba).convert("RGB")
            elif im.mode == "I;16" or im.mode == "I" or im.mode == "F":
                a = np.asarray(im, dtype=np.float64)
                hi = a.max() if a.size else 1.0
                a = np.clip(a / (hi if hi > 0 else 1.0) * 255.0, 0, 255).astype(np.uint8)
                im = Image.fromarray(a, "L").convert("RGB")
            elif im.mode != "RGB":
                im = im.convert("RGB")
            if size is not None:
                im = ImageOps.fit(im, (width, height), method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))
            arr = np.asarray(im, dtype=np.uint8)
        except InputError:
            raise
        except Exception as e:
            raise InputError(f"cannot decode image {p}: {_short(e)}") from None
    return np.ascontiguousarray(arr.reshape(arr.shape[0], arr.shape[1], 3))


# ----------------------------------------------------------------------------- MP4 out


def _as_rate(fps) -> Fraction:
    r = Fraction(fps).limit_denominator(1001 * 1000)
    if r <= 0:
        raise ValueError(f"fps must be positive, got {fps!r}")
    return r


def _as_audio(a) -> np.ndarray:
    try:  # torch tensors
        a = a.detach().cpu().numpy()
    except AttributeError:
        pass
    a = np.asarray(a)
    if a.dtype == np.int16:
        a = a.astype(np.float32) / 32768.0
    a = a.astype(np.float32, copy=False)
    if a.ndim == 2:  # [n, 1] / [1, n] / [ch, n]
        a = a.mean(axis=0 if a.shape[0] < a.shape[1] else 1)
    if a.ndim != 1:
        raise ValueError(f"audio must be mono [n], got shape {a.shape}")
    return np.clip(np.nan_to_num(a), -1.0, 1.0)


class Mp4Writer:
    """Streaming, atomic MP4 writer (H.264 yuv420p + AAC mono).

    ```
    with Mp4Writer("out.mp4", width=512, height=512) as w:
        for frames, audio in chunks:      # frames uint8 [t, H, W, 3], audio float32 [n]
            w.write(frames, audio)
    ```

    Output goes to a hidden temp file in the destination directory and is renamed onto
    `path` (`os.replace`) only when the `with` block exits cleanly (or `close()` is called);
    on an exception (or `abort()`) the temp file is deleted and nothing is left behind.

    Video pts are frame indices (time base 1/fps); audio pts are sample counts (time base
    1/sample_rate), so A/V stay in sync. Audio is never invented: the muxed audio duration
    equals the number of samples written (AAC's final frame is zero-padded by the encoder
    and trimmed again via the last packet's duration / the MP4 edit list), so callers that
    want silence under silent frames pass zeros.
    Odd `width`/`height` are rounded down to even (yuv420p needs even sizes) by cropping.
    """

    def __init__(
        self,
        path,
        width: int,
        height: int,
        fps: float = FPS,
        sample_rate: int = SAMPLE_RATE,
        audio: bool = True,
        crf: int = 18,
        preset: str = "veryfast",
    ):
        self.path = Path(path)
        self.src_width, self.src_height = int(width), int(height)
        self.width, self.height = self.src_width // 2 * 2, self.src_height // 2 * 2
        if self.width < 2 or self.height < 2:
            raise ValueError(f"video size too small: {width}x{height}")
        self.rate = _as_rate(fps)
        self.fps = float(self.rate)
        self.sample_rate = int(sample_rate)
        self.has_audio = bool(audio)
        self.frames_written = 0
        self.samples_written = 0
        self._closed = False
        parent = self.path.parent if str(self.path.parent) else Path(".")
        if not parent.is_dir():
            raise InputError(f"cannot write {self.path}: directory {parent} does not exist")
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp.mp4", dir=parent)
        except OSError as e:
            raise InputError(f"cannot write {self.path}: {_short(e)}") from None
        os.close(fd)
        self.tmp_path = Path(tmp)
        try:
            av = _av()
            self._container = av.open(str(self.tmp_path), mode="w", format="mp4")
            vs = self._container.add_stream("libx264", rate=self.rate)
            vs.width, vs.height = self.width, self.height
            vs.pix_fmt = "yuv420p"
            vs.options = {"crf": str(int(crf)), "preset": preset}
            vs.codec_context.time_base = Fraction(1) / self.rate
            self._vstream = vs
            self._astream = None
            if self.has_audio:
                a = self._container.add_stream("aac", rate=self.sample_rate, layout="mono")
                a.codec_context.time_base = Fraction(1, self.sample_rate)
                self._astream = a
        except BaseException:
            self._discard()
            raise

    # -- writing
    def write(self, frames=None, audio_chunk=None) -> None:
        """Append frames (uint8 [t, H, W, 3] or one [H, W, 3]) and/or mono audio samples."""
        if self._closed:
            raise RuntimeError("Mp4Writer is closed")
        if frames is not None:
            self._write_video(frames)
        if audio_chunk is not None:
            if self._astream is None:
                raise ValueError("this Mp4Writer was opened with audio=False")
            self._write_audio(_as_audio(audio_chunk))

    def _write_video(self, frames) -> None:
        av = _av()
        try:  # torch tensors
            frames = frames.detach().cpu().numpy()
        except AttributeError:
            pass
        frames = np.asarray(frames)
        if frames.ndim == 3:
            frames = frames[None]
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be uint8 [t, H, W, 3], got shape {frames.shape}")
        if frames.shape[1:3] != (self.src_height, self.src_width):
            raise ValueError(
                f"frame size {frames.shape[2]}x{frames.shape[1]} does not match the writer's "
                f"{self.src_width}x{self.src_height}"
            )
        if frames.dtype != np.uint8:
            frames = np.clip(np.nan_to_num(frames.astype(np.float32)), 0, 255).round().astype(np.uint8)
        frames = frames[:, : self.height, : self.width]
        for f in frames:
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")
            vf.pts = self.frames_written
            vf.time_base = self._vstream.codec_context.time_base
            for pkt in self._vstream.encode(vf):
                self._container.mux(pkt)
            self.frames_written += 1

    def _write_audio(self, a: np.ndarray) -> None:
        if a.size == 0:
            return
        av = _av()
        af = av.AudioFrame.from_ndarray(a.reshape(1, -1), format="fltp", layout="mono")
        af.sample_rate = self.sample_rate
        af.pts = self.samples_written
        af.time_base = Fraction(1, self.sample_rate)
        for pkt in self._astream.encode(af):
            self._container.mux(pkt)
        self.samples_written += a.shape[0]

    # -- finishing
    def close(self) -> Path:
        """Flush the encoders, finish the file and rename it onto `path`."""
        if self._closed:
            return self.path
        try:
            if self.frames_written == 0:
                raise ValueError(f"no video frames were written to {self.path}")
            for pkt in self._vstream.encode(None):
                self._container.mux(pkt)
            if self._astream is not None:
                for pkt in self._astream.encode(None):
                    self._container.mux(pkt)
            self._container.close()
            self._closed = True
            ordinary_permissions(self.tmp_path)
            os.replace(self.tmp_path, self.path)
        except BaseException:
            self._discard()
            raise
        return self.path

    def abort(self) -> None:
        """Give up: close and delete the temp file; `path` is left untouched."""
        self._discard()

    def _discard(self) -> None:
        self._closed = True
        c = getattr(self, "_container", None)
        if c is not None:
            try:
                c.close()
            except Exception:
                pass
        try:
            os.unlink(self.tmp_path)
        except FileNotFoundError:
            pass

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._discard()

    def __del__(self):  # never leave a temp file behind, even if the user forgot to close
        if not getattr(self, "_closed", True):
            try:
                self._discard()
            except Exception:
                pass


def write_mp4(
    path,
    frames,
    audio=None,
    fps: float = FPS,
    sample_rate: int = SAMPLE_RATE,
    crf: int = 18,
) -> Path:
    """Write frames (uint8 [T, H, W, 3] array, or an iterable of [t, H, W, 3] chunks / [H, W, 3]
    frames) and optional mono float32 audio to an H.264 + AAC MP4, atomically.

    Audio is interleaved with the video as it is written (each chunk gets the samples its
    frames span) and whatever audio remains after the last frame is written at the end, so
    the muxed audio is exactly the audio given. On any exception nothing is left at `path`
    (an existing file there is untouched) and no temp file remains.
    """
    if isinstance(frames, np.ndarray) or hasattr(frames, "detach"):
        chunks: Iterable = [frames]
    else:
        chunks = frames
    a = None if audio is None else _as_audio(audio)
    it = iter(chunks)
    try:
        first = next(it)
    except StopIteration:
        raise ValueError("write_mp4: no frames given") from None
    first = np.asarray(first.detach().cpu().numpy() if hasattr(first, "detach") else first)
    h, w = (first.shape[0], first.shape[1]) if first.ndim == 3 else (first.shape[1], first.shape[2])
    rate = _as_rate(fps)

    def all_chunks():
        yield first
        yield from it

    with Mp4Writer(path, width=w, height=h, fps=rate, sample_rate=sample_rate, audio=a is not None, crf=crf) as wr:
        apos = 0
        for chunk in all_chunks():
            wr.write(chunk)
            if a is not None:
                end = min(a.shape[0], math.floor(wr.frames_written * sample_rate / rate))
                if end > apos:
                    wr.write(None, a[apos:end])
                    apos = end
        if a is not None and apos < a.shape[0]:
            wr.write(None, a[apos:])
    return Path(path)


# ----------------------------------------------------------------------------- video in


def read_video(path) -> tuple[np.ndarray, np.ndarray | None, float]:
    """Decode a video: (frames uint8 [T, H, W, 3] RGB, audio float32 mono 16 kHz or None, fps)."""
    p = _check_file(path, "video")
    container = _open_input(p, "video")
    try:
        if not container.streams.video:
            raise InputError(f"video file {p} has no video stream")
        vs = container.streams.video[0]
        as_ = container.streams.audio[0] if container.streams.audio else None
        rate = vs.average_rate or vs.guessed_rate or vs.base_rate
        fps = float(rate) if rate else float(FPS)
        frames: list[np.ndarray] = []
        adec = _AudioDecoder(as_, p, None) if as_ is not None else None
        verr = None
        streams = [vs] + ([as_] if as_ is not None else [])
        try:
            for packet in container.demux(*streams):
                if packet.stream.type == "audio":
                    adec.feed(packet)
                elif verr is None:
                    try:
                        for f in packet.decode():
                            frames.append(f.to_ndarray(format="rgb24"))
                    except Exception as e:
                        verr = _short(e)
        except Exception as e:
            verr = verr or _short(e)
        if not frames:
            raise InputError(f"cannot decode video file {p}: {verr or 'no video frames'}")
        audio = adec.finish() if adec is not None else None
    finally:
        container.close()
    return np.stack(frames), audio, fps


def probe(path) -> dict:
    """Describe a media file without decoding its video.

    Returns {"has_video", "has_audio", "frames", "fps", "width", "height", "video_duration",
    "audio_duration", "audio_sample_rate", "duration"} (seconds; None where absent).
    `frames` counts video packets (one per frame for H.264) and `video_duration` is
    frames / fps; `audio_duration` is the last audio packet's end (pts + duration, encoder
    priming and final-frame padding excluded), so both are exact rather than header guesses.
    """
    p = _check_file(path, "media")
    container = _open_input(p, "media")
    info: dict = {
        "has_video": False,
        "has_audio": False,
        "frames": 0,
        "fps": None,
        "width": None,
        "height": None,
        "video_duration": None,
        "audio_duration": None,
        "audio_sample_rate": None,
        "duration": container.duration / 1_000_000 if container.duration else None,
    }
    try:
        vs = container.streams.video[0] if container.streams.video else None
        as_ = container.streams.audio[0] if container.streams.audio else None
        if vs is not None:
            rate = vs.average_rate or vs.guessed_rate or vs.base_rate
            info.update(has_video=True, fps=float(rate) if rate else None, width=vs.width, height=vs.height)
        if as_ is not None:
            info.update(has_audio=True, audio_sample_rate=as_.rate)
        streams = [s for s in (vs, as_) if s is not None]
        n, a_start, a_end = 0, None, None
        if streams:
            try:
                for pkt in container.demux(*streams):
                    if not pkt.size:
                        continue
                    if pkt.stream.type == "video":
                        n += 1
                    elif pkt.pts is not None:
                        if a_start is None or (0 <= pkt.pts < a_start):
                            a_start = max(pkt.pts, 0)
                        if pkt.duration:
                            a_end = max(a_end or 0, pkt.pts + pkt.duration)
            except Exception as e:
                raise InputError(f"cannot read media file {p}: {_short(e)}") from None
        if vs is not None:
            info["frames"] = n
            if info["fps"]:
                info["video_duration"] = n / info["fps"]
            elif vs.duration is not None:
                info["video_duration"] = float(vs.duration * vs.time_base)
        if as_ is not None:
            if a_end is not None and a_start is not None:
                info["audio_duration"] = float((a_end - a_start) * as_.time_base)
            elif as_.duration is not None:
                info["audio_duration"] = float(as_.duration * as_.time_base)
    finally:
        container.close()
    return info
