"""The scale case's control messages, the same for every system.

The active client sends ``mark`` (the server answers with its RSS: the baseline),
then opens the idle connections, then sends ``sync N``: the server answers (with its
RSS) once N idle connections were accepted. Any other message is echoed.
"""

from __future__ import annotations

import json
import socket
import statistics
import time
from typing import Callable, List, Optional

from .proto import rss_bytes

MARK = b"mark"
SYNC = b"sync "


class ScaleServer:
    """Decides the server's answer to each message of the active client."""

    def __init__(self) -> None:
        self.waiting_for: Optional[int] = None    # idle connections a sync waits for

    def on_message(self, message: bytes, idle: int) -> Optional[bytes]:
        """The answer to ``message`` now (None: none yet, see ``on_connections``)."""
        if message == MARK:
            return json.dumps({"rss": rss_bytes()}).encode()
        if message.startswith(SYNC):
            self.waiting_for = int(message[len(SYNC):])
            return self.on_connections(idle)
        return message

    def on_connections(self, idle: int) -> Optional[bytes]:
        """The deferred sync answer once ``idle`` connections are there, else None."""
        if self.waiting_for is None or idle < self.waiting_for:
            return None
        self.waiting_for = None
        return json.dumps({"rss": rss_bytes(), "idle": idle}).encode()


def open_idle(path: str, n: int) -> List[socket.socket]:
    """Connect ``n`` plain sockets to ``path`` (they stay idle); retry a full backlog."""
    socks = []
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        while True:
            try:
                s.connect(path)
                break
            except (BlockingIOError, ConnectionRefusedError, InterruptedError):
                time.sleep(0.0005)     # backlog full: the server is still accepting
        socks.append(s)
    return socks


def run_client(roundtrip: Callable[[bytes], bytes], path: str, idle: int,
               rounds: int, size: int) -> dict:
    """The scale client: latency alone, accept time of ``idle`` clients, latency among them."""
    from .proto import payload
    data = payload(size)
    for _ in range(rounds // 10 + 1):          # warm-up
        roundtrip(data)
    alone = _latency(roundtrip, data, rounds)
    before = json.loads(roundtrip(MARK))["rss"]
    start = time.perf_counter()
    socks = open_idle(path, idle)
    after = json.loads(roundtrip(SYNC + str(idle).encode()))["rss"]
    accept_s = time.perf_counter() - start
    among = _latency(roundtrip, data, rounds)
    for s in socks:
        s.close()
    return {"latency_alone": alone, "latency_among": among, "accept_s": accept_s,
            "rss_per_conn": (after - before) / max(idle, 1), "idle": idle}


#: A latency is measured in this many chunks of round trips; the figure is the
#: median of the chunks' means, so a burst of load on the machine (which on the
#: development VM can double round trips for a fraction of a second) spoils one
#: chunk rather than the comparison of "alone" with "among them".
CHUNKS = 10


def _latency(roundtrip: Callable[[bytes], bytes], data: bytes, rounds: int) -> float:
    """Seconds per round trip: the median of CHUNKS chunk means."""
    per_chunk = max(1, rounds // CHUNKS)
    means = []
    for _ in range(CHUNKS):
        start = time.perf_counter()
        for _ in range(per_chunk):
            roundtrip(data)
        means.append((time.perf_counter() - start) / per_chunk)
    return statistics.median(means)
