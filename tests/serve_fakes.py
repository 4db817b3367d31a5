"""Test double for the streaming engine: a drawn face whose mouth opens with the audio RMS.

Implements the `AvatarStream` protocol (stream/types.py) and the `Avatar` API of
`talkingmachines.stream.generator` (`new_stream(portrait)`, `default_portrait()`).
"""

from __future__ import annotations

import threading
import time

import numpy as np

from talkingmachines.stream.types import Chunk

FPS, SR, F = 25, 16_000, 12
SPF = SR // FPS


class FakeStream:
    fps = FPS
    sample_rate = SR
    chunk_video_frames = F

    def __init__(self, portrait: np.ndarray, size: int = 128, compute_s: float = 0.0):
        self.height = self.width = size
        self.compute_s = compute_s
        self.buf = np.zeros(0, np.float32)
        self.index = 0
        self.ended = False
        self.lock = threading.Lock()
        p = np.asarray(portrait, np.uint8)
        ys = (np.arange(size) * p.shape[0] // size).clip(0, p.shape[0] - 1)
        xs = (np.arange(size) * p.shape[1] // size).clip(0, p.shape[1] - 1)
        self.base = p[ys][:, xs].copy()
        self.pushed = 0
        self.cleared = 0

    def push_audio(self, samples: np.ndarray) -> None:
        with self.lock:
            self.buf = np.concatenate([self.buf, np.asarray(samples, np.float32).reshape(-1)])
            self.pushed += int(np.asarray(samples).size)

    def clear_audio(self) -> int:
        with self.lock:
            n = self.buf.size
            self.buf = np.zeros(0, np.float32)
            self.cleared += n
            return n

    def end_audio(self) -> None:
        self.ended = True

    def buffered_samples(self) -> int:
        return int(self.buf.size)

    def next_chunk(self, wait: bool = False) -> Chunk | None:
        n = F * SPF
        with self.lock:
            if wait and self.buf.size < n and not self.ended:
                return None
            audio = np.zeros(n, np.float32)
            take = min(n, self.buf.size)
            audio[:take] = self.buf[:take]
            self.buf = self.buf[take:]
        t = time.perf_counter()
        frames = np.empty((F, self.height, self.width, 3), np.uint8)
        s = self.height
        yy, xx = np.mgrid[0:s, 0:s]
        for i in range(F):
            a = audio[i * SPF : (i + 1) * SPF]
            level = float(np.sqrt(np.mean(a.astype(np.float64) ** 2)))
            open_ = min(1.0, level * 8.0)
            img = self.base.copy()
            face = (yy - s * 0.5) ** 2 / (s * 0.36) ** 2 + (xx - s * 0.5) ** 2 / (s * 0.28) ** 2 < 1
            img[face] = (img[face] * 0.3 + np.array([230, 190, 160]) * 0.7).astype(np.uint8)
            for ex in (0.38, 0.62):
                eye = (yy - s * 0.4) ** 2 + (xx - s * ex) ** 2 < (s * 0.04) ** 2
                img[eye] = 40
            mh = 0.01 + 0.08 * open_
            mouth = (yy - s * 0.66) ** 2 / (s * mh) ** 2 + (xx - s * 0.5) ** 2 / (s * 0.12) ** 2 < 1
            img[mouth] = (120, 20, 30)
            frames[i] = img
        rest = self.compute_s - (time.perf_counter() - t)
        if rest > 0:
            time.sleep(rest)
        speaking = bool(np.sqrt(np.mean(audio.astype(np.float64) ** 2)) > 0.01)
        c = Chunk(self.index, frames, audio, speaking, {"dit_ms": (time.perf_counter() - t) * 1000})
        self.index += 1
        return c


class FakeAvatar:
    def __init__(self, size: int = 128, compute_s: float = 0.0):
        self.size = size
        self.compute_s = compute_s
        self.streams: list[FakeStream] = []

    def default_portrait(self) -> np.ndarray:
        img = np.zeros((self.size, self.size, 3), np.uint8)
        img[..., 0] = np.linspace(40, 90, self.size, dtype=np.uint8)[:, None]
        img[..., 2] = 120
        return img

    def new_stream(self, portrait: np.ndarray) -> FakeStream:
        s = FakeStream(portrait, self.size, self.compute_s)
        self.streams.append(s)
        return s


class RecordingIO:
    """An AgentIO that records what an agent does (for agent unit tests)."""

    def __init__(self) -> None:
        self.audio: list[tuple[str | None, np.ndarray]] = []
        self.segments_ended = 0
        self.interrupts = 0
        self.events: list[dict] = []
        self.played: dict[str | None, float] = {}
        self.is_busy = False

    def push_audio(self, samples, segment=None) -> None:
        self.audio.append((segment, np.asarray(samples, np.float32)))
        self.is_busy = True

    def end_segment(self) -> None:
        self.segments_ended += 1

    def interrupt(self) -> float:
        self.interrupts += 1
        self.is_busy = False
        return self.played.get(self.audio[-1][0] if self.audio else None, 0.0)

    def played_ms(self, segment=None) -> float:
        return self.played.get(segment, 0.0)

    def busy(self) -> bool:
        return self.is_busy

    def send_event(self, event: dict) -> None:
        self.events.append(event)

    def samples(self, segment=...) -> int:
        return sum(x.size for s, x in self.audio if segment is ... or s == segment)
