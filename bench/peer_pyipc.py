"""pyipc peers (``--backend native`` or ``pure``): the library's own API.

Server: an event loop over ``wait_events()``; round trips are echoed with
``write()``. Client: ``write()`` + ``read()`` per round trip; one-way messages are
``schedule()``d (the core coalesces them into few system calls), with at most
``window`` messages in flight, counted back by their MESSAGE_TX events; large
ones (64 KiB and more) are sent with ``write()``, which writes straight from the
caller's buffer (no copy into a queue).
"""

from __future__ import annotations

import os
import time
from typing import Optional
from argparse import Namespace

import pyipc
from pyipc import EventType

from . import proto
from .scale_ctl import ScaleServer, run_client

RX, TX = EventType.MESSAGE_RX, EventType.MESSAGE_TX
CONNECTION, DISCONNECTION = EventType.CONNECTION, EventType.DISCONNECTION
#: Bytes scheduled but not yet written, at most (below max_queue_size).
WINDOW_BYTES = 8 << 20
#: Messages from this size on are sent with write() rather than schedule().
WRITE_FROM = 64 << 10


def context(args: Namespace) -> pyipc.Context:
    """The context of a peer: the run dir, the backend, room for the idle clients."""
    return pyipc.Context(rundir=args.dir, backend=args.backend,
                         max_connections=args.idle + 64)


def serve(args: Namespace) -> None:
    """Echo (rtt) or count and acknowledge (oneway) with the event loop."""
    ctx = context(args)
    ctx.service_init(proto.SERVICE)
    proto.ready()
    if args.case == "scale":
        return serve_scale(ctx)
    count, n, write, rtt = 0, args.n, ctx.write, args.case == "rtt"
    while True:
        for ev in ctx.wait_events():
            if ev.type is RX:
                if rtt:
                    write(ev.fd, ev.message)
                else:
                    count += 1
                    if count == n:
                        write(ev.fd, proto.ACK)
            elif ev.type is DISCONNECTION:
                return


def serve_scale(ctx: pyipc.Context) -> None:
    """The scale server: every client is accepted; the one that talks is answered."""
    ctl, idle, active = ScaleServer(), 0, None
    while True:
        for ev in ctx.wait_events():
            if ev.type is RX:
                if active is None:
                    active, idle = ev.fd, idle - 1
                _answer(ctx, active, ctl.on_message(ev.message, idle))
            elif ev.type is CONNECTION:
                idle += 1
                if active is not None:
                    _answer(ctx, active, ctl.on_connections(idle))
            elif ev.type is DISCONNECTION:
                if ev.fd == active:
                    return
                idle -= 1


def _answer(ctx: pyipc.Context, fd: Optional[int], reply: Optional[bytes]) -> None:
    """Send the scale server's answer, if there is one now."""
    if reply is not None:
        ctx.write(fd, reply)


def client(args: Namespace) -> None:
    """Time the round trips, the one-way stream or the scale case; print the result."""
    ctx = context(args)
    fd = ctx.connect(proto.SERVICE)
    data = proto.payload(args.size)
    if args.case == "scale":
        def roundtrip(m: bytes) -> bytes:
            ctx.write(fd, m)
            return ctx.read(fd)
        proto.raise_nofile(args.idle + 64)
        proto.result(**run_client(roundtrip, os.path.join(args.dir, proto.SERVICE),
                                  args.idle, args.n, args.size))
        return
    if args.case == "rtt":
        write, read = ctx.write, ctx.read
        for _ in range(proto.WARMUP):
            write(fd, data)
            read(fd)
        start = time.perf_counter()
        for _ in range(args.n):
            write(fd, data)
            read(fd)
    else:
        start = time.perf_counter()
        acked = False
        if len(data) >= WRITE_FROM:
            write = ctx.write
            for _ in range(args.n):
                write(fd, data)
        else:
            acked = send_window(ctx, fd, data, args.n)
        if not acked:
            ctx.read(fd)
    proto.result(seconds=time.perf_counter() - start)


def send_window(ctx: pyipc.Context, fd: int, data: bytes, n: int) -> bool:
    """Schedule ``n`` copies of ``data``, keeping at most WINDOW_BYTES in flight.
    True when the receiver's acknowledgement already came among the events (it
    can arrive in the same batch as the last MESSAGE_TX)."""
    window = max(1, WINDOW_BYTES // (len(data) + 4))
    schedule, wait_events = ctx.schedule, ctx.wait_events
    sent = done = 0
    acked = False
    while done < n:
        burst = min(n - sent, window - (sent - done))
        for _ in range(burst):
            schedule(fd, data)
        sent += burst
        for ev in wait_events():
            if ev.type is TX:
                done += 1
            elif ev.type is RX:
                acked = True
    return acked


def main() -> None:
    """Run the peer the command line asks for."""
    args = proto.parse()
    if args.role == "server":
        proto.raise_nofile(args.idle + 64)
    (serve if args.role == "server" else client)(args)


if __name__ == "__main__":
    main()
