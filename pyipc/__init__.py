"""pyipc: libIPC's model of inter-process communication, for Python.

Services are Unix sockets named in a run directory; each process runs one event
loop on a `Context`; messages are length-prefixed frames. Two backends,
`native` (Zig core through cffi) and `pure` (plain Python), share this API.
"""

import os as _os

if _os.name != "posix":
    # Before anything else is imported: the run directory needs fcntl, the
    # backends Unix sockets, fork and poll.
    raise ImportError(f"pyipc needs a POSIX system (Linux, macOS, a BSD); "
                      f"this one is {_os.name!r}")

from . import _backend
from ._backend import available as available_backends
from ._context import Context
from ._types import (DEFAULT_LINGER, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_MESSAGE_SIZE,
                     DEFAULT_MAX_QUEUE_SIZE, DEFAULT_READ_MANY, DEFAULT_RUNDIR,
                     IPCD_SERVICE, MAX_BUSY_POLL, MAX_CONNECTIONS_LIMIT, MAX_DRAIN_CALLS,
                     MAX_IPCD_REASON, MAX_MESSAGE_SIZE_LIMIT, MAX_MORE_PER_ROUND,
                     MAX_QUEUE_SIZE_LIMIT, MAX_READ_MANY, MAX_SOCKET_PATH,
                     MAX_SWITCH_END_REASON, MAX_TIMER,
                     READ_MANY_BYTES, BackendError, CBEvent,
                     ConnectionClosedError, ConnectionLimitError, Event, EventType,
                     InvalidNameError, IPCError, MessageTooLargeError, NetworkError, QueueFullError,
                     RunDirError, ServiceBusyError, ServiceNotFoundError, UnknownFdError)
from ._types import TimeoutError as TimeoutError  # explicit re-export, not in __all__
from ._version import __version__ as __version__
from .typed import (CorruptMessageError, DuplicateClassError, DuplicateTypeError,
                    FieldMismatchError, InvalidTypeNumberError, NotAMessageClassError,
                    Registry, TypedMessageError, UnencodableValueError, UnexpectedTypeError,
                    UnknownTypeError, UnregisteredClassError)

_backend.plug_in()
_backend.warn_if_unbuilt()

# TimeoutError is pyipc.TimeoutError but not in __all__: "from pyipc import *"
# would hide the built-in TimeoutError, and "except TimeoutError" would then miss
# every other timeout (socket, asyncio).
__all__ = [
    "Context", "Event", "EventType", "CBEvent", "available_backends",
    "IPCError", "ServiceBusyError", "ServiceNotFoundError", "InvalidNameError",
    "RunDirError", "MessageTooLargeError", "QueueFullError", "ConnectionClosedError",
    "UnknownFdError", "ConnectionLimitError", "BackendError", "NetworkError",
    "DEFAULT_LINGER", "DEFAULT_MAX_MESSAGE_SIZE", "DEFAULT_MAX_QUEUE_SIZE", "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_RUNDIR", "DEFAULT_READ_MANY", "MAX_READ_MANY", "MAX_BUSY_POLL", "READ_MANY_BYTES",
    "MAX_MORE_PER_ROUND", "MAX_DRAIN_CALLS", "MAX_SWITCH_END_REASON",
    "MAX_MESSAGE_SIZE_LIMIT", "MAX_QUEUE_SIZE_LIMIT", "MAX_CONNECTIONS_LIMIT", "MAX_TIMER",
    "MAX_SOCKET_PATH", "MAX_IPCD_REASON", "IPCD_SERVICE",
    "Registry", "TypedMessageError", "InvalidTypeNumberError", "DuplicateTypeError",
    "DuplicateClassError", "NotAMessageClassError", "UnregisteredClassError",
    "UnencodableValueError", "UnknownTypeError", "UnexpectedTypeError", "CorruptMessageError",
    "FieldMismatchError",
]
