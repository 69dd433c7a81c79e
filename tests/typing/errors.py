"""Errors as a user catches them: pyipc's classes with the built-ins they also
are, their attributes, and the typed-message errors. Run as a program;
checked by ``mypy --strict``.
"""

from __future__ import annotations

import builtins
import errno
from dataclasses import dataclass
from typing import Optional, Tuple, Type

import pyipc
from pyipc import Context, Registry


def connect_error(ctx: Context, name: str) -> Optional[int]:
    """errno of the failure to reach service ``name``, None when it answers."""
    try:
        ctx.connect(name)
    except pyipc.ServiceNotFoundError as e:      # also a FileNotFoundError
        assert isinstance(e, FileNotFoundError) and isinstance(e, pyipc.IPCError)
        return e.errno
    return None


def timed_out(ctx: Context, fd: int) -> bool:
    try:
        ctx.read(fd, timeout=0.01)
    except builtins.TimeoutError as e:           # pyipc.TimeoutError is one too
        return isinstance(e, pyipc.TimeoutError)
    return False


def typed_errors() -> None:
    reg = Registry()

    @reg.register(3)
    @dataclass
    class Need:
        a: int
        b: str

    try:
        reg.decode(b"\x09")
    except pyipc.UnknownTypeError as e:
        number: int = e.number
        assert number == 9
    try:
        reg.decode(reg.encode(Need(1, "x"))[:1] + b"\xa0")      # an empty map
    except pyipc.FieldMismatchError as e:
        missing: Tuple[str, ...] = e.missing
        assert missing == ("a", "b") and e.extra == ()
    kinds: Tuple[Type[pyipc.TypedMessageError], ...] = (
        pyipc.InvalidTypeNumberError, pyipc.DuplicateTypeError, pyipc.DuplicateClassError,
        pyipc.NotAMessageClassError, pyipc.UnregisteredClassError,
        pyipc.UnencodableValueError, pyipc.CorruptMessageError)
    for kind in kinds:
        assert issubclass(kind, ValueError)
    try:
        reg.register(256, Need)
    except pyipc.InvalidTypeNumberError as e:
        assert "out of range" in str(e)


def main() -> None:
    with Context() as ctx:
        assert connect_error(ctx, "typing-nobody") in (errno.ENOENT, errno.ECONNREFUSED)
        try:
            ctx.service_init("bad/name")
        except pyipc.InvalidNameError as e:
            assert e.errno is None and str(e) == "invalid service name: contains '/'"
        listening = ctx.service_init("typing-errors")
        try:
            Context().service_init("typing-errors")
        except pyipc.ServiceBusyError:
            pass
        try:
            ctx.write(12345, b"to nobody")
        except pyipc.UnknownFdError as e:
            assert str(e) == "fd 12345 is not managed by this context"
        with Context(max_message_size=8) as client:
            fd = client.connect("typing-errors")
            try:
                client.write(fd, b"nine bytes")
            except pyipc.MessageTooLargeError:
                pass
            assert timed_out(client, fd)
        ctx.close(listening)
    backend_errors: Tuple[Type[pyipc.IPCError], ...] = (
        pyipc.BackendError, pyipc.RunDirError, pyipc.QueueFullError,
        pyipc.ConnectionClosedError, pyipc.ConnectionLimitError)
    assert all(issubclass(e, OSError) for e in backend_errors)
    assert issubclass(pyipc.ConnectionClosedError, ConnectionError)
    assert issubclass(pyipc.NetworkError, ConnectionError)
    limits: Tuple[int, ...] = (pyipc.DEFAULT_MAX_MESSAGE_SIZE, pyipc.DEFAULT_MAX_QUEUE_SIZE,
                               pyipc.DEFAULT_MAX_CONNECTIONS, pyipc.DEFAULT_READ_MANY,
                               pyipc.MAX_READ_MANY, pyipc.MAX_BUSY_POLL, pyipc.READ_MANY_BYTES)
    assert all(n > 0 for n in limits)
    typed_errors()


if __name__ == "__main__":
    main()
