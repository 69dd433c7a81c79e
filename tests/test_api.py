"""The public API on both backends: construction, backend choice, limits,
timer, context manager, iteration, repr and payload types."""

from __future__ import annotations

import array
import copy
import pickle

import pytest

import pyipc
from pyipc import EventType

from conftest import collect, raises, wait_for


def test_backend_argument_selects_the_backend(backend, rundir):
    with pyipc.Context(rundir=rundir, backend=backend) as ctx:
        assert ctx.backend == backend
        assert isinstance(ctx, pyipc.Context)
        assert type(ctx).__name__ == {"pure": "PureContext", "native": "NativeContext"}[backend]


def test_env_selects_the_backend(backend, rundir, monkeypatch):
    monkeypatch.setenv("PYIPC_BACKEND", backend)
    with pyipc.Context(rundir=rundir) as ctx:
        assert ctx.backend == backend


def test_argument_beats_env(backend, rundir, monkeypatch):
    other = "pure" if backend == "native" else "native"
    monkeypatch.setenv("PYIPC_BACKEND", other)
    with pyipc.Context(rundir=rundir, backend=backend) as ctx:
        assert ctx.backend == backend


def test_default_is_native_when_it_loads(rundir, monkeypatch):
    monkeypatch.delenv("PYIPC_BACKEND", raising=False)
    expected = "native" if pyipc.available_backends()["native"] is None else "pure"
    with pyipc.Context(rundir=rundir) as ctx:
        assert ctx.backend == expected


def test_unknown_backend_is_a_backend_error(rundir, monkeypatch):
    with pytest.raises(pyipc.BackendError) as info:
        pyipc.Context(rundir=rundir, backend="turbo")
    assert str(info.value) == "unknown backend 'turbo' (expected 'native' or 'pure')"
    assert isinstance(info.value, pyipc.IPCError) and isinstance(info.value, OSError)
    monkeypatch.setenv("PYIPC_BACKEND", "turbo")
    with pytest.raises(pyipc.BackendError):
        pyipc.Context(rundir=rundir)


def test_only_none_chooses_the_backend(backend, rundir, monkeypatch):
    """A falsy backend= is not None: "" is an unknown name, and 0 or False
    a TypeError; neither falls back to the env or the automatic choice."""
    monkeypatch.setenv("PYIPC_BACKEND", backend)
    with pytest.raises(pyipc.BackendError) as info:
        pyipc.Context(rundir=rundir, backend="")
    assert str(info.value) == "unknown backend '' (expected 'native' or 'pure')"
    for value, name in ((0, "int"), (False, "bool"), (0.0, "float"), (b"", "bytes")):
        with pytest.raises(TypeError) as info:
            pyipc.Context(rundir=rundir, backend=value)
        assert str(info.value) == f"backend must be str or None, not {name}"
    with pyipc.Context(rundir=rundir, backend=None) as ctx:
        assert ctx.backend == backend


def test_native_asked_by_name_never_falls_back(rundir, monkeypatch, tmp_path):
    """A native library that cannot load raises BackendError with the reason."""
    import subprocess
    import sys
    from conftest import CHILD_ENV
    env = dict(CHILD_ENV, PYIPC_LIBRARY=str(tmp_path / "nope.so"))
    code = ("import pyipc\n"
            "try:\n    pyipc.Context(rundir='/tmp', backend='native')\n"
            "except pyipc.BackendError as e:\n    print('BackendError', e)\n"
            "print(pyipc.available_backends()['native'] is not None)\n"
            "print(pyipc.Context(rundir='/tmp').backend)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("BackendError native backend: cannot load libipc (")
    assert "nope.so: not found" in lines[0]
    assert lines[1:] == ["True", "pure"]


def test_available_backends_reports_pure(backend):
    available = pyipc.available_backends()
    assert set(available) == {"native", "pure"}
    assert available["pure"] is None
    assert available[backend] is None


def test_defaults_and_attributes(ctx_factory, rundir):
    ctx = ctx_factory()
    assert ctx.rundir == rundir
    assert ctx.max_message_size == 16 << 20 == pyipc.DEFAULT_MAX_MESSAGE_SIZE
    assert ctx.max_queue_size == 64 << 20 == pyipc.DEFAULT_MAX_QUEUE_SIZE
    assert ctx.max_connections == 65536 == pyipc.DEFAULT_MAX_CONNECTIONS
    assert ctx.timer is None


def test_rundir_default_and_env(backend, monkeypatch, rundir):
    monkeypatch.delenv("RUNDIR", raising=False)
    with pyipc.Context(backend=backend) as ctx:
        assert ctx.rundir == "/tmp/.libipc-run" == pyipc.DEFAULT_RUNDIR
    monkeypatch.setenv("RUNDIR", rundir)
    with pyipc.Context(backend=backend) as ctx:
        assert ctx.rundir == rundir
    with pyipc.Context(backend=backend, rundir="/tmp/elsewhere") as ctx:
        assert ctx.rundir == "/tmp/elsewhere"


def test_repr(ctx_factory, backend, rundir):
    assert repr(ctx_factory()) == f"<pyipc.Context backend={backend} rundir={rundir!r}>"


COPIES = {"pickle": pickle.dumps, "copy": copy.copy, "deepcopy": copy.deepcopy,
          "pickle a bound method": lambda ctx: pickle.dumps(ctx.connect)}


@pytest.mark.parametrize("how", COPIES)
def test_a_context_is_not_pickled_or_copied(ctx_factory, how):
    """Both backends refuse with one TypeError that says why: a shallow copy
    was made and shared the native handle (or the pure poller) with the
    original, and pickling failed on some inner object's name."""
    ctx = ctx_factory()
    ctx.service_init("svc")
    with pytest.raises(TypeError) as info:
        COPIES[how](ctx)
    assert str(info.value) == ("a pyipc.Context cannot be pickled or copied: it owns this "
                               "process's sockets and poller; make a new one where it is needed")
    assert ctx.wait_events(timeout=0) == []       # the context is as it was


@pytest.mark.parametrize("how", COPIES)
def test_an_aio_context_is_not_pickled_or_copied(actx, how):
    ctx = actx()
    with pytest.raises(TypeError, match="^a pyipc.aio.Context cannot be pickled or copied"):
        COPIES[how](ctx)


@pytest.mark.parametrize("kwargs, error, text", [
    ({"max_message_size": 0}, ValueError, "max_message_size must be between 1 and 4294967295"),
    ({"max_message_size": 1 << 32}, ValueError,
     "max_message_size must be between 1 and 4294967295"),
    ({"max_message_size": 100, "max_queue_size": 103}, ValueError,
     "max_queue_size must be at least max_message_size + 4"),
    ({"max_message_size": 1, "max_queue_size": 1 << 63}, ValueError,
     "max_queue_size must be at most 9223372036854775807"),
    ({"max_connections": 0}, ValueError, "max_connections must be between 1 and 2147483647"),
    ({"max_connections": 1 << 31}, ValueError,
     "max_connections must be between 1 and 2147483647"),
    ({"max_message_size": 1.5}, TypeError, "max_message_size must be int, not float"),
    ({"max_queue_size": "1"}, TypeError, "max_queue_size must be int, not str"),
    ({"max_connections": True}, TypeError, "max_connections must be int, not bool"),
])
def test_limits_are_validated(backend, rundir, kwargs, error, text):
    with pytest.raises(error) as info:
        pyipc.Context(rundir=rundir, backend=backend, **kwargs)
    assert str(info.value) == text


def test_limits_at_their_edges_are_accepted(ctx_factory):
    ctx = ctx_factory(max_message_size=1, max_queue_size=5, max_connections=1)
    assert (ctx.max_message_size, ctx.max_queue_size, ctx.max_connections) == (1, 5, 1)
    big = ctx_factory(max_message_size=1, max_queue_size=(1 << 63) - 1)
    assert big.max_queue_size == (1 << 63) - 1
    ctx = ctx_factory(max_message_size=pyipc.MAX_MESSAGE_SIZE_LIMIT,
                      max_queue_size=pyipc.MAX_MESSAGE_SIZE_LIMIT + 4,
                      max_connections=pyipc.MAX_CONNECTIONS_LIMIT)
    assert ctx.max_message_size == 0xFFFFFFFF and ctx.max_connections == 0x7FFFFFFF
    assert pyipc.MAX_QUEUE_SIZE_LIMIT == (1 << 63) - 1


@pytest.mark.parametrize("name", ["max_message_size", "max_queue_size", "max_connections"])
def test_a_limit_cannot_change_after_the_context_is_made(pair, name):
    """Assigning a limit was accepted and applied in part (pure: sends and
    new connections, not the decoders of existing ones) or not at all
    (native): it is refused, and the limit stays what the constructor got."""
    before = getattr(pair.server, name)
    with pytest.raises(AttributeError) as info:
        setattr(pair.server, name, 10)
    assert str(info.value) == (f"{name} is fixed for the context's life: give it to "
                               f"the constructor, Context({name}=...)")
    assert getattr(pair.server, name) == before
    pair.client.write(pair.client_fd, b"x" * 50)        # over 10: still accepted
    assert pair.server.read(pair.server_fd, timeout=10) == b"x" * 50


def test_timer_property(ctx_factory):
    ctx = ctx_factory()
    ctx.timer = 0
    assert ctx.timer == 0
    ctx.timer = 1500
    assert ctx.timer == 1500
    ctx.timer = None
    assert ctx.timer is None
    with pytest.raises(ValueError):
        ctx.timer = -1
    ctx.timer = pyipc.MAX_TIMER                  # the edge: accepted
    assert ctx.timer == pyipc.MAX_TIMER == (1 << 31) - 1
    ctx.timer = None
    with pytest.raises(ValueError, match=rf"^timer must be at most {pyipc.MAX_TIMER} ms$"):
        ctx.timer = pyipc.MAX_TIMER + 1
    for bad in (1.5, "10", True):
        with pytest.raises(TypeError):
            ctx.timer = bad
    assert ctx.timer is None


def test_timer_fires_after_its_time(ctx_factory):
    import time
    ctx = ctx_factory()
    ctx.timer = 30
    start = time.monotonic()
    ev = ctx.wait_event()
    elapsed = time.monotonic() - start
    assert (ev.type, ev.fd, ev.index, ev.message, ev.error) == (EventType.TIMER, -1, -1, None, None)
    assert 0.025 <= elapsed < 2


def test_nothing_to_wait_for(ctx_factory):
    ctx = ctx_factory()
    with pytest.raises(pyipc.IPCError) as info:
        ctx.wait_event()
    assert str(info.value) == "nothing to wait for: no fd and no timer"
    with pytest.raises(pyipc.IPCError):
        ctx.wait_events()


def test_a_wait_with_nothing_left_forgets_a_peer_that_ended(pair):
    """Once its DISCONNECTION was handed out, the next wait forgets the fd,
    even one that raises "nothing to wait for": a later call on it is
    UnknownFdError on both backends (pure said ConnectionClosedError)."""
    pair.server.close_all()
    assert [e.type for e in collect(pair.client, lambda seen: any(
        e.type == EventType.DISCONNECTION for e in seen))] == [EventType.DISCONNECTION]
    raises(pyipc.ConnectionClosedError,
           f"connection on fd {pair.client_fd} is closed by the peer",
           pair.client.schedule, pair.client_fd, b"x")
    raises(pyipc.IPCError, "nothing to wait for: no fd and no timer",
           pair.client.wait_events)
    raises(pyipc.UnknownFdError, f"fd {pair.client_fd} is not managed by this context",
           pair.client.schedule, pair.client_fd, b"x")


def test_context_manager_closes_everything(backend, rundir):
    import os
    with pyipc.Context(rundir=rundir, backend=backend) as ctx:
        fd = ctx.service_init("cm")
        assert os.path.exists(os.path.join(rundir, "cm"))
    assert not os.path.exists(os.path.join(rundir, "cm"))
    with pytest.raises(OSError):
        os.fstat(fd)
    with pytest.raises(pyipc.UnknownFdError):
        ctx.close(fd)


def test_context_manager_closes_on_exception(backend, rundir):
    import os
    with pytest.raises(RuntimeError):
        with pyipc.Context(rundir=rundir, backend=backend) as ctx:
            ctx.service_init("boom")
            raise RuntimeError("x")
    assert not os.path.exists(os.path.join(rundir, "boom"))


def test_iteration_yields_events_forever(pair):
    pair.client.write(pair.client_fd, b"one")
    pair.client.write(pair.client_fd, b"two")
    got = []
    pair.server.timer = 2000
    for ev in pair.server:
        assert ev.type == EventType.MESSAGE_RX
        got.append(ev.message)
        if len(got) == 2:
            break
    assert got == [b"one", b"two"]
    pair.server.timer = 10
    it = iter(pair.server)
    assert next(it).type == EventType.TIMER
    assert next(it).type == EventType.TIMER


def test_close_all_leaves_the_context_usable(ctx_factory, rundir):
    ctx = ctx_factory()
    ctx.service_init("again")
    ctx.close_all()
    fd = ctx.service_init("again")
    client = ctx_factory()
    client.connect_service("again")
    ev = wait_for(ctx, EventType.CONNECTION)[-1]
    assert ev.index == 1 and fd != ev.fd


@pytest.mark.parametrize("payload, expected", [
    (b"bytes", b"bytes"),
    ("str \u00e9\u4e2d", "str \u00e9\u4e2d".encode("utf-8")),
    (bytearray(b"bytearray"), b"bytearray"),
    (memoryview(b"xmemoryviewx")[1:-1], b"memoryview"),
    (array.array("H", [1, 2]), array.array("H", [1, 2]).tobytes()),
    (b"", b""),
    ("", b""),
])
def test_payload_types(pair, payload, expected):
    pair.client.write(pair.client_fd, payload)
    ev = wait_for(pair.server, EventType.MESSAGE_RX)[-1]
    assert ev.message == expected and type(ev.message) is bytes
    pair.client.schedule(pair.client_fd, payload)
    wait_for(pair.client, EventType.MESSAGE_TX)
    assert pair.server.read(pair.server_fd) == expected
    pair.server.write(pair.server_fd, payload)
    received = pair.client.read(pair.client_fd)
    assert received == expected and type(received) is bytes


@pytest.mark.parametrize("payload", [123, None, 1.5, ["a"], object()])
def test_other_payload_types_are_type_errors(pair, payload):
    for call in (pair.client.write, pair.client.schedule):
        with pytest.raises(TypeError) as info:
            call(pair.client_fd, payload)
        assert str(info.value) == (f"payload must be bytes-like or str, "
                                   f"not {type(payload).__name__}")
    # Nothing was sent or queued.
    pair.client.write(pair.client_fd, b"after")
    assert pair.server.read(pair.server_fd) == b"after"


def test_non_int_fd_is_a_type_error(pair):
    with pytest.raises(TypeError):
        pair.client.write("3", b"x")
    with pytest.raises(TypeError):
        pair.client.read(None)


def test_non_str_name_is_a_type_error(ctx_factory):
    ctx = ctx_factory()
    with pytest.raises(TypeError):
        ctx.service_init(b"bytes")
    with pytest.raises(TypeError):
        ctx.connect_service(42)


def test_event_repr_and_equality():
    ev = pyipc.Event(EventType.MESSAGE_RX, 5, 1, b"x" * 40)
    assert repr(ev) == ("Event(MESSAGE_RX, fd=5, index=1, message="
                        + repr(b"x" * 32 + b"...") + " (40 B))")
    assert ev == pyipc.Event(EventType.MESSAGE_RX, 5, 1, b"x" * 40)
    assert ev != pyipc.Event(EventType.MESSAGE_RX, 5, 2, b"x" * 40)
    assert repr(pyipc.Event(EventType.ERROR, 3, 0, None, "bad")) == \
        "Event(ERROR, fd=3, index=0, error='bad')"


def test_enum_values_are_libipcs():
    assert [int(t) for t in EventType] == list(range(9))
    assert [t.name for t in EventType] == [
        "ERROR", "CONNECTION", "DISCONNECTION", "MESSAGE_RX", "MESSAGE_TX", "TIMER",
        "EXTERNAL", "SWITCH_RX", "SWITCH_TX"]
    assert {c.name: int(c) for c in pyipc.CBEvent} == {
        "NO_ERROR": 0, "ERROR": 1, "FD_CLOSING": 2, "IGNORE": 3,
        "MORE": 4}                      # pyipc's, after libIPC's four


def test_error_hierarchy():
    for cls in (pyipc.ServiceBusyError, pyipc.ServiceNotFoundError, pyipc.InvalidNameError,
                pyipc.RunDirError, pyipc.MessageTooLargeError, pyipc.QueueFullError,
                pyipc.ConnectionClosedError, pyipc.UnknownFdError,
                pyipc.ConnectionLimitError, pyipc.BackendError, pyipc.NetworkError):
        assert issubclass(cls, pyipc.IPCError)
    assert issubclass(pyipc.IPCError, OSError)


def test_wrong_fd_types_and_numbers_agree(pair):
    for call in (lambda fd: pair.client.write(fd, b"x"), pair.client.read,
                 pair.client.close, pair.client.add_external,
                 pair.client.peer_credentials):
        with pytest.raises(TypeError) as info:
            call("3")
        assert str(info.value) == "fd must be int, not str"
    huge = 1 << 40
    for call in (lambda fd: pair.client.write(fd, b"x"), pair.client.read,
                 pair.client.close, pair.client.peer_credentials):
        with pytest.raises(pyipc.UnknownFdError) as info:
            call(huge)
        assert str(info.value) == f"fd {huge} is not managed by this context"
    with pytest.raises(pyipc.UnknownFdError) as info:
        pair.client.add_external(huge)
    assert str(info.value) == f"fd {huge} is not an open file descriptor"


def test_huge_fds_in_add_switch_agree(pair):
    """add_switch takes two fds: one out of C's int range is unknown like any
    other, named as given; only the same number twice is "with itself"."""
    ctx, fd = pair.client, pair.client_fd
    for fd1, fd2, named in ((-1, 1 << 31, -1), (1 << 31, -1, 1 << 31),
                            (10 ** 30, -1, 10 ** 30), ((1 << 32) + 5, 1 << 40, (1 << 32) + 5),
                            (-(1 << 31) - 1, 1 << 31, -(1 << 31) - 1),
                            (fd, 1 << 31, 1 << 31), (1 << 31, fd, 1 << 31),
                            (fd, -1, -1), (-1, fd, -1)):
        with pytest.raises(pyipc.UnknownFdError) as info:
            ctx.add_switch(fd1, fd2)
        assert str(info.value) == f"fd {named} is not managed by this context", (fd1, fd2)
    for same in (1 << 63, 1 << 31, -1):
        with pytest.raises(pyipc.IPCError) as info:
            ctx.add_switch(same, same)
        assert type(info.value) is pyipc.IPCError
        assert str(info.value) == f"cannot switch fd {same} with itself"


def test_a_missing_backend_fails_under_require_native(monkeypatch):
    """The backend fixture's rule: skip with the reason, but fail in CI."""
    import conftest
    monkeypatch.setattr(pyipc, "available_backends",
                        lambda: {"native": "libipc.so: not found", "pure": None})
    monkeypatch.setenv("PYIPC_REQUIRE_NATIVE", "1")
    with pytest.raises(pytest.fail.Exception) as info:
        conftest.require_backend("native")
    assert "libipc.so: not found" in str(info.value)
    monkeypatch.delenv("PYIPC_REQUIRE_NATIVE")
    with pytest.raises(pytest.skip.Exception) as info:
        conftest.require_backend("native")
    assert "libipc.so: not found" in str(info.value)
    assert conftest.require_backend("pure") == "pure"


def test_rundir_argument_type_and_nul(backend, tmp_path):
    with pytest.raises(TypeError) as info:
        pyipc.Context(rundir=b"/tmp/bytes", backend=backend)
    assert str(info.value) == "rundir must be str or os.PathLike[str], not bytes"
    with pytest.raises(ValueError) as info:
        pyipc.Context(rundir=str(tmp_path / "a\0b"), backend=backend)
    assert str(info.value) == "rundir must not contain NUL"
    assert list(tmp_path.iterdir()) == []       # nothing made of a cut-short path
    # A lone surrogate no file name gives: the same ValueError on both backends,
    # at construction (a UnicodeEncodeError before, native's at construction,
    # pure's at the first call).
    with pytest.raises(ValueError) as info:
        pyipc.Context(rundir=str(tmp_path / "a\ud800"), backend=backend)
    assert type(info.value) is ValueError
    assert str(info.value) == ("rundir must not contain a lone surrogate that is not an "
                               "undecodable byte's escape")
    assert list(tmp_path.iterdir()) == []


def test_strided_memoryview_payload(pair):
    strided = memoryview(b"a-b-c-")[::2]
    pair.client.write(pair.client_fd, strided)
    pair.client.schedule(pair.client_fd, strided)
    wait_for(pair.client, EventType.MESSAGE_TX)
    assert pair.server.read(pair.server_fd) == b"abc"
    assert pair.server.read(pair.server_fd) == b"abc"


def test_bool_is_not_a_fd(pair):
    for call in (lambda: pair.client.write(True, b"x"), lambda: pair.client.read(False),
                 lambda: pair.client.close(True), lambda: pair.client.add_external(True)):
        with pytest.raises(TypeError) as info:
            call()
        assert str(info.value).startswith("fd must be int, not bool")


def _returns_within(seconds: float, call) -> list:
    """call() in a daemon thread; its result, or AssertionError when it is
    still waiting after ``seconds`` (a hang shows as a failure, not a stuck run)."""
    import threading
    out: list = []
    thread = threading.Thread(target=lambda: out.append(call()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still waiting after {seconds} s"
    return out[0]


def test_own_sockets_are_blocking_and_the_event_loop_never_waits_on_them(pair, backend):
    """pyipc's own sockets are in blocking mode for good: the blocking calls
    wait in the kernel with no fcntl per call, and every transfer of the event
    loop passes MSG_DONTWAIT, so a full socket or half a frame never holds a
    wait_events(timer=0) up. Nothing toggles the mode, also when a call fails."""
    import os
    import threading
    client, server = pair.client, pair.server
    fds = (pair.client_fd, pair.server_fd)
    assert all(os.get_blocking(fd) for fd in fds)
    big = b"x" * (4 << 20)                       # more than the socket buffers hold
    client.schedule(pair.client_fd, big)
    client.timer = server.timer = 0
    # The client's loop writes what fits and returns; the server's reads the
    # part of the frame that came and returns.
    assert [e.type for e in _returns_within(10, client.wait_events)] == [EventType.TIMER]
    assert [e.type for e in _returns_within(10, server.wait_events)] == [EventType.TIMER]
    got: list = []
    while not got:
        client.wait_events()
        got = [e.message for e in server.wait_events() if e.type == EventType.MESSAGE_RX]
    assert got == [big]
    reader = threading.Thread(target=lambda: server.read(pair.server_fd))
    reader.start()
    client.write(pair.client_fd, big)            # waits for room
    reader.join()
    client.write(pair.client_fd, b"ping")
    assert server.read_many(pair.server_fd) == [b"ping"]
    server.write(pair.server_fd, b"pong")
    assert client.read(pair.client_fd) == b"pong"
    assert all(os.get_blocking(fd) for fd in fds)
    client.close(pair.client_fd)
    with pytest.raises(pyipc.ConnectionClosedError):
        server.read(pair.server_fd)
    assert os.get_blocking(pair.server_fd)
