"""What every pyipc daemon shares: one Context run as a foreground event loop,
a clean stop (SIGTERM, SIGINT, or stop() from any thread), logging, and
systemd readiness.

A daemon subclasses Daemon, opens what it serves in `setup()`, handles each
event in `on_event()`, and releases what it holds in `teardown()`. It may ask
for a callback later (`call_later`, for deadlines) and run blocking work on a
worker thread (`offload`); both callbacks run in the loop's thread, between two
events, so a daemon's state needs no lock. run() is the
loop; the CLI subcommands (pyipc ipcd, tcpd, websocketd) only parse options,
build the daemon and call run().
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import threading
import time
from types import FrameType
from typing import Any, Callable, Iterable, Optional

from .. import Context, Event, EventType, _rundir
from . import _systemd
from .._signal_wakeup import SignalWakeup, drain_pipe
from .._types import IPCD_SERVICE
from ._graceful_close import GracefulCloser
from ._offload import MAX_OFFLOAD_WORKERS, Offloader, OnDone, offload_workers
from ._timers import TimerHandle, Timers

#: The services the pyipc daemons serve themselves, each a dialer: ipcd's
#: `ipc`, tcpd's `tcp`, tlsd's `tls`, websocketd's `ws` and `wss`. Exposed,
#: any remote peer could make this host connect anywhere (an open proxy, a
#: port scanner), so check_exposed refuses them.
DAEMON_SERVICES = frozenset({IPCD_SERVICE, "tcp", "tls", "ws", "wss"})


class Daemon:
    """A foreground daemon on one pyipc Context.

    `ready` is set once setup() is done and the daemon serves (tests wait on
    it; systemd gets READY=1 at the same moment). stop() may be called from any
    thread or a signal handler: it only writes a byte to a pipe the loop
    watches, so the loop ends between two events, never inside one.
    """

    #: The logger's name suffix and the daemon's name in messages.
    name = "daemon"

    def __init__(self, *, rundir: Optional[str] = None, backend: Optional[str] = None,
                 max_offloads: int = MAX_OFFLOAD_WORKERS, **context_options: Any) -> None:
        """`context_options` go to the daemon's Context (e.g. max_message_size,
        max_queue_size, when the daemon's bounds are not pyipc's defaults).
        `max_offloads`: the offloads the daemon may have running at once (its
        bound on dials in progress): the workers are offload_workers() of it."""
        self.log = logging.getLogger(f"pyipc.daemons.{self.name}")
        self.ctx = Context(rundir=rundir, backend=backend, **context_options)
        self.ready = threading.Event()
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._wakeup = SignalWakeup()       # see pyipc/_signal_wakeup.py
        self._offloader = Offloader(offload_workers(max_offloads))
        # Read ends this object closes itself until the context watches them
        # (then close_all() closes them).
        self._unwatched = [self._stop_r, self._wakeup.fd, self._offloader.wake_fd]
        self._stopping = False
        self._finishing = False           # serving in teardown (serve_while)
        self._timers = Timers()
        self._closer = GracefulCloser(self.ctx, self.call_later, self.cancel)

    # ------------------------------------------------------------ for daemons

    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle:
        """Run callback() in the loop's thread `delay` seconds from now (or
        later, between two events). Only from the loop's thread. An exception
        it raises is logged; the daemon goes on."""
        return self._timers.call_later(delay, functools.partial(self._guarded, callback))

    def cancel(self, handle: TimerHandle) -> None:
        """Never run a callback asked for with call_later (no effect once run)."""
        self._timers.cancel(handle)

    def close_gracefully(self, fd: int) -> None:
        """From a switched TCP socket's DISCONNECTION: keep it open until its
        peer closed its side too (_graceful_close.py), so that what was
        written to it is not lost to a reset."""
        self._closer.close(fd)

    def offload(self, fn: Callable[[], Any], on_done: OnDone) -> None:
        """Run the blocking fn() on a worker thread, then on_done(result, exc)
        in the loop's thread (exc is the exception fn raised, else None). What
        has not finished when the daemon stops is dropped. An exception
        on_done raises is logged; the daemon goes on."""
        self._offloader.submit(fn, functools.partial(self._guarded, on_done))

    def _guarded(self, callback: Callable[..., None], *args: Any) -> None:
        """Run a timer's or an offload's callback: a bug in one (a single
        deadline, a single request) must not end the loop and every
        connection with it (_handle does the same for events)."""
        try:
            callback(*args)
        except Exception:
            self.log.exception("%s: a callback failed", self.name)

    # ------------------------------------------------------------ for subclasses

    def setup(self) -> None:
        """Open what the daemon serves (services, listening sockets)."""

    def check_exposed(self, names: Iterable[str]) -> None:
        """InvalidNameError at start for an exposed name no service of the
        run dir could have ('a/b', '..', too long for a socket path): it
        could never be reached, and a typo should not wait for a peer to
        show it (tcpd, tlsd and websocketd call it in setup). ValueError
        for a daemon's own service (DAEMON_SERVICES)."""
        for name in sorted(names):
            if name in DAEMON_SERVICES:
                raise ValueError(
                    f"cannot expose {name!r}: it is a pyipc daemon's own service (a "
                    f"dialer); exposed, any peer could make this host connect to any "
                    f"host and port. Expose the services themselves")
            _rundir.service_path(self.ctx.rundir, name)

    def on_event(self, ev: Event) -> None:
        """Handle one event of the context (other than the stop pipe's). An
        exception it raises is logged and on_event_failed(ev) called; the
        daemon goes on."""

    def on_event_failed(self, ev: Event) -> None:
        """After on_event(ev) raised: release what ev's fd held, so that a
        bug or a resource limit costs that connection only."""

    def teardown(self) -> None:
        """Release what setup() and the events acquired (the context closes after)."""

    # ------------------------------------------------------------ the loop

    def run(self, handle_signals: bool = True) -> None:
        """Serve until stop(), SIGTERM or SIGINT; then tear down and close all.

        Signal handlers are installed only from the main thread (Python's rule),
        and the previous ones are restored on return.
        """
        previous = self._install_signals() if handle_signals else {}
        try:
            while self._unwatched:
                self.ctx.add_external(self._unwatched[0])
                self._unwatched.pop(0)
            self.setup()
            self.ready.set()
            _systemd.notify("READY=1")
            self.log.info("%s ready in %s (backend %s)", self.name, self.ctx.rundir,
                          self.ctx.backend)
            self._loop()
        finally:
            _systemd.notify("STOPPING=1")
            self.log.info("%s stopping", self.name)
            try:
                self.teardown()
            finally:
                self._offloader.close()
                self.ctx.close_all()
                for fd in self._unwatched:        # read ends the context never watched
                    os.close(fd)
                self._wakeup.close(read_end_too=False)
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
                os.close(self._stop_w)

    def _loop(self) -> None:
        while not self._stopping:
            self._serve_once(self._timers.timeout())

    def _serve_once(self, timeout: Optional[float]) -> None:
        """One wait (at most `timeout` s), its events handled, the due timers run."""
        try:
            events = self.ctx.wait_events(timeout)
        except TimeoutError:    # pyipc's derives from the built-in: a timer is due
            events = []
        for ev in events:
            if self._stopping and not self._finishing:
                break
            if ev.type == EventType.EXTERNAL and ev.fd == self._stop_r:
                drain_pipe(self._stop_r)        # (else it stays readable)
                self._stopping = True
            elif ev.type == EventType.EXTERNAL and ev.fd == self._offloader.wake_fd:
                self._offloader.run_finished()
            elif ev.type == EventType.EXTERNAL and ev.fd == self._wakeup.fd:
                self._wakeup.drain()        # the handler itself has run, in Python
            elif ev.type == EventType.EXTERNAL and self._closer.owns(ev.fd):
                self._closer.readable(ev.fd)
            else:
                self._handle(ev)
        if not self._stopping or self._finishing:
            self._timers.run_due()

    def serve_while(self, busy: Callable[[], bool], seconds: float) -> None:
        """From teardown(): go on serving events (on_event, timers) while
        busy() and for `seconds` at most, e.g. the last exchanges a daemon
        owes before it closes (websocketd's close answers). A daemon stops
        taking new work first (closes its listeners) so that none comes."""
        deadline = time.monotonic() + seconds
        self._finishing = True
        try:
            while busy():
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                due = self._timers.timeout()
                self._serve_once(left if due is None else min(left, due))
        finally:
            self._finishing = False

    def _handle(self, ev: Event) -> None:
        """on_event(ev), guarded: a fault with one client must not end the
        loop and every other connection with it."""
        try:
            self.on_event(ev)
        except Exception:
            self.log.exception("%s: handling %s on fd %d failed", self.name, ev.type.name,
                               ev.fd)
            self.on_event_failed(ev)

    def stop(self) -> None:
        """Ask the loop to end (safe from any thread and from signal handlers)."""
        try:
            os.write(self._stop_w, b"x")
        except (BlockingIOError, OSError):
            pass  # the pipe is full (a stop is already pending) or closed (stopped)

    def _install_signals(self) -> dict[int, Any]:
        """Handle SIGTERM and SIGINT, and have every signal with a Python
        handler wake the loop (main thread only, Python's rule)."""
        if not self._wakeup.install():
            return {}
        previous: dict[int, Any] = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, self._on_signal)
        return previous

    def _on_signal(self, signum: int, frame: Optional[FrameType]) -> None:
        self.log.info("%s: signal %d, stopping", self.name, signum)
        self.stop()

