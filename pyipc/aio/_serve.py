"""pyipc.aio.serve(): a Server on a context of its own (or on one given)."""

from __future__ import annotations

from typing import Any, Optional

from ._context import Context
from ._server import Handler, Server


async def serve(name: str, handler: Handler, *, ctx: Optional[Context] = None,
                **context_args: Any) -> Server:
    """Listen as service `name` and run `await handler(conn)` as a task for
    each client, as asyncio.start_unix_server does. `ctx`: a pyipc.aio.Context
    to serve on; else one is made from `context_args` (pyipc.Context's
    arguments: rundir, backend, ...) and closed with the server."""
    owns = ctx is None
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
