"""Voice agents behind one small async interface.

An agent hears the user (`on_user_audio`, float32 16 kHz mono) and typed text (`on_text`),
and speaks through an `AgentIO` that the call session implements:

    io.push_audio(samples_16k, segment)   # agent speech (any amount, any pace)
    io.end_segment()                      # the current utterance is complete
    io.interrupt() -> played_ms           # barge-in: stop now; how much of the segment was heard
    io.played_ms(segment)                 # samples of `segment` actually sent on the audio track
    io.busy()                             # agent audio still queued or playing
    io.send_event(dict)                   # a message to the page (data channel)

Agents: `mirror` (the avatar speaks the user's mic live), `echo` (repeats each user turn after
it ends: energy VAD), `tts` (typed text spoken with espeak-ng), `realtime` (an OpenAI-Realtime-
compatible speech-to-speech server over a websocket).
"""

from __future__ import annotations

import asyncio
import base64
import io as _io
import json
import logging
import os
import shutil
import wave
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import numpy as np

log = logging.getLogger("talkingmachines.serve.agents")

SR = 16_000


# ------------------------------------------------------------------------------------------
# audio helpers
# ------------------------------------------------------------------------------------------
class Resampler:
    """Streaming mono resampler (libswresample through PyAV), float32 in, float32 out."""

    def __init__(self, rate_in: int, rate_out: int):
        self.rate_in, self.rate_out = rate_in, rate_out
        self._r = None
        if rate_in != rate_out:
            import av  # lazily: `serve.cli` reads AGENTS from here on machines without PyAV

            self._r = av.AudioResampler(format="s16", layout="mono", rate=rate_out)
        self._pts = 0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float32).reshape(-1)
        if self._r is None or x.size == 0:
            return x
        pcm = (np.clip(x, -1, 1) * 32767).astype(np.int16).reshape(1, -1)
        import av

        f = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        f.sample_rate = self.rate_in
        f.pts = self._pts
        self._pts += x.size
        out = [o.to_ndarray().reshape(-1) for o in self._r.resample(f)]
        if not out:
            return np.zeros(0, np.float32)
        return np.concatenate(out).astype(np.float32) / 32768.0


def frame_to_mono16k(frame: "av.AudioFrame", resampler: "av.AudioResampler") -> np.ndarray:
    """An aiortc/PyAV audio frame (any rate/layout) -> float32 16 kHz mono."""
    out = [o.to_ndarray().reshape(-1) for o in resampler.resample(frame)]
    if not out:
        return np.zeros(0, np.float32)
    return np.concatenate(out).astype(np.float32) / 32768.0


def pcm16_b64_encode(x: np.ndarray) -> str:
    return base64.b64encode((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()).decode("ascii")


def pcm16_b64_decode(s: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(s), dtype="<i2").astype(np.float32) / 32768.0


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if x.size else 0.0


# ------------------------------------------------------------------------------------------
# interface
# ------------------------------------------------------------------------------------------
class AgentIO(Protocol):
    def push_audio(self, samples: np.ndarray, segment: str | None = None) -> None: ...

    def end_segment(self) -> None: ...

    def interrupt(self) -> float: ...

    def played_ms(self, segment: str | None = None) -> float: ...

    def busy(self) -> bool: ...

    def send_event(self, event: dict) -> None: ...


class Agent:
    """Base agent: silent. Subclasses override what they need."""

    name = "silent"

    def __init__(self) -> None:
        self.io: AgentIO | None = None

    async def start(self, io: AgentIO) -> None:
        self.io = io

    async def on_user_audio(self, samples: np.ndarray) -> None:
        pass

    async def on_text(self, text: str) -> None:
        pass

    async def close(self) -> None:
        pass


class MirrorAgent(Agent):
    """The avatar speaks the user's microphone audio, live."""

    name = "mirror"

    async def on_user_audio(self, samples: np.ndarray) -> None:
        if self.io is not None and samples.size:
            self.io.push_audio(samples, "mirror")


class EnergyVAD:
    """Energy VAD with an adaptive noise floor; frames of 20 ms at 16 kHz.

    `feed()` returns events: "start" when speech has lasted `min_speech_s`, "end" after
    `hangover_s` of silence following speech.
    """

    def __init__(self, threshold: float = 0.015, min_speech_s: float = 0.12, hangover_s: float = 0.6,
                 frame: int = 320):
        self.threshold = threshold
        self.frame = frame
        self.min_speech = int(round(min_speech_s * SR / frame))
        self.hangover = int(round(hangover_s * SR / frame))
        self.noise = 0.0
        self.buf = np.zeros(0, np.float32)
        self.in_speech = False
        self.run_voiced = 0
        self.run_silent = 0

    def feed(self, x: np.ndarray) -> list[tuple[str, int]]:
        """Returns [(event, sample_offset_in_x)]."""
        events = []
        base = -self.buf.size
        self.buf = np.concatenate([self.buf, np.asarray(x, np.float32)])
        i = 0
        while i + self.frame <= self.buf.size:
            e = rms(self.buf[i : i + self.frame])
            voiced = e > max(self.threshold, 3.0 * self.noise)
            if not voiced:
                self.noise = 0.95 * self.noise + 0.05 * e if self.noise else e
            if voiced:
                self.run_voiced += 1
                self.run_silent = 0
                if not self.in_speech and self.run_voiced >= self.min_speech:
                    self.in_speech = True
                    events.append(("start", base + i + self.frame - self.min_speech * self.frame))
            else:
                self.run_silent += 1
                self.run_voiced = 0
                if self.in_speech and self.run_silent >= self.hangover:
                    self.in_speech = False
                    events.append(("end", base + i + self.frame))
            i += self.frame
        self.buf = self.buf[i:]
        return events


class EchoAgent(Agent):
    """Repeats each user turn after it ends (energy VAD). Speaking over it interrupts it."""

    name = "echo"

    def __init__(self, vad: EnergyVAD | None = None, barge_in: bool = True, max_turn_s: float = 15.0,
                 pre_roll_s: float = 0.2):
        super().__init__()
        self.vad = vad or EnergyVAD()
        self.barge_in = barge_in
        self.max_turn = int(max_turn_s * SR)
        self.pre_roll = int(pre_roll_s * SR)
        self.history = np.zeros(0, np.float32)  # recent audio (pre-roll)
        self.turn: list[np.ndarray] | None = None
        self.turns = 0
        self.interruptions = 0

    async def on_user_audio(self, samples: np.ndarray) -> None:
        x = np.asarray(samples, np.float32)
        events = self.vad.feed(x)
        pos = 0
        for ev, off in events:
            off = max(0, min(x.size, off)) if off >= 0 else 0
            if ev == "start":
                if self.barge_in and self.io is not None and self.io.busy():
                    self.io.interrupt()
                    self.interruptions += 1
                pre = np.concatenate([self.history, x[:off]])[-self.pre_roll :]
                self.turn = [pre]
                pos = off
            elif ev == "end" and self.turn is not None:
                self.turn.append(x[pos:off])
                self._finish_turn()
                pos = off
        if self.turn is not None:
            self.turn.append(x[pos:])
            if sum(a.size for a in self.turn) > self.max_turn:
                self._finish_turn()
        self.history = np.concatenate([self.history, x])[-self.pre_roll :]

    def _finish_turn(self) -> None:
        audio = np.concatenate(self.turn) if self.turn else np.zeros(0, np.float32)
        self.turn = None
        if self.io is None or audio.size == 0:
            return
        self.turns += 1
        seg = f"echo-{self.turns}"
        self.io.push_audio(audio, seg)
        self.io.end_segment()
        self.io.send_event({"type": "agent", "text": f"(echoing {audio.size / SR:.1f} s)"})


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None or shutil.which("espeak") is not None


async def espeak(text: str, voice: str = "en-us", speed: int = 165) -> np.ndarray:
    """Text -> float32 16 kHz mono through the espeak-ng binary (no shell)."""
    exe = shutil.which("espeak-ng") or shutil.which("espeak")
    if exe is None:
        raise RuntimeError("espeak-ng is not installed (apt-get install espeak-ng)")
    proc = await asyncio.create_subprocess_exec(
        exe, "-v", voice, "-s", str(speed), "--stdout", "--", text,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    if proc.returncode != 0 or not out:
        raise RuntimeError(f"espeak-ng failed: {err.decode(errors='replace').strip()}")
    with wave.open(_io.BytesIO(out)) as w:
        rate, ch = w.getframerate(), w.getnchannels()
        data = w.readframes(w.getnframes())
    x = np.frombuffer(data, "<i2").astype(np.float32) / 32768.0
    if ch > 1:
        x = x.reshape(-1, ch).mean(1)
    return Resampler(rate, SR)(x)


class TTSAgent(Agent):
    """Speaks typed text with espeak-ng. Text typed while it speaks is queued."""

    name = "tts"
    MAX_TEXT = 2000

    def __init__(self, voice: str = "en-us", speed: int = 165, greeting: str | None = None):
        super().__init__()
        self.voice, self.speed, self.greeting = voice, speed, greeting
        self.count = 0

    async def start(self, io: AgentIO) -> None:
        await super().start(io)
        if self.greeting:
            await self.on_text(self.greeting)

    async def on_text(self, text: str) -> None:
        text = (text or "").strip()[: self.MAX_TEXT]
        if not text or self.io is None:
            return
        x = await espeak(text, self.voice, self.speed)
        self.count += 1
        self.io.push_audio(x, f"tts-{self.count}")
        self.io.end_segment()
        self.io.send_event({"type": "agent", "text": text})


# ------------------------------------------------------------------------------------------
# OpenAI-Realtime-compatible speech-to-speech
# ------------------------------------------------------------------------------------------
@dataclass
class RealtimeOptions:
    url: str = "wss://api.openai.com/v1/realtime?model=gpt-realtime"
    api_key: str | None = None
    voice: str | None = None
    instructions: str | None = None
    protocol: str = "ga"  # "ga" (session.type=realtime, audio.input/output) or "beta" (pcm16 fields)
    rate: int = 24_000
    append_ms: int = 100  # mic audio batched into input_audio_buffer.append messages of this size


class RealtimeAgent(Agent):
    """Adapter for an OpenAI-Realtime-compatible server.

    Sends `session.update`, streams the mic as `input_audio_buffer.append` (PCM16 24 kHz
    base64), plays `response.output_audio.delta` / `response.audio.delta`, and on
    `input_audio_buffer.speech_started` interrupts playback and sends
    `conversation.item.truncate(item_id, content_index, audio_end_ms)` with the real played
    position (samples actually sent on the audio track).
    """

    name = "realtime"

    def __init__(self, opts: RealtimeOptions | None = None):
        super().__init__()
        self.opts = opts or RealtimeOptions()
        self._http = None
        self._ws = None
        self._task: asyncio.Task | None = None
        self._up = Resampler(SR, self.opts.rate)
        self._down = Resampler(self.opts.rate, SR)
        self._pending: list[np.ndarray] = []
        self._pending_n = 0
        self.item_id: str | None = None
        self.content_index = 0
        self.truncated: set[str] = set()
        self.truncations: list[dict] = []
        self.events_seen: list[str] = []
        self._send_lock = asyncio.Lock()

    def session_update(self) -> dict:
        o = self.opts
        if o.protocol == "beta":
            s: dict[str, Any] = {"modalities": ["audio", "text"], "input_audio_format": "pcm16",
                                 "output_audio_format": "pcm16", "turn_detection": {"type": "server_vad"}}
            if o.voice:
                s["voice"] = o.voice
        else:
            s = {"type": "realtime", "output_modalities": ["audio"],
                 "audio": {"input": {"format": {"type": "audio/pcm", "rate": o.rate},
                                     "turn_detection": {"type": "server_vad"}},
                           "output": {"format": {"type": "audio/pcm", "rate": o.rate}}}}
            if o.voice:
                s["audio"]["output"]["voice"] = o.voice
        if o.instructions:
            s["instructions"] = o.instructions
        return {"type": "session.update", "session": s}

    async def start(self, io: AgentIO) -> None:
        import aiohttp

        await super().start(io)
        headers = {}
        if self.opts.api_key:
            headers["Authorization"] = f"Bearer {self.opts.api_key}"
        if self.opts.protocol == "beta":
            headers["OpenAI-Beta"] = "realtime=v1"
        self._http = aiohttp.ClientSession()
        try:
            self._ws = await self._http.ws_connect(self.opts.url, headers=headers, heartbeat=20, max_msg_size=0)
        except Exception:
            await self._http.close()
            raise
        await self._send(self.session_update())
        self._task = asyncio.create_task(self._recv_loop())

    async def _send(self, msg: dict) -> None:
        if self._ws is None or self._ws.closed:
            return
        async with self._send_lock:
            await self._ws.send_str(json.dumps(msg))

    async def on_user_audio(self, samples: np.ndarray) -> None:
        y = self._up(samples)
        if y.size:
            self._pending.append(y)
            self._pending_n += y.size
        if self._pending_n >= self.opts.rate * self.opts.append_ms // 1000:
            x = np.concatenate(self._pending)
            self._pending, self._pending_n = [], 0
            await self._send({"type": "input_audio_buffer.append", "audio": pcm16_b64_encode(x)})

    async def on_text(self, text: str) -> None:
        text = (text or "").strip()
        if not text:
            return
        await self._send({"type": "conversation.item.create",
                          "item": {"type": "message", "role": "user",
                                   "content": [{"type": "input_text", "text": text}]}})
        await self._send({"type": "response.create"})

    async def _recv_loop(self) -> None:
        import aiohttp

        assert self._ws is not None
        try:
            async for msg in self._ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    if msg.type in (aiohttp.WSMsgType.ERROR, aiohttp.WSMsgType.CLOSE):
                        break
                    continue
                try:
                    ev = json.loads(msg.data)
                except ValueError:
                    continue
                await self.handle_event(ev)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("realtime receive loop failed")

    async def handle_event(self, ev: dict) -> None:
        t = ev.get("type", "")
        self.events_seen.append(t)
        io = self.io
        if t in ("response.output_audio.delta", "response.audio.delta"):
            item = ev.get("item_id")
            if item in self.truncated or io is None:
                return
            if item != self.item_id:
                self.item_id = item
                self._down = Resampler(self.opts.rate, SR)
            self.content_index = int(ev.get("content_index", 0) or 0)
            x = self._down(pcm16_b64_decode(ev.get("delta", "")))
            if x.size:
                io.push_audio(x, item)
        elif t in ("response.output_audio.done", "response.audio.done"):
            if io is not None and ev.get("item_id") not in self.truncated:
                io.end_segment()
        elif t == "input_audio_buffer.speech_started":
            await self.barge_in()
        elif t in ("response.output_audio_transcript.done", "response.audio_transcript.done"):
            if io is not None:
                io.send_event({"type": "agent", "text": ev.get("transcript", "")})
        elif t == "error":
            log.warning("realtime server error: %s", ev.get("error"))
            if io is not None:
                io.send_event({"type": "error", "text": str((ev.get("error") or {}).get("message", ev))})

    async def barge_in(self) -> None:
        io = self.io
        item = self.item_id
        if io is None or item is None or item in self.truncated:
            return
        if not io.busy():
            return  # fully played already: nothing to truncate
        played = io.interrupt()
        self.truncated.add(item)
        msg = {"type": "conversation.item.truncate", "item_id": item,
               "content_index": self.content_index, "audio_end_ms": int(played)}
        self.truncations.append(msg)
        await self._send(msg)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        if self._ws is not None:
            await self._ws.close()
        if self._http is not None:
            await self._http.close()


# ------------------------------------------------------------------------------------------
AGENTS = ("mirror", "echo", "tts", "realtime", "silent")


def agent_factory(name: str, **kw: Any) -> Callable[[], Agent]:
    """A factory that makes one fresh agent per call (per session)."""
    if name == "mirror":
        return MirrorAgent
    if name == "echo":
        return EchoAgent
    if name == "silent":
        return Agent
    if name == "tts":
        if not espeak_available():
            raise RuntimeError("the tts agent needs espeak-ng (apt-get install espeak-ng)")
        return lambda: TTSAgent(voice=kw.get("voice") or "en-us", greeting=kw.get("greeting"))
    if name == "realtime":
        url = kw.get("realtime_url") or os.environ.get("TM_REALTIME_URL") or RealtimeOptions.url
        key = kw.get("realtime_key") or os.environ.get("OPENAI_API_KEY")
        opts = RealtimeOptions(url=url, api_key=key, voice=kw.get("voice"),
                               instructions=kw.get("instructions"),
                               protocol=kw.get("realtime_protocol") or "ga")
        return lambda: RealtimeAgent(opts)
    raise ValueError(f"unknown agent {name!r}; choose one of {', '.join(AGENTS)}")
