"""LiveKit avatar plugin: a `VideoGenerator` for livekit-agents' `AvatarRunner`, and a worker.

The agent side publishes its TTS audio with `DataStreamAudioOutput`; the avatar worker
receives it with `DataStreamAudioReceiver`, and `AvatarRunner` feeds it to
`TalkingMachinesVideoGenerator.push_audio()`, pulls frames from `__aiter__` through an
`AVSynchronizer` (which paces them in real time) and publishes them. An interruption arrives
as `clear_buffer()`: speech stops at the next frame and the runner reports
`notify_playback_finished(interrupted=True)` with the position it counted from the audio
frames we yielded. At the end of an utterance we yield `AudioSegmentEnd` once all its audio
has been yielded; the runner then reports `interrupted=False`.

Needs `pip install 'talkingmachines[livekit]'` (livekit-agents >= 1.2).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from livekit import rtc
from livekit.agents.voice.avatar import AudioSegmentEnd, VideoGenerator

from .agents import Resampler

log = logging.getLogger("talkingmachines.serve.livekit")

LOOKAHEAD_SAMPLES = 1280


class TalkingMachinesVideoGenerator(VideoGenerator):
    """Drives an `AvatarStream` (stream/types.py) from LiveKit agent audio.

    Yields, per chunk, `chunk_video_frames` RGBA `rtc.VideoFrame`s; while the agent speaks each
    video frame is followed by its 40 ms of audio (16 kHz mono `rtc.AudioFrame`), so audio and
    video enter the `AVSynchronizer` together. While the agent is silent only video is yielded
    (listening motion).
    """

    def __init__(self, stream: Any, *, wait_for_audio_s: float = 0.25):
        self.stream = stream
        self.fps = int(getattr(stream, "fps", 25))
        self.sr = int(getattr(stream, "sample_rate", 16_000))
        self.spf = self.sr // self.fps
        self.chunk_frames = int(getattr(stream, "chunk_video_frames", 12))
        self.chunk_samples = self.chunk_frames * self.spf
        self.lookahead = int(getattr(stream, "lookahead_samples", LOOKAHEAD_SAMPLES))
        self.wait_for_audio_s = wait_for_audio_s
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tm-livekit")
        self._resamplers: dict[int, Resampler] = {}
        self._pending: list[np.ndarray] = []
        self._pending_n = 0
        self._engine_buffered = 0
        self._need_clear = False
        self._epoch = 0
        self._segment_open = False  # audio received for the current utterance
        self._segment_ended = False  # AudioSegmentEnd received, not yet re-emitted
        self._wake = asyncio.Event()
        self._closed = False
        self.chunks = 0
        self.interruptions = 0
        self.segments_ended = 0

    # ------------------------------------------------------------------ VideoGenerator
    async def push_audio(self, frame: rtc.AudioFrame | AudioSegmentEnd) -> None:
        if isinstance(frame, AudioSegmentEnd):
            if self._segment_open:
                self._segment_ended = True
            self._wake.set()
            return
        x = np.frombuffer(frame.data, dtype=np.int16).astype(np.float32) / 32768.0
        if frame.num_channels > 1:
            x = x.reshape(-1, frame.num_channels).mean(axis=1)
        r = self._resamplers.get(frame.sample_rate)
        if r is None:
            r = self._resamplers[frame.sample_rate] = Resampler(frame.sample_rate, self.sr)
        y = r(x)
        if y.size:
            self._pending.append(y)
            self._pending_n += y.size
            self._segment_open = True
            self._wake.set()

    def clear_buffer(self) -> None:
        self._pending.clear()
        self._pending_n = 0
        self._need_clear = True
        self._epoch += 1
        self._segment_open = False
        self._segment_ended = False
        self.interruptions += 1
        self._wake.set()

    def __aiter__(self) -> AsyncIterator[rtc.VideoFrame | rtc.AudioFrame | AudioSegmentEnd]:
        return self._run()

    async def aclose(self) -> None:
        self._closed = True
        self._wake.set()
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ internals
    def _step(self, clear: bool, pending: list[np.ndarray]):
        s = self.stream
        if clear:
            s.clear_audio()
        for x in pending:
            s.push_audio(x)
        before = s.buffered_samples()
        t = time.perf_counter()
        chunk = s.next_chunk()
        dt = time.perf_counter() - t
        after = s.buffered_samples()
        return chunk, max(0, before - after), after, dt

    def _have(self) -> int:
        return self._pending_n + self._engine_buffered

    async def _run(self) -> AsyncIterator[rtc.VideoFrame | rtc.AudioFrame | AudioSegmentEnd]:
        loop = asyncio.get_running_loop()
        while not self._closed:
            # an utterance in progress but less than a chunk buffered: give the TTS a moment
            if self._segment_open and not self._segment_ended and self._have() < self.chunk_samples + self.lookahead:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), self.wait_for_audio_s)
                except asyncio.TimeoutError:
                    pass
            clear, pending = self._need_clear, self._pending
            self._need_clear, self._pending, self._pending_n = False, [], 0
            epoch = self._epoch
            chunk, consumed, after, dt = await loop.run_in_executor(self._executor, self._step, clear, pending)
            self._engine_buffered = after
            self.chunks += 1
            speech = min(consumed, self.chunk_samples) if self._segment_open else 0
            if epoch != self._epoch and speech:
                speech = 0  # interrupted while this chunk was made: show it, but never play its audio
            audio = np.asarray(chunk.audio, np.float32)
            frames = np.asarray(chunk.frames)
            for i in range(frames.shape[0]):
                if speech and epoch != self._epoch:
                    speech = 0  # clear_buffer() while yielding: stop speaking at this frame
                yield _video_frame(frames[i])
                if i * self.spf < speech:
                    a = audio[i * self.spf : (i + 1) * self.spf]
                    yield _audio_frame(a, self.sr)
            if (self._segment_ended and epoch == self._epoch and self._have() == 0):
                self._segment_open = self._segment_ended = False
                self.segments_ended += 1
                yield AudioSegmentEnd()


def _video_frame(rgb: np.ndarray) -> rtc.VideoFrame:
    h, w = rgb.shape[:2]
    rgba = np.empty((h, w, 4), np.uint8)
    rgba[..., :3] = rgb
    rgba[..., 3] = 255
    return rtc.VideoFrame(w, h, rtc.VideoBufferType.RGBA, rgba.tobytes())


def _audio_frame(x: np.ndarray, sr: int) -> rtc.AudioFrame:
    pcm = (np.clip(x, -1, 1) * 32767).astype(np.int16)
    return rtc.AudioFrame(pcm.tobytes(), sr, 1, pcm.size)


# ------------------------------------------------------------------------------------------
# worker
# ------------------------------------------------------------------------------------------
_AVATAR = None


def _load_avatar():
    global _AVATAR
    if _AVATAR is None:
        from ..stream.generator import load_avatar

        _AVATAR = load_avatar(model=os.environ.get("TM_MODEL") or None,
                              preset=os.environ.get("TM_PRESET", "tiny"),
                              device=os.environ.get("TM_DEVICE", "cpu"))
    return _AVATAR


async def entrypoint(ctx) -> None:
    """LiveKit avatar worker job: joins the room, receives the agent's audio over data streams,
    publishes the avatar's video and audio. Portrait from $TM_IMAGE (default: the model's), framed
    for the model with $TM_ALIGN_FACE=1 (`face_align`)."""
    from livekit.agents.voice.avatar import AvatarOptions, AvatarRunner, DataStreamAudioReceiver

    await ctx.connect()
    loop = asyncio.get_running_loop()
    avatar = await loop.run_in_executor(None, _load_avatar)
    image = os.environ.get("TM_IMAGE")
    if image:
        from .app import load_image

        portrait = load_image(image)
        if os.environ.get("TM_ALIGN_FACE", "") not in ("", "0"):  # as `serve --align-face`
            from .. import face_align

            p = avatar.preset
            portrait = (await loop.run_in_executor(None, lambda: face_align.align_face(
                portrait, face_align.load_template(avatar.folder), p.height, p.width, source=image)))[0]
    else:
        portrait = avatar.default_portrait()
    stream = await loop.run_in_executor(None, avatar.new_stream, portrait)
    gen = TalkingMachinesVideoGenerator(stream)
    runner = AvatarRunner(
        ctx.room,
        audio_recv=DataStreamAudioReceiver(ctx.room),
        video_gen=gen,
        options=AvatarOptions(video_width=int(stream.width), video_height=int(stream.height),
                              video_fps=float(stream.fps), audio_sample_rate=int(stream.sample_rate),
                              audio_channels=1),
    )
    await runner.start()

    async def _cleanup() -> None:
        await runner.aclose()
        await gen.aclose()

    ctx.add_shutdown_callback(_cleanup)


def main() -> None:
    """`python -m talkingmachines.serve.livekit dev` (needs LIVEKIT_URL, LIVEKIT_API_KEY, LIVEKIT_API_SECRET)."""
    from livekit.agents import WorkerOptions, WorkerType, cli

    cli.run_app(WorkerOptions(entrypoint_fnc=entrypoint, worker_type=WorkerType.ROOM,
                              agent_name=os.environ.get("TM_AGENT_NAME", "talkingmachines-avatar")))


if __name__ == "__main__":
    main()
