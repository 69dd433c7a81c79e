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
import threading
from typing import Any, Awaitable, Callable

import pytest

import pyipc
import pyipc.aio
from pyipc import EventType

WAIT_S = 10.0
HEADER = 4


def run(coro_fn: Callable[[], Awaitable[Any]], timeout: float = WAIT_S) -> Any:
    """asyncio.run the coroutine, bounded."""
    async def bounded() -> Any:
        return await asyncio.wait_for(coro_fn(), timeout)
    return asyncio.run(bounded())


@pytest.fixture
def actx(backend, rundir):
    """Make pyipc.aio.Contexts on the test's backend and run dir."""
    def make(**kwargs: Any) -> pyipc.aio.Context:
        kwargs.setdefault("rundir", rundir)
        kwargs.setdefault("backend", backend)
        return pyipc.aio.Context(**kwargs)
    return make


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
