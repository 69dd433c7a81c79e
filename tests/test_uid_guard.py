"""examples/uid_guard_service.py: peer_credentials lets a service refuse a uid.

Runs as a process on a temporary run dir, on both backends (helpers and the
``run``/``rundir`` fixtures of tests/test_examples.py): a client of an allowed
uid gets its echo; with only another uid allowed, the client sees the
connection closed and the service prints who it refused.
"""

from __future__ import annotations

import os
import select
import signal

import pytest

import pyipc

from test_examples import Proc, run, rundir, stop_service  # noqa: F401 (fixtures)

TIMEOUT = 60.0
SCRIPT = "uid_guard_service.py"


def start_guard(run, *uids: int) -> Proc:
    args = [a for uid in uids for a in ("--allow-uid", str(uid))]
    service = run(SCRIPT, *args)
    line = service.expect(lambda l: "ready" in l)
    assert line.startswith("uid_guard_service: ready on ")
    return service


def refused_line(pid: int) -> str:
    return f"uid_guard_service: refused uid {os.getuid()} pid {pid}"


def test_allowed_uid_gets_its_echo(run, rundir: str, backend: str) -> None:
    service = start_guard(run, os.getuid() + 1, os.getuid())
    assert f"allowed uids {os.getuid()}, {os.getuid() + 1})" in service.seen[0]
    with pyipc.Context(rundir=rundir, backend=backend) as ctx:
        fd = ctx.connect("guard")
        for payload in (b"hello", b"", os.urandom(100_000)):
            ctx.write(fd, payload)
            assert ctx.read(fd) == payload
    client = run("pong_client.py", "--name", "guard", "still", "there")
    lines = client.finish()
    assert client.popen.returncode == 0, client.stderr
    assert lines == ["sent 'still', received 'still'", "sent 'there', received 'there'"]
    assert stop_service(service, rundir, "guard")[-1] == \
        "uid_guard_service: stopped after refusing 0 client(s)"


def test_own_uid_is_allowed_by_default(run, rundir: str, backend: str) -> None:
    service = start_guard(run)
    assert f"allowed uids {os.getuid()})" in service.seen[0]
    client = run("pong_client.py", "--name", "guard", "hi")
    assert client.finish() == ["sent 'hi', received 'hi'"]
    assert client.popen.returncode == 0, client.stderr
    stop_service(service, rundir, "guard", signal.SIGINT)


def test_other_uid_is_refused(run, rundir: str, backend: str) -> None:
    service = start_guard(run, os.getuid() + 1)
    with pyipc.Context(rundir=rundir, backend=backend) as ctx:
        fd = ctx.connect("guard")
        assert service.expect(lambda l: "refused" in l) == refused_line(os.getpid())
        # The service hung up: the fd becomes readable (EOF) and read() says so.
        assert select.select([fd], [], [], TIMEOUT)[0] == [fd], "the service kept the client"
        with pytest.raises(pyipc.ConnectionClosedError):
            ctx.read(fd)
    # A client process that sends at once is refused too (its message is not echoed).
    client = run("pong_client.py", "--name", "guard", "let me in")
    assert client.finish() == []
    assert client.popen.returncode == 1
    assert "pong_client: connection on fd" in client.stderr and "closed" in client.stderr
    assert service.expect(lambda l: "refused" in l) == refused_line(client.popen.pid)
    # Refusing does not stop the service; it still ends cleanly.
    assert service.popen.poll() is None
    assert stop_service(service, rundir, "guard")[-1] == \
        "uid_guard_service: stopped after refusing 2 client(s)"
