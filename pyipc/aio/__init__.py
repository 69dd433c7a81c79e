"""pyipc for asyncio (and uvloop, and trio through anyio).

    async with pyipc.aio.Context() as ctx:
        conn = await ctx.connect("pong")
        await conn.send(b"hello")
        print(await conn.recv())

    server = await pyipc.aio.serve("pong", handler)   # handler(conn) per client

A `pyipc.aio.Context` wraps a `pyipc.Context` and lets the running loop drive
it through `fileno()`; see docs/asyncio.md.
"""

from .._checks import MAX_HIGH_WATER
from ._connection import Connection
from ._context import DEFAULT_HIGH_WATER, DEFAULT_IPCD_TIMEOUT, Context, EventStream
from ._serve import serve
from ._server import Handler, Server

__all__ = ["Context", "Connection", "Server", "EventStream", "Handler", "serve",
           "DEFAULT_HIGH_WATER", "DEFAULT_IPCD_TIMEOUT", "MAX_HIGH_WATER"]
