"""Blocking work a daemon must not do in its loop (resolving a host name,
connecting to a remote host), run on worker threads; its result comes back
to the loop thread through a pipe the loop watches.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import threading
from typing import Any, Callable, Optional

from .._signal_wakeup import drain_pipe

#: Worker threads at most: more blocking calls than this wait for a free worker
#: (a daemon bounds its concurrent requests anyway, see ipcd --max-requests).
MAX_OFFLOAD_WORKERS = 16

#: on_done(result, exception): exactly one of the two is None (result may be None too).
OnDone = Callable[[Any, Optional[BaseException]], None]


class Offloader:
    """Runs fn() on a worker thread, then on_done(result, exc) in the loop:
    the loop watches `wake_fd` (readable when a result is waiting) and calls
    run_finished()."""

    __slots__ = ("_pool", "_finished", "_lock", "wake_fd", "_wake_w", "_closed")

    def __init__(self) -> None:
        self._pool: Optional[concurrent.futures.ThreadPoolExecutor] = None  # made when first used
        self._finished: collections.deque[tuple[OnDone, Any, Optional[BaseException]]] = \
            collections.deque()
        self._lock = threading.Lock()           # orders a finish against close()
        self.wake_fd, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._closed = False

    def submit(self, fn: Callable[[], Any], on_done: OnDone) -> None:
        """Run fn() on a worker thread; on_done(result, exc) later in the loop."""
        if self._closed:
            raise RuntimeError("the daemon is stopping: nothing more can be offloaded")
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                MAX_OFFLOAD_WORKERS, thread_name_prefix="pyipc-daemon")
        future = self._pool.submit(fn)
        future.add_done_callback(lambda f: self._finish(on_done, f))

    def _finish(self, on_done: OnDone, future: concurrent.futures.Future[Any]) -> None:
        """On the worker thread: park the outcome and wake the loop."""
        if future.cancelled():
            return                                  # close() dropped it
        exc = future.exception()
        with self._lock:
            if self._closed:
                return
            self._finished.append((on_done, None if exc else future.result(), exc))
            try:
                os.write(self._wake_w, b"x")
            except BlockingIOError:
                pass    # the pipe is full: the loop is already woken

    def run_finished(self) -> None:
        """In the loop: call on_done for every outcome parked so far."""
        drain_pipe(self.wake_fd)
        while self._finished:
            on_done, result, exc = self._finished.popleft()
            on_done(result, exc)

    def close(self) -> None:
        """Drop what has not finished (work already running is left to end on
        its own thread; its outcome is discarded) and close the pipe's write end
        (the loop's context closes the read end it watches)."""
        with self._lock:
            self._closed = True
            self._finished.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        os.close(self._wake_w)
