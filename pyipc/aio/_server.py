"""A service whose clients are each handled by a task: pyipc.aio.serve().

Shaped as asyncio.start_unix_server's Server: close(), close_clients(),
wait_closed(), serve_forever(), `async with`. A handler that returns has its
connection closed after what it sent has gone out; one that raises is
logged (a peer that left, ConnectionClosedError, is not an error).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from .._types import ConnectionClosedError
from ._connection import Connection
from ._flavor import Cancel, log

if TYPE_CHECKING:
    from ._context import Context

#: What serve() runs per client: `async def handler(conn): ...`.
Handler = Callable[[Connection], Awaitable[None]]


class Server:
    """A service of a pyipc.aio.Context with a handler task per client
    (made by `pyipc.aio.serve` or `ctx.serve`)."""

    def __init__(self, ctx: "Context", name: str, handler: Handler, owns_ctx: bool) -> None:
        self.ctx = ctx
        self.name = name
        #: The listening fd, and the socket's path.
        self.fd = ctx.sync.service_init(name)
        self.path = os.path.join(ctx.sync.rundir, name)
        self._handler = handler
        self._owns_ctx = owns_ctx
        self._serving = True
        self._cancels: dict[int, Cancel] = {}      # handler tasks, by connection fd
        self._waiters: list[Any] = []              # woken when closed or a handler ends
        ctx._servers[self.path] = self

    def __repr__(self) -> str:
        return f"<pyipc.aio.Server {self.name!r} serving={self._serving} clients={len(self._cancels)}>"

    def is_serving(self) -> bool:
        """Whether it still accepts clients."""
        return self._serving

    def _accept(self, conn: Connection) -> None:
        if not self._serving:           # a client that came in as we closed
            conn.abort()
            return
        cancel = self.ctx._spawn(self._run(conn), lambda: self._ended(conn, cancel))
        self._cancels[conn.fd] = cancel

    async def _run(self, conn: Connection) -> None:
        try:
            await self._handler(conn)
            await conn.close()
        except ConnectionClosedError:
            log.debug("service %s: client on fd %d left", self.name, conn.fd)
        except Exception:
            log.exception("service %s: the handler of fd %d failed", self.name, conn.fd)

    def _ended(self, conn: Connection, cancel: Cancel) -> None:
        """The handler task of `conn` ended, however (a task cancelled before
        it started included: its body never ran): the connection is closed
        now, without lingering, and waiters see one handler fewer."""
        conn.abort()
        if self._cancels.get(conn.fd) is cancel:    # (the fd may be another's by now)
            del self._cancels[conn.fd]
        self._one_fewer()

    def _one_fewer(self) -> None:
        """A task of the server ended: waiters re-check; a closed server
        with none left is no longer the context's to stop."""
        if not self._serving and not self._cancels:
            self.ctx._closed_servers.discard(self)
        self.ctx._flavor_wake(self._waiters)

    def close(self) -> None:
        """Stop listening (the socket file is removed). Handlers go on."""
        if not self._serving:
            return
        self._serving = False
        self.ctx._servers.pop(self.path, None)
        if self._cancels:       # the context's aclose() still stops its handlers
            self.ctx._closed_servers.add(self)
        if not self.ctx._closed or self.ctx._flavor is not None:
            self.ctx.sync.close(self.fd, linger=0)
        self.ctx._flavor_wake(self._waiters)

    def close_clients(self) -> None:
        """Cancel every handler task (their connections are closed)."""
        for cancel in list(self._cancels.values()):
            cancel()

    async def wait_closed(self) -> None:
        """Wait until closed and every handler has ended, or the context is
        closed (it cancels the handlers); then close the context too if
        serve() made it."""
        while (self._serving or self._cancels) and not self.ctx._shut():
            await self.ctx._wait(self._waiters)
        if self._owns_ctx:
            await self.ctx.aclose()

    async def serve_forever(self) -> None:
        """Wait until the server is closed; cancelled, it closes the server."""
        try:
            while self._serving:
                await self.ctx._wait(self._waiters)
        except BaseException:
            self.close()
            raise

    async def __aenter__(self) -> "Server":
        return self

    async def __aexit__(self, *exc: object) -> None:
        """close(), close_clients(), wait_closed()."""
        self.close()
        self.close_clients()
        await self.wait_closed()
