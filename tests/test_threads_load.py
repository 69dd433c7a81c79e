"""Threads under load: 8 threads x 10,000 messages each, through schedule()
or write() on one context, while its owner loops over wait_events() and a
blocking read(). Another context, in its own thread, receives them and
checks every thread's sequence numbers: each message once, whole, in order."""

from __future__ import annotations

import struct
import threading
from typing import Callable

import pytest

import pyipc
from pyipc import EventType

from conftest import deadline, wait_for

THREADS = 8
PER_THREAD = 10_000
#: Each producer sends a tick on its own connection every TICK_EVERY
#: messages: what the owner's blocking read() waits for.
TICK_EVERY = 500
#: A message: the producer's number, its sequence number, and padding that
#: says both again (a message cut or mixed with another one shows).
MESSAGE = struct.Struct(">II8s")


def message(thread: int, seq: int) -> bytes:
    return MESSAGE.pack(thread, seq, b"%02d%06d" % (thread, seq))


class Receiver(threading.Thread):
    """Owns the receiving context: reads THREADS * PER_THREAD messages and
    records what is wrong with them (the test thread asserts)."""

    def __init__(self, ctx: pyipc.Context, fd: int) -> None:
        super().__init__()
        self.ctx, self.fd = ctx, fd
        self.next = [0] * THREADS
        self.problems: list[str] = []

    def run(self) -> None:
        got = 0
        while got < THREADS * PER_THREAD and len(self.problems) < 10:
            for m in self.ctx.read_many(self.fd, timeout=30):
                got += 1
                thread, seq, pad = MESSAGE.unpack(m)
                if pad != b"%02d%06d" % (thread, seq) or seq != self.next[thread]:
                    self.problems.append(f"thread {thread}: got {seq}, expected "
                                         f"{self.next[thread]} ({m!r})")
                self.next[thread] = seq + 1


@pytest.mark.parametrize("how", ["schedule", "write"])
def test_eight_threads_send_through_one_context_while_its_owner_waits_and_reads(
        ctx_factory, how):
    server, receiver, ticker = ctx_factory(), ctx_factory(), ctx_factory()
    server.service_init("load")
    receiver_fd = receiver.connect_service("load")
    out_fd = wait_for(server, EventType.CONNECTION)[-1].fd
    ticker_fd = ticker.connect_service("load")
    tick_fd = wait_for(server, EventType.CONNECTION)[-1].fd
    rx = Receiver(receiver, receiver_fd)
    send: Callable[[int, bytes], None] = getattr(server, how)

    def produce(thread: int) -> None:
        for seq in range(PER_THREAD):
            send(out_fd, message(thread, seq))
            if seq % TICK_EVERY == TICK_EVERY - 1:
                # Another context, shared by the producers (each call takes
                # it in turn): what ends the owner's read.
                ticker.write(ticker_fd, b"tick")

    producers = [threading.Thread(target=produce, args=(t,)) for t in range(THREADS)]
    rx.start()
    for p in producers:
        p.start()
    # The owner: waits (schedule's messages go out in its rounds), and reads
    # the ticks in a blocking read() too; both wake for the producers' calls.
    ticks, expected, sent = 0, THREADS * PER_THREAD // TICK_EVERY, 0
    tick = deadline(60)
    while ticks < expected or (how == "schedule" and sent < THREADS * PER_THREAD):
        tick()
        for ev in server.wait_events(timeout=30):
            if ev.type == EventType.MESSAGE_TX:
                sent += 1
            elif ev.type == EventType.MESSAGE_RX:
                assert ev.fd == tick_fd and ev.message == b"tick"
                ticks += 1
            else:
                pytest.fail(f"unexpected {ev}")
        if ticks < expected:
            assert server.read(tick_fd, timeout=30) == b"tick"
            ticks += 1
    for p in producers:
        p.join(30)
        assert not p.is_alive()
    rx.join(30)
    assert not rx.is_alive() and rx.problems == []
    assert rx.next == [PER_THREAD] * THREADS
    assert sent == (THREADS * PER_THREAD if how == "schedule" else 0)
