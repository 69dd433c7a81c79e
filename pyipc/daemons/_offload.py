"""Blocking work a daemon must not do in its loop (resolving a host name,
connecting to a remote host), run on worker threads; its result comes back
to the loop thread through a pipe the loop watches.

The workers are daemon threads, made when needed: a stop never waits for a
connect or a name lookup still running (a pool's threads would be joined at
exit), and as many calls run at once as a daemon may have dials in progress
(its --max-pending; websocketd's --max-handshakes), MAX_OFFLOAD_WORKERS at
least (offload_workers), so that slow dials to one host never make a dial to
another wait for a worker.
"""

from __future__ import annotations

import collections
import os
import threading
from typing import Any, Callable, Optional

from .._signal_wakeup import drain_pipe

#: Worker threads at most when a daemon's bound on dials in progress is
#: lower (the daemons' default --max-pending); more calls wait for a worker,
#: in order.
MAX_OFFLOAD_WORKERS = 256


def offload_workers(max_dials: int) -> int:
    """The worker threads of a daemon that has at most `max_dials` dials in
    progress: one each, so that dials to a hung host (at most its per-host
    share of them) never take every worker; MAX_OFFLOAD_WORKERS at least
    (threads are made only when needed: a larger pool costs nothing idle)."""
    return max(max_dials, MAX_OFFLOAD_WORKERS)

#: on_done(result, exception): exactly one of the two is None (result may be None too).
OnDone = Callable[[Any, Optional[BaseException]], None]
#: A call waiting for a worker: fn and its on_done.
_Job = tuple[Callable[[], Any], OnDone]


class Offloader:
    """Runs fn() on a worker thread, then on_done(result, exc) in the loop:
    the loop watches `wake_fd` (readable when a result is waiting) and calls
    run_finished()."""

    __slots__ = ("_waiting", "_workers", "_finished", "_lock", "wake_fd", "_wake_w",
                 "_closed", "max_workers")

    def __init__(self, max_workers: int = MAX_OFFLOAD_WORKERS) -> None:
        self.max_workers = max_workers
        self._waiting: collections.deque[_Job] = collections.deque()
        self._workers = 0                       # threads running (under _lock)
        self._finished: collections.deque[tuple[OnDone, Any, Optional[BaseException]]] = \
            collections.deque()
        self._lock = threading.Lock()           # orders a finish against close()
        self.wake_fd, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._closed = False

    def submit(self, fn: Callable[[], Any], on_done: OnDone) -> None:
        """Run fn() on a worker thread; on_done(result, exc) later in the loop."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the daemon is stopping: nothing more can be offloaded")
            if self._workers >= self.max_workers:
                self._waiting.append((fn, on_done))
                return
            self._workers += 1
        try:
            threading.Thread(target=self._work, args=((fn, on_done),), daemon=True,
                             name="pyipc-daemon-worker").start()
        except BaseException:               # e.g. "can't start new thread": the slot is free
            with self._lock:
                self._workers -= 1
            raise

    def _work(self, job: _Job) -> None:
        """On a worker thread: run the job, then the waiting ones, then end."""
        next_job: Optional[_Job] = job
        while next_job is not None:
            fn, on_done = next_job
            try:
                result, exc = fn(), None
            except BaseException as e:          # handed to on_done, as a future would
                result, exc = None, e
            self._finish(on_done, result, exc)
            next_job = self._next_job()

    def _next_job(self) -> Optional[_Job]:
        """The next waiting job for this worker, or None: it ends (counted out)."""
        with self._lock:
            if self._closed or not self._waiting:
                self._workers -= 1
                return None
            return self._waiting.popleft()

    def _finish(self, on_done: OnDone, result: Any, exc: Optional[BaseException]) -> None:
        """On the worker thread: park the outcome and wake the loop (never
        raises: the worker must go on to count itself out)."""
        with self._lock:
            if self._closed:
                return
            self._finished.append((on_done, result, exc))
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass    # full (BlockingIOError): the loop is already woken

    def run_finished(self) -> None:
        """In the loop: call on_done for every outcome parked so far."""
        drain_pipe(self.wake_fd)
        while self._finished:
            on_done, result, exc = self._finished.popleft()
            on_done(result, exc)

    def close(self) -> None:
        """Drop what has not finished (work already running is left to end on
        its own daemon thread; its outcome is discarded) and close the pipe's
        write end (the loop's context closes the read end it watches)."""
        with self._lock:
            self._closed = True
            self._finished.clear()
            self._waiting.clear()
            os.close(self._wake_w)
