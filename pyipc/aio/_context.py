"""pyipc.aio.Context: a pyipc.Context driven by the running event loop.

The loop watches the context's fileno() (asyncio: loop.add_reader; trio:
anyio.wait_readable in a task of the context's own task group) and, when it
is readable, calls wait_events(timeout=0) until it returns [] (at most
MAX_ROUNDS times per wake-up: the fd is level-triggered, so what is left
wakes the loop again after the other callbacks and timers have run). Each
event goes where it belongs: a Connection's messages to its inbox, its
MESSAGE_TX to its count of unsent bytes, a new client of a Server to a new
handler task; every other event to the queue read by `events()`.
"""

from __future__ import annotations

import os
import select
import socket
import threading
from collections import deque
from typing import Any, Awaitable, Callable, NoReturn, Optional

from .._checks import as_payload, check_high_water, check_timeout
from .._context import NOT_COPIED, Context as SyncContext
from .._threads import BUSY_TEXT, RECHECK_S
from .._rundir import PathLike
from .._types import (DEFAULT_LINGER, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_MESSAGE_SIZE,
                      DEFAULT_MAX_QUEUE_SIZE, Event, EventType, IPCError, Payload,
                      UnknownFdError)
from ._connection import HEADER, Connection, closed_here
from ._ipcd import connect_through_ipcd, network
from ._flavor import NOT_ASYNCIO, AnyioFlavor, AsyncioFlavor, Flavor, TaskBody, Cancel, log, \
    get_running_loop, running_asyncio_loop

from ._server import Handler, Server, running_handler

#: send() waits while a connection has more unsent bytes than this (the
#: default of asyncio's transports), until it has at most a quarter of it.
DEFAULT_HIGH_WATER = 64 << 10
#: Seconds connect() waits for ipcd's answer by default (IPC_NETWORK set).
DEFAULT_IPCD_TIMEOUT = 10.0
#: wait_events(timeout=0) calls per wake-up of the loop at most (fairness: a
#: flood of messages cannot hold the loop's timers and other callbacks back).
MAX_ROUNDS = 16
#: While another thread is inside the context, the loop tries it again
#: after this many seconds, doubled each time up to MAX_RECHECK_S, in case
#: the wake-up at that thread's leaving was missed (see _watch_when_free).
MAX_RECHECK_S = 0.25

CLOSED_TEXT = "this pyipc.aio.Context is closed"
OTHER_LOOP_TEXT = ("this pyipc.aio.Context is bound to another event loop (it binds to "
                   "the loop that first uses it)")
NO_LOOP_TEXT = ("no running asyncio loop: under trio (through anyio), enter the context "
                "first with `async with pyipc.aio.Context() as ctx:` (its task group "
                "watches the context)")

_CONNECTION, _DISCONNECTION = EventType.CONNECTION, EventType.DISCONNECTION
_MESSAGE_RX, _MESSAGE_TX, _ERROR = EventType.MESSAGE_RX, EventType.MESSAGE_TX, EventType.ERROR
_EXTERNAL, _TIMER = EventType.EXTERNAL, EventType.TIMER


def _fileno(sync: SyncContext) -> int:
    return sync.fileno()


class _Waker:
    """A socket pair: wake() (from any thread) makes fileno() readable.
    Socket objects, not bare fds: a wake() after close() fails with
    OSError, never writes to a number reused meanwhile."""

    def __init__(self) -> None:
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)

    def fileno(self) -> int:
        return self._r.fileno()

    def wake(self, _: object = None) -> None:
        try:
            self._w.send(b"\0")
        except OSError:         # full (a wake-up is pending), or closed: done with
            pass

    def drain(self) -> None:
        try:
            self._r.recv(64)
        except OSError:
            pass

    def close(self) -> None:
        self._r.close()
        self._w.close()


def _still_readable(fd: int) -> bool:
    """Whether fd is readable now (or no longer open: that is for the
    caller to see); an EXTERNAL event handed out means a read will not block."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


class Context:
    """A `pyipc.Context` for async code: `async with pyipc.aio.Context() as ctx`.

    Same arguments as `pyipc.Context`, and `high_water` (bytes a connection
    may have unsent before send() waits; bytes of one fd's messages waiting
    unread, in a Connection or in the events() queue, before the fd is not
    read until they are down to a quarter). It binds to the running loop when
    first used (entered, connect, serve, events), not when made. `sync` is
    the underlying pyipc.Context. See docs/asyncio.md.
    """

    def __init__(self, rundir: Optional[PathLike] = None,
                 max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
                 backend: Optional[str] = None,
                 max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 linger: float = DEFAULT_LINGER, *,
                 high_water: int = DEFAULT_HIGH_WATER) -> None:
        check_high_water(high_water)
        #: The underlying pyipc.Context (its fds, timer, switches...).
        self.sync: SyncContext = SyncContext(rundir, max_message_size, backend,
                                             max_queue_size, max_connections, linger)
        self.high_water = high_water
        self._flavor: Optional[Flavor] = None
        #: The asyncio loop the context is bound to, for the per-call check
        #: (see _check_loop); NOT_ASYNCIO when unbound, closed or under trio.
        self._loop: object = NOT_ASYNCIO
        self._group: Any = None               # anyio's task group, when entered under trio
        self._closed = False
        self._conns: dict[int, Connection] = {}
        self._servers: dict[str, Server] = {}     # by socket path
        #: Servers closed (no longer in _servers) whose handlers still run:
        #: aclose() stops them too, as it stops the serving ones.
        self._closed_servers: set[Server] = set()
        self._events: deque[Event] = deque()
        #: External fds with an EXTERNAL event in _events not taken yet: the
        #: core reports one each round while the fd is readable, and a loop
        #: wake makes several rounds; one queued at a time says it all (more
        #: would be stale: a read on the fd they name would block).
        self._external_queued: set[int] = set()
        #: A TIMER waits in _events: the loop reads the context at every
        #: wake-up, so a short timer nobody reads would pile up TIMERs
        #: (~1,000 a second at 1 ms), stale ones; one says "time passed",
        #: as the sync API's wait_events() returns at most one a call.
        self._timer_queued = False
        # Receiving back-pressure for the fds whose messages come out of
        # events() (clients of a service_init() service...), as a
        # Connection's inbox has it: bytes of their MESSAGE_RX waiting in
        # _events (headers included), by fd; the fds not read meanwhile
        # (pause_reading) because more than high_water of theirs waits.
        self._queued_bytes: dict[int, int] = {}
        self._queue_paused: set[int] = set()
        self._event_waiters: list[Any] = []
        #: Messages that schedule() queued for fds that are not Connections
        #: (clients of a service_init() service...) and whose MESSAGE_TX has
        #: not come, by fd: aclose() lets them go out as a Connection's
        #: drain() does. Any thread may schedule(): the lock keeps the
        #: counts whole; waiters (the loop's) are woken when one ends.
        self._scheduled: dict[int, int] = {}
        self._scheduled_lock = threading.Lock()
        self._scheduled_waiters: list[Any] = []
        self._failure: Optional[Exception] = None

    def __repr__(self) -> str:
        return (f"<pyipc.aio.Context backend={self.sync.backend} rundir={self.sync.rundir!r} "
                f"connections={len(self._conns)}>")

    @property
    def backend(self) -> str:
        """"native" or "pure"."""
        return self.sync.backend

    @property
    def rundir(self) -> str:
        """The run directory."""
        return self.sync.rundir

    # -- binding to the loop -----------------------------------------------------------
    def _bind(self) -> Flavor:
        """The flavor of the running loop: bound now if this is the first use."""
        if self._closed:
            raise IPCError(CLOSED_TEXT)
        flavor = self._flavor
        if flavor is not None:
            if not flavor.owns_the_running_loop():
                raise RuntimeError(OTHER_LOOP_TEXT)
            return flavor
        loop = running_asyncio_loop()
        if loop is None:
            raise RuntimeError(NO_LOOP_TEXT)
        return self._start(AsyncioFlavor(loop))

    def _check_loop(self) -> None:
        """RuntimeError when the caller is not in the loop (thread, trio run)
        the context is bound to: its objects are that loop's alone (their
        counts and waiters are not locked; a waiter woken from elsewhere is
        never woken, or crashes trio). Every public method of Connection
        and Server calls it first; a closed or unbound context has nothing
        to check. The per-message calls (send, recv, drain, _wait) first
        compare the running asyncio loop with _loop themselves (one C call:
        this method costs 0.24 us, called about six times a message) and
        call this only when it is not the one."""
        flavor = self._flavor
        if flavor is not None and not flavor.owns_the_running_loop():
            raise RuntimeError(OTHER_LOOP_TEXT)

    def _start(self, flavor: Flavor) -> Flavor:
        self._flavor = flavor
        self._loop = flavor.loop if isinstance(flavor, AsyncioFlavor) else NOT_ASYNCIO
        flavor.watch(self.sync.fileno(), self._on_ready)
        return flavor

    def __reduce_ex__(self, protocol: object) -> NoReturn:
        """Not pickled or copied, as pyipc.Context (a copy would share its
        loop's state and the underlying context)."""
        raise TypeError(NOT_COPIED.format("pyipc.aio.Context"))

    async def __aenter__(self) -> "Context":
        if running_asyncio_loop() is not None or self._flavor is not None:
            self._bind()
            return self
        import anyio            # trio (or another anyio backend): a task group of our own
        group = anyio.create_task_group()
        await group.__aenter__()
        self._group = group
        self._start(AnyioFlavor(group))
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self.aclose()
        finally:
            group, self._group = self._group, None
            if group is not None:
                group.cancel_scope.cancel()
                await group.__aexit__(None, None, None)

    # -- what connections and servers ask of it ------------------------------------------
    async def _wait(self, waiters: list[Any]) -> None:
        if get_running_loop() is not self._loop:
            self._check_loop()
        if self._failure is not None:
            raise self._failure
        flavor = self._flavor
        if flavor is None:
            raise IPCError(CLOSED_TEXT)
        await flavor.wait(waiters)

    def _shut(self) -> bool:
        """Whether aclose() has finished (or given up): nothing will wake a
        waiter any more, so a Server's wait_closed() returns."""
        return self._closed and self._flavor is None

    def _flavor_wake(self, waiters: list[Any]) -> None:
        if waiters and self._flavor is not None:
            self._flavor.wake(waiters)

    async def _within(self, make: Callable[[], Awaitable[None]], seconds: float) -> bool:
        assert self._flavor is not None
        return await self._flavor.within(make, seconds)

    def _spawn(self, body: TaskBody, on_done: Callable[[], None]) -> Cancel:
        assert self._flavor is not None
        return self._flavor.spawn(body, on_done)

    def _adopt(self, fd: int) -> Connection:
        """A Connection for fd, a new connection of ctx.sync. On a closed
        context (aclose() ran while connect() awaited) nothing would ever
        drive or close it: the fd is closed and IPCError raised, as any
        call on a closed context raises."""
        if self._closed:
            try:
                self.sync.close(fd, linger=0)
            except IPCError:
                pass                # closed with the others already
            raise IPCError(CLOSED_TEXT)
        stale = self._conns.get(fd)
        if stale is not None:
            self._end_stale(stale)
        conn = Connection(self, fd, self.high_water)
        self._conns[fd] = conn
        self._forget_scheduled(fd)          # counted for a fd that had the number
        self._queue_paused.discard(fd)      # a number events() had: the Connection's now
        return conn

    def _written_for(self, fd: int, wake: bool = True) -> None:
        """One message schedule() counted for fd (not a Connection's) is
        written, or was not queued. Never below 0: a MESSAGE_TX of a
        message queued through ctx.sync.schedule() was not counted."""
        with self._scheduled_lock:
            left = self._scheduled.get(fd, 0) - 1
            if left > 0:
                self._scheduled[fd] = left
            else:
                self._scheduled.pop(fd, None)
        if left <= 0 and wake:
            self._flavor_wake(self._scheduled_waiters)

    def _forget_scheduled(self, fd: int) -> None:
        """fd ended, or its number is a new fd's: nothing counted for it
        will go out (the loop's call)."""
        with self._scheduled_lock:
            if self._scheduled.pop(fd, None) is None:
                return
        self._flavor_wake(self._scheduled_waiters)

    def _forget_closed_scheduled(self) -> None:
        """Forget the counts of fds closed through ctx.sync.close() (no event
        says so; close() sent what it could): the context no longer knows
        them (UnknownFdError). A fd that cannot say (not a Unix socket) is
        waited for."""
        for fd in list(self._scheduled):
            try:
                self.sync.peer_credentials(fd)
            except UnknownFdError:
                self._forget_scheduled(fd)
            except IPCError:
                pass

    def _forget(self, fd: int) -> None:
        self._conns.pop(fd, None)

    def _end_stale(self, conn: Connection) -> None:
        """conn's fd number is a new connection's: its fd was closed behind
        this layer's back (ctx.sync.close(), which no event reports), so
        conn has ended. Left in _conns, it would be handed the new peer's
        messages, and a new client would not reach its Server."""
        del self._conns[conn.fd]
        conn._end(closed_here(conn.fd))

    # -- the loop's callback ---------------------------------------------------------------
    def _on_ready(self) -> None:
        """The context's fd is readable: handle what is ready (see the module doc)."""
        wait_events, dispatch = self.sync.wait_events, self._dispatch
        for _ in range(MAX_ROUNDS):
            try:
                events = wait_events(timeout=0)
            except IPCError as exc:
                if exc.args != (BUSY_TEXT,):
                    self._fail(exc)     # e.g. a switch callback's: every waiter sees it
                    return
                events = []             # another thread's read... is inside: see below
            except Exception as exc:
                self._fail(exc)
                return
            if not events:
                # [] also when another thread's call (a write, a read through
                # asyncio.to_thread) holds the context: its events wait, the fd
                # stays readable, and the loop would spin. Stop watching until
                # it leaves (if it left already, the fd wakes the loop again).
                if self.sync._guard.held():
                    self._watch_when_free()
                return
            for ev in events:
                dispatch(ev)

    def _watch_when_free(self) -> None:
        """Another thread is inside ctx.sync: stop watching its fd, and
        watch it again once that thread's call ends (the loop must not wait
        for it: that call may need the loop, e.g. a write to a peer served
        by it). The thread's call ends by making the calls handed over to
        it (see pyipc/_threads.py): one of them wakes this loop (_Waker).
        That hand-over can be missed (queued as the thread leaves), so the
        wait also gives up after RECHECK_S, doubling up to MAX_RECHECK_S,
        and tries the context again: no missed events, no busy loop while
        the thread's call lasts."""
        flavor, sync = self._flavor, self.sync
        if flavor is None:
            return
        guard = sync._guard
        flavor.unwatch()
        waker: list[_Waker] = []        # made only if the thread is still inside

        def ours() -> bool:     # not closed nor failed meanwhile: still to watch
            return self._flavor is flavor and not self._closed and self._failure is None

        async def rewatch() -> None:
            delay = RECHECK_S
            item = None
            while ours():
                got, fd = guard.try_call(sync, _fileno)
                if got:
                    flavor.watch(fd, self._on_ready)
                    return
                if not waker:
                    waker.append(_Waker())
                if item is None or not item.done.locked():     # none pending
                    item = guard.when_free(sync, waker[0].wake)
                await flavor.within(lambda: flavor.wait_readable(waker[0].fileno()), delay)
                waker[0].drain()
                delay = min(delay * 2, MAX_RECHECK_S)

        def done() -> None:             # however the task ended (cancelled before its start too)
            if waker:
                waker[0].close()
        self._spawn(rewatch(), done)

    def _dispatch(self, ev: Event) -> None:
        kind = ev.type
        conn = self._conns.get(ev.fd)
        if conn is not None and kind is _CONNECTION:
            self._end_stale(conn)       # a new client on a number closed through ctx.sync
            conn = None
        if conn is not None:
            if kind is _MESSAGE_RX:
                conn._received(ev.message)          # type: ignore[arg-type]
            elif kind is _MESSAGE_TX:
                conn._written()
            elif kind is _DISCONNECTION:
                del self._conns[ev.fd]
                conn._disconnected()
            elif kind is _ERROR:
                conn.error = ev.error
            else:
                self._queue(ev)
            return
        if kind is _CONNECTION or kind is _DISCONNECTION:
            # A new connection on this number is not paused; an ended one
            # took its pause with it (its messages still queued count on).
            self._queue_paused.discard(ev.fd)
            self._forget_scheduled(ev.fd)        # an ended fd sends no more
        elif kind is _MESSAGE_TX and self._scheduled:
            self._written_for(ev.fd)
        if kind is _CONNECTION and self._servers:
            server = self._server_of(ev.fd)
            if server is not None:
                server._accept(self._adopt(ev.fd))
                return
        self._queue(ev)

    def _server_of(self, fd: int) -> Optional[Server]:
        """The Server that accepted client fd (the socket's local address is
        the service's path). Asked for every client, even with one Server:
        a service made on ctx.sync (not seen here) may have taken it."""
        sock = socket.socket(fileno=fd)
        try:
            path = sock.getsockname()
        except OSError:
            return None
        finally:
            sock.detach()
        return self._servers.get(os.fsdecode(path))

    def _queue(self, ev: Event) -> None:
        if ev.type is _TIMER:
            if self._timer_queued:
                return
            self._timer_queued = True
        elif ev.type is _EXTERNAL:
            if ev.fd in self._external_queued:
                return
            self._external_queued.add(ev.fd)
            self._watch_external(ev.fd, False)  # until taken: no event, no busy loop
        elif ev.type is _MESSAGE_RX:
            # Counted inline (every message comes here): past the high-water
            # mark fd is not read until _count_taken brings it down.
            fd = ev.fd
            queued = self._queued_bytes.get(fd, 0) + HEADER + len(ev.message)  # type: ignore[arg-type]
            self._queued_bytes[fd] = queued
            if queued > self.high_water and fd not in self._queue_paused:
                self._queue_paused.add(fd)
                self._pause(fd, True)
        self._events.append(ev)
        self._flavor_wake(self._event_waiters)

    def _count_taken(self, fd: int, size: int) -> None:
        """`size` bytes of fd's messages left the queue (a MESSAGE_RX taken):
        fd, not read past the high-water mark (see _queue), is read again
        at a quarter of it (as a Connection's inbox is)."""
        queued = self._queued_bytes.get(fd, 0) - size
        if queued > 0:
            self._queued_bytes[fd] = queued
        else:
            self._queued_bytes.pop(fd, None)
        if fd in self._queue_paused and queued <= self.high_water // 4:
            self._queue_paused.discard(fd)
            self._pause(fd, False)

    def _pause(self, fd: int, paused: bool) -> None:
        try:
            self.sync.pause_reading(fd, paused)
        except IPCError:
            pass                # ended meanwhile: its events say so

    def _watch_external(self, fd: int, on: bool) -> None:
        """Watch external fd again, or not while an EXTERNAL for it waits
        to be taken (the core reports one each round while the fd is
        readable: the loop would spin)."""
        try:
            self.sync.pause_reading(fd, not on)
        except IPCError:
            pass                # closed meanwhile: nothing to watch

    def _fail(self, exc: Exception) -> None:
        log.error("pyipc.aio: the context's event loop failed: %r", exc)
        self._failure = exc
        if self._flavor is not None:
            self._flavor.unwatch()
        for conn in list(self._conns.values()):
            self._flavor_wake(conn._rx_waiters)
            self._flavor_wake(conn._tx_waiters)
        self._flavor_wake(self._event_waiters)

    # -- the API -----------------------------------------------------------------------------
    async def connect(self, name: str, timeout: Optional[float] = None) -> Connection:
        """A Connection to service `name`. Direct (connect_service, which
        waits only while the service's listen backlog is full, for at most
        `timeout` seconds when given, blocking the loop), or through ipcd
        when IPC_NETWORK is set: then the loop awaits the exchange with ipcd
        (a long request sent as ipcd reads it, then its answer: ipcd may
        reach another host) for at most `timeout` seconds (default
        DEFAULT_IPCD_TIMEOUT), serving everything else meanwhile."""
        timeout = check_timeout(timeout)    # as the sync connect(): before anything is sent
        flavor = self._bind()
        await flavor.checkpoint()           # a cancelled connect() connects nothing
        self._bind()                        # closed meanwhile: connect nothing
        rules = network()
        if rules is None:
            fd = self.sync._connect_direct(name, timeout)
        else:
            fd = await connect_through_ipcd(
                self, name, rules, DEFAULT_IPCD_TIMEOUT if timeout is None else timeout)
        return self._adopt(fd)

    async def serve(self, name: str, handler: Handler) -> Server:
        """Listen as service `name`; run `await handler(conn)` as a task per client."""
        self._bind()
        return Server(self, name, handler, owns_ctx=False)

    def service_init(self, name: str) -> int:
        """Listen as service `name` without a handler: its clients' events
        come out of `events()` (libIPC's single-loop style)."""
        self._bind()
        return self.sync.service_init(name)

    def schedule(self, fd: int, payload: Payload) -> None:
        """Queue a message for fd (sync.schedule; the loop sends it), at
        once: no back-pressure wait. Any thread may call it, except on a
        Connection's fd: there the message is counted in the connection's
        unsent bytes as send() counts its own (each MESSAGE_TX takes the
        oldest count off: uncounted, its MESSAGE_TX would take a send()'s,
        and drain()/close() would drop that send()'s message as written),
        and those counts are the loop's (RuntimeError from elsewhere)."""
        conn = self._conns.get(fd)
        if conn is None:
            # Counted before it is queued: its MESSAGE_TX (the loop's) can
            # only come after, so the count never misses it.
            with self._scheduled_lock:
                self._scheduled[fd] = self._scheduled.get(fd, 0) + 1
            try:
                self.sync.schedule(fd, payload)
            except BaseException:
                self._written_for(fd, wake=self._flavor is not None
                                  and self._flavor.owns_the_running_loop())
                raise
            return
        if get_running_loop() is not self._loop:        # (see _check_loop)
            self._check_loop()
        conn._check_open()
        conn._schedule(as_payload(payload))

    async def wait_event(self) -> Event:
        """The next event that no Connection or Server took (CONNECTION of a
        service made by service_init, its clients' messages, TIMER, EXTERNAL,
        switching...). Cancelled, it has taken nothing."""
        self._bind()
        while True:
            while not self._events:
                await self._wait(self._event_waiters)
            ev = self._events.popleft()
            if ev.type is _TIMER:
                self._timer_queued = False
            elif ev.type is _MESSAGE_RX:
                self._count_taken(ev.fd, HEADER + len(ev.message))  # type: ignore[arg-type]
            if ev.type is not _EXTERNAL:
                return ev
            self._external_queued.discard(ev.fd)
            self._watch_external(ev.fd, True)
            if _still_readable(ev.fd):      # else stale: the caller read it since
                return ev

    def events(self) -> "EventStream":
        """`async for ev in ctx.events()`: wait_event() forever."""
        return EventStream(self)

    async def aclose(self) -> None:
        """Stop the servers, closed ones included (their handlers are
        cancelled and awaited, but not the handler that calls it), let
        what is scheduled go out (at most `linger` seconds in all), close
        every fd. If the context's loop failed (a switch callback raised),
        the handlers are awaited all the same, nothing can go out any
        more, and the failure is raised once every fd is closed. In a
        forked child it closes the child's copies of the fds only."""
        if self._closed:
            return
        if self.sync._guard.forked:
            self._close_in_forked_child()
            return
        self._check_loop()
        self._closed = True
        conns = list(self._conns.values())
        try:
            servers = await self._stop_servers()
            self._forget_closed_scheduled()
            if self._failure is None and self._flavor is not None and (
                    any(c.get_write_buffer_size() for c in conns)
                    or any(s._closing for s in servers) or self._scheduled):
                async def drained() -> None:
                    for conn in conns:
                        await conn.drain()
                    for server in servers:      # their handlers' replies go out
                        while server._closing:
                            await self._wait(server._waiters)
                    while self._scheduled:      # what schedule() queued for other fds
                        await self._wait(self._scheduled_waiters)
                await self._flavor.within(drained, self.sync.linger)
        finally:
            self._close_now(conns)
        if self._failure is not None:
            raise self._failure

    def _close_in_forked_child(self) -> None:
        """aclose() in a forked child (the at-fork hook marked ctx.sync): the
        loop is the parent's copy (its epoll is shared with the parent:
        un-watching the fd here would un-watch it there), and so are the
        handlers and waiters; none is touched. Only the child's copies of
        the fds are closed, as the sync close_all() does in a child."""
        self._closed = True
        self._flavor = None                 # no waiter is woken, nothing watched
        self._loop = NOT_ASYNCIO
        for conn in self._conns.values():
            conn._end(closed_here(conn.fd))
        self._conns.clear()
        self._scheduled.clear()
        self.sync.close_all()

    async def _stop_servers(self) -> list[Server]:
        """Close every server (closed ones have handlers left), cancel their
        handlers and wait until they ended; the servers."""
        servers = list(self._servers.values()) + list(self._closed_servers)
        # A handler that calls aclose() is not cancelled, nor waited for
        # (it waits for us): its replies are drained with the others.
        me = running_handler.get()
        for server in servers:
            server.close()
            server._cancel_handlers(spare=me)
        flavor = self._flavor
        for server in servers:          # their handlers' cleanup runs now
            while flavor is not None and any(conn is not me for conn in server._cancels):
                # Not _wait(): after a failure of the loop it raises at once,
                # and aclose() returned with the handlers still running.
                await flavor.wait(server._waiters)
        return servers

    def _close_now(self, conns: list[Connection]) -> None:
        if self._flavor is not None:
            self._flavor.unwatch()
        linger, self.sync.linger = self.sync.linger, 0     # what could go out has
        try:
            self.sync.close_all()
        finally:
            self.sync.linger = linger
        for conn in conns + list(self._conns.values()):
            if not conn.closed:
                conn._end(f"connection on fd {conn.fd} is closed")
        self._conns.clear()
        self._scheduled.clear()                 # closed: none of it goes out any more
        self._flavor_wake(self._event_waiters)
        # Last chance to wake a server's wait_closed(): a handler that ends
        # after this cannot (aclose() cancelled while it waited for one).
        for server in list(self._servers.values()) + list(self._closed_servers):
            self._flavor_wake(server._waiters)
        self._flavor = None
        self._loop = NOT_ASYNCIO


class EventStream:
    """`ctx.events()`: an async iterator of wait_event(). Not a generator, so
    that cancelling one `__anext__` leaves it usable (and loses no event)."""

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx

    def __aiter__(self) -> "EventStream":
        return self

    async def __anext__(self) -> Event:
        return await self._ctx.wait_event()
