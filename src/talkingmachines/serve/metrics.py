"""Server metrics in the Prometheus text exposition format (no client library needed)."""

from __future__ import annotations

import threading
import time


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.started = time.time()
        self.sessions_active = 0
        self.sessions_total = 0
        self.sessions_rejected = 0
        self.offers_bad = 0
        self.offers_limited = 0
        self.chunks = 0
        self.chunk_seconds_sum = 0.0
        self.rtf_last = 0.0
        self.first_frame_sum = 0.0
        self.first_frame_count = 0
        self.first_frame_last = 0.0
        self.frames_sent = 0
        self.interruptions = 0

    def chunk(self, compute_s: float, chunk_s: float) -> None:
        with self._lock:
            self.chunks += 1
            self.chunk_seconds_sum += compute_s
            self.rtf_last = compute_s / chunk_s if chunk_s else 0.0

    def first_frame(self, s: float) -> None:
        with self._lock:
            self.first_frame_sum += s
            self.first_frame_count += 1
            self.first_frame_last = s

    def rtf_mean(self) -> float:
        return self.chunk_seconds_sum / (self.chunks * 0.48) if self.chunks else 0.0

    def render(self) -> str:
        with self._lock:
            rows = [
                ("tm_sessions_active", "gauge", "Calls in progress", self.sessions_active),
                ("tm_sessions_total", "counter", "Calls accepted", self.sessions_total),
                ("tm_sessions_rejected_total", "counter", "Calls refused as busy", self.sessions_rejected),
                ("tm_offers_bad_total", "counter", "Malformed or oversized offers", self.offers_bad),
                ("tm_offers_rate_limited_total", "counter", "Offers refused: too many from one address",
                 self.offers_limited),
                ("tm_chunks_total", "counter", "Chunks generated", self.chunks),
                ("tm_chunk_compute_seconds_sum", "counter", "Compute time of all chunks", round(self.chunk_seconds_sum, 6)),
                ("tm_rtf", "gauge", "Real-time factor of the last chunk (compute / duration)", round(self.rtf_last, 4)),
                ("tm_rtf_mean", "gauge", "Mean real-time factor", round(self.rtf_mean(), 4)),
                ("tm_first_frame_seconds_sum", "counter", "Offer-to-first-chunk latency, sum", round(self.first_frame_sum, 6)),
                ("tm_first_frame_seconds_count", "counter", "Offer-to-first-chunk latency, count", self.first_frame_count),
                ("tm_first_frame_seconds_last", "gauge", "Offer-to-first-chunk latency of the last call", round(self.first_frame_last, 4)),
                ("tm_video_frames_sent_total", "counter", "Video frames sent", self.frames_sent),
                ("tm_interruptions_total", "counter", "Barge-ins", self.interruptions),
                ("tm_uptime_seconds", "gauge", "Seconds since start", round(time.time() - self.started, 1)),
            ]
        out = []
        for name, kind, help_, v in rows:
            out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {v}"]
        return "\n".join(out) + "\n"
