"""Types shared by both backends: events, callback results, errors and limits.

Every name here is part of the public API and is re-exported by `pyipc`.
The numbers of `EventType` and `CBEvent` are libIPC's, and the
same numbers are used by the C ABI in `zig/libipc.h`.
"""

from __future__ import annotations

import builtins
import enum
import sys
from typing import Any, NamedTuple, Optional, Union

if sys.version_info >= (3, 12):
    from collections.abc import Buffer as Buffer    # re-exported: the backends use it
else:
    from typing_extensions import Buffer as Buffer

Payload = Union[Buffer, str]
"""What write(), schedule() and write_many() send: a bytes-like object as it
is, a str as UTF-8 (anything else is a TypeError at run time)."""

DEFAULT_MAX_MESSAGE_SIZE = 16 << 20
"""Default bound on one message's payload, in bytes (16 MiB)."""

DEFAULT_MAX_QUEUE_SIZE = 64 << 20
"""Default bound on the bytes queued by `schedule()` for one fd (64 MiB)."""

DEFAULT_MAX_CONNECTIONS = 65536
"""Default bound on the number of fds one context manages (services,
connections and external fds together)."""

MAX_MESSAGE_SIZE_LIMIT = 0xFFFFFFFF
"""Hard upper bound of `max_message_size`: the 4-byte length header."""

MAX_QUEUE_SIZE_LIMIT = (1 << 63) - 1
"""Hard upper bound of `max_queue_size` (2**63 - 1): the core's queue byte
counts stay in 64 bits."""

MAX_CONNECTIONS_LIMIT = 0x7FFFFFFF
"""Hard upper bound of `max_connections` (2**31 - 1): the core's C int."""

MAX_TIMER = 0x7FFFFFFF
"""Longest `timer` a context takes, in milliseconds (2**31 - 1, about 24.8
days: poll()'s timeout is a C int)."""

DEFAULT_READ_MANY = 1024
"""Default `max_messages` of `read_many()`: messages returned by one call, at most."""

MAX_READ_MANY = 65536
"""Largest `max_messages` `read_many()` accepts (one call's batch)."""

READ_MANY_BYTES = 64 * 1024
"""One read_many() batch holds messages of this many bytes together at most;
a larger first message comes alone."""

MAX_BUSY_POLL = 10_000
"""Longest `busy_poll` a context takes, in microseconds (10 ms): it bounds
the CPU one wait may burn to save a wake-up that costs tens of microseconds."""

DEFAULT_RUNDIR = "/tmp/.libipc-run"
"""Default run directory, the same as libIPC's."""

MAX_SOCKET_PATH = 107
"""Longest socket path accepted (`sun_path` is 108 bytes on Linux, minus the NUL)."""

IPCD_SERVICE = "ipc"
"""Name of ipcd's service, reached by `connect()` when IPC_NETWORK is set."""

MAX_IPCD_REASON = 400
"""Bytes of an ipcd refusal after its "ne " (the code, a space and the text)
kept at most: what the client shows, and what the daemons send
(zig/ipcd_answer.zig's max_reason)."""

DEFAULT_LINGER = 1.0
"""Default `linger` of a Context, in seconds: how long closing waits for
scheduled messages to go out before it drops them (ZeroMQ's LINGER)."""

MAX_MORE_PER_ROUND = 64
"""Calls of one fd's `on_in` in one event-loop round at most, when it keeps
returning `CBEvent.MORE`: the rest continue in the next round (even if the fd
is not readable), so one fd with much buffered input cannot starve the others."""

MAX_DRAIN_CALLS = 1 << 16
"""`on_in` calls at most that let a switched fd whose write failed (its other
end gone) read what is left and meet its end (the core's max_drain_calls)."""

MAX_SWITCH_END_REASON = 1024
"""Longest `reason` `switch_end()` takes, in bytes of UTF-8."""


class EventType(enum.IntEnum):
    """What an `Event` reports (libIPC's numbers)."""

    ERROR = 0
    CONNECTION = 1
    DISCONNECTION = 2
    MESSAGE_RX = 3
    MESSAGE_TX = 4
    TIMER = 5
    EXTERNAL = 6
    SWITCH_RX = 7
    SWITCH_TX = 8


class CBEvent(enum.IntEnum):
    """Result of a switching callback (libIPC's numbers; MORE is pyipc's).

    MORE is for `on_in` only: the payload is forwarded as with NO_ERROR, and
    `on_in` is called again without waiting for the fd to be readable (it
    holds more input already read), up to MAX_MORE_PER_ROUND calls a round.
    From `on_out` it is an error, as any number that is not a result.
    """

    NO_ERROR = 0
    ERROR = 1
    FD_CLOSING = 2
    IGNORE = 3
    MORE = 4


class Event(NamedTuple):
    """One thing that happened on a context: an immutable named tuple.

    `type` is an `EventType`; `fd` the connection it concerns (-1 for
    TIMER); `index` the connection's slot in the context's table (-1 for
    TIMER); `message` the payload for MESSAGE_RX and SWITCH_RX (else None);
    `error` the reason for an ERROR event (else None).

    Events are values: equal when their fields are equal, hashable, and
    never changed once made (an attribute cannot be set). A batch from
    `wait_events()` may therefore hold one Event object several times, e.g.
    one MESSAGE_TX per message scheduled on a fd: each element still stands
    for one event (see docs/reference.md, "Events").
    """

    type: EventType
    fd: int = -1
    #: (As a field, `index` hides tuple.index(), which an Event does not need.)
    index: int = -1  # type: ignore[assignment]
    message: Optional[bytes] = None
    error: Optional[str] = None

    def __repr__(self) -> str:
        parts = [f"Event({self.type.name}", f"fd={self.fd}", f"index={self.index}"]
        if self.message is not None:
            shown = self.message if len(self.message) <= 32 else self.message[:32] + b"..."
            parts.append(f"message={shown!r} ({len(self.message)} B)")
        if self.error is not None:
            parts.append(f"error={self.error!r}")
        return ", ".join(parts) + ")"


class IPCError(OSError):
    """Base class of every error pyipc raises.

    `errno` is the OS error that caused it (None when no OS error did), and
    `str(e)` is the message alone, the same on both backends: unlike
    `OSError(errno, text)` it is not prefixed with `[Errno N]`.
    """

    def __init__(self, message: str = "", errno: Optional[int] = None) -> None:
        # One argument: OSError keeps it as the message (args[0]) and does not
        # take it for an errno.
        super().__init__(message)
        self.errno = errno

    def __str__(self) -> str:
        # BaseException's text (the message), not OSError's "[Errno N] ..."
        # (which it shows once .errno and .strerror are both set).
        return BaseException.__str__(self)

    def __reduce__(self) -> tuple[type[IPCError], tuple[str, Optional[int]], Any]:
        # OSError pickles args only: errno (an OSError slot) would be lost.
        message = self.args[0] if self.args else ""
        return type(self), (message, self.errno), self.__dict__ or None


class ServiceBusyError(IPCError):
    """Another live process already runs a service of that name in the run dir."""


class ServiceNotFoundError(IPCError, FileNotFoundError):
    """No service of that name in the run dir, or it refused the connection
    (also a built-in `FileNotFoundError`)."""


class InvalidNameError(IPCError):
    """A service name that is empty, has '/' or NUL, or makes a path too long."""


class RunDirError(IPCError):
    """The run directory cannot be used: a symlink, writable by others, or not creatable."""


class MessageTooLargeError(IPCError):
    """A message is larger than the context's `max_message_size`."""


class QueueFullError(IPCError):
    """A fd's send queue would exceed `max_queue_size`; nothing was queued."""


class ConnectionClosedError(IPCError, ConnectionError):
    """Read or write on a connection whose peer is gone (also a built-in
    `ConnectionError`)."""


class UnknownFdError(IPCError):
    """A fd this context does not manage (or not of the kind the call needs)."""


class ConnectionLimitError(IPCError):
    """The context already manages `max_connections` fds."""


class BackendError(IPCError):
    """The requested backend cannot be used (the reason is in the message)."""


class NetworkError(IPCError, ConnectionError):
    """connect() through ipcd was refused with a reason: the daemon of the
    scheme is missing, the remote host is unreachable or refused, a TLS
    failure, ipcd's timeout or its bound on requests (also a built-in
    `ConnectionError`). The text names the code ipcd gave, in parentheses."""


class TimeoutError(IPCError, builtins.TimeoutError):  # noqa: A001 - pyipc.TimeoutError
    """A blocking call's `timeout` passed first (also a built-in
    `TimeoutError`). Nothing was consumed; a write that had begun a frame
    completes it (behaviour reference: [Signals, timeouts and
    fork](reference.md#signals-timeouts-and-fork))."""


_ERRORS = (IPCError, ServiceBusyError, ServiceNotFoundError, InvalidNameError, RunDirError,
           MessageTooLargeError, QueueFullError, ConnectionClosedError, UnknownFdError,
           ConnectionLimitError, BackendError, NetworkError, TimeoutError)
# Shown (tracebacks, repr) and pickled as pyipc.X, the public name.
for _cls in _ERRORS:
    _cls.__module__ = "pyipc"
del _cls

#: Error classes by the name of the code the C ABI returns (`IPC_E_*` in
#: libipc.h): the native backend takes the numbers from the header.
ERRORS_BY_NAME: dict[str, type[IPCError]] = {
    "IPC_E_GENERIC": IPCError,
    "IPC_E_SERVICE_BUSY": ServiceBusyError,
    "IPC_E_SERVICE_NOT_FOUND": ServiceNotFoundError,
    "IPC_E_INVALID_NAME": InvalidNameError,
    "IPC_E_RUNDIR": RunDirError,
    "IPC_E_MESSAGE_TOO_LARGE": MessageTooLargeError,
    "IPC_E_QUEUE_FULL": QueueFullError,
    "IPC_E_CONNECTION_CLOSED": ConnectionClosedError,
    "IPC_E_UNKNOWN_FD": UnknownFdError,
    "IPC_E_CONNECTION_LIMIT": ConnectionLimitError,
    # IPC_E_INTERRUPTED never reaches a caller: the native backend runs the
    # signal's handler and goes on, or raises what the handler raised.
    "IPC_E_INTERRUPTED": IPCError,
    "IPC_E_TIMEOUT": TimeoutError,
    "IPC_E_NETWORK": NetworkError,
}

#: The same by number (tests/test_abi.py checks the numbers against libipc.h).
ERRORS_BY_CODE: dict[int, type[IPCError]] = {
    -1: IPCError,
    -2: ServiceBusyError,
    -3: ServiceNotFoundError,
    -4: InvalidNameError,
    -5: RunDirError,
    -6: MessageTooLargeError,
    -7: QueueFullError,
    -8: ConnectionClosedError,
    -9: UnknownFdError,
    -10: ConnectionLimitError,
    # IPC_E_INTERRUPTED never reaches a caller: the native backend runs the
    # signal's handler and goes on, or raises what the handler raised.
    -13: IPCError,
    -14: TimeoutError,
    -15: NetworkError,
}
