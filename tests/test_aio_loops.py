"""pyipc.aio on other loops (issue 18, item 2): uvloop, and trio through
anyio (the context's own task group waits with anyio.wait_readable). Each
is skipped only when its package is missing (the test extra installs them).
"""

from __future__ import annotations

import asyncio
import platform
from typing import Any, Awaitable, Callable

import pytest

import pyipc
import pyipc.aio
from pyipc import EventType

WAIT_S = 30.0
MESSAGES = 2000


async def echo(conn: pyipc.aio.Connection) -> None:
    async for message in conn:
        await conn.send(message)


async def exchange(make: Callable[..., pyipc.aio.Context]) -> None:
    """A server and a client context: echoes in order, events() style, and
    a handler's connection closed when it returns."""
    async with make() as server_ctx, make() as ctx:
        server = await server_ctx.serve("echo", echo)
        conn = await ctx.connect("echo")
        sent = [b"%d" % i * 50 for i in range(MESSAGES)]
        for message in sent:
            await conn.send(message)
        assert [await conn.recv() for _ in sent] == sent
        await conn.close()
        server_ctx.service_init("plain")
        other = await ctx.connect("plain")
        await other.send(b"via events()")
        async for ev in server_ctx.events():
            if ev.type == EventType.MESSAGE_RX:
                assert ev.message == b"via events()"
                break
        assert server.is_serving()


@pytest.fixture
def make(backend, rundir) -> Callable[..., pyipc.aio.Context]:
    def make(**kwargs: Any) -> pyipc.aio.Context:
        return pyipc.aio.Context(rundir=rundir, backend=backend, **kwargs)
    return make


# ---------------------------------------------------------------- uvloop


def _uvloop() -> Any:
    """uvloop: the test extra installs it on CPython (its marker), so missing
    there the test fails; elsewhere there is none to test."""
    if platform.python_implementation() != "CPython":
        pytest.skip("uvloop is installed on CPython only (the test extra's marker)")
    import uvloop
    return uvloop


def test_uvloop(make):
    uvloop = _uvloop()

    async def main() -> None:
        assert "uvloop" in type(asyncio.get_running_loop()).__module__
        await asyncio.wait_for(exchange(make), WAIT_S)
    uvloop.run(main())


def test_uvloop_back_pressure_and_cancelled_recv(make):
    uvloop = _uvloop()

    async def main() -> None:
        async with make() as server_ctx, make(high_water=1 << 10) as ctx:
            await server_ctx.serve("echo", echo)
            conn = await ctx.connect("echo")
            waiting = asyncio.create_task(conn.recv())
            await asyncio.sleep(0)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            for i in range(500):
                await conn.send(b"%d" % i * 100)
                assert conn.get_write_buffer_size() <= (1 << 10) + 304   # + one frame
            assert [await conn.recv() for _ in range(500)] == [b"%d" % i * 100
                                                              for i in range(500)]
    uvloop.run(asyncio.wait_for(main(), WAIT_S))


# ---------------------------------------------------------------- trio through anyio


def anyio_run(fn: Callable[[], Awaitable[None]], library: str) -> None:
    import anyio        # a test dependency, as trio (pyproject's test extra)

    async def bounded() -> None:
        with anyio.fail_after(WAIT_S):
            await fn()
    anyio.run(bounded, backend=library)


@pytest.mark.parametrize("library", ["trio", "asyncio"])
def test_anyio(make, library):
    anyio_run(lambda: exchange(make), library)


def test_trio_cancellation_and_timeouts(make):
    import anyio

    async def main() -> None:
        async with make() as server_ctx, make() as ctx:
            await server_ctx.serve("echo", echo)
            conn = await ctx.connect("echo")
            with anyio.move_on_after(0.05) as scope:    # a cancelled recv takes nothing
                await conn.recv()
            assert scope.cancelled_caught
            with anyio.CancelScope() as scope:          # nor does a cancelled connect
                scope.cancel()
                await ctx.connect("echo")
            assert len(ctx._conns) == 1
            await conn.send(b"after")
            assert await conn.recv() == b"after"
    anyio_run(main, "trio")


def test_trio_needs_the_context_entered(make):
    async def main() -> None:
        ctx = make()
        with pytest.raises(RuntimeError, match="async with pyipc.aio.Context"):
            await ctx.connect("echo")
        ctx.sync.close_all()
    anyio_run(main, "trio")


def test_a_context_is_used_from_its_trio_run_only(make):
    """Another trio run (in a thread) that uses a context bound to this run
    gets the documented RuntimeError (its connect() and send() were
    accepted, and the reply, woken from this run, crashed it: trio's
    AssertionError tore the context's task group down)."""
    import anyio
    import trio
    from pyipc.aio._context import OTHER_LOOP_TEXT

    async def main() -> None:
        async with make() as server_ctx, make() as ctx:
            await server_ctx.serve("echo", echo)
            conn = await ctx.connect("echo")
            calls: list[Callable[[], Awaitable[Any]]] = [
                lambda: ctx.connect("echo"), lambda: conn.send(b"x"), conn.recv, conn.close]

            async def each() -> list[str]:
                said = []
                for call in calls:
                    try:
                        with trio.fail_after(5):
                            await call()
                        said.append("returned")
                    except RuntimeError as e:
                        said.append(str(e))
                return said
            said = await anyio.to_thread.run_sync(trio.run, each)
            assert said == [OTHER_LOOP_TEXT] * len(calls)
            await conn.send(b"still ours")
            assert await conn.recv() == b"still ours"
    anyio_run(main, "trio")


def test_serve_without_a_context_under_trio_says_what_to_do(make, rundir, backend):
    """pyipc.aio.serve() without ctx= under trio: a RuntimeError that says
    to serve on a context entered first (it asked to enter the context
    serve() made itself, which the caller cannot), nothing left listening;
    serve(..., ctx=ctx) on an entered context serves."""
    import os

    async def main() -> None:
        with pytest.raises(RuntimeError) as info:
            await pyipc.aio.serve("echo", echo, rundir=rundir, backend=backend)
        assert "without ctx=" in str(info.value)
        assert "ctx.serve(name, handler)" in str(info.value)
        assert not os.path.exists(os.path.join(rundir, "echo"))
        async with make() as server_ctx, make() as ctx:
            await pyipc.aio.serve("echo", echo, ctx=server_ctx)
            conn = await ctx.connect("echo")
            await conn.send(b"served")
            assert await conn.recv() == b"served"
    anyio_run(main, "trio")
