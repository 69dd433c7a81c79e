"""What every daemon shares (pyipc/daemons/_runtime.py, _systemd.py): systemd
socket activation and readiness, the loop, the clean stop by stop() from
another thread and by SIGTERM/SIGINT, on both backends."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading

import pytest

import pyipc
from pyipc.daemons import Daemon
from pyipc.daemons import _systemd

from conftest import CHILD_ENV


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
