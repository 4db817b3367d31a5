"""Per-client offer rate limit for `serve`'s /offer: each offer makes the server read up to 8 MB,
decode a portrait and set up a WebRTC peer, so one address must not be able to send them without
end (the global --max-sessions and the one-connecting-offer-per-client rule bound calls, not
attempts). A sliding window per client address, in memory."""

from __future__ import annotations

import time
from collections import deque
from typing import Callable

OFFERS_PER_MINUTE = 30  # the default: the page sends one offer per call
WINDOW_S = 60.0
MAX_CLIENTS = 4096  # addresses tracked before the idle ones are swept out


class OfferRateLimit:
    """At most ``per_minute`` offers per client address in any 60 s; ``per_minute <= 0`` means
    no limit."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic):
        self.per_minute = per_minute
        self.clock = clock
        self._seen: dict[str, deque[float]] = {}

    def retry_after(self, client: str) -> float | None:
        """Count an offer from ``client``: None when it may go on, else the seconds until it may
        send the next (the refused offer is not counted)."""
        if self.per_minute <= 0:
            return None
        now = self.clock()
        if len(self._seen) > MAX_CLIENTS:
            self._sweep(now)
        times = self._seen.setdefault(client, deque())
        while times and times[0] <= now - WINDOW_S:
            times.popleft()
        if len(times) >= self.per_minute:
            return times[0] + WINDOW_S - now
        times.append(now)
        return None

    def _sweep(self, now: float) -> None:
        for client in [c for c, t in self._seen.items() if not t or t[-1] <= now - WINDOW_S]:
            del self._seen[client]

