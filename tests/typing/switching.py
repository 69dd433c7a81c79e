"""Switching: a line-based foreign protocol on a socket, switched to a pyipc
client's connection, with the callbacks that translate it (as a network
daemon would). Run as a program; checked by ``mypy --strict``.
"""

from __future__ import annotations

import os
import socket
from typing import Optional, Tuple

from pyipc import CBEvent, Context, Event, EventType


def on_in(fd: int) -> Tuple[CBEvent, Optional[bytes]]:
    """One line of the foreign side (at most 4 KiB, read in one go here)."""
    data = os.read(fd, 4096)
    if not data:
        return CBEvent.FD_CLOSING, None
    if data.startswith(b"#"):
        return CBEvent.IGNORE, None
    return CBEvent.NO_ERROR, data.rstrip(b"\n")


def on_out(fd: int, payload: bytes) -> CBEvent:
    os.write(fd, payload + b"\n")
    return CBEvent.NO_ERROR


def wait_for(ctx: Context, kind: EventType) -> Event:
    while True:
        for ev in ctx.wait_events(timeout=10):
            if ev.type == kind:
                return ev


def main() -> None:
    with Context() as daemon, Context() as client:
        daemon.service_init("typing-switch")
        cfd = client.connect_service("typing-switch")
        conn = wait_for(daemon, EventType.CONNECTION).fd
        inner, outer = socket.socketpair()
        foreign = inner.detach()               # the daemon's context owns it now
        daemon.add_external(foreign)
        daemon.add_switch(foreign, conn)
        daemon.set_switch_callbacks(foreign, on_in, on_out)

        outer.sendall(b"hello\n")
        assert wait_for(daemon, EventType.SWITCH_RX).message == b"hello"
        wait_for(daemon, EventType.SWITCH_TX)
        assert client.read(cfd, timeout=10) == b"hello"

        client.write(cfd, "back")
        wait_for(daemon, EventType.SWITCH_TX)
        outer.settimeout(10)
        assert outer.recv(100) == b"back\n"

        daemon.set_switch_callbacks(foreign, None, None)    # pyipc framing again
        outer.close()
        wait_for(daemon, EventType.DISCONNECTION)


if __name__ == "__main__":
    main()
