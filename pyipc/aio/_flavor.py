"""The async library pyipc.aio runs on: asyncio (uvloop too), or trio through anyio.

All that pyipc.aio needs from it is here: watch the context's fd, make a
coroutine wait until it is woken, wake it, run a task, bound a wait in time,
and yield once. The rest of pyipc.aio is the same on both.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any, Awaitable, Callable, Coroutine, Optional

log = logging.getLogger("pyipc.aio")

#: A coroutine run as its own task (a service's handler); its cancel function.
TaskBody = Coroutine[Any, Any, None]
Cancel = Callable[[], None]


class Flavor:
    """What pyipc.aio asks of the async library (see the two below)."""

    name = "abstract"

    def owns_the_running_loop(self) -> bool:
        """Whether the caller runs where this flavor was made (same loop)."""
        raise NotImplementedError

    def watch(self, fd: int, on_ready: Callable[[], None]) -> None:
        """Call on_ready() whenever fd is readable, until unwatch()."""
        raise NotImplementedError

    def unwatch(self) -> None:
        """Stop calling on_ready (before the fd is closed)."""
        raise NotImplementedError

    async def wait(self, waiters: list[Any]) -> None:
        """Wait until wake(waiters) is called (or the caller is cancelled)."""
        raise NotImplementedError

    def wake(self, waiters: list[Any]) -> None:
        """Wake every coroutine waiting on `waiters` (they re-check what they
        wait for: a woken waiter is handed nothing, so a cancelled one loses
        nothing)."""
        raise NotImplementedError

    def spawn(self, body: TaskBody, on_done: Callable[[], None]) -> Cancel:
        """Run `body` as a task of its own; return the function that cancels
        it. `on_done()` runs once the task ended, however: also when it was
        cancelled before its first step (asyncio then never runs the body,
        so a `finally` of the body's would not run)."""
        raise NotImplementedError

    async def within(self, make: Callable[[], Awaitable[None]], seconds: float) -> bool:
        """Await make() for at most `seconds`: whether it finished in time."""
        raise NotImplementedError

    async def checkpoint(self) -> None:
        """Yield to the loop once (and let a pending cancellation in)."""
        raise NotImplementedError

    async def wait_readable(self, fd: int) -> None:
        """Wait until fd is readable (a one-off wait, not the context's fd)."""
        raise NotImplementedError

    async def wait_writable(self, fd: int) -> None:
        """Wait until fd is writable (a one-off wait)."""
        raise NotImplementedError


class AsyncioFlavor(Flavor):
    """asyncio and its drop-in loops (uvloop): loop.add_reader and futures."""

    name = "asyncio"

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._fd: Optional[int] = None
        self._tasks: set[asyncio.Task[None]] = set()   # strong refs, as asyncio asks

    def owns_the_running_loop(self) -> bool:
        try:
            return asyncio.get_running_loop() is self.loop
        except RuntimeError:
            return False

    def watch(self, fd: int, on_ready: Callable[[], None]) -> None:
        self.loop.add_reader(fd, on_ready)
        self._fd = fd

    def unwatch(self) -> None:
        if self._fd is not None and not self.loop.is_closed():
            self.loop.remove_reader(self._fd)
        self._fd = None

    async def wait(self, waiters: list[Any]) -> None:
        fut: asyncio.Future[None] = self.loop.create_future()
        waiters.append(fut)
        try:
            await fut
        finally:
            if not fut.done():          # cancelled: forget it (woken ones are gone already)
                waiters.remove(fut)

    def wake(self, waiters: list[Any]) -> None:
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)
        waiters.clear()

    def spawn(self, body: TaskBody, on_done: Callable[[], None]) -> Cancel:
        task = self.loop.create_task(body)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda _: on_done())

        def cancel() -> None:
            task.cancel()
        return cancel

    async def within(self, make: Callable[[], Awaitable[None]], seconds: float) -> bool:
        try:
            await asyncio.wait_for(make(), seconds)
            return True
        except asyncio.TimeoutError:
            return False

    async def checkpoint(self) -> None:
        await asyncio.sleep(0)

    async def wait_readable(self, fd: int) -> None:
        ready = self.loop.create_future()
        self.loop.add_reader(fd, ready.set_result, None)
        try:
            await ready
        finally:
            self.loop.remove_reader(fd)

    async def wait_writable(self, fd: int) -> None:
        ready = self.loop.create_future()
        self.loop.add_writer(fd, ready.set_result, None)
        try:
            await ready
        finally:
            self.loop.remove_writer(fd)


class AnyioFlavor(Flavor):
    """trio (or any anyio backend), through anyio: a task of the context's task
    group waits with anyio.wait_readable(fd); anyio.Event wakes waiters."""

    name = "anyio"

    def __init__(self, group: Any) -> None:
        import anyio            # only here: asyncio users need not install it
        self._anyio = anyio
        self._group = group
        self._watching: Optional[Any] = None     # the CancelScope of the fd's task
        self._fd = -1                             # the fd it watches
        #: The run it was made in: another trio run (in another thread) that
        #: used the context would have its waiters woken from this run, which
        #: trio refuses (an AssertionError that tore this run down).
        self._run = current_anyio_run()

    def owns_the_running_loop(self) -> bool:
        # Made only where no asyncio loop runs (trio): it is not asyncio's.
        return running_asyncio_loop() is None and current_anyio_run() == self._run

    def watch(self, fd: int, on_ready: Callable[[], None]) -> None:
        anyio = self._anyio
        scope = anyio.CancelScope()
        self._watching = scope

        async def pump() -> None:
            with scope:
                # Checked after each wait and each on_ready(): unwatch() may
                # have run meanwhile and the fd be closed (a wait on it then
                # raises EBADF from trio's epoll, before any cancellation).
                while not scope.cancel_called:
                    try:
                        await anyio.wait_readable(fd)
                    except anyio.ClosedResourceError:
                        return          # unwatch()'s notify_closing: the fd is being closed
                    if not scope.cancel_called:
                        on_ready()
        self._fd = fd
        self._group.start_soon(pump)

    def unwatch(self) -> None:
        if self._watching is not None:
            self._watching.cancel()
            self._watching = None
            # A pump waiting on the fd is woken now (ClosedResourceError),
            # as trio asks before a watched fd is closed.
            self._anyio.notify_closing(self._fd)

    async def wait(self, waiters: list[Any]) -> None:
        event = self._anyio.Event()
        waiters.append(event)
        try:
            await event.wait()
        finally:
            if not event.is_set():
                waiters.remove(event)

    def wake(self, waiters: list[Any]) -> None:
        for event in waiters:
            event.set()
        waiters.clear()

    def spawn(self, body: TaskBody, on_done: Callable[[], None]) -> Cancel:
        scope = self._anyio.CancelScope()

        async def run() -> None:
            try:
                with scope:
                    await body
            finally:
                on_done()
        self._group.start_soon(run)
        return scope.cancel

    async def within(self, make: Callable[[], Awaitable[None]], seconds: float) -> bool:
        with self._anyio.move_on_after(seconds) as scope:
            await make()
        return not scope.cancelled_caught

    async def checkpoint(self) -> None:
        await self._anyio.lowlevel.checkpoint()

    async def wait_readable(self, fd: int) -> None:
        await self._anyio.wait_readable(fd)

    async def wait_writable(self, fd: int) -> None:
        await self._anyio.wait_writable(fd)


def current_anyio_run() -> object:
    """What identifies the running anyio loop that is not asyncio's: trio's
    token for its run, else the library and the thread; None where no async
    library runs (a plain thread)."""
    import sniffio          # anyio's dependency: only under anyio
    try:
        library = sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        return None
    if library == "trio":
        import trio
        return trio.lowlevel.current_trio_token()
    return library, threading.get_ident()


#: The running asyncio loop or None, in one C call (asyncio's own
#: _get_running_loop: no exception when there is none).
get_running_loop: Callable[[], Optional[asyncio.AbstractEventLoop]] = \
    asyncio.events._get_running_loop
#: What a context's _loop is when no asyncio loop is its own: never the
#: running loop, nor None (so that the full check runs).
NOT_ASYNCIO = object()


def running_asyncio_loop() -> Optional[asyncio.AbstractEventLoop]:
    """The running asyncio loop, or None (under trio, or no loop at all)."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
