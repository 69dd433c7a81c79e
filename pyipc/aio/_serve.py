"""pyipc.aio.serve(): a Server on a context of its own (or on one given)."""

from __future__ import annotations

from typing import Any, Optional

from ._context import Context
from ._flavor import running_asyncio_loop
from ._server import Handler, Server

#: serve() without ctx= under trio: the context it would make needs its task
#: group entered (and left) by the caller's task, which serve() cannot do.
SERVE_UNDER_TRIO_TEXT = (
    "pyipc.aio.serve() without ctx= runs under asyncio (or uvloop) only: under trio "
    "(through anyio), serve on a context entered first: `async with pyipc.aio.Context() "
    "as ctx: server = await ctx.serve(name, handler)` (or serve(name, handler, ctx=ctx))")


async def serve(name: str, handler: Handler, *, ctx: Optional[Context] = None,
                **context_args: Any) -> Server:
    """Listen as service `name` and run `await handler(conn)` as a task for
    each client, as asyncio.start_unix_server does. `ctx`: a pyipc.aio.Context
    to serve on; else one is made from `context_args` (pyipc.Context's
    arguments: rundir, backend, ...) and closed with the server (under
    asyncio only: under trio, RuntimeError; give it an entered `ctx`)."""
    owns = ctx is None
    if owns and running_asyncio_loop() is None:
        raise RuntimeError(SERVE_UNDER_TRIO_TEXT)
    if ctx is None:
        ctx = Context(**context_args)
    elif context_args:
        raise TypeError("serve() takes either ctx or the arguments of a new Context")
    try:
        ctx._bind()
        return Server(ctx, name, handler, owns)
    except BaseException:
        if owns:
            await ctx.aclose()
        raise
