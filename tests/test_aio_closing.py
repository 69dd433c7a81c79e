"""pyipc.aio: what is queued goes out and what is closed ends, whoever
queued or closed it (review findings 2, 4, 5, 7 and 8), on both backends.

ctx.schedule() on a Connection's fd is counted with the connection's own
sends; a context left (aclose()) lets out what ctx.schedule() queued for
the clients of a service_init() service, and a reply its own handler sent
when that handler closes it; a Connection whose fd was closed through
ctx.sync ends once its number is taken again, and is not handed the new
client; a forked child leaves `async with` without an error. Every wait is
bounded by asyncio.wait_for.
"""

from __future__ import annotations

import asyncio
import os
from collections import deque
from typing import Any, Awaitable, Callable

import pytest

import pyipc
import pyipc.aio
from pyipc import EventType

from conftest import run_aio

WAIT_S = 10.0
HEADER = 4


def run(coro_fn: Callable[[], Awaitable[Any]], timeout: float = WAIT_S) -> Any:
    """asyncio.run the coroutine, bounded by this file's WAIT_S."""
    return run_aio(coro_fn, timeout)


def messages_until_disconnection(ctx: pyipc.Context) -> list[bytes]:
    """What the clients of ctx's service sent, until one leaves (sync API)."""
    got: list[bytes] = []
    while True:
        for ev in ctx.wait_events(timeout=WAIT_S):
            if ev.type == EventType.MESSAGE_RX:
                got.append(ev.message)
            elif ev.type == EventType.DISCONNECTION:
                return got


async def echo(conn: pyipc.aio.Connection) -> None:
    async for message in conn:
        await conn.send(message)


# ---------------------------------------------------------------- finding 4
def test_schedule_on_a_connection_is_counted_with_its_sends(actx, ctx_factory):
    """ctx.schedule() on a Connection's fd, then send(): both are counted
    as unsent, and close() waits for both. The scheduled message was not
    counted: its MESSAGE_TX took the send()'s count off, close() saw
    nothing unsent and dropped the 4 MiB the send() had queued."""
    big = b"b" * (4 << 20)          # far more than the sockets' buffers hold
    service = ctx_factory()
    service.service_init("s")

    async def main() -> list[bytes]:
        async with actx() as ctx:
            conn = await ctx.connect("s")
            ctx.schedule(conn.fd, "small")                # str, as sync.schedule takes it
            await conn.send(big)
            assert conn.get_write_buffer_size() == 2 * HEADER + len(b"small") + len(big)
            with pytest.raises(RuntimeError, match="another event loop"):
                await asyncio.to_thread(ctx.schedule, conn.fd, b"from a thread")
            closing = asyncio.ensure_future(conn.close())
            got = await asyncio.to_thread(messages_until_disconnection, service)
            await closing
            return got
    got = run(main)
    assert [len(m) for m in got] == [len(b"small"), len(big)]


# ---------------------------------------------------------------- finding 7
def frame(payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "big") + payload


def test_a_connection_closed_through_sync_ends_when_its_number_is_reused(actx):
    """ctx.sync.close(conn.fd) reports no event; once the number is a new
    client's, the old Connection ends (its recv() raises) and the new
    client goes to the Server, a handler of its own. The old Connection
    stayed open and was handed the new client's messages (a handler
    serving another client), and the CONNECTION went to events()."""
    async def main() -> None:
        started: asyncio.Queue[pyipc.aio.Connection] = asyncio.Queue()

        async def handler(conn: pyipc.aio.Connection) -> None:
            started.put_nowait(conn)
            await echo(conn)

        # Made first, so that the number the close gives back is free for
        # the server's accept (not taken by a client's socket).
        import socket
        clients = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(10)]
        try:
            async with actx() as ctx:
                server = await ctx.serve("s", handler)
                clients[0].connect(server.path)
                old = await asyncio.wait_for(started.get(), WAIT_S)
                receiving = asyncio.ensure_future(old.recv())
                await asyncio.to_thread(ctx.sync.close, old.fd)     # any thread may
                for client in clients[1:]:
                    client.connect(server.path)
                    new = await asyncio.wait_for(started.get(), WAIT_S)
                    if new.fd == old.fd:
                        break
                assert new.fd == old.fd, f"fd {old.fd} never taken again"
                with pytest.raises(pyipc.ConnectionClosedError, match="is closed"):
                    await asyncio.wait_for(receiving, WAIT_S)
                assert old.closed and not new.closed and ctx._events == deque()
                client.sendall(frame(b"to the new handler"))
                reply = await asyncio.wait_for(new_reply(client), WAIT_S)
                assert reply == frame(b"to the new handler")
        finally:
            for client in clients:
                client.close()

    async def new_reply(sock: Any) -> bytes:
        want = len(frame(b"to the new handler"))
        got = b""
        while len(got) < want:
            got += await asyncio.to_thread(sock.recv, want - len(got))
        return got
    run(main)


def test_a_client_connection_closed_through_sync_ends_when_its_number_is_reused(actx):
    """The client side: ctx.sync.close(conn.fd), then a connect() given the
    same number ends the old Connection; the new one works (the old one
    was left open, sharing the new one's number)."""
    async def main() -> None:
        async with actx() as server_ctx, actx() as ctx:
            await server_ctx.serve("s", echo)
            old = await ctx.connect("s")
            ctx.sync.close(old.fd)
            new = await ctx.connect("s")
            assert new.fd == old.fd             # the lowest free number
            assert old.closed and ctx._conns == {new.fd: new}
            with pytest.raises(pyipc.ConnectionClosedError, match="is closed"):
                await old.recv()
            await new.send(b"new")
            assert await asyncio.wait_for(new.recv(), WAIT_S) == b"new"
    run(main)


# ---------------------------------------------------------------- finding 2
def test_leaving_the_context_lets_out_what_schedule_queued_for_any_fd(actx, ctx_factory):
    """libIPC's style: a service_init() service answers with ctx.schedule(),
    and the context is left at once. The reply goes out (within linger),
    as the sync `with` sends it: it was dropped (close_all() with linger
    0: only Connections were drained). A reply for a fd closed through
    ctx.sync.close() meanwhile (no event says it) does not hold the exit."""
    big = b"r" * (4 << 20)          # far more than the sockets' buffers hold
    client = ctx_factory()

    async def main() -> tuple[bytes, float]:
        ctx = actx(linger=WAIT_S)
        async with ctx:
            ctx.service_init("s")
            fd = client.connect("s")
            gone = client.connect("s")
            client.write(fd, b"ask", timeout=WAIT_S)
            clients, asker = set(), None
            async for ev in ctx.events():   # both clients, and the request
                if ev.type == EventType.CONNECTION:
                    clients.add(ev.fd)
                elif ev.type == EventType.MESSAGE_RX:
                    asker = ev.fd
                if asker is not None and len(clients) == 2:
                    break
            ctx.schedule(asker, big)
            (other,) = clients - {asker}
            ctx.schedule(other, b"to a fd closed behind the loop's back")
            ctx.sync.close(other)
            reading = asyncio.ensure_future(asyncio.to_thread(client.read, fd, WAIT_S))
            started = asyncio.get_running_loop().time()
        took = asyncio.get_running_loop().time() - started
        client.close(gone)
        return await reading, took
    reply, took = run(main)
    assert reply == big
    assert took < WAIT_S / 2


# ---------------------------------------------------------------- finding 5
@pytest.mark.parametrize("library", ["asyncio", "trio"])
def test_a_handler_that_closes_its_context_still_sends_its_reply(actx, library):
    """A "shutdown" command: the handler replies, then closes its own
    context. aclose() does not cancel the handler that called it, and the
    reply goes out before the fds close: aclose() cancelled its caller,
    whose first await then ended the stop with everything dropped (and
    under trio the fd's watcher could then wait on the closed fd: EBADF)."""
    import anyio
    reply = b"r" * (4 << 20)         # far more than the sockets' buffers hold

    async def main() -> None:
        async with actx() as server_ctx, actx() as ctx:
            async def handler(conn: pyipc.aio.Connection) -> None:
                async for _ in conn:
                    await conn.send(reply)
                    await server_ctx.aclose()
                    assert conn.closed

            await server_ctx.serve("s", handler)
            conn = await ctx.connect("s")
            await conn.send(b"shutdown")
            with anyio.fail_after(WAIT_S):
                assert await conn.recv() == reply
                with pytest.raises(pyipc.ConnectionClosedError, match="closed by the peer"):
                    await conn.recv()
    anyio.run(main, backend=library)


@pytest.mark.parametrize("closed_by", ["on_ready", "another task"])
def test_the_trio_watcher_stops_before_its_fd_is_closed(closed_by):
    """Under trio the context's fd is watched by a task (AnyioFlavor.watch).
    unwatch() then closing the fd, while that task was about to wait on it
    again (woken, or inside on_ready()), tore the run down with EBADF from
    trio's epoll: the watcher now stops at once, and a watcher waiting on
    the fd is woken before it is closed. (No pyipc backend is involved: the
    flavor watches any fd; a pipe here.)"""
    import anyio
    from pyipc.aio._flavor import AnyioFlavor

    async def main() -> None:
        read_end, write_end = os.pipe()
        readied = anyio.Event()
        try:
            async with anyio.create_task_group() as group:
                flavor = AnyioFlavor(group)

                def on_ready() -> None:
                    readied.set()
                    if closed_by == "on_ready":
                        flavor.unwatch()
                        os.close(read_end)

                flavor.watch(read_end, on_ready)
                if closed_by == "on_ready":
                    os.write(write_end, b"x")       # the watcher calls on_ready
                    with anyio.fail_after(WAIT_S):
                        await readied.wait()
                else:
                    await anyio.lowlevel.checkpoint()   # the watcher waits on the fd
                    await anyio.lowlevel.checkpoint()
                    flavor.unwatch()
                    os.close(read_end)
        finally:
            os.close(write_end)
    anyio.run(main, backend="trio")


# ---------------------------------------------------------------- finding 8
def test_a_forked_child_leaves_async_with_cleanly(actx):
    """os.fork() inside `async with pyipc.aio.Context()`: the child leaves
    the block (only its copies of the fds are closed) and exits 0; the
    parent's context goes on serving. The child's exit raised RuntimeError
    (the fork reset the running loop: "bound to another event loop")."""
    async def main() -> None:
        async with actx() as server_ctx, actx() as ctx:
            await server_ctx.serve("s", echo)
            conn = await ctx.connect("s")
            await conn.send(b"before")
            assert await asyncio.wait_for(conn.recv(), WAIT_S) == b"before"
            pid = os.fork()
            if pid == 0:                    # the child: leave both blocks, then exit
                status = 1
                try:
                    await ctx.aclose()
                    await server_ctx.aclose()
                    status = 0 if conn.closed and ctx._conns == {} else 2
                finally:
                    os._exit(status)
            try:
                _, status = await asyncio.wait_for(asyncio.to_thread(os.waitpid, pid, 0), WAIT_S)
            except BaseException:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                raise
            assert os.waitstatus_to_exitcode(status) == 0
            await conn.send(b"after")       # the parent's loop still watches its contexts
            assert await asyncio.wait_for(conn.recv(), WAIT_S) == b"after"
    run(main)
