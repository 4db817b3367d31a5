"""LiveKit avatar plugin through the library's in-process pieces (no LiveKit server here).

The agent side is livekit-agents' own `QueueAudioOutput` (an `AudioOutput` + `AudioReceiver`);
the avatar side is the real `AvatarRunner` with its `AVSynchronizer`, `AudioSource` and
`VideoSource`; only publishing to a room is skipped (no server), by marking the tracks as
already published.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

lk = pytest.importorskip("livekit.agents", reason="livekit-agents not installed (pip install 'talkingmachines[livekit]')")
from livekit import rtc  # noqa: E402
from livekit.agents.voice.avatar import (AudioSegmentEnd, AvatarOptions, AvatarRunner,  # noqa: E402
                                         QueueAudioOutput)

from serve_fakes import FakeAvatar  # noqa: E402
from talkingmachines.serve.livekit import TalkingMachinesVideoGenerator  # noqa: E402

SR = 16_000


def tts_frames(seconds: float, sr: int = 24_000, ms: int = 20):
    n = int(sr * ms / 1000)
    t = np.arange(int(seconds * sr)) / sr
    x = (0.3 * np.sin(2 * np.pi * 200 * t) * 32767).astype(np.int16)
    for i in range(0, x.size - n + 1, n):
        yield rtc.AudioFrame(x[i : i + n].tobytes(), sr, 1, n)


def make_gen():
    stream = FakeAvatar(size=64, compute_s=0.01).new_stream(np.zeros((64, 64, 3), np.uint8))
    return TalkingMachinesVideoGenerator(stream), stream


@pytest.mark.timeout(30)
def test_generator_yields_frames_audio_and_segment_end():
    async def main():
        gen, stream = make_gen()
        for f in tts_frames(1.0):
            await gen.push_audio(f)
        await gen.push_audio(AudioSegmentEnd())
        it = gen.__aiter__()
        kinds, audio_s = [], 0.0
        while "end" not in kinds and len(kinds) < 400:
            item = await it.__anext__()
            if isinstance(item, rtc.VideoFrame):
                kinds.append("v")
                assert (item.width, item.height) == (64, 64)
            elif isinstance(item, rtc.AudioFrame):
                kinds.append("a")
                assert item.sample_rate == SR and item.num_channels == 1
                audio_s += item.samples_per_channel / SR
            elif isinstance(item, AudioSegmentEnd):
                kinds.append("end")
        assert kinds[-1] == "end"
        assert 0.95 < audio_s < 1.3, audio_s  # the utterance (24 kHz in) comes out at 16 kHz, padded to frames
        # after the utterance: video only (listening)
        more = [type((await it.__anext__())).__name__ for _ in range(24)]
        assert set(more) == {"VideoFrame"}
        await gen.aclose()

    asyncio.run(main())


@pytest.mark.timeout(30)
def test_clear_buffer_stops_speech_at_next_frame():
    async def main():
        gen, stream = make_gen()
        for f in tts_frames(3.0):
            await gen.push_audio(f)
        it = gen.__aiter__()
        n_audio = 0
        for _ in range(30):
            item = await it.__anext__()
            n_audio += isinstance(item, rtc.AudioFrame)
        assert n_audio > 5
        gen.clear_buffer()
        after = [await it.__anext__() for _ in range(60)]
        assert not any(isinstance(x, rtc.AudioFrame) for x in after)
        assert not any(isinstance(x, AudioSegmentEnd) for x in after)
        assert stream.cleared > 0
        await gen.aclose()

    asyncio.run(main())


class _NoRoomRunner(AvatarRunner):
    """The real runner; publishing is skipped because no LiveKit server can run here."""

    async def _publish_track(self) -> None:
        self._video_publication = object()  # type: ignore[assignment]


@pytest.mark.timeout(60)
def test_avatar_runner_with_queue_audio_output_playback_finished_and_interrupt():
    async def main():
        gen, stream = make_gen()
        audio_out = QueueAudioOutput(sample_rate=24_000)
        room = rtc.Room()
        runner = _NoRoomRunner(room, audio_recv=audio_out, video_gen=gen,
                               options=AvatarOptions(video_width=64, video_height=64, video_fps=25,
                                                     audio_sample_rate=SR, audio_channels=1))
        await runner.start()
        finished = []
        audio_out.on("playback_finished", lambda ev: finished.append(ev))

        # 1) a full utterance: playback finishes, not interrupted, position ~ its length
        t0 = time.monotonic()
        for f in tts_frames(1.0):
            await audio_out.capture_frame(f)
        audio_out.flush()
        ev = await asyncio.wait_for(audio_out.wait_for_playout(), 15)
        assert ev.interrupted is False
        assert 0.9 < ev.playback_position < 1.4, ev.playback_position
        assert time.monotonic() - t0 > 0.8  # paced in real time by the AVSynchronizer

        # 2) an utterance interrupted after ~0.6 s: interrupted=True with the played position
        for f in tts_frames(4.0):
            await audio_out.capture_frame(f)
        await asyncio.sleep(0.8)
        audio_out.clear_buffer()
        audio_out.flush()
        ev2 = await asyncio.wait_for(audio_out.wait_for_playout(), 15)
        assert ev2.interrupted is True
        assert 0.1 < ev2.playback_position < 2.0, ev2.playback_position
        assert gen.interruptions == 1
        await runner.aclose()
        await gen.aclose()
        await room.disconnect()

    asyncio.run(main())


def test_worker_entry_point_importable():
    from talkingmachines.serve import livekit as plugin

    assert callable(plugin.entrypoint) and callable(plugin.main)
