"""connect() through ipcd (IPC_NETWORK): ipcd answers with the connected
socket, passed as a file descriptor (the core's fdpass.zig).
"""

from __future__ import annotations

import os
import select
import socket
import time
from typing import TYPE_CHECKING, List, Optional, Tuple, cast

from .._checks import cut_utf8, too_large_text
from .._types import (IPCD_SERVICE, MAX_IPCD_REASON, ConnectionClosedError, IPCError,
                      InvalidNameError, MessageTooLargeError, NetworkError,
                      ServiceNotFoundError, TimeoutError)
from .. import _rundir
from .blocking import wait_fd
from .conn_table import CONNECTION, Conn
from .services import STREAM_FAMILIES, connected_unix, set_send_timeout
from .syscalls import os_error

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
        return self._add(Conn(sock.fileno(), sock, CONNECTION, self._max_message_size)).fd


def ask_ipcd(ctx: "Context", name: str, network: str, timeout: Optional[float]) -> socket.socket:
    """connect()'s exchange with ipcd, made through ctx's own calls (both
    backends): send "NAME;IPC_NETWORK", wait for the answer (at most
    `timeout` s), take the fd it hands over. Returns that connected stream
    socket, for the backend to adopt; raises what the answer means. A wait
    that a signal interrupts goes on once its handler returns (PEP 475), so
    ipcd is asked once; a handler that raises ends it (its exception comes
    out). A request too large for ctx raises MessageTooLargeError."""
    _rundir.service_path(ctx.rundir, name)
    request = ipcd_request(name, network, ctx.max_message_size)
    deadline = None if timeout is None else time.monotonic() + timeout
    ipcd = adopt_connection(ctx, _connect_to_ipcd(ctx.rundir, name, deadline))

    def left() -> Optional[float]:
        return None if deadline is None else max(0.0, deadline - time.monotonic())
    try:
        try:
            ctx.write(ipcd, request, left())
        except ConnectionClosedError:
            pass        # ipcd closed before taking it all (at its bounds): its answer is there
        # An ipcd that accepted but does not answer must not hang us.
        if not wait_fd(ipcd, select.POLLIN, left()):
            raise TimeoutError(f"connect to service {name} timed out")
        answer, fds = receive_answer(ipcd)
    except TimeoutError as e:
        raise TimeoutError(f"connect to service {name} timed out") from e.__cause__
    finally:
        # At once: what is left of a request that timed out is not for
        # anyone (the context's linger would wait for it past the timeout).
        ctx.close(ipcd, linger=0)
    sock = _connected_stream(take_ipcd_answer(name, answer, fds))
    if sock is None:
        raise IPCError("ipcd sent a file descriptor that is not a connected "
                       "Unix or TCP stream socket")
    return sock


def ipcd_request(name: str, network: str, max_message_size: int) -> bytes:
    """The request to ipcd, "NAME;IPC_NETWORK", as UTF-8 (ipcd reads it as
    text), checked before ipcd is asked (sync and aio connect() alike):
    InvalidNameError for a name that cannot be UTF-8 (a lone surrogate, from
    a file name's undecodable bytes), MessageTooLargeError for a request
    over the context's max_message_size (one frame)."""
    try:
        request = f"{name};{network}".encode()
    except UnicodeEncodeError:
        raise InvalidNameError(f"service name {name!r} is not valid UTF-8: ipcd "
                               "cannot be asked for it") from None
    if len(request) > max_message_size:
        raise MessageTooLargeError(too_large_text(len(request), max_message_size))
    return request


def receive_answer(ipcd: int) -> Tuple[bytes, List[int]]:
    """ipcd's raw answer and the fds passed with it; (b"", []) when the
    socket fails (ipcd reset it). An exception a signal handler raised
    comes out, even an OSError (it has no errno)."""
    ipcd_sock = socket.socket(fileno=ipcd)
    try:
        answer, fds, _, _ = socket.recv_fds(ipcd_sock, 2000, MAX_RECEIVED_FDS, _CMSG_CLOEXEC)
        return answer, fds
    except OSError as e:
        if e.errno is None:
            raise
        return b"", []
    finally:
        ipcd_sock.detach()                  # the context closes it


def _connect_to_ipcd(rundir: str, name: str, deadline: Optional[float]) -> socket.socket:
    """A connected socket to ipcd's service. An ipcd whose listen backlog is
    full holds a Unix connect(): with a deadline, SO_SNDTIMEO bounds that wait
    (Linux and the BSDs), so connect(timeout=) holds for this part too."""
    path = _rundir.service_path(rundir, IPCD_SERVICE)
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    except OSError as e:
        raise os_error(f"cannot connect to service {IPCD_SERVICE}", e.errno) from None
    try:
        while not connected_unix(sock, path, deadline):
            pass                # a signal cut the wait short: go on waiting
        set_send_timeout(sock, None)
        return sock
    except (FileNotFoundError, ConnectionRefusedError) as e:
        sock.close()
        raise ServiceNotFoundError(
            f"IPC_NETWORK is set but ipcd is not running "
            f"(no service {IPCD_SERVICE} in {rundir})", e.errno) from None
    except BlockingIOError:         # SO_SNDTIMEO (or timeout 0) ran out
        sock.close()
        raise TimeoutError(f"connect to service {name} timed out") from None
    except OSError as e:
        sock.close()
        raise os_error(f"cannot connect to service {IPCD_SERVICE}", e.errno) from None


def adopt_connection(ctx: "Context", sock: socket.socket) -> int:
    """sock's fd, now a connection of ctx (closed if ctx cannot take it)."""
    fd = sock.detach()
    try:
        ctx.add_connection(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


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
    code, _, text = cut_utf8(rest, MAX_IPCD_REASON).partition(b" ")
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
