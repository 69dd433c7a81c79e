"""What websocketd's tests share: the daemon in a thread, and pyipc services
(echo, a sink, a typed JSON peer) each in its own thread with its own Context.
Every thread is stopped and joined at the end of the test that started it."""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, List, Optional

import pyipc
from pyipc import EventType
from pyipc.daemons.websocketd import Options, WebSocketd


class DaemonThread:
    """A WebSocketd running in a thread; `url(path)` is its ws:// URL."""

    def __init__(self, rundir: str, backend: str, **options: object) -> None:
        options.setdefault("port", 0)
        listen_fds = options.pop("listen_fds", None)
        self.daemon = WebSocketd(Options(**options), rundir=rundir,  # type: ignore[arg-type]
                                 backend=backend, listen_fds=listen_fds)  # type: ignore[arg-type]
        self.failure: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.daemon.ready.wait(0.05):
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("websocketd failed to start") from self.failure
        host, self.port = self.daemon.addresses[0]
        self.scheme = "wss" if options.get("ssl_context") else "ws"

    def _run(self) -> None:
        try:
            self.daemon.run(handle_signals=False)
        except BaseException as e:
            self.failure = e
            raise

    def url(self, path: str = "/") -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}{path}"

    def http_url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        self.daemon.stop()
        self.thread.join(10)
        assert not self.thread.is_alive(), "websocketd did not stop"


class ServiceThread:
    """A pyipc service in a thread: `handle(ctx, event)` for each event.

    `events` records every non-TIMER event's (type, fd, message); `stop()`
    ends it and closes its context (its clients see their connection end)."""

    def __init__(self, rundir: str, backend: str, name: str,
                 handle: Optional[Callable[[pyipc.Context, pyipc.Event], None]] = None,
                 **limits: int) -> None:
        self.handle = handle or echo
        self.events: List[pyipc.Event] = []
        self.changed = threading.Condition()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self.failure: Optional[BaseException] = None
        # The context is made, used and closed in the service's own thread.
        self.thread = threading.Thread(target=self._run, args=(rundir, backend, name, limits),
                                       daemon=True)
        self.thread.start()
        if not self._ready.wait(10) or self.failure is not None:
            raise RuntimeError(f"service {name} did not start") from self.failure

    def _run(self, rundir: str, backend: str, name: str, limits: dict) -> None:
        try:
            ctx = pyipc.Context(rundir=rundir, backend=backend, **limits)
        except BaseException as e:
            self.failure = e
            self._ready.set()
            raise
        try:
            ctx.service_init(name)
            ctx.timer = 20     # how soon stop() is noticed
            self._ready.set()
            while not self._stop.is_set():
                for ev in ctx.wait_events():
                    if ev.type == EventType.TIMER:
                        continue
                    self.handle(ctx, ev)
                    with self.changed:
                        self.events.append(ev)
                        self.changed.notify_all()
        except BaseException as e:
            self.failure = e
            self._ready.set()
            raise
        finally:
            ctx.close_all()

    def wait_for(self, predicate: Callable[[List[pyipc.Event]], bool],
                 timeout: float = 10.0) -> List[pyipc.Event]:
        """The events so far, once predicate(events) holds (else AssertionError)."""
        with self.changed:
            if not self.changed.wait_for(lambda: predicate(self.events), timeout):
                raise AssertionError(f"service events never matched; saw {self.events!r}")
            return list(self.events)

    def messages(self) -> List[bytes]:
        return [ev.message for ev in self.events
                if ev.type == EventType.MESSAGE_RX and ev.message is not None]

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(10)
        assert not self.thread.is_alive(), "service thread did not stop"


def echo(ctx: pyipc.Context, ev: pyipc.Event) -> None:
    """Echo each message to its sender."""
    if ev.type == EventType.MESSAGE_RX and ev.message is not None:
        try:
            ctx.schedule(ev.fd, ev.message)
        except pyipc.ConnectionClosedError:
            pass


def sink(ctx: pyipc.Context, ev: pyipc.Event) -> None:
    """Keep what arrives (recorded in ServiceThread.events), answer nothing."""



class Flood:
    """A service's handler that sends `count` numbered `size`-byte messages
    to its client as fast as its queue takes them (the rest at each
    MESSAGE_TX). Message i is `i` (4 bytes, big-endian) repeated."""

    def __init__(self, count: int, size: int) -> None:
        self.count, self.size = count, size
        self.sent = 0

    def message(self, i: int) -> bytes:
        return i.to_bytes(4, "big") * (self.size // 4)

    def __call__(self, ctx: pyipc.Context, ev: pyipc.Event) -> None:
        if ev.type in (EventType.CONNECTION, EventType.MESSAGE_TX):
            try:
                while self.sent < self.count:
                    ctx.schedule(ev.fd, self.message(self.sent))
                    self.sent += 1
            except pyipc.QueueFullError:
                pass                        # the rest at the next MESSAGE_TX


class ClientQueueWatch:
    """Sets `over` once a WebSocket client's queue in websocketd is over its
    bound (backpressure: websocketd no longer reads the service): after
    each message of a service, an empty switch_send (which the core refuses
    then, and is otherwise nothing) probes it from `daemon`'s loop (set it
    before a client connects)."""

    def __init__(self, monkeypatch: Any) -> None:
        from pyipc.daemons.websocketd import session as session_mod
        self.over = threading.Event()
        self.daemon: Any = None
        on_out = session_mod.Session.on_out

        def probing_on_out(session: Any, fd: int, payload: bytes) -> Any:
            result = on_out(session, fd, payload)
            if not self.over.is_set():      # (a timer: inside on_out nothing is refused)
                self.daemon.later(0, lambda: self._probe(session))
            return result
        monkeypatch.setattr(session_mod.Session, "on_out", probing_on_out)

    def _probe(self, session: Any) -> None:
        try:
            session.ctx.switch_send(session.fd, b"")
        except pyipc.QueueFullError:
            self.over.set()
        except pyipc.IPCError:
            pass                            # ended meanwhile
