"""pyipc._signal_wakeup: the pipe through which a signal ends a wait that
began just after Python's last check for signals (used by pongd and the
daemons' runtime; tests/test_daemon_runtime.py has the stress test)."""

from __future__ import annotations

import os
import select
import signal
import threading

import pyipc
from pyipc._signal_wakeup import SignalWakeup


def test_a_signal_writes_its_number_to_the_pipe_and_the_previous_fd_comes_back():
    seen = []
    old_handler = signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(signum))
    wakeup = SignalWakeup()
    try:
        assert wakeup.install()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert select.select([wakeup.fd], [], [], 10)[0] == [wakeup.fd]
        assert os.read(wakeup.fd, 16) == bytes([signal.SIGUSR1])
        assert seen == [signal.SIGUSR1]
        wakeup.drain()                              # empty: returns, does not block
    finally:
        wakeup.close(read_end_too=True)
        signal.signal(signal.SIGUSR1, old_handler)
    assert signal.set_wakeup_fd(-1) == -1           # the previous one (none) is back


def test_install_off_the_main_thread_changes_nothing():
    wakeup = SignalWakeup()
    results = []
    t = threading.Thread(target=lambda: results.append(wakeup.install()))
    t.start()
    t.join()
    wakeup.close(read_end_too=True)
    assert results == [False]
    assert signal.set_wakeup_fd(-1) == -1


def test_a_wait_in_a_context_returns_for_a_signal(backend, rundir):
    """The pipe watched by a context: the wait returns an EXTERNAL event for it."""
    old_handler = signal.signal(signal.SIGUSR1, lambda signum, frame: None)
    wakeup = SignalWakeup()
    try:
        with pyipc.Context(rundir=rundir, backend=backend) as ctx:
            ctx.add_external(wakeup.fd)
            assert wakeup.install()
            os.kill(os.getpid(), signal.SIGUSR1)
            ev = ctx.wait_event(timeout=10)
            assert (ev.type, ev.fd) == (pyipc.EventType.EXTERNAL, wakeup.fd)
            wakeup.close(read_end_too=False)
    finally:
        signal.signal(signal.SIGUSR1, old_handler)


def test_close_off_the_main_thread_leaves_no_fd_for_a_signal_to_corrupt(tmp_path):
    """Python's wake-up fd cannot be given back off the main thread: close()
    there raised ValueError, and a closed write end would have its number
    reused by the next file opened, into which a signal writes its byte."""
    old_handler = signal.signal(signal.SIGUSR1, lambda signum, frame: None)
    wakeup = SignalWakeup()
    write_fd = wakeup._write_fd
    errors = []
    try:
        assert wakeup.install()

        def close() -> None:
            try:
                wakeup.close(read_end_too=True)
            except BaseException as e:
                errors.append(e)
        t = threading.Thread(target=close)
        t.start()
        t.join()
        assert errors == []
        victim = tmp_path / "victim"
        with open(victim, "wb") as f:
            os.kill(os.getpid(), signal.SIGUSR1)
            assert f.fileno() != write_fd       # the number was not reused
        assert victim.read_bytes() == b""
        assert signal.set_wakeup_fd(-1) == write_fd     # still valid (/dev/null)
    finally:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGUSR1, old_handler)
        os.close(write_fd)
