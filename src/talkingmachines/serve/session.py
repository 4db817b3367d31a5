"""One call: the peer connection, the avatar stream, the voice agent and the pacing.

Generation runs in a per-session worker thread (one at a time, so the stream is never
touched concurrently) and only a little ahead of playout, so a barge-in is heard within
one chunk: the worker makes the next chunk when
  * enough agent audio is buffered for a full chunk (plus the look-ahead), or the agent
    ended its utterance, and at most one chunk is queued beyond the compute budget, or
  * the queue is about to run dry (then the stream pads with silence: listening motion).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import secrets
import time
import uuid
from collections import deque
from typing import Any, Callable

import av
import numpy as np
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from .agents import Agent, frame_to_mono16k
from .metrics import Metrics
from .tracks import AgentAudioTrack, AvatarVideoTrack, Playout, Span

log = logging.getLogger("talkingmachines.serve.session")

LOOKAHEAD_SAMPLES = 1280  # 80 ms: the stream's audio context beyond a chunk's end (StreamConfig.audio_context)


class CallSession:
    def __init__(self, stream: Any, agent: Agent, metrics: Metrics | None = None, *,
                 idle_timeout: float = 4.0, connect_timeout: float = 6.0,
                 on_closed: Callable[["CallSession"], Any] | None = None,
                 t_offer: float | None = None, pc: RTCPeerConnection | None = None,
                 executor: concurrent.futures.Executor | None = None, client: str | None = None):
        self.id = uuid.uuid4().hex[:8]
        # what /hangup must present: the id is not proof of owning the call
        self.secret = secrets.token_urlsafe(16)
        self.client = client  # the caller's address (offers are limited per client)
        self.stream = stream
        self.agent = agent
        self.metrics = metrics or Metrics()
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self.on_closed = on_closed
        self.t_offer = t_offer if t_offer is not None else time.monotonic()
        self.pc = pc or RTCPeerConnection()
        self.fps = int(getattr(stream, "fps", 25))
        self.sr = int(getattr(stream, "sample_rate", 16_000))
        self.chunk_frames = int(getattr(stream, "chunk_video_frames", 12))
        self.chunk_samples = self.chunk_frames * self.sr // self.fps
        self.chunk_s = self.chunk_frames / self.fps
        self.lookahead = int(getattr(stream, "lookahead_samples", LOOKAHEAD_SAMPLES))
        self.playout = Playout(fps=self.fps, sample_rate=self.sr)
        self.video_track = AvatarVideoTrack(self.playout)
        self.audio_track = AgentAudioTrack(self.playout)
        # The server passes one bounded pool shared by all calls (no thread made and dropped per
        # call). A call never runs two steps at once (`_gen_loop` awaits each), so sharing keeps
        # its stream single-threaded.
        self._own_executor = executor is None
        self.executor = executor or concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"tm-gen-{self.id}")
        # agent audio not yet handed to the stream (loop side)
        self.pending: list[tuple[str | None, np.ndarray]] = []
        self.pending_n = 0
        self.need_clear = False
        self.flush = False
        self.epoch = 0
        self.current_segment: str | None = None
        # worker side: FIFO mirror of the stream's audio buffer, [segment, samples]
        self._fifo: deque[list] = deque()
        self.engine_buffered = 0
        self.est = 0.15  # running estimate of chunk compute time (s)
        self.wake = asyncio.Event()
        self.channel = None
        self.last_activity = time.monotonic()
        self.connected_at: float | None = None
        self.tasks: list[asyncio.Task] = []
        self.closing = False
        self.closed = asyncio.Event()
        self.close_reason = ""
        self.first_frame_s: float | None = None
        self.chunks = 0
        self.last_stats: dict = {}
        self._rtcp_seen: dict[str, Any] = {}

    # ------------------------------------------------------------------ signalling
    async def answer(self, sdp: str, type_: str = "offer") -> RTCSessionDescription:
        pc = self.pc

        @pc.on("connectionstatechange")
        async def _on_state() -> None:
            st = pc.connectionState
            log.info("session %s: connection %s", self.id, st)
            if st == "connected" and self.connected_at is None:
                self.connected_at = time.monotonic()
                self.last_activity = time.monotonic()
            if st in ("failed", "closed"):
                await self.close(f"connection {st}")

        @pc.on("iceconnectionstatechange")
        async def _on_ice() -> None:
            if pc.iceConnectionState in ("failed", "closed"):
                await self.close(f"ice {pc.iceConnectionState}")

        @pc.on("track")
        def _on_track(track) -> None:
            if track.kind == "audio":
                self.tasks.append(asyncio.create_task(self._mic_loop(track)))
            else:
                self.tasks.append(asyncio.create_task(self._drain(track)))

        @pc.on("datachannel")
        def _on_dc(channel) -> None:
            self.channel = channel

            @channel.on("message")
            def _on_msg(message) -> None:
                self.last_activity = time.monotonic()
                self.tasks.append(asyncio.create_task(self._on_message(message)))

        await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type=type_))
        kinds = {t.kind for t in pc.getTransceivers()}
        if "video" not in kinds:
            raise ValueError("the offer has no video m-line: the client must receive video")
        pc.addTrack(self.audio_track)
        pc.addTrack(self.video_track)
        answer = await pc.createAnswer()
        await pc.setLocalDescription(answer)
        await self.agent.start(self)
        self.tasks.append(asyncio.create_task(self._gen_loop()))
        self.tasks.append(asyncio.create_task(self._watchdog()))
        return pc.localDescription

    # ------------------------------------------------------------------ AgentIO
    def push_audio(self, samples: np.ndarray, segment: str | None = None) -> None:
        x = np.asarray(samples, np.float32).reshape(-1)
        if x.size == 0 or self.closing:
            return
        self.current_segment = segment
        self.pending.append((segment, x))
        self.pending_n += x.size
        if self.pending_n + self.engine_buffered >= self.chunk_samples + self.lookahead:
            self.wake.set()

    def end_segment(self) -> None:
        self.flush = True
        self.wake.set()

    def interrupt(self) -> float:
        seg = self.current_segment
        played = self.playout.played.get(seg, 0)
        self.pending.clear()
        self.pending_n = 0
        self.need_clear = True
        self.flush = False
        self.epoch += 1
        self.playout.interrupt()
        self.metrics.interruptions += 1
        self.wake.set()
        self.send_event({"type": "interrupted", "segment": seg, "played_ms": played * 1000.0 / self.sr})
        return played * 1000.0 / self.sr

    def played_ms(self, segment: str | None = None) -> float:
        seg = self.current_segment if segment is None else segment
        return self.playout.played.get(seg, 0) * 1000.0 / self.sr

    def busy(self) -> bool:
        return (self.pending_n + self.engine_buffered + self.playout.pending_agent_samples()) > 0

    def send_event(self, event: dict) -> None:
        ch = self.channel
        if ch is not None and getattr(ch, "readyState", "") == "open":
            try:
                ch.send(json.dumps(event))
            except Exception:  # a closing channel
                pass

    # ------------------------------------------------------------------ media in
    async def _mic_loop(self, track) -> None:
        res = av.AudioResampler(format="s16", layout="mono", rate=self.sr)
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            self.last_activity = time.monotonic()
            x = frame_to_mono16k(frame, res)
            if x.size:
                try:
                    await self.agent.on_user_audio(x)
                except Exception:
                    log.exception("agent failed on user audio")

    async def _drain(self, track) -> None:
        while True:
            try:
                await track.recv()
            except MediaStreamError:
                return
            self.last_activity = time.monotonic()

    async def _on_message(self, message) -> None:
        try:
            msg = json.loads(message) if isinstance(message, str) else {}
        except ValueError:
            return
        t = msg.get("type")
        if t == "text":
            try:
                await self.agent.on_text(str(msg.get("text", ""))[:2000])
            except Exception as e:
                self.send_event({"type": "error", "text": str(e)})
        elif t == "interrupt":
            if self.busy():
                self.interrupt()
        elif t == "ping":
            self.send_event({"type": "pong", "t": msg.get("t")})

    # ------------------------------------------------------------------ generation
    def _step(self, clear: bool, pending: list[tuple[str | None, np.ndarray]]):
        """Worker thread: hand the pending audio to the stream and make one chunk."""
        s = self.stream
        if clear:
            s.clear_audio()
            self._fifo.clear()
        for seg, x in pending:
            s.push_audio(x)
            if self._fifo and self._fifo[-1][0] == seg:
                self._fifo[-1][1] += x.size
            else:
                self._fifo.append([seg, x.size])
        before = s.buffered_samples()
        t = time.perf_counter()
        chunk = s.next_chunk()
        dt = time.perf_counter() - t
        after = s.buffered_samples()
        consumed = max(0, before - after)
        spans: list[Span] = []
        off = 0
        limit = int(chunk.audio.shape[0])
        while consumed > 0 and self._fifo:
            seg, n = self._fifo[0]
            take = min(n, consumed)
            if off < limit:
                spans.append(Span(seg, off, min(take, limit - off)))
            off += take
            consumed -= take
            if take == n:
                self._fifo.popleft()
            else:
                self._fifo[0][1] = n - take
        return chunk, spans, dt, after

    def _should_wait(self) -> float:
        """Seconds to wait before making the next chunk (0: make it now)."""
        p = self.playout
        if p.t0 is None and not p.entries:
            return 0.0  # first chunk: as soon as possible
        have = self.pending_n + self.engine_buffered
        ready = have >= self.chunk_samples + self.lookahead or (self.flush and have > 0)
        budget = 1.5 * self.est + 0.06
        allowed = budget + (self.chunk_s if ready else 0.0)
        return max(0.0, p.lead_seconds() - allowed)

    async def _gen_loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while not self.closing:
                wait = self._should_wait()
                if wait > 0.002:
                    self.wake.clear()
                    try:
                        cap = 0.05 if self.playout.t0 is None else 0.5
                        await asyncio.wait_for(self.wake.wait(), timeout=min(wait, cap))
                    except asyncio.TimeoutError:
                        pass
                    continue
                clear, pending = self.need_clear, self.pending
                self.need_clear, self.pending, self.pending_n = False, [], 0
                if not pending and self.engine_buffered == 0:
                    self.flush = False
                epoch = self.epoch
                chunk, spans, dt, after = await loop.run_in_executor(self.executor, self._step, clear, pending)
                if self.closing:
                    break
                self.engine_buffered = after
                if after == 0 and not self.pending:
                    self.flush = False
                self.est = 0.7 * self.est + 0.3 * dt if self.chunks else dt
                if epoch != self.epoch and spans:
                    continue  # made before a barge-in from audio that was cut: never play it
                lead = self.playout.lead_seconds()
                e = self.playout.add(chunk.frames, chunk.audio, spans, bool(chunk.speaking), index=chunk.index)
                self.chunks += 1
                self.metrics.chunk(dt, self.chunk_s)
                if self.first_frame_s is None:
                    self.first_frame_s = time.monotonic() - self.t_offer
                    self.metrics.first_frame(self.first_frame_s)
                self.last_stats = {
                    "type": "state", "state": "speaking" if chunk.speaking else "listening",
                    "chunk": int(chunk.index), "rtf": round(dt / self.chunk_s, 3), "chunk_ms": round(dt * 1000, 1),
                    "latency_ms": round((lead + dt) * 1000, 1),
                    "first_frame_ms": round(self.first_frame_s * 1000, 1),
                    "timings": {k: float(v) for k, v in (chunk.timings or {}).items()},
                }
                t0 = self.playout.t0
                delay = 0.0 if t0 is None else max(0.0, t0 + e.start_frame / self.fps - time.monotonic())
                loop.call_later(delay, self.send_event, dict(self.last_stats))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("session %s: generation failed", self.id)
            self.send_event({"type": "error", "text": f"generation failed: {exc}"})
            asyncio.ensure_future(self.close(f"generation failed: {exc}"))

    # ------------------------------------------------------------------ liveness
    async def _rtcp_alive(self) -> bool:
        """True when the client sent an RTCP receiver report since the last check."""
        alive = False
        for sender in self.pc.getSenders():
            try:
                report = await sender.getStats()
            except Exception:
                continue
            for st in report.values():
                if getattr(st, "type", "") == "remote-inbound-rtp":
                    key = st.id
                    if self._rtcp_seen.get(key) != st.timestamp:
                        self._rtcp_seen[key] = st.timestamp
                        alive = True
        return alive

    async def _watchdog(self) -> None:
        t_start = time.monotonic()
        while not self.closing:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            if self.connected_at is None:
                if now - t_start > self.connect_timeout:
                    await self.close("never connected")
                    return
                continue
            if await self._rtcp_alive():
                self.last_activity = now
            if now - self.last_activity > self.idle_timeout:
                await self.close(f"client silent for {now - self.last_activity:.1f} s")
                return

    # ------------------------------------------------------------------ teardown
    async def close(self, reason: str = "closed") -> None:
        if self.closing:
            return
        self.closing = True
        self.close_reason = reason
        log.info("session %s: closing (%s)", self.id, reason)
        self.playout.closed = True
        self.playout.ready.set()
        me = asyncio.current_task()
        for t in self.tasks:
            if t is not me:
                t.cancel()
        try:
            await asyncio.wait_for(self.agent.close(), 3.0)
        except Exception:
            pass
        try:
            await asyncio.wait_for(self.pc.close(), 3.0)
        except Exception:
            pass
        if self._own_executor:
            self.executor.shutdown(wait=False, cancel_futures=True)
        closer = getattr(self.stream, "close", None)
        if callable(closer):
            try:
                closer()
            except Exception:
                pass
        self.metrics.frames_sent += self.playout.frames_sent
        self.tasks.clear()
        self.closed.set()
        if self.on_closed is not None:
            r = self.on_closed(self)
            if asyncio.iscoroutine(r):
                await r
