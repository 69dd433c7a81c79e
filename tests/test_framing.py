"""The frame decoder under every split of the byte stream, on both backends.

A raw socket (a foreign peer) sends an encoded list of messages cut at
arbitrary points. After each chunk the test runs the service's event loop until
the kernel buffer of the connection is empty (FIONREAD == 0): the service has
consumed the chunk, so every cut is a real boundary between two reads.
"""

from __future__ import annotations

import os
import random
import socket
import struct
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pyipc
from pyipc import EventType

from conftest import deadline, frame, raw_connect, unread_bytes, wait_for

MAX = 70_000

sizes = st.one_of(st.sampled_from([0, 0, 1, 3, 4, 5, 255, 256, 4095, 4096, 65535, 65536, MAX]),
                  st.integers(0, MAX))


class Feeder:
    """A service context and a raw client; send chunks with a consumption barrier."""

    def __init__(self, ctx: pyipc.Context, rundir: str, name: str = "frames") -> None:
        self.ctx = ctx
        ctx.service_init(name)
        self.sock = raw_connect(rundir, name)
        self.sock.setblocking(False)
        self.fd = wait_for(ctx, EventType.CONNECTION)[-1].fd
        self.received: list[bytes] = []
        self.other: list[pyipc.Event] = []

    def round(self) -> None:
        self.ctx.timer = 0
        for ev in self.ctx.wait_events():
            if ev.type == EventType.MESSAGE_RX:
                assert ev.fd == self.fd
                self.received.append(ev.message)
            elif ev.type != EventType.TIMER:
                self.other.append(ev)

    def barrier(self) -> None:
        """Run rounds until the service has read everything sent so far."""
        tick = deadline()
        while unread_bytes(self.fd) > 0:
            tick()
            self.round()
        self.round()

    def send(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        tick = deadline()
        while view:
            tick()
            try:
                n = self.sock.send(view)
            except BlockingIOError:
                self.barrier()          # the socket buffer is full: let it drain
                continue
            view = view[n:]
        self.barrier()

    def close(self) -> None:
        self.sock.close()


def payloads(seed: int, lengths: list[int]) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(n) for n in lengths]


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(lengths=st.lists(sizes, min_size=1, max_size=12), seed=st.integers(0, 2**32),
       data=st.data())
def test_any_split_of_the_stream(ctx_factory, rundir, lengths, seed, data):
    messages = payloads(seed, lengths)
    stream = b"".join(frame(m) for m in messages)
    cuts = sorted(set(data.draw(
        st.lists(st.integers(0, len(stream)), max_size=20), label="cuts")))
    ctx = ctx_factory()
    feeder = Feeder(ctx, rundir)
    try:
        start = 0
        for cut in cuts + [len(stream)]:
            feeder.send(stream[start:cut])
            start = cut
        assert len(feeder.received) == len(messages)
        assert [len(m) for m in feeder.received] == lengths
        assert feeder.received == messages
        assert feeder.other == []
    finally:
        feeder.close()
        ctx.close_all()


def test_header_split_in_two(ctx_factory, rundir):
    feeder = Feeder(ctx_factory(), rundir)
    try:
        for first in (1, 2, 3):
            data = frame(b"split header %d" % first)
            feeder.send(data[:first])
            assert feeder.received == [b"split header %d" % k for k in range(1, first)]
            feeder.send(data[first:])
        assert feeder.received == [b"split header %d" % k for k in (1, 2, 3)]
    finally:
        feeder.close()


def test_every_byte_separately(ctx_factory, rundir):
    messages = [b"", b"a", b"", b"bcd", b"efgh", b"", b"ijklmnop"]
    feeder = Feeder(ctx_factory(), rundir)
    try:
        for byte in b"".join(frame(m) for m in messages):
            feeder.send(bytes([byte]))
        assert feeder.received == messages
    finally:
        feeder.close()


def test_many_messages_in_one_send(ctx_factory, rundir):
    messages = [struct.pack(">I", i) * (i % 7) for i in range(3000)]
    feeder = Feeder(ctx_factory(), rundir)
    try:
        feeder.send(b"".join(frame(m) for m in messages))
        assert feeder.received == messages
    finally:
        feeder.close()


def test_empty_messages_only(ctx_factory, rundir):
    feeder = Feeder(ctx_factory(), rundir)
    try:
        feeder.send(frame(b"") * 1000)
        assert feeder.received == [b""] * 1000
        feeder.send(frame(b""))
        assert len(feeder.received) == 1001
    finally:
        feeder.close()


def test_large_message_trickled(ctx_factory, rundir):
    """A 1 MB message arriving 4 KB at a time, with a small one on each side."""
    big = os.urandom(1 << 20)
    stream = frame(b"before") + frame(big) + frame(b"after")
    feeder = Feeder(ctx_factory(), rundir)
    try:
        for i in range(0, len(stream), 4096):
            feeder.send(stream[i:i + 4096])
        assert feeder.received == [b"before", big, b"after"]
    finally:
        feeder.close()


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(lengths=st.lists(sizes, min_size=1, max_size=6), seed=st.integers(0, 2**32),
       data=st.data())
def test_read_under_any_split(ctx_factory, rundir, lengths, seed, data):
    """read() (not the event loop) decodes split streams too: a thread sends each
    chunk only once the reader has consumed the previous one."""
    messages = payloads(seed, lengths)
    stream = b"".join(frame(m) for m in messages)
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(stream)), max_size=10))))
    ctx = ctx_factory()
    ctx.service_init("rd")
    sock = raw_connect(rundir, "rd")
    fd = wait_for(ctx, EventType.CONNECTION)[-1].fd
    failure: list[BaseException] = []

    def sender():
        try:
            start = 0
            for cut in cuts + [len(stream)]:
                sock.sendall(stream[start:cut])
                start = cut
                deadline = time.monotonic() + 30
                while unread_bytes(fd) > 0 and not failure:
                    if time.monotonic() > deadline:
                        raise TimeoutError("the reader did not consume a chunk")
        except BaseException as e:      # pragma: no cover - reported below
            failure.append(e)

    t = threading.Thread(target=sender)
    t.start()
    try:
        got = [ctx.read(fd) for _ in messages]
    finally:
        failure.append(StopIteration())     # stop the sender's wait if read failed
        t.join(30)
        sock.close()
        ctx.close_all()
    assert not [f for f in failure if not isinstance(f, StopIteration)]
    assert got == messages


def test_client_side_decodes_a_split_stream(ctx_factory, rundir):
    """The same decoder on the connecting side: a raw service sends split frames."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(os.path.join(rundir, "rawsvc"))
    listener.listen(1)
    client = ctx_factory()
    try:
        fd = client.connect_service("rawsvc")
        peer, _ = listener.accept()
        messages = [b"", os.urandom(70_000), b"x", b""]
        stream = b"".join(frame(m) for m in messages)
        got = []
        for i in range(0, len(stream), 9999):
            peer.sendall(stream[i:i + 9999])
            tick = deadline()
            while unread_bytes(fd) > 0:
                tick()
                client.timer = 0
                got += [e.message for e in client.wait_events()
                        if e.type == EventType.MESSAGE_RX]
        client.timer = 0
        got += [e.message for e in client.wait_events() if e.type == EventType.MESSAGE_RX]
        assert got == messages
        peer.close()
    finally:
        listener.close()


def _pump(sender: pyipc.Context, receiver: pyipc.Context) -> list[bytes]:
    """Run both event loops (timer 0) until the receiver got one message."""
    tick = deadline()
    while True:
        tick()
        sender.timer = 0
        sender.wait_events()
        receiver.timer = 0
        got = [e.message for e in receiver.wait_events() if e.type == EventType.MESSAGE_RX]
        if got:
            return got


@pytest.mark.parametrize("size", [0, 1, 65535, 65536, 65537, 300_000])
def test_sizes_around_buffer_edges_both_ways(pair, size):
    data = os.urandom(size)
    pair.client.schedule(pair.client_fd, data)
    pair.client.schedule(pair.client_fd, b"next")
    got = _pump(pair.client, pair.server)
    tick = deadline()
    while len(got) < 2:
        tick()
        got += _pump(pair.client, pair.server)
    assert got == [data, b"next"]
    pair.server.schedule(pair.server_fd, data)
    assert _pump(pair.server, pair.client) == [data]
