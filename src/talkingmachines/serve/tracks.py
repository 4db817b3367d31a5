"""WebRTC tracks for the avatar: video and agent audio paced from ONE shared clock.

aiortc's sender does not pace: `recv()` must sleep until each frame's wall-clock time.
Both tracks read from a `Playout` timeline. The clock (`t0`) starts when the first chunk is
ready and the peer connection pulls its first frame; from then on video frame `n` plays at `t0 + n / fps` (pts `n * 90000 / fps`) and audio
sample `s` plays at `t0 + s / 16000` (pts `s`, time base 1/16000; aiortc's Opus encoder
resamples to 48 kHz). A chunk is placed on the timeline at `max(end of the previous chunk,
now)`, for its audio and its frames alike, so a late chunk leaves a gap (the last frame is held,
the audio is silence) but never shifts the voice against the lips.
"""

from __future__ import annotations

import asyncio
import fractions
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

VIDEO_CLOCK = 90_000
AUDIO_PTIME = 0.020  # 20 ms audio frames
MAX_BEHIND_S = 0.25  # a track that fell this far behind its clock skips ahead (both stay on the clock)


@dataclass
class Span:
    """Agent audio inside a chunk: `length` samples from `offset` belong to `segment`."""

    segment: str | None
    offset: int
    length: int


@dataclass
class Entry:
    start_frame: int
    frames: np.ndarray  # uint8 [F, H, W, 3]
    audio: np.ndarray  # float32 [F * spf]
    spans: list[Span] = field(default_factory=list)
    speaking: bool = False
    cut: int | None = None  # chunk-local sample from which the audio is muted (barge-in)
    index: int = 0

    @property
    def n_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def end_frame(self) -> int:
        return self.start_frame + self.n_frames


class Playout:
    """The shared timeline both tracks read from (single event loop; not thread-safe)."""

    def __init__(self, fps: int = 25, sample_rate: int = 16_000, clock: Callable[[], float] = time.monotonic):
        self.fps = fps
        self.sample_rate = sample_rate
        self.spf = sample_rate // fps  # audio samples per video frame
        self.clock = clock
        self.t0: float | None = None
        self.ready = asyncio.Event()  # the first chunk is on the timeline
        self.started = asyncio.Event()  # the clock runs
        self.entries: list[Entry] = []
        self.next_frame = 0  # first free frame slot on the timeline
        self.audio_pos = 0  # absolute audio samples handed to the audio track
        self.video_pos = 0  # absolute video frames handed to the video track
        self.played: dict[str | None, int] = {}  # agent samples actually sent, per segment
        self.last_image: np.ndarray | None = None
        self.frames_sent = 0
        self.audio_samples_sent = 0
        self.closed = False

    # ---- clock ------------------------------------------------------------------------
    def now_frame(self) -> float:
        if self.t0 is None:
            return 0.0
        return (self.clock() - self.t0) * self.fps

    def start_clock(self) -> None:
        """Start the shared clock (first track pull after the first chunk is ready)."""
        if self.t0 is None:
            self.t0 = self.clock()
            self.started.set()

    def lead_seconds(self) -> float:
        """How much generated media is queued ahead of the clock."""
        if self.t0 is None:
            return self.next_frame / self.fps
        return max(0.0, (self.next_frame - self.now_frame()) / self.fps)

    # ---- producer ---------------------------------------------------------------------
    def add(self, frames: np.ndarray, audio: np.ndarray, spans: list[Span] | None = None,
            speaking: bool = False, index: int = 0) -> Entry:
        self.ready.set()
        start = max(self.next_frame, math.ceil(self.now_frame()), self.video_pos, -(-self.audio_pos // self.spf))
        e = Entry(start, frames, np.asarray(audio, np.float32), list(spans or []), speaking, index=index)
        expect = e.n_frames * self.spf
        if e.audio.shape[0] != expect:  # defensive: keep A/V lengths equal
            a = np.zeros(expect, np.float32)
            a[: min(expect, e.audio.shape[0])] = e.audio[:expect]
            e.audio = a
        self.entries.append(e)
        self.next_frame = e.end_frame
        if self.last_image is None:
            self.last_image = frames[0]
        return e

    def interrupt(self) -> None:
        """Barge-in: mute the rest of the chunk being heard, drop chunks not yet started."""
        keep = []
        for e in self.entries:
            s0 = e.start_frame * self.spf
            if e.start_frame * self.spf <= self.audio_pos < e.end_frame * self.spf or e.start_frame < self.video_pos:
                cut = max(0, self.audio_pos - s0)
                e.cut = cut if e.cut is None else min(e.cut, cut)
                keep.append(e)
            elif e.end_frame * self.spf <= self.audio_pos and e.end_frame <= self.video_pos:
                keep.append(e)  # already played (gc drops it)
            # else: not started: dropped
        self.entries = keep
        self.next_frame = max([e.end_frame for e in keep] + [self.video_pos, math.ceil(self.now_frame())])

    def pending_agent_samples(self) -> int:
        """Agent audio on the timeline that the audio track has not sent yet."""
        n = 0
        for e in self.entries:
            s0 = e.start_frame * self.spf
            for sp in e.spans:
                a, b = s0 + sp.offset, s0 + sp.offset + sp.length
                if e.cut is not None:
                    b = min(b, s0 + e.cut)
                n += max(0, b - max(a, self.audio_pos))
        return n

    def speaking_now(self) -> bool:
        f = self.video_pos
        for e in self.entries:
            if e.start_frame <= f < e.end_frame:
                return e.speaking
        return False

    # ---- consumers --------------------------------------------------------------------
    def video_frame(self, n: int) -> np.ndarray | None:
        for e in self.entries:
            if e.start_frame <= n < e.end_frame:
                self.last_image = e.frames[n - e.start_frame]
                break
        self.video_pos = max(self.video_pos, n + 1)
        self._gc()
        return self.last_image

    def audio(self, start: int, n: int) -> np.ndarray:
        out = np.zeros(n, np.float32)
        end = start + n
        for e in self.entries:
            s0 = e.start_frame * self.spf
            s1 = s0 + e.audio.shape[0]
            a, b = max(start, s0), min(end, s1)
            if a >= b:
                continue
            la, lb = a - s0, b - s0
            if e.cut is not None:
                lb = min(lb, e.cut)
            if la < lb:
                out[a - start : a - start + (lb - la)] = e.audio[la:lb]
                for sp in e.spans:
                    x, y = max(la, sp.offset), min(lb, sp.offset + sp.length)
                    if x < y:
                        self.played[sp.segment] = self.played.get(sp.segment, 0) + (y - x)
        self.audio_pos = max(self.audio_pos, end)
        self._gc()
        return out

    def _gc(self) -> None:
        while self.entries:
            e = self.entries[0]
            if e.end_frame <= self.video_pos and e.end_frame * self.spf <= self.audio_pos:
                self.entries.pop(0)
            else:
                break


async def _sleep_until(clock: Callable[[], float], t: float) -> None:
    dt = t - clock()
    if dt > 0:
        await asyncio.sleep(dt)


class AvatarVideoTrack(MediaStreamTrack):
    kind = "video"

    def __init__(self, playout: Playout):
        super().__init__()
        self.playout = playout
        self.n = 0
        self.time_base = fractions.Fraction(1, VIDEO_CLOCK)

    async def recv(self) -> av.VideoFrame:
        p = self.playout
        if self.readyState != "live" or p.closed:
            raise MediaStreamError
        await p.ready.wait()
        p.start_clock()
        if self.n == 0:
            self.n = max(0, math.floor(p.now_frame()))
        t = p.t0 + self.n / p.fps
        if p.clock() - t > MAX_BEHIND_S:  # fell behind (CPU starved): skip ahead on the same clock
            self.n = math.floor(p.now_frame())
            t = p.t0 + self.n / p.fps
        await _sleep_until(p.clock, t)
        if p.closed:
            raise MediaStreamError
        img = p.video_frame(self.n)
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
        frame.pts = self.n * VIDEO_CLOCK // p.fps
        frame.time_base = self.time_base
        self.n += 1
        p.frames_sent += 1
        return frame


class AgentAudioTrack(MediaStreamTrack):
    kind = "audio"

    def __init__(self, playout: Playout):
        super().__init__()
        self.playout = playout
        self.samples = int(round(playout.sample_rate * AUDIO_PTIME))
        self.pos = 0  # absolute sample index of the next frame
        self.time_base = fractions.Fraction(1, playout.sample_rate)

    async def recv(self) -> av.AudioFrame:
        p = self.playout
        if self.readyState != "live" or p.closed:
            raise MediaStreamError
        await p.ready.wait()
        p.start_clock()
        sr = p.sample_rate
        if self.pos == 0:
            self.pos = max(0, math.floor(p.now_frame()) * p.spf)
        t = p.t0 + self.pos / sr
        if p.clock() - t > MAX_BEHIND_S:
            self.pos = (math.floor((p.clock() - p.t0) * sr) // self.samples) * self.samples
            t = p.t0 + self.pos / sr
        await _sleep_until(p.clock, t)
        if p.closed:
            raise MediaStreamError
        x = p.audio(self.pos, self.samples)
        pcm = (np.clip(x, -1.0, 1.0) * 32767.0).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = sr
        frame.pts = self.pos
        frame.time_base = self.time_base
        self.pos += self.samples
        p.audio_samples_sent += self.samples
        return frame
