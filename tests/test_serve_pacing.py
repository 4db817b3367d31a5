"""Pacing: one shared clock for audio and video, monotonic pts, barge-in within one chunk."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from serve_fakes import FakeAvatar
from talkingmachines.serve.agents import Agent
from talkingmachines.serve.session import CallSession
from talkingmachines.serve.tracks import AgentAudioTrack, AvatarVideoTrack, Playout, Span

F, SPF = 12, 640


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def tagged_chunk(first_frame: int, h: int = 4):
    """Frames and audio that carry their own frame number (to check A/V alignment)."""
    frames = np.zeros((F, h, h, 3), np.uint8)
    audio = np.zeros(F * SPF, np.float32)
    for i in range(F):
        frames[i] = (first_frame + i) % 256
        audio[i * SPF : (i + 1) * SPF] = ((first_frame + i) % 256) / 1000.0
    return frames, audio


def test_playout_av_share_one_timeline():
    clk = FakeClock()
    p = Playout(clock=clk)
    for k in range(3):
        p.add(*tagged_chunk(k * F))
    p.start_clock()
    for n in range(3 * F):
        img = p.video_frame(n)
        a = p.audio(n * SPF, SPF)
        assert int(img[0, 0, 0]) == n
        assert np.allclose(a, n / 1000.0), n  # the audio heard with frame n is frame n's audio


def test_late_chunk_keeps_sync_and_holds_last_frame():
    clk = FakeClock()
    p = Playout(clock=clk)
    p.add(*tagged_chunk(0))
    p.start_clock()
    for n in range(F):
        p.video_frame(n)
        p.audio(n * SPF, SPF)
    # the next chunk is 5 frames late: a gap (held frame + silence), then it plays in sync
    clk.t += (F + 5) / 25
    held = p.video_frame(F + 1)
    assert int(held[0, 0, 0]) == F - 1
    assert np.all(p.audio((F + 1) * SPF, SPF) == 0)
    e = p.add(*tagged_chunk(100))
    assert e.start_frame >= F + 5
    for i in range(F):
        n = e.start_frame + i
        assert int(p.video_frame(n)[0, 0, 0]) == 100 + i
        assert np.allclose(p.audio(n * SPF, SPF), (100 + i) / 1000.0)


def test_interrupt_cuts_audio_now_and_counts_played():
    p = Playout(clock=FakeClock())
    fr, au = tagged_chunk(0)
    au[:] = 0.5
    p.add(fr, au, [Span("item", 0, F * SPF)], speaking=True)
    p.add(fr, au, [Span("item", 0, F * SPF)], speaking=True)
    p.start_clock()
    for n in range(5):
        p.video_frame(n)
        p.audio(n * SPF, SPF)
    assert p.played["item"] == 5 * SPF
    assert p.pending_agent_samples() == 2 * F * SPF - 5 * SPF
    p.interrupt()
    assert p.pending_agent_samples() == 0
    assert len(p.entries) == 1  # the chunk not yet started is dropped
    assert np.all(p.audio(5 * SPF, SPF) == 0)  # silent from the next audio frame on
    assert p.played["item"] == 5 * SPF
    assert p.next_frame == F


def test_tracks_pts_monotonic_and_on_one_clock():
    async def main():
        p = Playout()
        v, a = AvatarVideoTrack(p), AgentAudioTrack(p)
        for k in range(3):
            p.add(*tagged_chunk(k * F))
        vp, ap, vt, at = [], [], [], []

        async def pull_v():
            for _ in range(20):
                f = await v.recv()
                vp.append(f.pts)
                vt.append(time.monotonic())

        async def pull_a():
            for _ in range(40):
                f = await a.recv()
                ap.append(f.pts)
                at.append(time.monotonic())

        await asyncio.gather(pull_v(), pull_a())
        assert np.all(np.diff(vp) == 3600)  # 90 kHz / 25 fps
        assert np.all(np.diff(ap) == 320)  # 20 ms at 16 kHz
        # video frame n and audio sample n*640 are released at the same wall-clock time
        t0 = p.t0
        for i, t in enumerate(vt):
            assert abs((t - t0) - vp[i] / 90000) < 0.03
        for i, t in enumerate(at):
            assert abs((t - t0) - ap[i] / 16000) < 0.03
        # pace: 20 frames take ~0.8 s, not less
        assert vt[-1] - vt[0] > 0.7

    asyncio.run(main())


class _Puller:
    """Stands in for aiortc's senders: pulls both tracks in real time."""

    def __init__(self, s: CallSession):
        self.s = s
        self.audio: list[np.ndarray] = []
        self.tasks = []

    def start(self):
        async def va():
            while True:
                await self.s.video_track.recv()

        async def aa():
            while True:
                f = await self.s.audio_track.recv()
                self.audio.append(f.to_ndarray().reshape(-1).astype(np.float32) / 32768)

        self.tasks = [asyncio.ensure_future(va()), asyncio.ensure_future(aa())]

    def stop(self):
        for t in self.tasks:
            t.cancel()


@pytest.mark.timeout(30)
def test_session_barge_in_stops_within_one_chunk():
    async def main():
        stream = FakeAvatar(compute_s=0.03).new_stream(np.zeros((64, 64, 3), np.uint8))
        s = CallSession(stream, Agent())
        gen = asyncio.ensure_future(s._gen_loop())
        puller = _Puller(s)
        puller.start()
        await asyncio.sleep(0.3)
        tone = (0.3 * np.sin(2 * np.pi * 200 * np.arange(16000 * 5) / 16000)).astype(np.float32)
        s.push_audio(tone, "item1")  # 5 s of agent speech at once (like a fast LLM)
        s.end_segment()
        await asyncio.sleep(1.5)
        assert s.busy()
        heard_before = sum(int(np.sum(np.abs(x) > 0.05)) for x in puller.audio)
        assert heard_before > 8000
        n_before = len(puller.audio)
        played_ms = s.interrupt()
        # the position reported is what the audio track actually sent of item1
        assert played_ms == pytest.approx(s.playout.played["item1"] / 16.0)
        assert 500 < played_ms < 1500
        await asyncio.sleep(1.2)
        after = puller.audio[n_before:]
        loud = [i for i, x in enumerate(after) if np.max(np.abs(x)) > 0.05]
        # audio stops at once (no loud 20 ms frame after the barge-in)
        assert not loud, loud[:5]
        assert not s.busy()
        assert s.playout.played["item1"] / 16.0 == pytest.approx(played_ms)
        # the video shows listening within one chunk: the latest chunks are silent ones
        assert s.playout.speaking_now() is False
        puller.stop()
        gen.cancel()
        await s.close("test")

    asyncio.run(main())


@pytest.mark.timeout(30)
def test_session_silence_gives_listening_and_paces_generation():
    async def main():
        stream = FakeAvatar().new_stream(np.zeros((64, 64, 3), np.uint8))
        s = CallSession(stream, Agent())
        gen = asyncio.ensure_future(s._gen_loop())
        puller = _Puller(s)
        puller.start()
        await asyncio.sleep(2.0)
        # generation stays just ahead of playout (not racing ahead): about 2 s of chunks + a little
        assert 3 <= s.chunks <= 7, s.chunks
        assert s.playout.lead_seconds() < 1.0
        assert not s.playout.speaking_now()
        puller.stop()
        gen.cancel()
        await s.close("test")

    asyncio.run(main())
