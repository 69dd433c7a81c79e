"""What every daemon shares (pyipc/daemons/_runtime.py, _systemd.py): systemd
socket activation and readiness, the loop, the clean stop by stop() from
another thread and by SIGTERM/SIGINT, on both backends."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import pyipc
from pyipc.daemons import Daemon
from pyipc.daemons import _systemd
from pyipc.daemons._offload import Offloader

from conftest import CHILD_ENV, spin_until


class EchoDaemon(Daemon):
    """The smallest daemon: serves `echo`, answers every message with itself."""

    name = "echo"

    def setup(self) -> None:
        self.ctx.service_init("echo")

    def on_event(self, ev: pyipc.Event) -> None:
        if ev.type == pyipc.EventType.MESSAGE_RX:
            self.ctx.schedule(ev.fd, ev.message)

    def teardown(self) -> None:
        self.torn_down = True


# ------------------------------------------------------------ readiness

def test_notify_sends_the_state_to_notify_socket(tmp_path, monkeypatch):
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(path)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert _systemd.notify("READY=1")
        assert listener.recv(100) == b"READY=1"


def test_notify_reaches_an_abstract_socket(monkeypatch):
    name = f"pyipc-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert _systemd.notify("STATUS=serving")
        assert listener.recv(100) == b"STATUS=serving"


def test_notify_without_systemd_is_false(monkeypatch, tmp_path):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert _systemd.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert _systemd.notify("READY=1") is False      # logged, not raised


# ------------------------------------------------------------ socket activation

ACTIVATED = """
import json, os, socket, sys
from pyipc.daemons import _systemd
a, b = socket.socketpair()
os.dup2(a.fileno(), 3); os.dup2(b.fileno(), 4)
os.environ.update(LISTEN_PID=sys.argv[1] or str(os.getpid()), LISTEN_FDS="2",
                  LISTEN_FDNAMES="tcp:")
found = _systemd.listen_fds()
print(json.dumps({"found": found, "left": [v for v in ("LISTEN_PID", "LISTEN_FDS",
      "LISTEN_FDNAMES") if v in os.environ], "inheritable": os.get_inheritable(3)}))
"""


def test_listen_fds_takes_the_sockets_systemd_passed():
    out = subprocess.run([os.sys.executable, "-c", ACTIVATED, ""], env=CHILD_ENV,
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == {"found": {"tcp": [3], "unknown": [4]}, "left": [],
                               "inheritable": False}


def test_listen_fds_meant_for_another_process_are_not_taken():
    out = subprocess.run([os.sys.executable, "-c", ACTIVATED, "1"], env=CHILD_ENV,
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out)["found"] == {}


# ------------------------------------------------------------ the loop and its stop

def test_daemon_serves_then_stops_from_another_thread(backend, rundir):
    daemon = EchoDaemon(rundir=rundir, backend=backend)
    runner = threading.Thread(target=daemon.run)
    runner.start()
    try:
        assert daemon.ready.wait(10)
        with pyipc.Context(rundir=rundir, backend=backend) as client:
            fd = client.connect_service("echo")
            client.write(fd, b"ping")
            assert client.read(fd, timeout=10) == b"ping"
    finally:
        daemon.stop()
        runner.join(10)
    assert not runner.is_alive()
    assert daemon.torn_down
    assert not os.path.exists(os.path.join(rundir, "echo"))   # the service is closed


SIGNALLED = """
import sys
sys.path.insert(0, sys.argv[3])
from test_daemon_runtime import EchoDaemon
EchoDaemon(rundir=sys.argv[1], backend=sys.argv[2]).run()
print("stopped", flush=True)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_daemon_stops_cleanly_on_a_signal_and_tells_systemd(backend, rundir, tmp_path,
                                                             processes, sig):
    notify_path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(notify_path)
        listener.settimeout(10)
        proc = processes(SIGNALLED, rundir, backend, os.path.dirname(__file__),
                         env=dict(CHILD_ENV, NOTIFY_SOCKET=notify_path),
                         stdout=subprocess.PIPE, text=True)
        assert listener.recv(100) == b"READY=1"
        assert os.path.exists(os.path.join(rundir, "echo"))
        proc.send_signal(sig)
        assert listener.recv(100) == b"STOPPING=1"
        out, _ = proc.communicate(timeout=10)
    assert (proc.returncode, out) == (0, "stopped\n")
    assert not os.path.exists(os.path.join(rundir, "echo"))


# ------------------------------------------------------------ call_later and offload

class ScriptedDaemon(Daemon):
    """Runs `script(self)` once the loop serves, from the loop's thread (as a
    timer due at once), and records what its callbacks saw."""

    name = "scripted"

    def __init__(self, script, **kw) -> None:
        super().__init__(**kw)
        self.script = script
        self.seen: list = []
        self.threads: set = set()
        self.done = threading.Event()

    def setup(self) -> None:
        self.call_later(0, lambda: self.script(self))

    def note(self, what) -> None:
        self.threads.add(threading.get_ident())
        self.seen.append(what)


def run_scripted(script, backend, rundir, timeout=10):
    daemon = ScriptedDaemon(script, rundir=rundir, backend=backend)
    runner = threading.Thread(target=daemon.run)
    runner.start()
    try:
        assert daemon.done.wait(timeout), daemon.seen
    finally:
        daemon.stop()
        runner.join(10)
    assert not runner.is_alive()
    return daemon


def test_call_later_runs_in_due_order_in_the_loop_thread(backend, rundir):
    def script(d):
        d.loop_thread = threading.get_ident()
        d.call_later(0.2, lambda: (d.note("last"), d.done.set()))
        d.call_later(0.05, lambda: d.note("second"))
        d.call_later(0, lambda: d.note("first"))
        d.cancel(d.call_later(0.1, lambda: d.note("cancelled")))
    d = run_scripted(script, backend, rundir)
    assert d.seen == ["first", "second", "last"]
    assert d.threads == {d.loop_thread}


def test_call_later_waits_its_delay(backend, rundir):
    def script(d):
        d.start = time.monotonic()
        d.call_later(0.3, lambda: (d.note(time.monotonic() - d.start), d.done.set()))
    d = run_scripted(script, backend, rundir)
    assert d.seen[0] >= 0.3


class Echoing(ScriptedDaemon):
    """A scripted daemon that echoes every message it gets."""

    def on_event(self, ev):
        if ev.type == pyipc.EventType.MESSAGE_RX:
            self.ctx.schedule(ev.fd, ev.message)


def test_timers_fire_while_events_flow(backend, rundir):
    """A daemon busy with messages still runs its timers (the wait's timeout is
    the next timer's, and due timers run after every round of events)."""
    def script(d):
        d.ctx.service_init("busy")
        d.call_later(0.2, lambda: (d.note("fired"), d.done.set()))

    daemon = Echoing(script, rundir=rundir, backend=backend)
    runner = threading.Thread(target=daemon.run)
    runner.start()
    try:
        with pyipc.Context(rundir=rundir, backend=backend) as client:
            fd = connect_when_served(client, "busy")
            while not daemon.done.is_set():
                client.write(fd, b"x")
                assert client.read(fd, timeout=10) == b"x"
        assert daemon.seen == ["fired"]
    finally:
        daemon.stop()
        runner.join(10)


def connect_when_served(client, name, timeout=10):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return client.connect_service(name)
        except pyipc.ServiceNotFoundError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)    # polling for a service another thread opens


def test_a_timer_due_past_what_a_wait_takes_does_not_end_the_loop(backend, rundir):
    """The only timers due in 1e10 s (past threading.TIMEOUT_MAX) and never:
    the loop waits MAX_TIMEOUT at most at once and goes on serving (the
    wait's ValueError ended the daemon, as ipcd's --request-timeout inf did)."""
    from pyipc.daemons._timers import MAX_TIMEOUT, Timers
    def script(d):
        d.ctx.service_init("busy")
        d.call_later(1e10, lambda: d.note("in 300 years"))
        d.call_later(float("inf"), lambda: d.note("never"))
        d.done.set()

    timers = Timers()
    timers.call_later(float("inf"), lambda: None)
    assert timers.timeout() == MAX_TIMEOUT
    daemon = Echoing(script, rundir=rundir, backend=backend)
    runner = threading.Thread(target=daemon.run)
    runner.start()
    try:
        assert daemon.done.wait(10)
        with pyipc.Context(rundir=rundir, backend=backend) as client:
            fd = connect_when_served(client, "busy")
            for _ in range(3):
                client.write(fd, b"x")
                assert client.read(fd, timeout=10) == b"x"
        assert runner.is_alive() and daemon.seen == []
    finally:
        daemon.stop()
        runner.join(10)
    assert not runner.is_alive()


def test_call_later_refuses_a_negative_or_nan_delay(backend, rundir):
    daemon = Daemon(rundir=rundir, backend=backend)
    try:
        for bad in (-1, float("nan")):
            with pytest.raises(ValueError, match="delay must be"):
                daemon.call_later(bad, lambda: None)
    finally:
        daemon.stop()
        daemon.run(handle_signals=False)    # stop is pending: sets up, ends, frees


def test_offload_returns_results_and_exceptions_in_the_loop_thread(backend, rundir):
    gate = threading.Event()

    def script(d):
        d.loop_thread = threading.get_ident()
        d.offload(lambda: (gate.wait(10), threading.get_ident())[1],
                  lambda result, exc: (d.note(("slow", result != d.loop_thread, exc)),
                                       d.done.set()))
        d.offload(lambda: 1 / 0, lambda result, exc: (d.note(("error", result,
                                                              type(exc))), gate.set()))
    d = run_scripted(script, backend, rundir)
    # The failing call finished first although asked second: the slow one
    # waited for it, so the loop was not held by the slow one.
    assert d.seen == [("error", None, ZeroDivisionError), ("slow", True, None)]
    assert d.threads == {d.loop_thread}


def test_offloaded_work_unfinished_at_stop_is_dropped(backend, rundir):
    gate = threading.Event()
    calls = []

    def script(d):
        d.offload(lambda: gate.wait(10), lambda result, exc: calls.append(result))
        d.done.set()
    d = run_scripted(script, backend, rundir)
    gate.set()
    spin_until(lambda: d._offloader._workers == 0)   # the worker ran fn and ended
    assert calls == []
    with pytest.raises(RuntimeError, match="stopping"):
        d.offload(lambda: None, lambda result, exc: None)


def test_sigterm_right_after_ready_always_stops_the_daemon(backend, rundir):
    """A SIGTERM sent the moment the daemon is ready lands while the loop is
    on its way into the kernel's wait, after Python's last check for signals:
    without the runtime's wake-up pipe (signal.set_wakeup_fd) that wait was
    not interrupted and the daemon went on serving (native: about 1 run in 5).
    The daemon runs in the main thread, where Python delivers signals."""
    assert threading.current_thread() is threading.main_thread(), \
        "signal handlers run only in the main thread (pytest runs tests there)"
    missed = 0
    for _ in range(50):
        daemon = EchoDaemon(rundir=rundir, backend=backend)
        stopped = threading.Event()
        rescued: list = []

        def terminate(daemon=daemon, stopped=stopped, rescued=rescued) -> None:
            daemon.ready.wait(10)
            os.kill(os.getpid(), signal.SIGTERM)
            if not stopped.wait(5):         # the signal was lost: end it another way
                rescued.append(True)
                daemon.stop()
        killer = threading.Thread(target=terminate)
        killer.start()
        try:
            daemon.run()
        finally:
            stopped.set()
            killer.join()
        missed += len(rescued)
    assert missed == 0
    assert signal.set_wakeup_fd(-1) == -1      # the runtime gave the previous one back


def test_a_failing_timer_or_offload_callback_does_not_end_the_daemon(backend, rundir, caplog):
    # Timer and offload callbacks once ran unguarded in the loop, so one bug
    # in a deadline's callback ended the daemon and every connection it served.
    def script(d):
        d.call_later(0, lambda: 1 / 0)
        d.offload(lambda: None, lambda result, exc: {}["missing"])
        d.call_later(0.05, lambda: (d.note("still running"), d.done.set()))
    d = run_scripted(script, backend, rundir)
    assert d.seen == ["still running"]
    failures = [r.exc_info[0] for r in caplog.records if r.exc_info]
    assert sorted(f.__name__ for f in failures) == ["KeyError", "ZeroDivisionError"]


def test_a_failing_on_event_is_logged_and_costs_that_connection_only(backend, rundir, caplog):
    """The runtime guards on_event for every daemon: the failure is logged,
    on_event_failed(ev) releases that fd's state, and the daemon serves on."""
    class Faulty(EchoDaemon):
        failed: list = []

        def on_event(self, ev: pyipc.Event) -> None:
            if ev.type == pyipc.EventType.MESSAGE_RX and ev.message == b"boom":
                raise RuntimeError("a bug about one client")
            super().on_event(ev)

        def on_event_failed(self, ev: pyipc.Event) -> None:
            self.failed.append(ev.fd)
            self.ctx.close(ev.fd)

    daemon = Faulty(rundir=rundir, backend=backend)
    runner = threading.Thread(target=daemon.run, kwargs={"handle_signals": False})
    runner.start()
    try:
        assert daemon.ready.wait(10)
        with pyipc.Context(rundir=rundir, backend=backend) as bad, \
                pyipc.Context(rundir=rundir, backend=backend) as good:
            fd_bad, fd_good = bad.connect_service("echo"), good.connect_service("echo")
            bad.write(fd_bad, b"boom")
            with pytest.raises(pyipc.ConnectionClosedError):
                bad.read(fd_bad, timeout=10)            # that client was let go
            good.write(fd_good, b"still served")
            assert good.read(fd_good, timeout=10) == b"still served"
    finally:
        daemon.stop()
        runner.join(10)
    assert not runner.is_alive()
    assert len(daemon.failed) == 1
    assert [r.exc_info[0] for r in caplog.records if r.exc_info] == [RuntimeError]


# ------------------------------------------------------------ the offloader itself

def test_offloaded_calls_past_the_workers_wait_and_all_run():
    off = Offloader(max_workers=2)
    outcomes: list = []
    gate = threading.Event()
    try:
        for i in range(6):
            off.submit(lambda i=i: gate.wait(10) and i,
                       lambda result, exc: outcomes.append(result))
        assert off._workers == 2 and len(off._waiting) == 4
        gate.set()
        while len(outcomes) < 6:
            assert select.select([off.wake_fd], [], [], 10)[0], outcomes
            off.run_finished()
        assert sorted(outcomes) == list(range(6))
        spin_until(lambda: off._workers == 0)
    finally:
        off.close()
        os.close(off.wake_fd)


def test_a_worker_that_cannot_start_gives_its_slot_back(monkeypatch):
    """A failed Thread.start() ("can't start new thread") is raised to the
    caller and leaves no slot taken: with one worker at most, the next call
    still runs (it waited forever)."""
    off = Offloader(max_workers=1)
    real_start = threading.Thread.start

    def cannot_start(thread: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")
    monkeypatch.setattr(threading.Thread, "start", cannot_start)
    try:
        with pytest.raises(RuntimeError, match="can't start"):
            off.submit(lambda: 1, lambda result, exc: None)
        monkeypatch.setattr(threading.Thread, "start", real_start)
        outcomes: list = []
        off.submit(lambda: 2, lambda result, exc: outcomes.append(result))
        assert select.select([off.wake_fd], [], [], 10)[0], (off._workers, off._waiting)
        off.run_finished()
        assert outcomes == [2]
    finally:
        off.close()
        os.close(off.wake_fd)


def test_a_dial_past_its_deadline_or_abandoned_does_no_lookup(monkeypatch):
    """A dial that waited for a worker past its deadline, or whose request
    was answered, gives the worker back at once: no name lookup (which may
    take the resolver's whole timeout)."""
    from pyipc.daemons import _sockets

    def no_lookup(*args: object, **kwargs: object) -> None:
        raise AssertionError("looked up a name for a dial nobody waits for")
    monkeypatch.setattr(socket, "getaddrinfo", no_lookup)
    with pytest.raises(TimeoutError):
        _sockets.dial_tcp("example.invalid", 1, time.monotonic() - 1)
    with pytest.raises(TimeoutError):
        _sockets.dial_tcp("example.invalid", 1, time.monotonic() + 60, lambda: True)


def test_a_dial_tries_each_address_within_one_deadline(monkeypatch):
    """dial_tcp goes through the name's addresses in turn, all within the
    dial's deadline: a refused address costs nothing and the next one is
    tried; one that does not answer uses its share of the time left (the
    last all of it), not a timeout of its own (socket.create_connection gave
    each address the whole timeout), nor all of it (the next one was never
    tried)."""
    from pyipc.daemons import _sockets
    with socket.create_server(("127.0.0.1", 0)) as good, socket.socket() as refused, \
            socket.socket() as silent:
        refused.bind(("127.0.0.1", 0))            # bound, not listening: refused
        silent.bind(("127.0.0.1", 0))
        silent.listen(0)                          # its queue filled: SYNs dropped
        with socket.create_connection(silent.getsockname(), timeout=10):
            def addresses(*ports: int) -> list:
                return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", p))
                        for p in ports]
            monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: addresses(
                refused.getsockname()[1], good.getsockname()[1]))
            with _sockets.dial_tcp("h", 1, time.monotonic() + 10) as sock:
                assert sock.getpeername() == good.getsockname()
            monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: addresses(
                silent.getsockname()[1], good.getsockname()[1]))
            with _sockets.dial_tcp("h", 1, time.monotonic() + 1) as sock:
                assert sock.getpeername() == good.getsockname()
            monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: addresses(
                *[silent.getsockname()[1]] * 3))
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                _sockets.dial_tcp("h", 1, started + 0.5)
            assert time.monotonic() - started < 5     # the deadline, not 0.5 s per address


@pytest.mark.parametrize("command", ["tcpd", "tlsd", "websocketd"])
def test_an_exposed_name_no_service_could_have_stops_the_daemon_at_start(rundir, command,
                                                                         tmp_path):
    """--expose a/b (or '..'): refused at start with the reason, not kept
    as a name no peer could ever reach."""
    extra = []
    if command == "tlsd":
        import trustme
        cert = str(tmp_path / "cert.pem")
        trustme.CA().issue_cert("localhost").private_key_and_cert_chain_pem.write_to_path(cert)
        extra = ["--listen", "127.0.0.1:0", "--cert", cert]
    if command == "websocketd":
        extra = ["--port", "0"]
    if command == "tcpd":
        extra = ["--listen", "127.0.0.1:0"]
    out = subprocess.run([sys.executable, "-m", "pyipc", "--rundir", rundir, command,
                          "--expose", "pong,a/b", *extra], capture_output=True, text=True,
                         timeout=60, env=CHILD_ENV)
    assert out.returncode != 0
    assert "invalid service name: contains '/'" in out.stderr


def _start_args(command: str, tmp_path) -> list:
    """What `pyipc COMMAND` needs besides --expose to start on a free port."""
    if command == "tlsd":
        import trustme
        cert = str(tmp_path / "cert.pem")
        trustme.CA().issue_cert("localhost").private_key_and_cert_chain_pem.write_to_path(cert)
        return ["--listen", "127.0.0.1:0", "--cert", cert]
    return ["--port", "0"] if command == "websocketd" else ["--listen", "127.0.0.1:0"]


@pytest.mark.parametrize("command,name", [("tcpd", "tcp"), ("tcpd", "ws"),
                                          ("tlsd", "tls"), ("tlsd", "ipc"),
                                          ("websocketd", "ws"), ("websocketd", "wss"),
                                          ("websocketd", "tcp")])
def test_exposing_a_daemons_own_service_stops_the_daemon_at_start(rundir, command, name,
                                                                  tmp_path, backend):
    """--expose ws (or any daemon's service, a dialer): refused at start, or
    any peer could make this host connect anywhere (an open proxy)."""
    out = subprocess.run([sys.executable, "-m", "pyipc", "--backend", backend,
                          "--rundir", rundir, command,
                          "--expose", f"pong,{name}", *_start_args(command, tmp_path)],
                         capture_output=True, text=True, timeout=60, env=CHILD_ENV)
    assert out.returncode != 0
    assert f"cannot expose {name!r}: it is a pyipc daemon's own service" in out.stderr
    assert "Traceback" not in out.stderr


def test_daemon_services_names_every_daemons_own_service():
    """DAEMON_SERVICES holds the service each daemon registers."""
    from pyipc._types import IPCD_SERVICE
    from pyipc.daemons import tcpd, tlsd
    from pyipc.daemons._runtime import DAEMON_SERVICES
    from pyipc.daemons.websocketd import dialer
    assert DAEMON_SERVICES == {IPCD_SERVICE, tcpd.TCP_SERVICE, tlsd.SERVICE,
                               dialer.WS_SERVICE, dialer.WSS_SERVICE}


def _daemon_bounded_at(kind: str, bound: int, rundir: str, backend: str) -> Daemon:
    """A tcpd, tlsd (dials only) or websocketd (no dialer's services
    needed: port 0) whose bound on dials in progress is `bound`."""
    if kind == "tcpd":
        from pyipc.daemons.tcpd import Tcpd
        return Tcpd(rundir=rundir, backend=backend, listen=["127.0.0.1:0"],
                    max_pending=bound)
    if kind == "tlsd":
        from pyipc.daemons.tlsd import Tlsd, TlsdConfig
        return Tlsd(TlsdConfig(max_pending=bound), rundir=rundir, backend=backend)
    from pyipc.daemons.websocketd import Options, WebSocketd
    return WebSocketd(Options(port=0, max_handshakes=bound), rundir=rundir, backend=backend)


@pytest.mark.parametrize("kind", ["tcpd", "tlsd", "websocketd"])
def test_every_dial_a_daemon_admits_has_a_worker(kind, rundir, backend):
    """--max-pending 600 (websocketd: --max-handshakes): 599 offloaded dials
    hung (a host that does not answer) leave a worker for the next one. With
    the pool fixed at 256 workers, it waited behind the hung ones (one host
    at its default share, 300, took every worker)."""
    from daemon_harness import running
    bound = 600
    gate, ran = threading.Event(), threading.Event()
    with running(_daemon_bounded_at(kind, bound, rundir, backend)) as daemon:
        try:
            for _ in range(bound - 1):
                daemon.offload(lambda: gate.wait(30), lambda result, exc: None)
            daemon.offload(ran.set, lambda result, exc: None)
            assert ran.wait(10), "the last dial admitted waited for a worker"
        finally:
            gate.set()
