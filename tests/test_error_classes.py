"""The error classes as Python code meets them: errno of the OS error that
caused them, the built-in classes they also are, their pyipc.X name, pickling,
tracebacks with real frames, running out of fds, and Context's positional
backend. The same on both backends."""

from __future__ import annotations

import builtins
import contextlib
import errno
import gc
import os
import pickle
import re
import resource
import socket
import traceback
from typing import Iterator

import pytest

import pyipc
from pyipc._types import ERRORS_BY_CODE

from conftest import ROOT, require_backend

#: Every public error class of pyipc.
ERROR_CLASSES = [pyipc.IPCError, pyipc.ServiceBusyError, pyipc.ServiceNotFoundError,
                 pyipc.InvalidNameError, pyipc.RunDirError, pyipc.MessageTooLargeError,
                 pyipc.QueueFullError, pyipc.ConnectionClosedError, pyipc.UnknownFdError,
                 pyipc.ConnectionLimitError, pyipc.BackendError, pyipc.NetworkError,
                 pyipc.TimeoutError]


def raised(call, *args) -> pyipc.IPCError:
    """The IPCError that call(*args) raises."""
    with pytest.raises(pyipc.IPCError) as info:
        call(*args)
    return info.value


# -- errno -----------------------------------------------------------------------

def test_service_not_found_carries_enoent(ctx_factory, rundir):
    e = raised(ctx_factory().connect_service, "nobody")
    assert type(e) is pyipc.ServiceNotFoundError
    assert e.errno == errno.ENOENT
    assert str(e) == f"no service nobody in {rundir}"


def test_missing_rundir_is_enoent(ctx_factory, tmp_path):
    missing = str(tmp_path / "never")
    e = raised(ctx_factory(rundir=missing).connect, "x")
    assert type(e) is pyipc.ServiceNotFoundError
    assert (e.errno, str(e)) == (errno.ENOENT, f"no service x in {missing}")


def test_stale_socket_carries_econnrefused(ctx_factory, rundir):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(os.path.join(rundir, "stale"))
    sock.close()                # the file stays, nobody listens
    e = raised(ctx_factory().connect_service, "stale")
    assert type(e) is pyipc.ServiceNotFoundError
    assert (e.errno, str(e)) == (errno.ECONNREFUSED, f"no service stale in {rundir}")


def test_ipcd_not_running_keeps_the_errno(ctx_factory, rundir, monkeypatch):
    monkeypatch.setenv("IPC_NETWORK", "svc unix://svc")
    e = raised(ctx_factory().connect, "svc")
    assert type(e) is pyipc.ServiceNotFoundError
    assert e.errno == errno.ENOENT
    assert str(e) == f"IPC_NETWORK is set but ipcd is not running (no service ipc in {rundir})"


def test_cannot_start_service_carries_the_errno(ctx_factory, rundir):
    os.mkdir(os.path.join(rundir, "svc.lock"))      # open(O_RDWR) of a directory: EISDIR
    e = raised(ctx_factory().service_init, "svc")
    assert type(e) is pyipc.IPCError
    assert (e.errno, str(e)) == (errno.EISDIR, f"cannot start service svc: {os.strerror(errno.EISDIR)}")


def test_rundir_error_carries_the_errno(ctx_factory, rundir):
    afile = os.path.join(rundir, "file")
    open(afile, "w").close()
    e = raised(ctx_factory(rundir=os.path.join(afile, "sub")).service_init, "svc")
    assert type(e) is pyipc.RunDirError
    assert e.errno == errno.ENOTDIR
    assert str(e) == f"cannot create run directory {afile}/sub: {os.strerror(errno.ENOTDIR)}"


def test_errors_without_an_os_cause_have_no_errno(pair):
    assert raised(pair.client.read, 99999).errno is None
    assert raised(pair.client.add_switch, pair.client_fd, pair.client_fd).errno is None
    with pytest.raises(pyipc.MessageTooLargeError) as info:
        pair.client.write(pair.client_fd, b"x" * (pair.client.max_message_size + 1))
    assert info.value.errno is None


def test_errno_of_a_failure_does_not_stick(ctx_factory, rundir):
    """A failure without an OS cause after one with it: errno None again."""
    ctx = ctx_factory()
    assert raised(ctx.connect_service, "nobody").errno == errno.ENOENT
    assert raised(ctx.close, 99999).errno is None


# -- the built-in classes ----------------------------------------------------------

def test_plain_python_code_catches_them(pair, ctx_factory):
    with pytest.raises(FileNotFoundError):
        ctx_factory().connect_service("nobody")
    pair.client.close(pair.client_fd)
    with pytest.raises(ConnectionError) as info:
        pair.server.read(pair.server_fd)
    assert type(info.value) is pyipc.ConnectionClosedError


def test_timeout_error_is_an_ipc_error_and_the_builtin():
    assert issubclass(pyipc.TimeoutError, pyipc.IPCError)
    assert issubclass(pyipc.TimeoutError, builtins.TimeoutError)
    assert pyipc.TimeoutError is not builtins.TimeoutError
    # "from pyipc import *" does not hide the built-in TimeoutError.
    assert "TimeoutError" not in pyipc.__all__


def test_error_codes_of_the_header_are_mapped():
    """IPC_E_TIMEOUT and IPC_E_INTERRUPTED are in libipc.h, numbered as
    ERRORS_BY_CODE knows them (the codes Python raises a class for)."""
    header = (ROOT / "zig" / "libipc.h").read_text()
    codes = {name: int(value) for name, value in re.findall(r"IPC_E_(\w+) = (-\d+)", header)}
    assert codes["INTERRUPTED"] == -13 and codes["TIMEOUT"] == -14
    assert ERRORS_BY_CODE[codes["TIMEOUT"]] is pyipc.TimeoutError
    raised_by_class = set(codes) - {"BUFFER_TOO_SMALL", "NO_MEMORY"}
    assert {codes[n] for n in raised_by_class} == set(ERRORS_BY_CODE)


# -- names, text and pickling --------------------------------------------------------

@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda c: c.__name__)
def test_classes_print_as_pyipc_names(cls):
    assert cls.__module__ == "pyipc"
    assert getattr(pyipc, cls.__name__) is cls
    e = cls("what happened", errno.EPIPE)
    assert str(e) == "what happened"            # no "[Errno 32]" prefix
    assert traceback.format_exception_only(e) == [f"pyipc.{cls.__name__}: what happened\n"]
    copy = pickle.loads(pickle.dumps(e))
    assert (type(copy), str(copy), copy.errno) == (cls, "what happened", errno.EPIPE)


def test_raised_errors_pickle_with_errno(ctx_factory):
    e = raised(ctx_factory().connect_service, "nobody")
    copy = pickle.loads(pickle.dumps(e))
    assert (type(copy), str(copy), copy.errno) == (type(e), str(e), errno.ENOENT)


def test_text_stays_plain_when_strerror_is_set():
    """OSError prints "[Errno N] strerror" once both are set: ours never do."""
    e = pyipc.IPCError("write failed: Broken pipe", errno.EPIPE)
    e.strerror = os.strerror(errno.EPIPE)
    assert str(e) == "write failed: Broken pipe"


# -- tracebacks ------------------------------------------------------------------------

def test_traceback_of_a_failing_write_has_real_frames(pair):
    pair.server.close(pair.server_fd)
    with pytest.raises(pyipc.ConnectionClosedError) as info:
        pair.client.write(pair.client_fd, b"x" * 300_000)   # more than a socket buffer
    text = "".join(traceback.format_exception(info.value))
    assert "<string>" not in text
    frames = traceback.extract_tb(info.value.__traceback__)
    assert any(f.name == "write" for f in frames)
    for frame in frames:
        assert os.path.isfile(frame.filename), frame
        assert frame.line, frame        # the source line is found and shown


# -- out of fds --------------------------------------------------------------------

@contextlib.contextmanager
def out_of_fds(spare: int = 0) -> Iterator[None]:
    """Every fd number this process may open but ``spare`` is taken (fds of
    /dev/null under a lowered RLIMIT_NOFILE); all closed and the limit
    restored afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fillers: list[int] = []
    # Earlier tests' garbage (contexts, sockets) closes its fds when collected:
    # collected now, and no collection meanwhile, so none is freed in the block.
    gc.collect()
    gc.disable()
    probe = os.open("/dev/null", os.O_RDONLY)
    os.close(probe)
    # Room for every fd open now and a few more: few fillers to open.
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(probe, *_open_fds()) + 8, hard))
    try:
        while True:
            try:
                fillers.append(os.open("/dev/null", os.O_RDONLY))
            except OSError as e:
                assert e.errno == errno.EMFILE
                break
        for _ in range(spare):
            os.close(fillers.pop())
        yield
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        gc.enable()


def _open_fds() -> list[int]:
    return [int(name) for name in os.listdir("/proc/self/fd")]


@pytest.mark.parametrize("spare", [0, 1], ids=["no-fd", "one-fd"])
def test_context_out_of_fds(backend, rundir, spare):
    """With one fd left, the poller gets it and the wake-up pipe fails: the
    poller's fd is closed again."""
    gc.collect()        # earlier tests' garbage closes its fds now, not below
    before = set(_open_fds())
    with out_of_fds(spare):
        with pytest.raises(pyipc.IPCError) as info:
            pyipc.Context(rundir, backend=backend)
    e = info.value
    assert type(e) is pyipc.IPCError
    assert (e.errno, str(e)) == (errno.EMFILE, "cannot create context: Too many open files")
    assert set(_open_fds()) - before == set()       # nothing it opened is left open


@pytest.mark.parametrize("spare", [0, 1], ids=["no-fd", "one-fd"])
def test_c_context_init_out_of_fds_is_not_out_of_memory(spare):
    """The C call's own code: IPC_E_GENERIC with errno EMFILE (it said
    IPC_E_NO_MEMORY, which a C caller takes for out of memory)."""
    require_backend("native")
    from pyipc._native import ffi, lib
    handle = ffi.new("void **")
    with out_of_fds(spare):
        rc = lib.ipc_context_init(handle)
        err = ffi.errno
    assert (rc, err) == (lib.IPC_E_GENERIC, errno.EMFILE)
    assert handle[0] == ffi.NULL


def test_connect_out_of_fds(ctx_factory):
    server, client = ctx_factory(), ctx_factory()
    server.service_init("svc")
    for call in (client.connect, client.connect_service):
        with out_of_fds():
            with pytest.raises(pyipc.IPCError) as info:
                call("svc")
        e = info.value
        assert type(e) is pyipc.IPCError
        assert e.errno == errno.EMFILE
        assert str(e) == "cannot connect to service svc: Too many open files"
    client.connect("svc")       # with fds again, it works


# -- Context's positional arguments ------------------------------------------------------

def test_positional_backend_is_honoured(backend, rundir, monkeypatch):
    other = "pure" if backend == "native" else "native"
    monkeypatch.setenv("PYIPC_BACKEND", other)      # what a keyword-only reading would take
    ctx = pyipc.Context(rundir, 1024, backend)
    try:
        assert (ctx.backend, ctx.rundir, ctx.max_message_size) == (backend, rundir, 1024)
    finally:
        ctx.close_all()
