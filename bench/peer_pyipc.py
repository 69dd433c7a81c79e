"""pyipc peers (``--backend native`` or ``pure``): the library's own API.

Server: an event loop over ``wait_events()``; round trips are echoed with
``write()``. Client: ``write()`` + ``read()`` per round trip. One way, the batch
API: the client sends with ``write_many()`` (up to 1,024 messages or 1 MiB per
call, gathered into one writev), the server takes them with ``read_many()``
(every message already received, one call, no Event per message), or from
64 KiB on with ``read_into()`` one reused buffer (read from the socket straight
into it).

Per-message events (``events``, issue 21's workload, as libIPC programs are
written): the client calls ``schedule()`` per message, keeping at most
``window()`` unacknowledged, and counts MESSAGE_TX from ``wait_events()``; the
server counts MESSAGE_RX from ``wait_events()`` and answers ``done`` at the end.
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
#: One write_many() call's batch: at most this many messages, this many bytes.
BATCH_MESSAGES = 1024
BATCH_BYTES = 1 << 20
#: Messages from this size on are received with read_into() (no copy in between).
INTO_FROM = 64 << 10
#: Per-message events: at most this many scheduled messages not yet reported
#: by MESSAGE_TX (issue 21), and from LARGE on, LARGE_WINDOW.
WINDOW, LARGE, LARGE_WINDOW = 4096, 64 << 10, 64
#: What the events server answers after the last message.
DONE = b"done"


def window(size: int) -> int:
    """How many scheduled messages the events client keeps unacknowledged."""
    return LARGE_WINDOW if size >= LARGE else WINDOW


def context(args: Namespace) -> pyipc.Context:
    """The context of a peer: the run dir, the backend, room for the idle
    clients, busy_poll."""
    ctx = pyipc.Context(rundir=args.dir, backend=args.backend,
                        max_connections=args.idle + 64)
    ctx.busy_poll = args.busy_poll
    return ctx


def serve(args: Namespace) -> None:
    """Echo (rtt) or count and acknowledge (oneway) with the event loop."""
    ctx = context(args)
    ctx.service_init(proto.SERVICE)
    proto.ready()
    if args.case == "scale":
        return serve_scale(ctx)
    if args.case == "rtt":
        return serve_rtt(ctx)
    if args.case == "events":
        return serve_events(ctx, args.n)
    return serve_oneway(ctx, args.n, args.size)


def serve_rtt(ctx: pyipc.Context) -> None:
    """Echo every message with write() until the client hangs up."""
    write = ctx.write
    while True:
        for ev in ctx.wait_events():
            if ev.type is RX:
                write(ev.fd, ev.message)
            elif ev.type is DISCONNECTION:
                return


def serve_events(ctx: pyipc.Context, n: int) -> None:
    """Count ``n`` MESSAGE_RX events, answer ``done``, wait for the hang-up."""
    count, wait_events = 0, ctx.wait_events
    while count < n:
        for ev in wait_events():
            if ev.type is RX:
                count += 1
                if count == n:
                    ctx.write(ev.fd, DONE)
    while not any(ev.type is DISCONNECTION for ev in wait_events()):
        pass


def serve_oneway(ctx: pyipc.Context, n: int, size: int) -> None:
    """Count ``n`` messages (after the CONNECTION: read_many, or read_into one
    buffer for messages of 64 KiB and more), acknowledge the last, then wait
    for the client to hang up."""
    count, fd = 0, None
    while fd is None:
        for ev in ctx.wait_events():
            if ev.type is CONNECTION:
                fd = ev.fd
            elif ev.type is RX:         # came in the same batch as the CONNECTION
                count += 1
    if size >= INTO_FROM:
        buf, read_into = bytearray(size), ctx.read_into
        for _ in range(n - count):
            read_into(fd, buf)
    else:
        read_many = ctx.read_many
        while count < n:
            count += len(read_many(fd))
    ctx.write(fd, proto.ACK)
    while not any(ev.type is DISCONNECTION for ev in ctx.wait_events()):
        pass


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
        start, cpu = time.perf_counter(), proto.cpu_seconds()
        for _ in range(args.n):
            write(fd, data)
            read(fd)
        proto.result(seconds=time.perf_counter() - start, cpu=proto.cpu_seconds() - cpu)
        return
    start, cpu = time.perf_counter(), proto.cpu_seconds()
    if args.case == "events":
        send_events(ctx, fd, data, args.n)
    else:
        send_batches(ctx, fd, data, args.n)
        ctx.read(fd)
    proto.result(seconds=time.perf_counter() - start, cpu=proto.cpu_seconds() - cpu)


def send_events(ctx: pyipc.Context, fd: int, data: bytes, n: int) -> None:
    """schedule() ``n`` copies of ``data`` one at a time, at most window()
    not yet reported by MESSAGE_TX; then wait for the server's ``done``."""
    schedule, wait_events = ctx.schedule, ctx.wait_events
    sent = done = 0
    answered, most = False, window(len(data))
    while done < n or not answered:
        while sent < n and sent - done < most:
            schedule(fd, data)
            sent += 1
        for ev in wait_events():
            if ev.type is TX:
                done += 1
            elif ev.type is RX:
                answered = True


def send_batches(ctx: pyipc.Context, fd: int, data: bytes, n: int) -> None:
    """Send ``n`` copies of ``data`` with write_many(), a batch per call."""
    per_call = max(1, min(BATCH_MESSAGES, BATCH_BYTES // max(1, len(data))))
    batch, write_many = [data] * per_call, ctx.write_many
    for _ in range(n // per_call):
        write_many(fd, batch)
    if n % per_call:
        write_many(fd, batch[:n % per_call])


def main() -> None:
    """Run the peer the command line asks for."""
    proto.run_scale_capable_peer(serve, client)


if __name__ == "__main__":
    main()
