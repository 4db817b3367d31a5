"""What the streaming engine hands to its consumers (CLI writer, WebRTC tracks, LiveKit)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch


@dataclass
class Chunk:
    index: int  # 0-based chunk counter within the session
    frames: np.ndarray  # uint8 [F, H, W, 3], F = chunk video frames (12 by default), 25 fps
    audio: np.ndarray  # float32 [F * 640], mono 16 kHz: exactly the audio that plays with `frames`
    speaking: bool  # False when the chunk's audio was (near) silence: listening motion
    timings: dict = field(default_factory=dict)  # stage timings in ms (dit_ms, vae_ms, ...)


@dataclass
class LatentChunk:
    """A chunk before its decode: what the DiT stage hands to a decode stage (`stream.disagg`)."""

    index: int
    latents: torch.Tensor  # [1, C, F, h, w], normalised, on the DiT device
    audio: np.ndarray
    speaking: bool
    timings: dict = field(default_factory=dict)
    event: object = None  # CUDA event recorded after the DiT's last kernel for this chunk


class AvatarStream(Protocol):
    """The interface every consumer codes against (implemented by StreamingGenerator).

    Audio is pushed as it arrives; `next_chunk()` produces the next 0.48 s of video with the
    audio that belongs to it. When less than a chunk of audio is buffered, `next_chunk()`
    pads with silence (the avatar listens) unless `end_audio()` was not called and
    `wait=True` is asked, in which case it returns None.
    """

    fps: int
    sample_rate: int
    chunk_video_frames: int
    height: int
    width: int

    def push_audio(self, samples: np.ndarray) -> None: ...

    def clear_audio(self) -> int:
        """Drop buffered, not yet generated audio (barge-in). Returns samples dropped."""
        ...

    def end_audio(self) -> None: ...

    def buffered_samples(self) -> int: ...

    def next_chunk(self, wait: bool = False) -> Chunk | None: ...
