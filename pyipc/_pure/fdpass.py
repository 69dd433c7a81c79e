"""connect() through ipcd (IPC_NETWORK): ipcd answers with the connected
socket, passed as a file descriptor (the core's fdpass.zig).
"""

from __future__ import annotations

import os
import select
import socket
import time
from typing import TYPE_CHECKING, List, Optional, cast

from .._types import (IPCD_SERVICE, MAX_IPCD_REASON, IPCError, NetworkError,
                      ServiceNotFoundError, TimeoutError)
from .. import _rundir
from .blocking import wait_fd
from .conn_table import CONNECTION, Conn
from .services import STREAM_FAMILIES

if TYPE_CHECKING:
    from .._context import Context
    from .state import PureState

#: Fds received with ipcd's answer at most (the first is used, the others
#: closed; the kernel discards any beyond these).
MAX_RECEIVED_FDS = 8
#: Refusal codes that mean "no such service" (the others: NetworkError).
_NOT_FOUND_CODES = (b"norule", b"noservice")
#: Received fds are close-on-exec from the start, where the system can.
_CMSG_CLOEXEC = getattr(socket, "MSG_CMSG_CLOEXEC", 0)


class Ipcd:
    """PureContext's connect() through ipcd."""

    __slots__ = ()

    def _connect_ipcd(self: PureState, name: str, network: str, timeout: Optional[float]) -> int:
        # (PureState is the mixins' view of the PureContext, a Context.)
        sock = ask_ipcd(cast("Context", self), name, network, timeout)
        sock.setblocking(True)
        return self._add(Conn(sock.fileno(), sock, CONNECTION, self.max_message_size)).fd


def ask_ipcd(ctx: "Context", name: str, network: str, timeout: Optional[float]) -> socket.socket:
    """connect()'s exchange with ipcd, made through ctx's own calls (both
    backends): send "NAME;IPC_NETWORK", wait for the answer (at most
    `timeout` s), take the fd it hands over. Returns that connected stream
    socket, for the backend to adopt; raises what the answer means. A wait
    that a signal interrupts goes on once its handler returns (PEP 475), so
    ipcd is asked once; a handler that raises ends it."""
    _rundir.service_path(ctx.rundir, name)
    try:
        ipcd = ctx.connect_service(IPCD_SERVICE)
    except ServiceNotFoundError as e:
        raise ServiceNotFoundError(
            f"IPC_NETWORK is set but ipcd is not running "
            f"(no service {IPCD_SERVICE} in {ctx.rundir})", e.errno) from None
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        ctx.write(ipcd, f"{name};{network}", timeout)
        # An ipcd that accepted but does not answer must not hang us.
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not wait_fd(ipcd, select.POLLIN, left):
            raise TimeoutError(f"connect to service {name} timed out")
        ipcd_sock = socket.socket(fileno=ipcd)
        try:
            answer, fds, _, _ = socket.recv_fds(
                ipcd_sock, 2000, MAX_RECEIVED_FDS, _CMSG_CLOEXEC)
        finally:
            ipcd_sock.detach()                  # the context closes it
    except TimeoutError as e:
        raise TimeoutError(f"connect to service {name} timed out") from e.__cause__
    except OSError:
        answer, fds = b"", []
    finally:
        ctx.close(ipcd)
    sock = _connected_stream(take_ipcd_answer(name, answer, fds))
    if sock is None:
        raise IPCError("ipcd sent a file descriptor that is not a connected "
                       "Unix or TCP stream socket")
    return sock


def take_ipcd_answer(name: str, answer: bytes, fds: List[int]) -> int:
    """The fd ipcd handed over with its answer "ok" (any others it sent are
    closed), or the IPCError its answer means (every fd closed). Shared with
    pyipc.aio's connect()."""
    for extra in fds[1:]:        # only the first is used: the others are not leaked
        os.close(extra)
    if answer != b"ok" or not fds:
        if fds:
            os.close(fds[0])
        raise _refusal_error(name, answer)
    return fds[0]


def _refusal_error(name: str, answer: bytes) -> IPCError:
    """The error of ipcd's answer when it is not "ok" + fd: pyipc's refusal
    "ne CODE TEXT" names its code and reason; anything else (libIPC's bare
    EOF) says only that it failed."""
    base = f"ipcd could not connect to service {name}"
    if not answer.startswith(b"ne "):
        return IPCError(base)
    rest = answer[3:]
    for stop in (b"\0", b"\r", b"\n"):          # a reason is one line
        rest = rest.split(stop, 1)[0]
    code, _, text = rest[:MAX_IPCD_REASON].partition(b" ")
    if not code:
        return IPCError(base)
    cls = ServiceNotFoundError if code in _NOT_FOUND_CODES else NetworkError
    message = f"{base} ({code.decode('utf-8', 'replace')})"
    if text:
        message += ": " + text.decode("utf-8", "replace")
    return cls(message)


def _connected_stream(fd: int) -> Optional[socket.socket]:
    """A socket object owning fd when fd is a connected Unix or TCP stream socket
    (what ipcd must hand over); else None, with fd closed."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:             # not a socket at all (a pipe, /dev/null)
        os.close(fd)
        return None
    try:
        if sock.family in STREAM_FAMILIES and sock.type == socket.SOCK_STREAM:
            sock.getpeername()  # ENOTCONN when it is not connected
            return sock
    except OSError:
        pass
    sock.close()
    return None
