"""pyipc.aio's connect() through ipcd (IPC_NETWORK set) does not hold the
event loop: ipcd may take seconds to answer (it reaches another host), and
meanwhile the loop serves everything else. Same errors as the sync connect().
Both backends; ipcd is a stand-in in a thread that answers when told to."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import threading
from typing import Any, Iterator, List, Optional

import pytest

import pyipc
import pyipc.aio

from conftest import raw_connect
from test_aio import open_fds, run


class SlowIpcd:
    """A stand-in for ipcd at RUNDIR/ipc: takes one request, then answers
    only when `answer()` is called (with "ok" and a connection to the
    service, or with the raw bytes given: b"" sends nothing), then notes
    whether the client hung up."""

    def __init__(self, rundir: str) -> None:
        self.rundir = rundir
        self.path = os.path.join(rundir, "ipc")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(1)
        self.request: Optional[bytes] = None
        self.got_request = threading.Event()
        self.go = threading.Event()
        self.reply: Optional[bytes] = None
        self.hung_up = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            (size,) = struct.unpack(">I", conn.recv(4, socket.MSG_WAITALL))
            self.request = conn.recv(size, socket.MSG_WAITALL)
            name = self.request.split(b";")[0].decode()
            self.got_request.set()
            self.go.wait(30)
            if self.reply is not None:
                if self.reply:
                    conn.sendall(self.reply)
            else:
                with raw_connect(self.rundir, name) as target:
                    socket.send_fds(conn, [b"ok"], [target.fileno()])
            self.hung_up = conn.recv(1) == b""

    def answer(self, reply: Optional[bytes] = None) -> None:
        self.reply = reply
        self.go.set()

    def close(self) -> None:
        if not self.go.is_set():
            self.answer(b"")
        self.thread.join(10)
        self.listener.close()
        os.unlink(self.path)


@pytest.fixture
def ipcd(rundir, monkeypatch) -> Iterator[SlowIpcd]:
    monkeypatch.setenv("IPC_NETWORK", "pong unix://pong")
    fake = SlowIpcd(rundir)
    try:
        yield fake
    finally:
        fake.close()


def test_the_loop_runs_while_ipcd_takes_its_time(ipcd, backend, rundir, ctx_factory):
    server = ctx_factory()
    server.service_init("pong")
    ticks: List[float] = []

    async def main() -> bytes:
        async with pyipc.aio.Context(rundir=rundir, backend=backend) as ctx:
            connecting = asyncio.ensure_future(ctx.connect("pong"))
            # The loop goes on: ticks come while ipcd has the request and
            # has not answered. Had connect() held the loop, none would.
            while not ipcd.got_request.is_set() or len(ticks) < 5:
                await asyncio.sleep(0.01)
                ticks.append(asyncio.get_running_loop().time())
            assert not connecting.done()
            ipcd.answer()
            conn = await connecting
            await conn.send(b"through ipcd")
            ev = await asyncio.to_thread(server.wait_event, 10)       # CONNECTION
            assert ev.type == pyipc.EventType.CONNECTION
            assert server.read(ev.fd, timeout=10) == b"through ipcd"
            server.write(ev.fd, b"back")
            got = await conn.recv()
            await conn.close()
            return got
    assert run(main) == b"back"
    assert ipcd.request == b"pong;pong unix://pong"
    assert len(ticks) >= 5


def test_ipcd_that_does_not_answer_in_time(ipcd, backend, rundir):
    async def main() -> Any:
        async with pyipc.aio.Context(rundir=rundir, backend=backend) as ctx:
            with pytest.raises(pyipc.TimeoutError, match="connect to service pong timed out"):
                await ctx.connect("pong", timeout=0.2)
    run(main)
    ipcd.answer(b"")                            # too late: it only looks for the hang-up
    ipcd.thread.join(10)
    assert ipcd.hung_up                         # the exchange's socket is closed


def test_ipcd_refusal_is_the_sync_connects_error(ipcd, backend, rundir):
    async def main() -> Any:
        async with pyipc.aio.Context(rundir=rundir, backend=backend) as ctx:
            connecting = asyncio.ensure_future(ctx.connect("pong"))
            await asyncio.to_thread(ipcd.got_request.wait, 10)
            ipcd.answer(b"no")
            with pytest.raises(pyipc.IPCError, match="ipcd could not connect to service pong"):
                await connecting
    run(main)


def test_no_ipcd_is_the_sync_connects_error(backend, rundir, monkeypatch):
    monkeypatch.setenv("IPC_NETWORK", "pong unix://pong")

    async def main() -> Any:
        async with pyipc.aio.Context(rundir=rundir, backend=backend) as ctx:
            with pytest.raises(pyipc.ServiceNotFoundError) as info:
                await ctx.connect("pong")
            return str(info.value)
    assert run(main) == (f"IPC_NETWORK is set but ipcd is not running "
                         f"(no service ipc in {rundir})")


def test_cancelled_while_ipcd_thinks_leaves_nothing_behind(ipcd, backend, rundir):
    async def main() -> Any:
        async with pyipc.aio.Context(rundir=rundir, backend=backend) as ctx:
            connecting = asyncio.ensure_future(ctx.connect("pong"))
            await asyncio.to_thread(ipcd.got_request.wait, 10)
            connecting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await connecting
            return ctx.sync.fileno() >= 0
    assert run(main)
    ipcd.answer(b"")
    ipcd.thread.join(10)
    assert ipcd.hung_up


def test_a_long_ipc_network_is_sent_whole(ipcd, backend, rundir, ctx_factory, monkeypatch):
    """A request longer than the socket's buffer (250 KB of rules, under
    ipcd's MAX_REQUEST) goes out as ipcd reads it; it raised BlockingIOError."""
    rules = "x unix://y;" * 23_000 + "pong unix://pong"
    monkeypatch.setenv("IPC_NETWORK", rules)
    server = ctx_factory()
    server.service_init("pong")

    async def main() -> bytes:
        async with pyipc.aio.Context(rundir=rundir, backend=backend) as ctx:
            connecting = asyncio.ensure_future(ctx.connect("pong", timeout=30))
            await asyncio.to_thread(ipcd.got_request.wait, 10)
            ipcd.answer()
            conn = await connecting
            await conn.close()
            return ipcd.request or b""
    assert run(main) == b"pong;" + rules.encode()


def test_ipcd_that_does_not_read_the_request_in_time(backend, rundir, monkeypatch):
    """The timeout bounds sending the request too: an ipcd that accepted and
    never reads a long one does not hold connect() past it."""
    monkeypatch.setenv("IPC_NETWORK", "x unix://y;" * 23_000 + "pong unix://pong")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(os.path.join(rundir, "ipc"))
        listener.listen(1)                      # connected in the backlog, never read

        async def main() -> Any:
            async with pyipc.aio.Context(rundir=rundir, backend=backend) as ctx:
                with pytest.raises(pyipc.TimeoutError,
                                   match="connect to service pong timed out"):
                    await ctx.connect("pong", timeout=0.2)
        run(main)


def test_a_context_full_when_ipcd_answers_is_the_sync_connects_error(ipcd, backend, rundir,
                                                                   ctx_factory):
    """The last free connection is taken while ipcd thinks: the fd it hands
    over cannot be added, and that is ConnectionLimitError, as the sync
    connect() raises it (every refusal read 'ipcd sent a file descriptor
    that is not a connected Unix or TCP stream socket')."""
    server = ctx_factory()
    server.service_init("pong")

    async def main() -> Any:
        async with pyipc.aio.Context(rundir=rundir, backend=backend,
                                     max_connections=1) as ctx:
            connecting = asyncio.ensure_future(ctx.connect("pong"))
            await asyncio.to_thread(ipcd.got_request.wait, 10)
            ctx.sync.connect_service("pong")        # the last one it may have
            ipcd.answer()
            with pytest.raises(pyipc.ConnectionLimitError,
                               match=r"^too many connections \(max_connections 1\)$"):
                await connecting
    run(main)


def test_a_full_context_does_not_ask_ipcd(backend, rundir, ctx_factory, monkeypatch):
    """No room for one more connection: ConnectionLimitError at once, and
    ipcd is not asked for a connection (to a service that may be on another
    host) that could not be taken, as the sync connect() does not ask."""
    monkeypatch.setenv("IPC_NETWORK", "pong unix://pong")
    server = ctx_factory()
    server.service_init("pong")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(os.path.join(rundir, "ipc"))
        listener.listen(1)

        async def main() -> Any:
            async with pyipc.aio.Context(rundir=rundir, backend=backend,
                                         max_connections=1) as ctx:
                ctx.sync.connect_service("pong")    # the one connection it may have
                with pytest.raises(pyipc.ConnectionLimitError,
                                   match=r"^too many connections \(max_connections 1\)$"):
                    await ctx.connect("pong")
        run(main)
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):        # nobody connected to "ipcd"
            listener.accept()


def test_a_context_closed_while_ipcd_thinks_takes_no_connection(ipcd, backend, rundir,
                                                                ctx_factory):
    """aclose() while connect() waits for ipcd, then ipcd answers: connect()
    raises the closed context's IPCError and the fd ipcd handed over is
    closed (it returned an open Connection on the closed context, its fd
    leaked and what was sent on it lost)."""
    server = ctx_factory()
    server.service_init("pong")

    async def main() -> None:
        ctx = pyipc.aio.Context(rundir=rundir, backend=backend)
        await ctx.__aenter__()
        before = open_fds()
        connecting = asyncio.ensure_future(ctx.connect("pong"))
        await asyncio.to_thread(ipcd.got_request.wait, 10)
        await ctx.aclose()
        ipcd.answer()
        with pytest.raises(pyipc.IPCError, match="^this pyipc.aio.Context is closed$"):
            await connecting
        await asyncio.to_thread(ipcd.thread.join, 10)
        assert not ctx._conns
        assert not open_fds() - before          # aclose() closed some; none is new
    run(main)
    assert ipcd.hung_up


@pytest.mark.parametrize("timeout", [-1, -1e-9, float("nan"), float("inf"), 1e300, True, "1"])
def test_a_bad_timeout_is_refused_before_ipcd_is_asked(ipcd, backend, rundir, ctx_factory,
                                                       timeout):
    """connect(timeout=) is checked as the sync connect() checks it, before
    anything goes to ipcd: -1 sent the request then raised TimeoutError
    (sync: ValueError), NaN, inf, 1e300 and True ran the exchange, "1" was
    a raw TypeError from the comparison. The one connection the stand-in
    ipcd accepts is then the good call's: had a refused call reached ipcd,
    the good one would wait unaccepted."""
    server = ctx_factory()
    server.service_init("pong")
    with pytest.raises((TypeError, ValueError)) as sync_error:
        ctx_factory().connect("pong", timeout=timeout)

    async def main() -> None:
        async with pyipc.aio.Context(rundir=rundir, backend=backend) as ctx:
            with pytest.raises(sync_error.type) as error:
                await ctx.connect("pong", timeout=timeout)
            assert str(error.value) == str(sync_error.value)
            assert not ipcd.got_request.is_set()
            ipcd.answer()
            conn = await ctx.connect("pong", timeout=10)
            await conn.close()
    run(main)
    assert ipcd.request == b"pong;pong unix://pong"
