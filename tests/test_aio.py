"""pyipc.aio under asyncio (issue 18, items 2 and 4), on both backends.

Echo of 10,000 messages across processes, a sync client against an async
service and an async client against the sync pongd, 1,000 concurrent
clients on one service, back-pressure against a consumer that does not
read, cancellation at every await, a loop timer that fires on time while
messages flow, libIPC's single-loop style (events()), typed messages, and
the Server's life cycle. Every wait is bounded by asyncio.timeout/wait_for.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import resource
import socket
import sys
import threading
import time
from typing import Any, Awaitable, Callable

import pytest

import pyipc
import pyipc.aio
from pyipc import EventType
from conftest import CHILD_ENV, run_aio

WAIT_S = 30.0
ECHOES = 10_000

#: A child process: an async echo service on pyipc.aio (prints ready, then serves).
ECHO_SERVICE = '''
import asyncio, sys
import pyipc.aio

async def echo(conn):
    async for message in conn:
        await conn.send(message)

async def main():
    async with await pyipc.aio.serve(sys.argv[1], echo, rundir=sys.argv[2]) as server:
        print("ready", flush=True)
        await server.serve_forever()

asyncio.run(main())
'''


def run(coro_fn: Callable[[], Awaitable[Any]], timeout: float = WAIT_S) -> Any:
    """asyncio.run the coroutine, bounded by this file's WAIT_S."""
    return run_aio(coro_fn, timeout)


@pytest.fixture
def echo_child(backend, rundir, processes):
    """An async echo service in a child process, ready."""
    env = dict(CHILD_ENV, PYIPC_BACKEND=backend)
    proc = processes(ECHO_SERVICE, "echo", rundir, env=env, stdout=__import__("subprocess").PIPE,
                     text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


async def echo(conn: pyipc.aio.Connection) -> None:
    async for message in conn:
        await conn.send(message)


# ---------------------------------------------------------------- across processes


def test_echo_of_10000_messages_across_processes(actx, echo_child):
    async def main() -> None:
        async with actx() as ctx:
            conn = await ctx.connect("echo")
            sent = [i.to_bytes(4, "big") * 8 for i in range(ECHOES)]

            async def sender() -> None:
                for message in sent:
                    await conn.send(message)
            task = asyncio.create_task(sender())
            got = [await conn.recv() for _ in range(ECHOES)]
            await task
            assert got == sent
            await conn.close()
    run(main)


def test_a_sync_client_against_the_async_service(ctx_factory, echo_child):
    ctx = ctx_factory()
    fd = ctx.connect("echo")
    batch = [b"m%d" % i for i in range(1000)]
    ctx.write_many(fd, batch, timeout=WAIT_S)
    got: list[bytes] = []
    while len(got) < len(batch):
        got += ctx.read_many(fd, timeout=WAIT_S)
    assert got == batch


def test_an_async_client_against_the_sync_pongd(actx, backend, rundir, processes):
    import subprocess
    pongd = processes("import sys; from pyipc.cli import main; sys.exit(main())",
                      "--rundir", rundir, "--backend", backend, "pongd", "pongd",
                      stdout=subprocess.PIPE, text=True)
    assert "serving pongd" in pongd.stdout.readline()

    async def main() -> None:
        async with actx() as ctx:
            conn = await ctx.connect("pongd")
            for i in range(1000):
                await conn.send(b"%d" % i)
            assert [await conn.recv() for _ in range(1000)] == [b"%d" % i for i in range(1000)]
    run(main)


# ---------------------------------------------------------------- many clients


def test_1000_concurrent_clients_on_one_async_service(actx):
    clients, rounds = 1000, 5
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * clients + 200                  # both ends in this process, and spares
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))

    async def client(ctx: pyipc.aio.Context, n: int) -> int:
        conn = await ctx.connect("echo")
        for r in range(rounds):
            await conn.send(b"%d:%d" % (n, r))
            assert await conn.recv() == b"%d:%d" % (n, r)
        await conn.close()
        return n

    async def main() -> None:
        async with actx() as server_ctx, actx() as client_ctx:
            async with await server_ctx.serve("echo", echo) as server:
                done = await asyncio.gather(*(client(client_ctx, n) for n in range(clients)))
                assert sorted(done) == list(range(clients))
                assert server.is_serving()
    try:
        run(main, 120.0)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# ---------------------------------------------------------------- back-pressure


def test_a_slow_consumer_makes_send_wait_and_memory_stays_bounded(actx, ctx_factory):
    """The consumer (a sync context in a thread) reads nothing until the
    sender is seen waiting; queued bytes never exceed the high-water mark plus
    one message; a send() cancelled while it waited queued nothing, so the
    consumer gets every other message, whole and in order."""
    high, size, count = 256 << 10, 64 << 10, 200
    frame = size + 4
    consumer = ctx_factory()
    go, got = threading.Event(), []

    def consume(fd: int) -> None:
        go.wait(WAIT_S)
        while len(got) < count:
            got.extend(consumer.read_many(fd, timeout=WAIT_S))

    async def main() -> None:
        async with actx(high_water=high) as ctx:
            ctx.service_init("sink")     # events() style for the service
            fd = consumer.connect("sink")
            ev = await ctx.wait_event()
            assert ev.type == EventType.CONNECTION
            conn = ctx._adopt(ev.fd)     # as a Server would: the connection object
            thread = threading.Thread(target=consume, args=(fd,))
            thread.start()
            peak, timed_out = 0, 0
            try:
                for i in range(count):
                    message = i.to_bytes(4, "big") * (size // 4)
                    if not go.is_set():
                        try:     # proves send() waits: nobody reads, so it cannot finish
                            await asyncio.wait_for(conn.send(message), 0.5)
                        except asyncio.TimeoutError:
                            timed_out += 1
                            go.set()                       # now consume
                            await conn.send(message)       # queued nothing: send again
                    else:
                        await conn.send(message)
                    peak = max(peak, conn.get_write_buffer_size())
                    assert conn.get_write_buffer_size() <= high + frame
                await conn.drain()
            finally:
                go.set()
                await asyncio.to_thread(thread.join, WAIT_S)
            assert timed_out == 1 and peak > high
    run(main, 60.0)
    assert len(got) == count
    assert [m[:4] for m in got] == [i.to_bytes(4, "big") for i in range(count)]
    assert all(len(m) == size for m in got)


# ---------------------------------------------------------------- cancellation


def test_cancelling_recv_loses_no_message(actx):
    async def main() -> None:
        async with actx() as server_ctx, actx() as ctx:
            got: asyncio.Queue[pyipc.aio.Connection] = asyncio.Queue()

            async def handler(conn: pyipc.aio.Connection) -> None:
                await got.put(conn)
                await asyncio.Event().wait()        # keeps it open until cancelled
            server = await server_ctx.serve("svc", handler)
            conn = await ctx.connect("svc")
            peer = await got.get()
            # Cancelled while nothing has come.
            waiting = asyncio.create_task(conn.recv())
            await asyncio.sleep(0)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            # Woken by a message, then cancelled before it resumed: the
            # message stays for the next recv().
            waiting = asyncio.create_task(conn.recv())
            await asyncio.sleep(0)
            await peer.send(b"first")
            await peer.send(b"second")
            while not conn._inbox:                   # arrived and woke the waiter
                await asyncio.sleep(0)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            assert await conn.recv() == b"first"
            assert await conn.recv() == b"second"
            with pytest.raises(TimeoutError):       # a timeout is a cancellation too
                async with asyncio.timeout(0.05):
                    await conn.recv()
            await peer.send(b"third")
            assert await conn.recv() == b"third"
            server.close()
    run(main)


def test_a_timeout_on_recv(actx):
    async def main() -> None:
        async with actx() as server_ctx, actx() as ctx:
            await server_ctx.serve("svc", echo)
            conn = await ctx.connect("svc")
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.05):
                    await conn.recv()
            await conn.send(b"after")
            assert await conn.recv() == b"after"
    run(main)


def test_cancelling_connect_connects_nothing(actx):
    async def main() -> None:
        async with actx() as server_ctx, actx() as ctx:
            server_ctx.service_init("svc")
            task = asyncio.create_task(ctx.connect("svc"))
            await asyncio.sleep(0)                  # it is at its first await
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert ctx._conns == {}
            conn = await ctx.connect("svc")         # the context still works
            ev = await server_ctx.wait_event()
            assert ev.type == EventType.CONNECTION
            assert list(ctx._conns) == [conn.fd]
    run(main)


def test_cancelling_wait_event_and_events_loses_no_event(actx):
    async def main() -> None:
        async with actx() as server_ctx, actx() as ctx:
            server_ctx.service_init("svc")
            events = server_ctx.events()
            task = asyncio.create_task(events.__anext__())
            await asyncio.sleep(0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            conn = await ctx.connect("svc")
            await conn.send(b"hello")
            while len(server_ctx._events) < 2:      # both arrived, nobody waiting
                await asyncio.sleep(0)
            task = asyncio.create_task(server_ctx.wait_event())
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            seen = []
            async for ev in events:                 # still usable after a cancellation
                seen.append((ev.type, ev.message))
                if len(seen) == 2:
                    break
            assert seen == [(EventType.CONNECTION, None), (EventType.MESSAGE_RX, b"hello")]
    run(main)


def test_cancelling_a_waiting_send_leaves_the_stream_framed(actx, ctx_factory):
    """A send() cancelled while it waits for room has queued nothing; the
    peer receives exactly the sends that returned, whole and in order."""
    sink, got = ctx_factory(), []

    def consume(fd: int) -> None:           # until the sender closes
        try:
            while True:
                got.extend(sink.read_many(fd, timeout=WAIT_S))
        except pyipc.ConnectionClosedError:
            pass

    async def main() -> None:
        async with actx(high_water=0) as ctx:   # every send() after the first waits
            ctx.service_init("sink")
            fd = sink.connect("sink")
            conn = ctx._adopt((await ctx.wait_event()).fd)
            thread = threading.Thread(target=consume, args=(fd,))
            thread.start()
            returned = []
            for i in range(60):
                task = asyncio.create_task(conn.send(b"%d" % i * 1000))
                await asyncio.sleep(0)          # it has started: queued, or waiting
                if i % 3 == 0:
                    task.cancel()
                try:
                    await task
                    returned.append(b"%d" % i * 1000)
                except asyncio.CancelledError:
                    pass
            await conn.close()                  # after what was queued has gone out
            await asyncio.to_thread(thread.join, WAIT_S)
            assert got == returned and 30 < len(returned) < 60
    run(main)


# ---------------------------------------------------------------- the loop stays fair


def test_a_loop_timer_fires_on_time_while_messages_flow(actx):
    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with actx() as server_ctx, actx() as ctx:
            await server_ctx.serve("echo", echo)
            conn = await ctx.connect("echo")
            stop = asyncio.Event()
            echoed = 0

            async def flood() -> None:
                nonlocal echoed
                while not stop.is_set():
                    for _ in range(100):
                        await conn.send(b"x" * 64)
                    for _ in range(100):
                        await conn.recv()
                    echoed += 100

            task = asyncio.create_task(flood())
            while echoed < 1000:                    # the flow is under way
                await asyncio.sleep(0)
            fired = loop.create_future()
            due = loop.time() + 0.2
            loop.call_at(due, lambda: fired.set_result((loop.time(), echoed)))
            at, echoed_then = await fired
            stop.set()
            await task
            assert at - due < 0.15, f"the timer fired {at - due:.3f} s late"
            assert echoed_then > 1000               # messages flowed meanwhile
    run(main)


# ---------------------------------------------------------------- the rest of the API


def test_libipc_single_loop_style(actx):
    async def main() -> None:
        async with actx() as server_ctx, actx() as ctx:
            server_ctx.service_init("svc")
            conn = await ctx.connect("svc")
            await conn.send(b"ping")
            async for ev in server_ctx.events():
                if ev.type == EventType.MESSAGE_RX:
                    server_ctx.schedule(ev.fd, ev.message.upper())
                    break
            assert await conn.recv() == b"PING"
    run(main)


@dataclasses.dataclass
class Greeting:
    text: str


def test_typed_messages(actx):
    registry = pyipc.Registry()
    registry.register(1, Greeting)

    async def handler(conn: pyipc.aio.Connection) -> None:
        greeting = await conn.recv_typed(registry, cls=Greeting)
        await conn.send_typed(Greeting(greeting.text + "!"), registry)

    async def main() -> None:
        async with actx() as server_ctx, actx() as ctx:
            await server_ctx.serve("svc", handler)
            conn = await ctx.connect("svc")
            await conn.send_typed(Greeting("hi"), registry)
            assert await conn.recv_typed(registry) == Greeting("hi!")
            # The handler returned: its connection is closed after the reply.
            with pytest.raises(pyipc.ConnectionClosedError,
                               match="closed by the peer"):
                await conn.recv()
            assert [m async for m in conn] == []
    run(main)


def test_recv_typed_refuses_a_wrong_argument_before_receiving(actx):
    """recv_typed with a registry that is not one, or a cls that is not a
    class: TypeError, and the message is still there for the next recv (it
    used to be received first and lost); send_typed(obj, None): TypeError."""
    registry = pyipc.Registry()
    registry.register(1, Greeting)

    async def handler(conn: pyipc.aio.Connection) -> None:
        await conn.send_typed(Greeting("hi"), registry)
        await conn.recv()                   # until the client goes

    async def main() -> None:
        async with actx() as server_ctx, actx() as ctx:
            await server_ctx.serve("svc", handler)
            conn = await ctx.connect("svc")
            with pytest.raises(TypeError, match="^registry must be a pyipc.typed.Registry"):
                await conn.recv_typed(None)
            with pytest.raises(TypeError, match="^cls must be a class, not str$"):
                await conn.recv_typed(registry, cls="Greeting")
            assert await conn.recv_typed(registry, cls=Greeting) == Greeting("hi")
            with pytest.raises(TypeError, match="^registry must be a pyipc.typed.Registry"):
                await conn.send_typed(Greeting("x"), None)
            await conn.close()
    run(main)


def test_messages_before_a_disconnection_come_first(actx):
    async def handler(conn: pyipc.aio.Connection) -> None:
        for i in range(3):
            await conn.send(b"%d" % i)

    async def main() -> None:
        async with actx() as server_ctx, actx() as ctx:
            await server_ctx.serve("svc", handler)
            conn = await ctx.connect("svc")
            assert [m async for m in conn] == [b"0", b"1", b"2"]
            assert conn.closed
            with pytest.raises(pyipc.ConnectionClosedError):
                await conn.send(b"late")
    run(main)


def test_a_failing_handler_is_logged_and_the_server_goes_on(actx, caplog):
    async def handler(conn: pyipc.aio.Connection) -> None:
        if await conn.recv() == b"fail":
            raise ValueError("boom")
        await conn.send(b"fine")

    async def main() -> None:
        async with actx() as server_ctx, actx() as ctx:
            await server_ctx.serve("svc", handler)
            bad = await ctx.connect("svc")
            await bad.send(b"fail")
            assert [m async for m in bad] == []     # its connection was closed
            good = await ctx.connect("svc")
            await good.send(b"ok?")
            assert await good.recv() == b"fine"
    with caplog.at_level(logging.ERROR, logger="pyipc.aio"):
        run(main)
    assert "the handler of fd" in caplog.text and "boom" in caplog.text


def test_server_life_cycle(actx, rundir):
    async def main() -> None:
        started = asyncio.Event()

        async def handler(conn: pyipc.aio.Connection) -> None:
            started.set()
            await conn.recv()                       # until cancelled

        server = await pyipc.aio.serve("svc", handler, rundir=rundir,
                                       backend=actx().backend)
        assert os.path.exists(os.path.join(rundir, "svc"))
        forever = asyncio.create_task(server.serve_forever())
        async with actx() as ctx:
            await ctx.connect("svc")
            await started.wait()
            forever.cancel()                        # cancelling serve_forever closes it
            with pytest.raises(asyncio.CancelledError):
                await forever
            assert not server.is_serving()
            assert not os.path.exists(os.path.join(rundir, "svc"))
            with pytest.raises(pyipc.ServiceNotFoundError):
                await ctx.connect("svc")
            server.close_clients()
            await server.wait_closed()              # the handler ended; its context closed
            assert server.ctx._closed
    run(main)


def test_the_context_binds_to_the_loop_that_first_uses_it(actx):
    ctx = actx()                                    # made with no loop running

    async def use() -> None:
        ctx.service_init("svc")

    asyncio.run(use())
    with pytest.raises(RuntimeError, match="bound to another event loop"):
        asyncio.run(use())
    ctx.sync.close_all()


def test_a_closed_context_refuses_to_work(actx):
    async def main() -> None:
        ctx = actx()
        async with ctx:
            pass
        with pytest.raises(pyipc.IPCError, match="is closed"):
            await ctx.connect("svc")
    run(main)


# ---------------------------------------------------------------- faults the review found

def test_a_handler_cancelled_before_its_first_step_still_ends(actx):
    """close_clients() in the same loop iteration that accepted a client:
    its handler task is cancelled before it ran (asyncio then never runs its
    body): the connection is closed and wait_closed() returns (it hung)."""
    async def main() -> None:
        async with actx() as ctx:
            server = await ctx.serve("s", echo)
            accept = server._accept

            def accept_then_close(conn: pyipc.aio.Connection) -> None:
                accept(conn)
                server.close()
                server.close_clients()
            server._accept = accept_then_close      # type: ignore[method-assign]
            client = await ctx.connect("s")
            await asyncio.wait_for(server.wait_closed(), 10)
            assert server._cancels == {}
            with pytest.raises(pyipc.ConnectionClosedError):
                await asyncio.wait_for(client.recv(), 10)    # the client is told
    run(main)


def test_a_cancelled_close_still_closes(actx, ctx_factory):
    """close() waits for what is unsent (up to linger); cancelled meanwhile
    (wait_for), the connection is closed all the same, not left open."""
    async def main() -> None:
        sink = ctx_factory()
        sink.service_init("sink")                   # never reads
        async with actx(linger=5) as ctx:
            conn = await ctx.connect("sink")
            for _ in range(12):            # under the high-water mark
                await conn.send(b"z" * 10000)
            assert conn.get_write_buffer_size() > 0
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(conn.close(), 0.3)
            assert conn.closed and conn.fd not in ctx._conns
    run(main)


def test_one_external_event_is_queued_per_readiness(actx):
    """An external fd readable once: one EXTERNAL event waits, not one per
    round of the loop's wake, and one handed out means a read will not block
    (dozens of stale ones named an fd whose read would block)."""
    async def main() -> None:
        async with actx() as ctx, _external_pipe(ctx) as (r, w):
            os.write(w, b"x")
            ev = await asyncio.wait_for(ctx.wait_event(), 10)
            assert (ev.type, ev.fd) == (EventType.EXTERNAL, r)
            assert os.read(r, 100) == b"x"
            os.write(w, b"y")                    # a second readiness: one more event
            ev = await asyncio.wait_for(ctx.wait_event(), 10)
            assert (ev.type, ev.fd) == (EventType.EXTERNAL, r)
            assert os.read(r, 100) == b"y"
            with pytest.raises(asyncio.TimeoutError):       # none stale is handed out
                await asyncio.wait_for(ctx.wait_event(), 0.3)
            assert len(ctx._external_queued) <= 1
    run(main)


@contextlib.asynccontextmanager
async def _external_pipe(ctx: pyipc.aio.Context) -> Any:
    """A pipe whose read end ctx watches as an external fd: (read, write)."""
    r, w = os.pipe()
    try:
        ctx.sync.add_external(r)
        yield r, w
    finally:
        ctx.sync.close(r)
        os.close(w)


def _flood_an_unread_connection(actx, ctx_factory, high: int,
                                message: Callable[[int], bytes]) -> list[bytes]:
    """A sync sender writes message(n) for n = 0, 1, ... to a handler that
    does not recv() until the sender's writes block (a write timing out);
    checks that the context stopped reading the connection, with at most
    the mark plus one round's reads in its inbox; then lets the handler take
    everything: what it got, in order."""
    sender = ctx_factory()
    got: list[bytes] = []

    async def main() -> None:
        async with actx(high_water=high) as ctx:
            idle, finished = asyncio.Event(), asyncio.Event()
            conns: list[pyipc.aio.Connection] = []

            async def hold(conn: pyipc.aio.Connection) -> None:
                conns.append(conn)
                await idle.wait()
                while len(got) < sent:
                    got.append(await conn.recv())
                finished.set()

            server = await ctx.serve("s", hold)
            fd = sender.connect("s")
            sent = await asyncio.get_running_loop().run_in_executor(
                None, write_until_blocked, sender, fd, message)
            (conn,) = conns
            assert sent < 100_000
            assert conn._read_paused
            assert conn._inbox_bytes == sum(4 + len(m) for m in conn._inbox)
            assert conn._inbox_bytes <= high + (1 << 20)   # the mark + one round's reads
            idle.set()         # (the write that timed out stays queued in the sender)
            await finished.wait()
            server.close()
    run(main)
    return got


def write_until_blocked(sender: pyipc.Context, fd: int,
                        message: Callable[[int], bytes]) -> int:
    """Write message(0), message(1), ... to fd until a write times out (the
    peer's socket and ours are full): how many went."""
    sent = 0
    with pytest.raises(pyipc.TimeoutError):
        while sent < 100_000:              # far past any socket buffer
            sender.write(fd, message(sent), timeout=1)
            sent += 1
    return sent


def test_a_connection_nobody_reads_holds_its_sender_back(actx, ctx_factory):
    """The handler never calls recv(): once more than the high-water mark
    waits in the connection's inbox the context stops reading it, so the
    (sync) sender's writes block instead of the receiver's memory growing;
    once recv() takes it down, reading resumes and everything arrives in
    order (it buffered every message: 2 GB in 4 s)."""
    chunk = b"m" * 10_000
    got = _flood_an_unread_connection(actx, ctx_factory, 64 << 10,
                                      lambda n: b"%08d" % n + chunk)
    assert [m[:8] for m in got] == [b"%08d" % i for i in range(len(got))]


def test_an_unread_external_fd_does_not_spin_the_loop(actx):
    """An EXTERNAL event nobody takes: the fd is not watched meanwhile, so
    the loop sleeps (it woke at every round: a CPU at 100%)."""
    async def main() -> None:
        async with actx() as ctx, _external_pipe(ctx) as (r, w):
            os.write(w, b"x")
            await asyncio.sleep(0.1)               # the event is queued, not taken
            cpu = time.process_time()
            await asyncio.sleep(1)
            assert time.process_time() - cpu < 0.2
            ev = await asyncio.wait_for(ctx.wait_event(), 10)
            assert (ev.type, ev.fd) == (EventType.EXTERNAL, r)
    run(main)


def test_a_flood_of_empty_messages_holds_its_sender_back(actx, ctx_factory):
    """Receive back-pressure counts each message's header, as send() does:
    empty messages unread in the inbox reach the high-water mark too, so
    reading pauses and the sender's writes block (counting payload bytes
    only, the inbox never paused and grew without bound)."""
    got = _flood_an_unread_connection(actx, ctx_factory, 1024, lambda n: b"")
    assert got == [b""] * len(got)


def test_a_connection_this_side_dropped_says_why(actx):
    """The context drops a connection whose peer sent a frame over
    max_message_size: recv() and send() say it failed, and why, not that
    the peer closed it (the reason was only in conn.error)."""
    async def main() -> None:
        async with actx(max_message_size=100) as server_ctx, actx() as ctx:
            texts: asyncio.Future[tuple[pyipc.aio.Connection, str, str]] = \
                asyncio.get_running_loop().create_future()

            async def handler(conn: pyipc.aio.Connection) -> None:
                # (an assertion failing here would only be logged: main asserts)
                with pytest.raises(pyipc.ConnectionClosedError) as on_recv:
                    await conn.recv()
                with pytest.raises(pyipc.ConnectionClosedError) as on_send:
                    await conn.send(b"late")
                texts.set_result((conn, str(on_recv.value), str(on_send.value)))

            await server_ctx.serve("s", handler)
            client = await ctx.connect("s")
            await client.send(b"x" * 1000)
            conn, on_recv, on_send = await asyncio.wait_for(texts, 10)
            reason = "message of 1000 bytes exceeds max_message_size (100)"
            assert conn.error == reason
            assert on_recv == on_send == f"connection on fd {conn.fd} failed: {reason}"
    run(main)


async def _idle_handler_on(ctx: pyipc.aio.Context, client: pyipc.aio.Context,
                           handler: Callable[[pyipc.aio.Connection], Awaitable[None]],
                           started: asyncio.Event) -> pyipc.aio.Server:
    """A server of ctx whose one client (of `client`) runs `handler`, started."""
    server = await ctx.serve("s", handler)
    await client.connect("s")
    await asyncio.wait_for(started.wait(), 10)
    return server


def test_closing_the_context_stops_the_handlers_of_a_closed_server(actx):
    """server.close() stops listening, its handlers go on; closing the
    context then cancels them too, and a pending wait_closed() returns
    (the closed server was out of the context's sight: its handler ran on
    after the context closed, and wait_closed() hung)."""
    async def main() -> None:
        started, outcome = asyncio.Event(), []

        async def handler(conn: pyipc.aio.Connection) -> None:
            started.set()
            try:
                await asyncio.Event().wait()      # works on something else than conn
            except asyncio.CancelledError:
                outcome.append("cancelled")
                raise

        async with actx() as client:
            server_ctx = actx()
            server = await _idle_handler_on(server_ctx, client, handler, started)
            server.close()
            waiting = asyncio.ensure_future(server.wait_closed())
            await server_ctx.aclose()
            assert outcome == ["cancelled"]
            await asyncio.wait_for(waiting, 10)
            assert server._cancels == {} and not server_ctx._closed_servers
    run(main)


def test_wait_closed_returns_once_the_context_is_closed(actx):
    """aclose() cancelled while it waits for a handler's cleanup: the
    context is closed all the same, and wait_closed() returns instead of
    waiting for a wake-up that nothing can send any more."""
    async def main() -> None:
        started, cleaning = asyncio.Event(), asyncio.Event()

        async def handler(conn: pyipc.aio.Connection) -> None:
            started.set()
            try:
                await asyncio.Event().wait()
            finally:
                cleaning.set()
                await asyncio.Event().wait()      # a cleanup that does not end by itself

        async with actx() as client:
            server_ctx = actx()
            server = await _idle_handler_on(server_ctx, client, handler, started)
            waiting = asyncio.ensure_future(server.wait_closed())
            closing = asyncio.ensure_future(server_ctx.aclose())
            await asyncio.wait_for(cleaning.wait(), 10)
            closing.cancel()
            with pytest.raises(asyncio.CancelledError):
                await closing
            await asyncio.wait_for(waiting, 10)
            await asyncio.wait_for(server.wait_closed(), 10)     # a new one too
    run(main)


ABANDONED_AT_SHUTDOWN = """
import asyncio, gc, sys
import pyipc, pyipc.aio
rundir, backend, runner = sys.argv[1], sys.argv[2], sys.argv[3]
if runner == "uvloop":
    import uvloop
    asyncio.run = uvloop.run
sink = pyipc.Context(rundir=rundir, backend=backend)

async def main():
    replied = asyncio.Event()
    async def handler(conn):
        await conn.recv()
        await conn.send(b"r" * (4 << 20))   # to a client that does not read
        replied.set()
        await conn.recv()
    server = await pyipc.aio.serve("s", handler, rundir=rundir, backend=backend)
    fd = sink.connect("s")
    sink.write(fd, b"ask", timeout=10)
    await asyncio.wait_for(replied.wait(), 10)
    try:                                    # serve_forever ended by a timeout (or Ctrl-C)
        await asyncio.wait_for(server.serve_forever(), 0.2)
    except asyncio.TimeoutError:
        pass

asyncio.run(main())
gc.collect()
print("done")
"""


#: The same, with a close_clients() (of no client yet) right after serve().
CLOSE_CLIENTS_THEN_ABANDONED = ABANDONED_AT_SHUTDOWN.replace(
    "handler, rundir=rundir, backend=backend)\n",
    "handler, rundir=rundir, backend=backend)\n    server.close_clients()\n", 1)


@pytest.mark.parametrize("runner", ["asyncio", "uvloop"])
@pytest.mark.parametrize("script", [ABANDONED_AT_SHUTDOWN, CLOSE_CLIENTS_THEN_ABANDONED],
                         ids=["plain", "after_close_clients"])
def test_a_handler_cancelled_by_asyncio_run_leaves_no_task_behind(backend, rundir, runner,
                                                                   script):
    """asyncio.run ends with a handler still running (its reply unsent, the
    server closed, the context not): asyncio.run cancels it. Its connection
    is aborted then, as before; a close task started then was left pending
    on the closed loop ('Task was destroyed but it is pending!'). So also
    after an earlier close_clients() (it left a flag set for good, and
    every later cancellation was taken for its own)."""
    assert script.count("close_clients") == (script is CLOSE_CLIENTS_THEN_ABANDONED)
    done = __import__("subprocess").run(
        [sys.executable, "-c", script, rundir, backend, runner],
        env=CHILD_ENV, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "done", done.stderr
    assert "Task was destroyed" not in done.stderr, done.stderr
    assert "Event loop is closed" not in done.stderr, done.stderr


@pytest.mark.parametrize("library", ["asyncio", "trio"])
def test_a_failure_while_a_reply_drains_is_logged_not_escaped(backend, rundir, library,
                                                              caplog):
    """The context's loop fails (as when wait_events raises) while a
    cancelled handler's reply drains: the close task's failure is logged,
    as a handler's is; it escaped its task (asyncio: 'never retrieved';
    trio: the context's task group torn down). White-box: ctx._fail."""
    import anyio
    sink = pyipc.Context(rundir=rundir, backend=backend)
    escaped: list[BaseException] = []

    async def main() -> None:
        replied = anyio.Event()

        async def handler(conn: pyipc.aio.Connection) -> None:
            await conn.recv()
            await conn.send(b"r" * (4 << 20))
            replied.set()
            await conn.recv()
        try:
            async with pyipc.aio.Context(rundir=rundir, backend=backend, linger=3) as ctx:
                server = await ctx.serve("s", handler)
                fd = sink.connect("s")
                sink.write(fd, b"ask", timeout=10)
                await replied.wait()
                server.close_clients()          # its reply drains in a close task
                while not server._closing:
                    await anyio.sleep(0.01)
                ctx._fail(RuntimeError("boom"))
                while server._closing:
                    await anyio.sleep(0.01)
        except BaseException as e:              # noqa: B036 (what leaves the block)
            escaped.append(e)
    try:
        with caplog.at_level(logging.ERROR, logger="pyipc.aio"):
            anyio.run(main, backend=library)
    finally:
        sink.close_all()
    assert not any("boom" in repr(e) and "Group" in type(e).__name__ for e in escaped), escaped
    assert any("closing fd" in r.getMessage() and "failed" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize("leave", ["server", "context"])
@pytest.mark.parametrize("then", ["waits", "returns"])
def test_a_reply_sent_before_the_service_stops_goes_out(actx, leave, then):
    """The handler sent a reply (send() returned: queued whole), then the
    service stops: leaving `async with server:` or closing the context
    cancels the handler (waiting for the next request, or in the close
    that follows its return), and its reply still goes out before its
    connection closes (it was aborted, the reply dropped)."""
    reply = b"r" * (4 << 20)           # far more than the sockets' buffers hold

    async def main() -> None:
        replied = asyncio.Event()

        async def handler(conn: pyipc.aio.Connection) -> None:
            async for _ in conn:
                await conn.send(reply)
                replied.set()
                if then == "returns":
                    return

        async with actx() as client_ctx, actx() as server_ctx:
            server = await server_ctx.serve("s", handler)
            conn = await client_ctx.connect("s")
            await conn.send(b"ask")
            await asyncio.wait_for(replied.wait(), 10)
            receiving = asyncio.ensure_future(conn.recv())
            if leave == "server":
                async with server:
                    pass
            else:
                await server_ctx.aclose()
            assert await asyncio.wait_for(receiving, 10) == reply
            with pytest.raises(pyipc.ConnectionClosedError, match="closed by the peer"):
                await asyncio.wait_for(conn.recv(), 10)
    run(main)


def test_a_reply_nobody_reads_holds_the_stop_for_at_most_linger(actx, ctx_factory):
    """The reply of a cancelled handler goes out within `linger` seconds or
    is dropped: a client that never reads does not hold wait_closed()."""
    async def main() -> float:
        replied = asyncio.Event()

        async def handler(conn: pyipc.aio.Connection) -> None:
            await conn.recv()
            await conn.send(b"r" * (4 << 20))
            replied.set()
            await conn.recv()

        sink = ctx_factory()                        # connects, asks, never reads
        async with actx(linger=0.5) as server_ctx:
            server = await server_ctx.serve("s", handler)
            fd = sink.connect("s")
            sink.write(fd, b"ask", timeout=10)
            await asyncio.wait_for(replied.wait(), 10)
            started = time.monotonic()
            async with server:
                pass
            assert server._closing == set() and server_ctx._conns == {}
            return time.monotonic() - started
    assert 0.4 < run(main) < 5


def test_a_handler_whose_client_left_is_stopped_when_its_fd_is_taken_again(actx):
    """A handler awaiting something else while its client leaves: its fd
    number goes to a later client. close_clients() cancels every handler and
    wait_closed() waits for all (the first was forgotten: its entry, kept by
    fd, was overwritten by the later one's)."""
    async def main() -> None:
        started: asyncio.Queue[pyipc.aio.Connection] = asyncio.Queue()
        cancelled: list[int] = []
        never = asyncio.Event()

        async def handler(conn: pyipc.aio.Connection) -> None:
            started.put_nowait(conn)
            try:
                await never.wait()                   # not reading its client
            except asyncio.CancelledError:
                cancelled.append(len(cancelled))
                raise

        # The clients' sockets are made first, so that the number the first
        # client's connection gives back is free for the server's accept.
        clients = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(10)]
        try:
            async with actx() as ctx:
                server = await ctx.serve("s", handler)
                clients[0].connect(server.path)
                first = await asyncio.wait_for(started.get(), 10)
                clients[0].close()
                fds = [first.fd]
                # The number is given back at one of the server's next
                # waits: clients come (their handlers wait too) until one
                # is given it.
                for client in clients[1:]:
                    client.connect(server.path)
                    fds.append((await asyncio.wait_for(started.get(), 10)).fd)
                    if fds[-1] == fds[0]:
                        break
                assert fds[-1] == fds[0], f"fd {fds[0]} never taken again: {fds}"
                assert first.closed
                server.close()
                server.close_clients()
                await asyncio.wait_for(server.wait_closed(), 10)
                assert cancelled == list(range(len(fds)))   # every handler, the first's too
        finally:
            for client in clients:
                client.close()
    run(main)


def open_fds() -> set[int]:
    """The fds this process has open (not the one listdir read them with)."""
    def is_open(fd: int) -> bool:
        try:
            os.fstat(fd)
            return True
        except OSError:
            return False
    return set(filter(is_open, map(int, os.listdir("/proc/self/fd"))))


def test_a_connect_racing_aclose_connects_nothing(actx, ctx_factory):
    """aclose() runs while connect() waits at its checkpoint: connect()
    raises the closed context's IPCError and connects nothing (it returned
    an open Connection on the closed context: its fd leaked, sends lost)."""
    from conftest import quiet
    service = ctx_factory()
    service.service_init("pong")

    async def main() -> None:
        ctx = actx()
        await ctx.__aenter__()
        before = open_fds()
        connecting = asyncio.ensure_future(ctx.connect("pong"))
        await asyncio.sleep(0)              # connect() is at its checkpoint
        await ctx.aclose()
        with pytest.raises(pyipc.IPCError, match="^this pyipc.aio.Context is closed$"):
            await connecting
        assert not ctx._conns
        assert not open_fds() - before          # aclose() closed some; none is new
    run(main)
    assert EventType.CONNECTION not in [ev.type for ev in quiet(service)]


def test_a_client_of_a_plain_service_nobody_reads_is_held_back(actx, ctx_factory):
    """libIPC's style (service_init + events()) with a consumer that takes
    nothing: once more than the high-water mark of a client's messages waits
    in the events queue the context stops reading it, so the (sync)
    client's writes block instead of the queue growing (1.4 GB in 4 s, the reviewer measured);
    then every message comes out of events(), in order."""
    high = 64 << 10
    sender = ctx_factory()

    async def main() -> None:
        async with actx(high_water=high) as ctx:
            ctx.service_init("plain")
            fd = sender.connect("plain")
            sent = await asyncio.get_running_loop().run_in_executor(
                None, write_until_blocked, sender, fd, lambda i: b"%08d" % i + b"m" * 1000)
            assert sent < 100_000
            queued = [ev.message for ev in ctx._events if ev.type == EventType.MESSAGE_RX]
            assert sum(4 + len(m) for m in queued) <= high + (1 << 20)  # + one round's reads
            got: list[bytes] = []
            while len(got) < sent:
                ev = await asyncio.wait_for(ctx.wait_event(), 10)
                if ev.type == EventType.MESSAGE_RX:
                    got.append(ev.message[:8])
            assert got == [b"%08d" % i for i in range(sent)]
    run(main)


def test_a_context_is_used_from_its_loop_only(actx):
    """Every method of a Connection, a Server and the Context, called from
    another thread's loop, raises the documented RuntimeError (send() was
    accepted, its unsent count then raced the owning loop's and drain()
    hung; recv() raised asyncio's 'attached to a different loop').
    From a thread, loop.call_soon_threadsafe(conn.abort) is the way: it
    wakes the connection's recv()."""
    async def main() -> None:
        async with actx() as server_ctx, actx() as ctx:
            server = await server_ctx.serve("echo", echo)
            conn = await ctx.connect("echo")
            calls: dict[str, Callable[[], Any]] = {
                "send": lambda: conn.send(b"x"), "recv": conn.recv, "drain": conn.drain,
                "close": conn.close, "abort": conn.abort,
                "set_write_buffer_limits": conn.set_write_buffer_limits,
                "connect": lambda: ctx.connect("echo"), "wait_event": ctx.wait_event,
                "aclose": ctx.aclose, "wait_closed": server.wait_closed,
                "serve_forever": server.serve_forever, "server.close": server.close,
                "close_clients": server.close_clients}

            async def each() -> dict[str, str]:
                said = {}
                for name, call in calls.items():
                    try:
                        result = call()
                        if asyncio.iscoroutine(result):
                            await asyncio.wait_for(result, 5)
                        said[name] = "returned"
                    except RuntimeError as e:
                        said[name] = str(e)
                return said
            said = await asyncio.to_thread(asyncio.run, each())
            assert said == dict.fromkeys(calls, pyipc.aio._context.OTHER_LOOP_TEXT)
            await conn.send(b"still ours")
            assert await asyncio.wait_for(conn.recv(), 10) == b"still ours"
            assert server.is_serving()
            waiting = asyncio.ensure_future(conn.recv())
            loop = asyncio.get_running_loop()
            await asyncio.to_thread(loop.call_soon_threadsafe, conn.abort)
            with pytest.raises(pyipc.ConnectionClosedError):
                await asyncio.wait_for(waiting, 10)
    run(main)


def test_aclose_after_the_loop_failed_awaits_the_handlers(actx):
    """The context's loop failed (as when a switch callback raises;
    white-box: ctx._fail): aclose() still cancels the handlers and awaits
    their cleanup before it returns (it raised the failure at its first
    wait and left them running on closed connections), then raises it."""
    async def main() -> None:
        done: list[str] = []
        started = asyncio.Event()

        async def handler(conn: pyipc.aio.Connection) -> None:
            started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                await asyncio.sleep(0.05)       # cleanup that takes a while
                done.append("cleaned up")
                raise
        async with actx() as client:
            ctx = actx()
            await ctx.__aenter__()
            await ctx.serve("s", handler)
            await client.connect("s")
            await asyncio.wait_for(started.wait(), 10)
            ctx._fail(RuntimeError("boom"))
            with pytest.raises(RuntimeError, match="^boom$"):
                await ctx.aclose()
            assert done == ["cleaned up"]
    run(main)


def test_send_waits_for_room_in_a_send_queue_smaller_than_the_high_water_mark(actx,
                                                                               ctx_factory):
    """max_queue_size (8 KiB) below the high-water mark (64 KiB): send()
    waits while the message would not fit in the fd's send queue (it
    raised QueueFullError, the sync schedule()'s), and every message
    arrives, in order, once the peer reads."""
    peer = ctx_factory()
    peer.service_init("slow")
    messages = [b"%04d" % i + b"x" * 996 for i in range(2000)]     # 2 MB: past any buffer

    async def main() -> None:
        async with actx(max_message_size=1024, max_queue_size=8192) as ctx:
            conn = await ctx.connect("slow")

            async def send_all() -> None:
                for message in messages:
                    await conn.send(message)
                    assert conn.get_write_buffer_size() <= 8192
            def read_all() -> list[bytes]:
                return [ev.message for ev in collect_messages(peer, len(messages))]
            sending = asyncio.ensure_future(send_all())
            # The peer reads nothing yet: send() waits for room (it failed).
            await asyncio.wait({sending}, timeout=0.5)
            failed = sending.exception() if sending.done() else None
            assert failed is None, repr(failed)
            got = await asyncio.to_thread(read_all)
            await asyncio.wait_for(sending, 10)
            assert got == messages
    run(main)


def collect_messages(ctx: pyipc.Context, count: int) -> list[pyipc.Event]:
    """The next `count` MESSAGE_RX events of ctx (bounded waits)."""
    got: list[pyipc.Event] = []
    while len(got) < count:
        got.extend(ev for ev in ctx.wait_events(timeout=10) if ev.type == EventType.MESSAGE_RX)
    return got


def test_a_client_of_a_service_made_on_ctx_sync_comes_out_of_events(actx):
    """One Server, and a service made with ctx.sync.service_init() (the
    underlying context): its client's events come out of events(), not
    to the Server's handler (the only Server took every client)."""
    async def main() -> None:
        async with actx() as ctx, actx() as client:
            handled: list[bytes] = []

            async def handler(conn: pyipc.aio.Connection) -> None:
                async for message in conn:
                    handled.append(message)
            await ctx.serve("a", handler)
            ctx.sync.service_init("plain")
            conn = await client.connect("plain")
            await conn.send(b"for plain")
            async for ev in ctx.events():
                if ev.type == EventType.MESSAGE_RX:
                    assert ev.message == b"for plain"
                    break
            assert handled == []
    run(main, timeout=10)


def test_timer_events_do_not_pile_up_in_events(actx):
    """A 1 ms timer nobody reads for 0.3 s: one TIMER waits in the events
    queue, not one per expiry (~300, stale when taken), and the next one
    comes once it is taken, as the sync API's wait_events() gives them."""
    async def main() -> None:
        async with actx() as ctx:
            ctx.sync.timer = 1
            await asyncio.sleep(0.3)        # the timer expires ~300 times meanwhile
            assert [ev.type for ev in ctx._events] == [EventType.TIMER]
            for _ in range(3):
                ev = await asyncio.wait_for(ctx.wait_event(), 10)
                assert ev.type == EventType.TIMER
            assert len(ctx._events) <= 1
    run(main)


HIGH_WATER_REFUSED = [
    (-1, ValueError), ((1 << 63), ValueError), (10**30, ValueError),
    (math.nan, TypeError), (1.5, TypeError), (True, TypeError), ("x", TypeError)]


@pytest.mark.parametrize("value, error", HIGH_WATER_REFUSED)
def test_high_water_is_an_int_from_0_to_the_int64_bound(actx, value, error):
    """high_water (and set_write_buffer_limits' marks) is checked as the
    other counts are: NaN was taken and turned receive back-pressure off
    (every comparison with it is false), 1.5, True and 10**30 were taken,
    "x" raised a raw TypeError from the comparison."""
    MAX_HIGH_WATER = pyipc.aio.MAX_HIGH_WATER
    assert MAX_HIGH_WATER == (1 << 63) - 1
    with pytest.raises(error, match="high_water must be"):
        actx(high_water=value)

    async def main() -> None:
        async with actx(high_water=0) as server_ctx, \
                actx(high_water=MAX_HIGH_WATER) as ctx:          # both edges taken
            await server_ctx.serve("echo", echo)
            conn = await ctx.connect("echo")
            assert conn.get_write_buffer_limits() == (MAX_HIGH_WATER // 4, MAX_HIGH_WATER)
            conn.set_write_buffer_limits(0)
            conn.set_write_buffer_limits(MAX_HIGH_WATER, MAX_HIGH_WATER)
            for name, kwargs in (("high", {"high": value}), ("low", {"high": 8, "low": value})):
                with pytest.raises(error, match=f"{name} must be"):
                    conn.set_write_buffer_limits(**kwargs)
            assert conn.get_write_buffer_limits() == (MAX_HIGH_WATER, MAX_HIGH_WATER)
            await conn.send(b"ping")
            assert await asyncio.wait_for(conn.recv(), 10) == b"ping"
    run(main)
