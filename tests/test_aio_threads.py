"""pyipc.aio and other threads' calls on ctx.sync: while a thread is inside
the sync context (its write() to a peer this loop serves, a read() through
asyncio.to_thread), the loop neither waits for it (it may need the loop) nor
fails, nor spins on the readable fd: it watches the fd again once the
thread's call ends (docs/asyncio.md, "Threads")."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

import pyipc
import pyipc.aio


async def until_held(ctx: pyipc.aio.Context) -> None:
    """Wait until a thread is inside ctx.sync (no event says it)."""
    deadline = time.monotonic() + 10
    while not ctx.sync._guard._lock.locked():
        assert time.monotonic() < deadline, "the thread did not enter the context"
        await asyncio.sleep(0.001)


def test_a_threads_write_to_a_peer_this_loop_serves_does_not_freeze_the_loop(actx):
    """A thread write()s through ctx.sync to a service of the same loop that
    has not read yet; a message for the writing context arrives meanwhile.
    The loop's wait_events(timeout=0) waited for the write, which waited for
    the loop (the thread's write then timed out, the loop frozen till then)."""
    async def main() -> None:
        async with actx() as server_ctx, actx() as ctx:
            reply, got = asyncio.Event(), []

            async def handler(conn: pyipc.aio.Connection) -> None:
                await reply.wait()
                await conn.send(b"hello")       # readable for ctx while the thread writes
                got.append(len(await conn.recv()))
            await server_ctx.serve("svc", handler)
            conn = await ctx.connect("svc")
            outcome: list[Any] = []

            def write() -> None:
                try:
                    outcome.append(ctx.sync.write(conn.fd, b"w" * (8 << 20), timeout=3.0))
                except pyipc.IPCError as exc:
                    outcome.append(exc)
            thread = threading.Thread(target=write)
            thread.start()
            await until_held(ctx)
            start = time.monotonic()
            reply.set()
            assert await asyncio.wait_for(conn.recv(), 10) == b"hello"
            while thread.is_alive():
                await asyncio.sleep(0.01)
            assert outcome == [None] and got == [8 << 20]
            assert time.monotonic() - start < 2.5
    asyncio.run(asyncio.wait_for(main(), 30))


@pytest.mark.parametrize("library", ["asyncio", "trio"])
def test_a_worker_threads_read_on_ctx_sync_is_waited_for_not_fatal(actx, library):
    """A worker thread's read on ctx.sync (as through asyncio.to_thread)
    holds the context while it waits; a client of the context's
    Server sends meanwhile. The loop's wait_events raised "in use by another
    thread", which failed the context for good. Now it is answered once the
    read ends, and the loop does not spin on the readable fd while it waits."""
    import anyio

    async def main() -> None:
        ctx, client = actx(), actx()
        rounds = 0
        on_ready = ctx._on_ready

        def counted() -> None:
            nonlocal rounds
            rounds += 1
            on_ready()
        ctx._on_ready = counted         # type: ignore[method-assign]
        async with ctx, client:
            async def echo(conn: pyipc.aio.Connection) -> None:
                async for message in conn:
                    await conn.send(message)
            await ctx.serve("echo", echo)
            ctx.service_init("raw")
            raw = await client.connect("raw")
            raw_fd = (await ctx.wait_event()).fd        # its CONNECTION
            conn = await client.connect("echo")
            read: list[Any] = []
            # A thread of our own, joined (trio's to_thread keeps its worker
            # alive for a while; other tests count the threads).
            thread = threading.Thread(target=lambda: read.append(ctx.sync.read(raw_fd, 20)))
            thread.start()
            with anyio.fail_after(20):
                while not ctx.sync._guard._lock.locked():   # the thread is inside
                    await anyio.sleep(0.001)
                await conn.send(b"during")
                await anyio.sleep(0.3)  # a while the context is busy: counted, not waited on
                busy_rounds = rounds
                assert busy_rounds < 20
                await raw.send(b"ends the read")
                while thread.is_alive():
                    await anyio.sleep(0.005)
                thread.join()
                assert read == [b"ends the read"]
                assert await conn.recv() == b"during"
                await conn.send(b"after")
                assert await conn.recv() == b"after"
            assert ctx._failure is None
    anyio.run(main, backend=library)
