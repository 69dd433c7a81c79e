"""Holes in the run directory and name checks (issue 16, point 5), both backends:
a NAME.lock symlink, a symlinked run dir given with a trailing slash, the names
"." and "..", and ';' in a name (it would inject rules into ipcd's request)."""

from __future__ import annotations

import fcntl
import os

import pytest

import pyipc

from conftest import raises


# -- NAME.lock ------------------------------------------------------------------

def test_dangling_lock_symlink_is_refused_and_not_followed(ctx_factory, rundir, tmp_path):
    """A dangling RUNDIR/pong.lock symlink: no file is created (and locked)
    where it points, and the service does not start."""
    target = tmp_path / "outside.lock"
    lock = os.path.join(rundir, "pong.lock")
    os.symlink(target, lock)
    ctx = ctx_factory()
    raises(pyipc.IPCError, f"cannot start service pong: {lock} is a symlink",
           ctx.service_init, "pong")
    assert not os.path.lexists(target)
    assert os.listdir(rundir) == ["pong.lock"]     # no socket either
    assert os.path.islink(lock)                    # left as found


def test_lock_symlink_to_an_existing_file_is_refused(ctx_factory, rundir, tmp_path):
    """A symlink to a file outside: that file is neither locked nor changed."""
    target = tmp_path / "outside.lock"
    target.write_bytes(b"keep")
    lock = os.path.join(rundir, "pong.lock")
    os.symlink(target, lock)
    ctx = ctx_factory()
    raises(pyipc.IPCError, f"cannot start service pong: {lock} is a symlink",
           ctx.service_init, "pong")
    with open(target, "rb+") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)     # nobody holds it
        assert f.read() == b"keep"


def test_lock_fd_is_close_on_exec(ctx_factory, rundir):
    """The lock fd must not leak into a child process started by the service."""
    ctx = ctx_factory()
    ctx.service_init("svc")
    lock = os.stat(os.path.join(rundir, "svc.lock"))
    found = []
    for fd in range(3, 4096):
        try:
            st = os.fstat(fd)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (lock.st_dev, lock.st_ino):
            found.append(fd)
    assert found, "the service holds no fd on svc.lock"
    assert all(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC for fd in found)


# -- run directory given with a trailing slash ------------------------------------

@pytest.mark.parametrize("suffix", ["/", "//"])
def test_symlinked_rundir_with_trailing_slash_is_refused(ctx_factory, rundir, suffix):
    target = os.path.join(rundir, "real")
    os.mkdir(target, 0o700)
    link = os.path.join(rundir, "link")
    os.symlink(target, link)
    ctx = ctx_factory(rundir=link + suffix)
    for call in (ctx.service_init, ctx.connect_service):
        raises(pyipc.RunDirError, f"run directory {link} is a symlink", call, "s")
    assert os.listdir(target) == []


def test_file_as_rundir_with_trailing_slash_is_not_a_directory(ctx_factory, rundir):
    path = os.path.join(rundir, "file")
    open(path, "w").close()
    ctx = ctx_factory(rundir=path + "/")
    for call in (ctx.service_init, ctx.connect_service):
        raises(pyipc.RunDirError, f"run directory {path} is not a directory", call, "s")


def test_real_rundir_with_trailing_slash_works(ctx_factory, rundir):
    server, client = ctx_factory(rundir=rundir + "/"), ctx_factory(rundir=rundir + "//")
    server.service_init("svc")
    client.connect_service("svc")
    assert sorted(os.listdir(rundir)) == ["svc", "svc.lock"]


# -- names "." and ".." and names with ';' ------------------------------------------

BAD_NAMES = [
    (".", "'.' and '..' are not names"),
    ("..", "'.' and '..' are not names"),
    ("a;b", "contains ';'"),
    (";", "contains ';'"),
    # A lone surrogate that no file name's byte gives (UnicodeEncodeError
    # before, with each backend's own text); checked first.
    ("\ud800", "a lone surrogate that is not an undecodable byte's escape cannot be a file name"),
    ("a\udfff/", "a lone surrogate that is not an undecodable byte's escape cannot be a file name"),
]


@pytest.mark.parametrize("name, reason", BAD_NAMES)
def test_bad_names_create_nothing(ctx_factory, rundir, name, reason, monkeypatch):
    monkeypatch.delenv("IPC_NETWORK", raising=False)
    ctx = ctx_factory()
    for call in (ctx.service_init, ctx.connect_service, ctx.connect):
        raises(pyipc.InvalidNameError, f"invalid service name: {reason}", call, name)
    assert os.listdir(rundir) == []


@pytest.mark.parametrize("name, reason", BAD_NAMES)
def test_bad_names_do_not_create_the_rundir(ctx_factory, tmp_path, name, reason):
    missing = str(tmp_path / "never")
    ctx = ctx_factory(rundir=missing)
    raises(pyipc.InvalidNameError, f"invalid service name: {reason}", ctx.service_init, name)
    assert not os.path.exists(missing)


def test_a_name_or_rundir_with_an_undecodable_byte_reads_the_same_on_both_backends(
        ctx_factory, rundir):
    """A surrogate escape (os.fsdecode's '\\udcff' for the byte 0xff) stands
    for its byte on disk, and errors show the name and run dir as given (the
    native backend showed U+FFFD where pure showed the escape)."""
    server, client = ctx_factory(), ctx_factory()
    server.service_init("na\udcffme")
    client.connect_service("na\udcffme")
    assert sorted(os.listdir(os.fsencode(rundir))) == [b"na\xffme", b"na\xffme.lock"]
    raises(pyipc.ServiceNotFoundError, f"no service nosuch\udcff in {rundir}",
           client.connect_service, "nosuch\udcff")
    elsewhere = os.path.join(rundir, "x\udcff", "y")
    raises(pyipc.ServiceNotFoundError, f"no service a in {elsewhere}",
           ctx_factory(rundir=elsewhere).connect_service, "a")


def test_dots_inside_a_name_are_fine(ctx_factory, rundir):
    server, client = ctx_factory(), ctx_factory()
    for name in ("...", ".hidden", "a..b"):
        server.service_init(name)
        client.connect_service(name)


def test_semicolon_through_ipcd_is_invalid_name(ctx_factory, rundir, monkeypatch):
    """With IPC_NETWORK set the request to ipcd is "NAME;IPC_NETWORK": a ';'
    in NAME would add rules of the caller's choosing. Refused before ipcd is
    even looked for (no ipcd runs here: that would be ServiceNotFoundError)."""
    monkeypatch.setenv("IPC_NETWORK", "b local:b")
    ctx = ctx_factory()
    raises(pyipc.InvalidNameError, "invalid service name: contains ';'", ctx.connect, "a;b")
    raises(pyipc.ServiceNotFoundError,
           f"IPC_NETWORK is set but ipcd is not running (no service ipc in {rundir})",
           ctx.connect, "a")
    assert os.listdir(rundir) == []
