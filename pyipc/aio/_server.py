"""A service whose clients are each handled by a task: pyipc.aio.serve().

Shaped as asyncio.start_unix_server's Server: close(), close_clients(),
wait_closed(), serve_forever(), `async with`. A handler that returns has its
connection closed after what it sent has gone out; one that raises is
logged (a peer that left, ConnectionClosedError, is not an error); one that
is cancelled (close_clients(), the context's aclose()) has its connection
closed once what it sent is out too (at most `linger` seconds).
"""

from __future__ import annotations

import os
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Optional

from .._types import ConnectionClosedError
from ._connection import Connection
from ._flavor import Cancel, log

if TYPE_CHECKING:
    from ._context import Context

#: What serve() runs per client: `async def handler(conn): ...`.
Handler = Callable[[Connection], Awaitable[None]]

#: The connection whose handler the running task is (or was started by):
#: set in the handler's task, so the context's aclose() called from the
#: handler does not cancel it (its reply would be dropped, the stop
#: aborted at the handler's first await).
running_handler: ContextVar[Optional[Connection]] = ContextVar("running_handler", default=None)


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
        # Handler tasks, by connection (not by fd: a connection its client
        # left gives its number back while its handler may still run).
        self._cancels: dict[Connection, Cancel] = {}
        #: Connections of ended handlers closing once what they sent is out.
        self._closing: set[Connection] = set()
        #: Connections whose handler ended on its own (returned or raised).
        self._done: set[Connection] = set()
        #: Connections whose handler close_clients() cancelled: ours to close
        #: once their replies are out. Only those: a handler cancelled by
        #: anyone else later (asyncio.run's shutdown) is not.
        self._stopped: set[Connection] = set()
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
        self._cancels[conn] = self.ctx._spawn(self._run(conn), lambda: self._ended(conn))

    async def _run(self, conn: Connection) -> None:
        # The connection is closed by _ended once the task is over, not here:
        # a close here, cancelled by close_clients(), would drop the replies.
        running_handler.set(conn)       # this task's context only
        try:
            await self._handler(conn)
        except ConnectionClosedError:
            log.debug("service %s: client on fd %d left", self.name, conn.fd)
        except Exception:
            log.exception("service %s: the handler of fd %d failed", self.name, conn.fd)
        self._done.add(conn)

    def _ended(self, conn: Connection) -> None:
        """The handler task of `conn` ended, however (returned, raised, or
        cancelled: before its first step included, when its body never
        ran), and waiters see one handler fewer. Its connection is closed
        now if nothing it sent is unsent; else once that is out (at most
        `linger` seconds): a handler cancelled by close_clients() or the
        context's aclose() may have replied, and its reply is not dropped."""
        # Cancelled by someone else (asyncio.run's shutdown cancels every
        # task, then closes the loop): a close task started now would be
        # left pending on a closed loop; the connection is aborted, as before.
        ours = conn in self._done or conn in self._stopped
        self._done.discard(conn)
        self._stopped.discard(conn)
        if ours and conn.get_write_buffer_size() and self.ctx._flavor is not None:
            self._close_when_sent(conn)
        else:
            conn.abort()
        self._cancels.pop(conn, None)
        self._one_fewer()

    def _close_when_sent(self, conn: Connection) -> None:
        """conn.close() as a task of its own, which wait_closed() and the
        context's aclose() wait for."""
        self._closing.add(conn)

        def closed() -> None:
            self._closing.discard(conn)
            self._one_fewer()
        self.ctx._spawn(self._close_logged(conn), closed)

    async def _close_logged(self, conn: Connection) -> None:
        """conn.close(); a failure is logged, as a handler's is (it would
        escape the task: never retrieved, or a trio nursery torn down)."""
        try:
            await conn.close()
        except Exception:
            log.exception("service %s: closing fd %d failed", self.name, conn.fd)

    def _one_fewer(self) -> None:
        """A task of the server ended: waiters re-check; a closed server
        with none left is no longer the context's to stop."""
        if not self._serving and not self._cancels and not self._closing:
            self.ctx._closed_servers.discard(self)
        self.ctx._flavor_wake(self._waiters)

    def close(self) -> None:
        """Stop listening (the socket file is removed). Handlers go on."""
        if not self._serving:
            return
        self.ctx._check_loop()
        self._serving = False
        self.ctx._servers.pop(self.path, None)
        if self._cancels or self._closing:      # the context's aclose() still stops them
            self.ctx._closed_servers.add(self)
        if not self.ctx._closed or self.ctx._flavor is not None:
            self.ctx.sync.close(self.fd, linger=0)
        self.ctx._flavor_wake(self._waiters)

    def close_clients(self) -> None:
        """Cancel every handler task (their connections are closed once what
        they sent is out, at most `linger` seconds)."""
        self.ctx._check_loop()
        self._cancel_handlers(spare=None)

    def _cancel_handlers(self, spare: Optional[Connection]) -> None:
        """close_clients(), but the handler of `spare` goes on (the one
        that called the context's aclose())."""
        for conn, cancel in list(self._cancels.items()):
            if conn is not spare:
                self._stopped.add(conn)
                cancel()

    async def wait_closed(self) -> None:
        """Wait until closed, every handler has ended and their replies are
        out (at most `linger` seconds), or the context is closed (it cancels
        the handlers); then close the context too if serve() made it."""
        self.ctx._check_loop()
        while (self._serving or self._cancels or self._closing) and not self.ctx._shut():
            await self.ctx._wait(self._waiters)
        if self._owns_ctx:
            await self.ctx.aclose()

    async def serve_forever(self) -> None:
        """Wait until the server is closed; cancelled, it closes the server."""
        self.ctx._check_loop()
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
