"""A service and a client in one process: every Context method a plain echo
service uses, with the events as a user matches them.

Run as a program (the run directory is env RUNDIR, the backend env
PYIPC_BACKEND); checked by ``mypy --strict`` (ci/mypy).
"""

from __future__ import annotations

import array
import os
from typing import Iterable, List, Optional

import pyipc
from pyipc import Context, Event, EventType


def serve_one_round(service: Context) -> List[Event]:
    """Answer every message in the events ready now; return those events."""
    events = service.wait_events(timeout=10)
    for ev in events:
        if ev.type == EventType.MESSAGE_RX and ev.message is not None:
            service.schedule(ev.fd, ev.message)
        elif ev.type is EventType.ERROR:
            error: Optional[str] = ev.error
            raise RuntimeError(f"fd {ev.fd} (slot {ev.index}): {error}")
    return events


def until(service: Context, kind: EventType) -> Event:
    """Serve until an event of ``kind`` comes; return it."""
    while True:
        for ev in serve_one_round(service):
            if ev.type == kind:
                return ev


def echo(service: Context, client: Context, fd: int, payloads: Iterable[bytes | str]) -> None:
    for payload in payloads:
        client.write(fd, payload, timeout=10)
        until(service, EventType.MESSAGE_TX)
        answer: bytes = client.read(fd, timeout=10)
        expected = payload.encode() if isinstance(payload, str) else payload
        assert answer == expected, (answer, expected)


def main() -> None:
    with Context(max_message_size=1 << 20, max_queue_size=4 << 20, max_connections=64,
                 linger=0.5) as service, Context() as client:
        assert service.backend in pyipc.available_backends()
        assert service.rundir == os.environ.get("RUNDIR", pyipc.DEFAULT_RUNDIR)
        assert service.max_message_size == 1 << 20 and client.linger == pyipc.DEFAULT_LINGER
        service.timer = 5000
        service.busy_poll = 0
        service.linger = 0.25
        listening: int = service.service_init("typing-echo")
        fd = client.connect("typing-echo", timeout=10)
        conn = until(service, EventType.CONNECTION).fd
        pid, uid, gid = service.peer_credentials(conn)
        assert (pid, uid, gid) == (os.getpid(), os.getuid(), os.getgid())

        # Payloads: bytes, str (UTF-8), and any buffer.
        echo(service, client, fd, [b"bytes", "str \N{SNOWMAN}"])
        for buffer in (bytearray(b"bytearray"), memoryview(b"view"), array.array("B", [1, 2])):
            client.write(fd, buffer)
            until(service, EventType.MESSAGE_TX)
            assert client.read(fd) == bytes(buffer)

        # Batches, and reading into a buffer of one's own.
        client.write_many(fd, [b"one", "two", bytearray(b"three")], timeout=10)
        sent = 0
        while sent < 3:
            sent += sum(ev.type == EventType.MESSAGE_TX for ev in serve_one_round(service))
        got: List[bytes] = []
        while len(got) < 3:     # every echo has been written: these calls do not block
            got += client.read_many(fd, max_messages=pyipc.MAX_READ_MANY)
        assert got == [b"one", b"two", b"three"]
        client.write(fd, b"into")
        until(service, EventType.MESSAGE_TX)
        buf = bytearray(16)
        n: int = client.read_into(fd, buf, timeout=10)
        assert buf[:n] == b"into"

        # A foreign fd, watched.
        r, w = os.pipe()
        service.add_external(r)
        os.write(w, b"x")
        assert until(service, EventType.EXTERNAL).fd == r
        service.close(r, linger=0)
        os.close(w)

        client.close(fd)
        assert until(service, EventType.DISCONNECTION).fd == conn
        service.close(listening)
        client.timer = 0
        assert client.wait_event().type == EventType.TIMER   # nothing else left
        for ev in client:       # wait_event() forever: here, until the first TIMER
            assert ev.type is EventType.TIMER and ev.fd == -1
            break
        service.close_all()


if __name__ == "__main__":
    main()
