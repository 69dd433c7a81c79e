"""The run directory and service files: modes, lock, stale sockets, cleanup."""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import stat
import subprocess

import pytest

import pyipc
from pyipc import EventType

from conftest import unavailable, wait_for


def test_rundir_is_created_with_mode_0770(ctx_factory, rundir):
    path = os.path.join(rundir, "a", "b", "run")
    old = os.umask(0o077)            # the mode must not depend on the umask
    try:
        ctx_factory(rundir=path).service_init("svc")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o770
    assert stat.S_ISDIR(os.lstat(path).st_mode)


def test_existing_rundir_mode_is_left_alone(ctx_factory, rundir):
    os.chmod(rundir, 0o750)
    ctx_factory().service_init("svc")
    assert stat.S_IMODE(os.lstat(rundir).st_mode) == 0o750


def test_socket_mode_0660_and_lock_file(ctx_factory, rundir):
    old = os.umask(0o077)
    try:
        ctx_factory().service_init("svc")
    finally:
        os.umask(old)
    st = os.lstat(os.path.join(rundir, "svc"))
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660
    lock = os.lstat(os.path.join(rundir, "svc.lock"))
    assert stat.S_ISREG(lock.st_mode)
    # The group shares the run dir: its members must be able to open the lock.
    assert stat.S_IMODE(lock.st_mode) == 0o660


def test_an_old_lock_file_of_ours_gets_mode_0660(ctx_factory, rundir):
    lock = os.path.join(rundir, "svc.lock")
    os.close(os.open(lock, os.O_CREAT | os.O_RDWR, 0o600))
    os.chmod(lock, 0o600)
    ctx_factory().service_init("svc")
    assert stat.S_IMODE(os.lstat(lock).st_mode) == 0o660


def test_a_lock_file_that_is_a_hard_link_or_another_users_keeps_its_mode(ctx_factory, rundir,
                                                                          tmp_path):
    """The lock's mode is changed only on our own file of one link: a hard
    link planted at NAME.lock made the file it links to group-readable (a
    0600 secret became 0660), and root changed another user's lock file."""
    secret = tmp_path / "secret"
    secret.write_bytes(b"s")
    os.chmod(secret, 0o600)
    os.link(secret, os.path.join(rundir, "svc.lock"))
    ctx = ctx_factory()
    ctx.service_init("svc")
    assert stat.S_IMODE(os.lstat(secret).st_mode) == 0o600
    if os.geteuid() == 0:           # root: a lock file of another user's
        lock = os.path.join(rundir, "other.lock")
        os.close(os.open(lock, os.O_CREAT | os.O_RDWR, 0o600))
        os.chown(lock, 1000, 1000)
        os.chmod(lock, 0o600)
        ctx.service_init("other")
        assert stat.S_IMODE(os.lstat(lock).st_mode) == 0o600


def test_lock_is_an_exclusive_flock(ctx_factory, rundir):
    ctx = ctx_factory()
    sfd = ctx.service_init("svc")
    fd = os.open(os.path.join(rundir, "svc.lock"), os.O_RDWR)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        ctx.close(sfd)               # released with the service
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # Someone else holding the lock makes the name busy, socket or not.
        with pytest.raises(pyipc.ServiceBusyError):
            ctx.service_init("svc")
        fcntl.flock(fd, fcntl.LOCK_UN)
        ctx.service_init("svc")
    finally:
        os.close(fd)


def test_lock_file_is_kept_after_close(ctx_factory, rundir):
    ctx = ctx_factory()
    ctx.close(ctx.service_init("svc"))
    assert not os.path.exists(os.path.join(rundir, "svc"))
    assert os.path.exists(os.path.join(rundir, "svc.lock"))


def test_stale_socket_is_replaced(ctx_factory, rundir):
    path = os.path.join(rundir, "svc")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()                     # a stale socket file, nobody holds the lock
    os.link(path, path + ".old")     # keeps its inode taken, so a new one differs
    old_ino = os.lstat(path).st_ino
    server, client = ctx_factory(), ctx_factory()
    server.service_init("svc")
    assert os.lstat(path).st_ino != old_ino
    fd = client.connect_service("svc")
    client.write(fd, b"reached the new one")
    assert wait_for(server, EventType.MESSAGE_RX)[-1].message == b"reached the new one"


def test_stale_socket_of_a_killed_process(ctx_factory, rundir, processes, backend):
    proc = processes("import sys, pyipc, os\n"
                     "ctx = pyipc.Context(rundir=sys.argv[1], backend=sys.argv[2])\n"
                     "ctx.service_init('svc')\nprint('ready', flush=True)\nimport signal; signal.pause()\n",
                     rundir, backend, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n"
    with pytest.raises(pyipc.ServiceBusyError):
        ctx_factory().service_init("svc")
    proc.kill()
    proc.wait()
    assert os.path.exists(os.path.join(rundir, "svc"))   # left behind by SIGKILL
    server, client = ctx_factory(), ctx_factory()
    server.service_init("svc")
    fd = client.connect_service("svc")
    client.write(fd, b"x")
    assert wait_for(server, EventType.MESSAGE_RX)[-1].message == b"x"


def test_socket_removed_on_close_and_close_all(ctx_factory, rundir):
    ctx = ctx_factory()
    fd = ctx.service_init("one")
    ctx.service_init("two")
    ctx.close(fd)
    assert not os.path.exists(os.path.join(rundir, "one"))
    assert os.path.exists(os.path.join(rundir, "two"))
    ctx.close_all()
    assert not os.path.exists(os.path.join(rundir, "two"))
    with pytest.raises(pyipc.ServiceNotFoundError):
        ctx_factory().connect_service("two")


def _clean_rundir(rundir: str) -> None:
    """What a tmp cleaner does to a run dir in use: remove it all."""
    shutil.rmtree(rundir)


def _clean_lock(rundir: str) -> None:
    """What a tmp cleaner does to an old lock file: remove it."""
    os.unlink(os.path.join(rundir, "x.lock"))


@pytest.mark.parametrize("clean", [_clean_rundir, _clean_lock], ids=["rundir", "lock"])
@pytest.mark.parametrize("close", ["close", "close_all"])
def test_closing_an_old_service_keeps_a_new_ones_socket(ctx_factory, rundir, clean, close):
    """The old service's path now names another service's socket (the run
    dir re-created, or the name taken again once its lock file was gone):
    closing the old one must not remove it."""
    old = ctx_factory()
    old_fd = old.service_init("x")
    clean(rundir)
    new, client = ctx_factory(), ctx_factory()
    new.service_init("x")
    if close == "close":
        old.close(old_fd)
    else:
        old.close_all()
    assert stat.S_ISSOCK(os.lstat(os.path.join(rundir, "x")).st_mode)
    fd = client.connect_service("x")
    client.write(fd, b"reached the new one")
    assert wait_for(new, EventType.MESSAGE_RX)[-1].message == b"reached the new one"


def test_service_recreated_in_the_same_process(ctx_factory, rundir):
    """libIPC leaked the lock fd, so this failed; here it works many times."""
    ctx, client = ctx_factory(), ctx_factory()
    before = len(os.listdir("/proc/self/fd"))
    for i in range(20):
        sfd = ctx.service_init("again")
        cfd = client.connect_service("again")
        client.write(cfd, b"%d" % i)
        ev = wait_for(ctx, EventType.MESSAGE_RX)[-1]
        assert ev.message == b"%d" % i
        ctx.close(ev.fd)
        ctx.close(sfd)
        client.close(cfd)
    ctx.timer = 0
    ctx.timer = None
    assert len(os.listdir("/proc/self/fd")) <= before + 1   # no fd leaks (lock fds)


def test_rundir_env_is_used(backend, rundir, monkeypatch):
    monkeypatch.setenv("RUNDIR", rundir)
    with pyipc.Context(backend=backend) as server, pyipc.Context(backend=backend) as client:
        server.service_init("envsvc")
        assert os.path.exists(os.path.join(rundir, "envsvc"))
        fd = client.connect_service("envsvc")
        client.write(fd, b"via env")
        assert wait_for(server, EventType.MESSAGE_RX)[-1].message == b"via env"


def test_rundir_argument_beats_env(backend, rundir, monkeypatch, tmp_path):
    monkeypatch.setenv("RUNDIR", str(tmp_path))
    with pyipc.Context(backend=backend, rundir=rundir) as ctx:
        ctx.service_init("argsvc")
    assert not os.path.exists(tmp_path / "argsvc.lock")
    assert os.path.exists(os.path.join(rundir, "argsvc.lock"))


def test_pathlike_rundir(backend, rundir):
    from pathlib import Path
    with pyipc.Context(backend=backend, rundir=Path(rundir)) as ctx:
        assert ctx.rundir == rundir
        ctx.service_init("p")
        assert os.path.exists(os.path.join(rundir, "p"))


def test_other_process_reaches_the_service(ctx_factory, rundir, processes, backend):
    server = ctx_factory()
    server.service_init("xproc")
    proc = processes("import sys, pyipc\n"
                     "with pyipc.Context(rundir=sys.argv[1], backend=sys.argv[2]) as c:\n"
                     "    fd = c.connect('xproc')\n"
                     "    c.write(fd, b'from child')\n"
                     "    print(c.read(fd).decode(), flush=True)\n",
                     rundir, "pure" if backend == "native" else "native",
                     stdout=subprocess.PIPE, text=True)
    ev = wait_for(server, EventType.MESSAGE_RX)[-1]
    assert ev.message == b"from child"
    server.write(ev.fd, b"answer")
    out, _ = proc.communicate(timeout=30)
    assert out == "answer\n" and proc.returncode == 0


def test_closing_a_service_keeps_its_connections(ctx_factory, rundir):
    server, client = ctx_factory(), ctx_factory()
    sfd = server.service_init("svc")
    cfd = client.connect_service("svc")
    conn = wait_for(server, EventType.CONNECTION)[-1].fd
    server.close(sfd)
    assert not os.path.exists(os.path.join(rundir, "svc"))
    client.write(cfd, b"still connected")
    assert server.read(conn) == b"still connected"
    server.write(conn, b"yes")
    assert client.read(cfd) == b"yes"
    with pytest.raises(pyipc.ServiceNotFoundError):
        ctx_factory().connect_service("svc")


def test_service_named_like_another_ones_lock_file(ctx_factory, rundir):
    """Service "x.lock" next to service "x": it must not delete x's lock file
    (which would let a second "x" start), and "x" after "x.lock" fails cleanly."""
    x = ctx_factory()
    x.service_init("x")
    with pytest.raises(pyipc.IPCError) as info:
        ctx_factory().service_init("x.lock")
    assert type(info.value) is pyipc.IPCError
    assert str(info.value) == \
        f"cannot start service x.lock: {rundir}/x.lock exists and is not a socket"
    assert os.path.isfile(os.path.join(rundir, "x.lock"))
    with pytest.raises(pyipc.ServiceBusyError):
        ctx_factory().service_init("x")          # still protected by its lock
    # The other order: "y.lock" runs, then "y" cannot open its lock file.
    ctx_factory().service_init("y.lock")
    with pytest.raises(pyipc.IPCError) as info:
        ctx_factory().service_init("y")
    assert type(info.value) is pyipc.IPCError
    assert str(info.value) == "cannot start service y: No such device or address"
    assert stat.S_ISSOCK(os.lstat(os.path.join(rundir, "y.lock")).st_mode)


def test_a_file_that_is_not_a_socket_is_not_deleted(ctx_factory, rundir):
    path = os.path.join(rundir, "data")
    with open(path, "w") as f:
        f.write("precious")
    with pytest.raises(pyipc.IPCError) as info:
        ctx_factory().service_init("data")
    assert str(info.value) == f"cannot start service data: {path} exists and is not a socket"
    with open(path) as f:
        assert f.read() == "precious"
    os.mkdir(os.path.join(rundir, "adir"))
    with pytest.raises(pyipc.IPCError):
        ctx_factory().service_init("adir")
    assert os.path.isdir(os.path.join(rundir, "adir"))


def test_rundir_owned_by_another_user_is_refused(backend, rundir):
    """A run dir of another user (not root) could hand us their sockets."""
    if os.geteuid() != 0:
        # CI runs as root (the network tests need it too): there it fails.
        unavailable("needs root to give the run dir to another user", "PYIPC_REQUIRE_NETWORK")
    other = os.path.join(rundir, "theirs")
    os.mkdir(other, 0o770)
    os.chown(other, 54321, -1)
    try:
        with pytest.raises(pyipc.RunDirError) as info:
            pyipc.Context(rundir=other, backend=backend).service_init("svc")
        assert str(info.value) == f"run directory {other} is owned by another user (uid 54321)"
        with pytest.raises(pyipc.RunDirError):
            pyipc.Context(rundir=other, backend=backend).connect_service("svc")
    finally:
        os.chown(other, 0, -1)
    # root's own run dir (as for a system daemon) is fine
    ctx = pyipc.Context(rundir=other, backend=backend)
    ctx.service_init("svc")
    ctx.close_all()


def test_pure_a_service_that_fails_after_bind_leaves_no_socket_file(rundir, monkeypatch):
    """service_init failing after its socket was bound (chmod or listen
    refused) removes the socket file it made, as the core's does; pure left
    it there. White-box: pure only (the failure is injected in its chmod)."""
    from pyipc import _rundir
    ctx = pyipc.Context(rundir=rundir, backend="pure")
    try:
        def refuse(path: str, mode: int) -> None:
            raise PermissionError(13, "Permission denied")
        monkeypatch.setattr(_rundir.os, "chmod", refuse)
        with pytest.raises(pyipc.IPCError, match="^cannot start service svc: Permission denied$"):
            ctx.service_init("svc")
        monkeypatch.undo()
        assert not os.path.exists(os.path.join(rundir, "svc"))
        ctx.service_init("svc")                         # and the name can be served
    finally:
        ctx.close_all()
