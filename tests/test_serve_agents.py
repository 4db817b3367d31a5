"""Voice agents: mirror, echo (VAD), tts (espeak-ng), realtime (against a local protocol server)."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil

import numpy as np
import pytest
from aiohttp import WSMsgType, web

from serve_fakes import FakeAvatar, RecordingIO
from talkingmachines.serve.agents import (EchoAgent, EnergyVAD, MirrorAgent, RealtimeAgent, RealtimeOptions,
                                          Resampler, TTSAgent, agent_factory, pcm16_b64_decode,
                                          pcm16_b64_encode)

SR = 16_000


def tone(seconds: float, amp: float = 0.3, f: float = 220.0, sr: int = SR) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * f * t)).astype(np.float32)


def feed_blocks(agent, x: np.ndarray, block: int = 960):
    async def run():
        for i in range(0, x.size, block):
            await agent.on_user_audio(x[i : i + block])

    asyncio.run(run())


def test_mirror_pushes_user_audio():
    io = RecordingIO()
    a = MirrorAgent()
    asyncio.run(a.start(io))
    feed_blocks(a, tone(0.5))
    assert io.samples() == 8000


def test_vad_start_end():
    v = EnergyVAD()
    x = np.concatenate([np.zeros(8000, np.float32), tone(1.0), np.zeros(16000, np.float32)])
    ev = []
    for i in range(0, x.size, 480):
        ev += [e for e, _ in v.feed(x[i : i + 480])]
    assert ev == ["start", "end"]


def test_echo_repeats_each_turn_after_it_ends():
    io = RecordingIO()
    a = EchoAgent()
    asyncio.run(a.start(io))
    x = np.concatenate([np.zeros(8000, np.float32), tone(1.0), np.zeros(16000, np.float32),
                        tone(0.6, f=330), np.zeros(16000, np.float32)])
    feed_blocks(a, x)
    assert a.turns == 2 and io.segments_ended == 2
    n1 = io.samples("echo-1")
    assert 0.9 * SR < n1 < 2.0 * SR  # the turn (plus pre-roll and hangover), not the whole input
    assert len({s for s, _ in io.audio}) == 2


def test_echo_barge_in_interrupts_playback():
    io = RecordingIO()
    a = EchoAgent()
    asyncio.run(a.start(io))
    feed_blocks(a, np.concatenate([tone(0.8), np.zeros(16000, np.float32)]))
    assert io.busy()  # it is echoing; the user talks again
    feed_blocks(a, tone(0.5))
    assert io.interrupts == 1


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")
def test_tts_speaks_text():
    io = RecordingIO()
    a = TTSAgent()

    async def run():
        await a.start(io)
        await a.on_text("Hello, I am your avatar.")

    asyncio.run(run())
    x = np.concatenate([s for _, s in io.audio])
    assert 0.8 * SR < x.size < 4 * SR
    assert np.sqrt(np.mean(x ** 2)) > 0.02
    assert io.segments_ended == 1 and io.events[-1]["text"] == "Hello, I am your avatar."


def test_resampler_lengths_and_pcm_roundtrip():
    up, down = Resampler(16000, 24000), Resampler(24000, 16000)
    y = np.concatenate([up(tone(0.1)) for _ in range(10)])
    assert abs(y.size - 24000) < 200
    z = np.concatenate([down(y[i : i + 2400]) for i in range(0, y.size, 2400)])
    assert abs(z.size - 16000) < 200
    x = tone(0.05)
    assert np.allclose(pcm16_b64_decode(pcm16_b64_encode(x)), x, atol=1e-4)


def test_agent_factory():
    assert agent_factory("mirror")().name == "mirror"
    with pytest.raises(ValueError):
        agent_factory("nope")


# ------------------------------------------------------------------------------------------
# realtime: a small local server that speaks the OpenAI Realtime protocol
# ------------------------------------------------------------------------------------------
class FakeRealtimeServer:
    """Answers the first user audio with item A (new event name), the second with item B
    (old event name, 3 s long), and reports `speech_started` while B plays."""

    def __init__(self, barge_after_s: float = 0.8):
        self.received: list[dict] = []
        self.auth: str | None = None
        self.barge_after_s = barge_after_s
        self.truncate = asyncio.Event()

    async def handler(self, request):
        self.auth = request.headers.get("Authorization")
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_json({"type": "session.created", "session": {}})
        appended = 0
        sent_a = sent_b = False
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                continue
            ev = json.loads(msg.data)
            self.received.append(ev)
            if ev["type"] == "input_audio_buffer.append":
                appended += pcm16_b64_decode(ev["audio"]).size
                if appended >= 24000 * 0.3 and not sent_a:
                    sent_a = True
                    await self.speak(ws, "item_A", 0.5, "response.output_audio.delta", "response.output_audio.done")
                if appended >= 24000 * 0.6 and not sent_b:
                    sent_b = True
                    await self.speak(ws, "item_B", 3.0, "response.audio.delta", "response.audio.done")
                    asyncio.ensure_future(self.barge(ws))
            if ev["type"] == "conversation.item.truncate":
                self.truncate.set()
        return ws

    async def speak(self, ws, item, seconds, delta_name, done_name):
        x = tone(seconds, 0.3, 200, 24000)
        for i in range(0, x.size, 2400):  # 100 ms deltas, faster than real time
            await ws.send_json({"type": delta_name, "item_id": item, "content_index": 0, "output_index": 0,
                                "response_id": "r", "delta": pcm16_b64_encode(x[i : i + 2400])})
        await ws.send_json({"type": done_name, "item_id": item, "content_index": 0})

    async def barge(self, ws):
        await asyncio.sleep(self.barge_after_s)
        await ws.send_json({"type": "input_audio_buffer.speech_started", "audio_start_ms": 1000, "item_id": "u2"})


async def _serve(fake):
    app = web.Application()
    app.router.add_get("/v1/realtime", fake.handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"ws://127.0.0.1:{runner.addresses[0][1]}/v1/realtime"


@pytest.mark.timeout(30)
def test_realtime_protocol_with_recording_io():
    async def main():
        fake = FakeRealtimeServer(barge_after_s=0.2)
        runner, url = await _serve(fake)
        io = RecordingIO()
        a = RealtimeAgent(RealtimeOptions(url=url, api_key="k123", voice="alloy"))
        await a.start(io)
        for _ in range(40):  # 0.8 s of mic in 20 ms frames
            await a.on_user_audio(tone(0.02))
            await asyncio.sleep(0.005)
        io.played["item_B"] = 1234.0  # what the session says was actually played
        await asyncio.wait_for(fake.truncate.wait(), 5)
        await a.close()
        await runner.cleanup()
        types = [e["type"] for e in fake.received]
        assert types[0] == "session.update"
        su = fake.received[0]["session"]
        assert su["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}
        assert fake.auth == "Bearer k123"
        appends = [e for e in fake.received if e["type"] == "input_audio_buffer.append"]
        n = sum(pcm16_b64_decode(e["audio"]).size for e in appends)
        assert abs(n - 0.8 * 24000) < 2400 + 200  # mic resampled 16 -> 24 kHz (last partial batch pending)
        # both delta names were played, resampled to 16 kHz
        assert abs(io.samples("item_A") - 8000) < 200
        assert io.samples("item_B") > 0
        assert io.interrupts == 1
        tr = [e for e in fake.received if e["type"] == "conversation.item.truncate"]
        assert tr == [{"type": "conversation.item.truncate", "item_id": "item_B", "content_index": 0,
                       "audio_end_ms": 1234}]

    asyncio.run(main())


@pytest.mark.timeout(40)
def test_realtime_barge_in_through_a_session_reports_real_played_position():
    """Agent + CallSession + tracks pulled in real time: audio_end_ms is what the audio track sent."""
    from talkingmachines.serve.session import CallSession

    async def main():
        fake = FakeRealtimeServer(barge_after_s=1.5)
        runner, url = await _serve(fake)
        stream = FakeAvatar(compute_s=0.02).new_stream(np.zeros((64, 64, 3), np.uint8))
        agent = RealtimeAgent(RealtimeOptions(url=url))
        s = CallSession(stream, agent)
        await agent.start(s)
        gen = asyncio.ensure_future(s._gen_loop())
        heard = []

        async def pull_v():
            while True:
                await s.video_track.recv()

        async def pull_a():
            while True:
                f = await s.audio_track.recv()
                heard.append(f.to_ndarray().reshape(-1).astype(np.float32) / 32768)

        pulls = [asyncio.ensure_future(pull_v()), asyncio.ensure_future(pull_a())]
        for _ in range(40):
            await agent.on_user_audio(tone(0.02, amp=0.01))
            await asyncio.sleep(0.02)
        await asyncio.wait_for(fake.truncate.wait(), 10)
        n_at_barge = len(heard)
        await asyncio.sleep(1.0)
        tr = [e for e in fake.received if e["type"] == "conversation.item.truncate"][0]
        played_b = s.playout.played.get("item_B", 0)
        assert tr["item_id"] == "item_B"
        assert tr["audio_end_ms"] == int(played_b / 16.0)
        assert 200 < tr["audio_end_ms"] < 2500  # part of the 3 s item, not all of it
        late = heard[n_at_barge + 1 :]
        assert all(np.max(np.abs(x)) < 0.05 for x in late), "agent audio still heard after barge-in"
        assert s.playout.played.get("item_A", 0) == 8000 or s.playout.played.get("item_A", 0) > 7000
        for t in pulls + [gen]:
            t.cancel()
        await s.close("test")
        await runner.cleanup()

    asyncio.run(main())


def test_realtime_beta_session_update():
    a = RealtimeAgent(RealtimeOptions(protocol="beta", voice="verse", instructions="be brief"))
    su = a.session_update()["session"]
    assert su["input_audio_format"] == "pcm16" and su["voice"] == "verse" and su["instructions"] == "be brief"


def test_realtime_ignores_deltas_of_truncated_item():
    io = RecordingIO()
    a = RealtimeAgent()
    a.io = io
    d = base64.b64encode(np.zeros(2400, "<i2").tobytes()).decode()

    async def run():
        await a.handle_event({"type": "response.output_audio.delta", "item_id": "x", "content_index": 0, "delta": d})
        await a.barge_in()
        n = io.samples()
        await a.handle_event({"type": "response.output_audio.delta", "item_id": "x", "content_index": 0, "delta": d})
        return n

    n = asyncio.run(run())
    assert io.samples() == n and io.interrupts == 1
