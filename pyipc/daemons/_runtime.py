"""What every pyipc daemon shares: one Context run as a foreground event loop,
a clean stop (SIGTERM, SIGINT, or stop() from any thread), logging, and
systemd readiness.

A daemon subclasses Daemon, opens what it serves in `setup()`, handles each
event in `on_event()`, and releases what it holds in `teardown()`. run() is the
loop; the CLI subcommands (pyipc ipcd, tcpd, websocketd) only parse options,
build the daemon and call run().
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType
from typing import Any, Optional

from .. import Context, Event, EventType
from . import _systemd


class Daemon:
    """A foreground daemon on one pyipc Context.

    `ready` is set once setup() is done and the daemon serves (tests wait on
    it; systemd gets READY=1 at the same moment). stop() may be called from any
    thread or a signal handler: it only writes a byte to a pipe the loop
    watches, so the loop ends between two events, never inside one.
    """

    #: The logger's name suffix and the daemon's name in messages.
    name = "daemon"

    def __init__(self, *, rundir: Optional[str] = None, backend: Optional[str] = None) -> None:
        self.log = logging.getLogger(f"pyipc.daemons.{self.name}")
        self.ctx = Context(rundir=rundir, backend=backend)
        self.ready = threading.Event()
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._stop_r_owned = True   # until the context watches it
        self._stopping = False

    # ------------------------------------------------------------ for subclasses

    def setup(self) -> None:
        """Open what the daemon serves (services, listening sockets)."""

    def on_event(self, ev: Event) -> None:
        """Handle one event of the context (other than the stop pipe's)."""

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
            self.ctx.add_external(self._stop_r)   # close_all() closes it
            self._stop_r_owned = False
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
                self.ctx.close_all()
                if self._stop_r_owned:
                    os.close(self._stop_r)
                os.close(self._stop_w)
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    def _loop(self) -> None:
        while not self._stopping:
            for ev in self.ctx.wait_events():
                if ev.type == EventType.EXTERNAL and ev.fd == self._stop_r:
                    self._stopping = True
                elif not self._stopping:
                    self.on_event(ev)

    def stop(self) -> None:
        """Ask the loop to end (safe from any thread and from signal handlers)."""
        try:
            os.write(self._stop_w, b"x")
        except (BlockingIOError, OSError):
            pass  # the pipe is full (a stop is already pending) or closed (stopped)

    def _install_signals(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous: dict[int, Any] = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, self._on_signal)
        return previous

    def _on_signal(self, signum: int, frame: Optional[FrameType]) -> None:
        self.log.info("%s: signal %d, stopping", self.name, signum)
        self.stop()
