"""A daemon's timers: callbacks due after a delay, run by the daemon's loop
between two events (handshake deadlines, request timeouts, retries).

Kept apart from the Context's own TIMER event, which libIPC defines as
"nothing happened for N ms" and which a daemon serving traffic would never see.
"""

from __future__ import annotations

import heapq
import itertools
import time
from typing import Callable, Optional

#: The longest timeout option of a daemon (seconds): ipcd's --request-timeout,
#: tcpd's, tlsd's and websocketd's --handshake-timeout and --connect-timeout.
#: A request, a handshake or a dial not done in a day never will be, so a
#: longer value is a mistake (inf, 1e10); one past threading.TIMEOUT_MAX
#: made the loop's wait_events() raise and the daemon end at its first client.
#: Also the longest wait of the loop (Timers.timeout).
MAX_TIMEOUT = 86400.0


def check_timeout(what: str, seconds: float) -> None:
    """ValueError naming option `what` unless `seconds` is > 0 and at most
    MAX_TIMEOUT (NaN and infinity refused)."""
    if not 0 < seconds <= MAX_TIMEOUT:          # NaN fails both
        raise ValueError(f"{what} must be > 0 and at most {MAX_TIMEOUT:g} seconds "
                         f"(a day), not {seconds!r}")


class TimerHandle:
    """What call_later() returns; pass it to cancel()."""

    __slots__ = ("when", "callback", "cancelled")

    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False


class Timers:
    """Pending callbacks ordered by due time (time.monotonic())."""

    __slots__ = ("_heap", "_order")

    def __init__(self) -> None:
        # (when, order, handle): `order` keeps callbacks due at the same time
        # in the order they were asked for, and handles are never compared.
        self._heap: list[tuple[float, int, TimerHandle]] = []
        self._order = itertools.count()

    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle:
        """Run callback() in `delay` seconds (>= 0) from now."""
        if not delay >= 0:      # also refuses NaN
            raise ValueError(f"delay must be a number of seconds >= 0, not {delay!r}")
        handle = TimerHandle(time.monotonic() + delay, callback)
        heapq.heappush(self._heap, (handle.when, next(self._order), handle))
        return handle

    @staticmethod
    def cancel(handle: TimerHandle) -> None:
        """Never run handle's callback (no effect once it has run)."""
        handle.cancelled = True

    def timeout(self) -> Optional[float]:
        """Seconds until the next callback is due (0 if one is), or None;
        MAX_TIMEOUT at most, a wait every backend takes (a timer due later,
        or never, is waited for over several waits)."""
        while self._heap and self._heap[0][2].cancelled:
            heapq.heappop(self._heap)
        if not self._heap:
            return None
        return min(MAX_TIMEOUT, max(0.0, self._heap[0][0] - time.monotonic()))

    def run_due(self) -> None:
        """Run every callback due by now, in due order. A callback that asks
        for another timer due now gets it run in the next round, not this one,
        so a loop of zero delays cannot starve the events."""
        now = time.monotonic()
        due: list[TimerHandle] = []
        while self._heap and self._heap[0][0] <= now:
            due.append(heapq.heappop(self._heap)[2])
        for handle in due:
            if not handle.cancelled:
                handle.cancelled = True     # ran: a later cancel() is a no-op
                handle.callback()
