"""pyipc.aio's connect() through ipcd (IPC_NETWORK set), without holding the
event loop: the exchange with ipcd (a framed "NAME;IPC_NETWORK", then the
answer "ok" with the connected fd by SCM_RIGHTS) runs on a non-blocking
socket awaited by the loop, and the fd received is handed to the context with
add_connection(). ipcd may take seconds to answer (it reaches another host);
meanwhile the loop serves everything else. Same errors as the sync connect().
"""

from __future__ import annotations

import os
import socket
import struct
from typing import TYPE_CHECKING, Awaitable, Optional

from .. import _rundir
from .._pure.fdpass import (_connected_stream, adopt_connection, ipcd_request, receive_answer,
                            take_ipcd_answer)
from .._types import IPCD_SERVICE, IPCError, ServiceNotFoundError, TimeoutError

if TYPE_CHECKING:
    from .._context import Context as SyncContext
    from ._context import Context
    from ._flavor import Flavor

NOT_A_STREAM = "ipcd sent a file descriptor that is not a connected Unix or TCP stream socket"
_CMSG_CLOEXEC = getattr(socket, "MSG_CMSG_CLOEXEC", 0)


def network() -> Optional[str]:
    """IPC_NETWORK when it is set and not empty (IPCError if not UTF-8)."""
    raw = os.environb.get(b"IPC_NETWORK")
    if not raw:
        return None
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise IPCError("IPC_NETWORK is not valid UTF-8") from None


async def connect_through_ipcd(ctx: "Context", name: str, rules: str,
                               timeout: Optional[float]) -> int:
    """Ask ipcd for a connection to `name`; the fd, now a connection of ctx.sync."""
    rundir = ctx.sync.rundir
    _rundir.service_path(rundir, name)          # InvalidNameError before anything
    request = ipcd_request(name, rules, ctx.sync.max_message_size)
    _check_room(ctx.sync)
    sock = _connect_ipcd(rundir)
    try:
        flavor = ctx._bind()
        framed = struct.pack(">I", len(request)) + request

        def exchange() -> Awaitable[None]:
            return _exchange(flavor, sock, framed)
        if timeout is None:
            await exchange()
        elif not await flavor.within(exchange, timeout):
            raise TimeoutError(f"connect to service {name} timed out")
        answer, fds = receive_answer(sock.fileno())
    finally:
        sock.close()                            # ipcd sees the end of the exchange
    # As the sync connect(): an fd that is not a connected stream is said so;
    # any other refusal of add_connection (ConnectionLimitError at
    # max_connections...) is raised as it is, the fd closed.
    handed = _connected_stream(take_ipcd_answer(name, answer, fds))
    if handed is None:
        raise IPCError(NOT_A_STREAM)
    return adopt_connection(ctx.sync, handed)


def _check_room(sync: "SyncContext") -> None:
    """ConnectionLimitError now when the context has no room for one more
    connection, before ipcd is asked for one (and reaches the service, maybe
    on another host) that could not be taken: the sync connect() refuses
    then too (its exchange with ipcd is a connection of its context). An
    end of a socket pair is added and closed at once (no event comes of it)."""
    probe, other = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    with other:
        sync.close(adopt_connection(sync, probe), linger=0)


async def _exchange(flavor: "Flavor", sock: socket.socket, request: bytes) -> None:
    """Send the framed request (a long IPC_NETWORK does not fit the socket's
    buffer at once: the rest goes as ipcd reads), then wait for the answer."""
    view, sent = memoryview(request), 0
    while sent < len(request):
        try:
            sent += sock.send(view[sent:])
        except BlockingIOError:
            await flavor.wait_writable(sock.fileno())
        except OSError:
            return              # ipcd went away: its answer (none) says so
    await flavor.wait_readable(sock.fileno())


def _connect_ipcd(rundir: str) -> socket.socket:
    """A non-blocking connection to ipcd's service (a Unix socket connects at
    once or not at all)."""
    path = _rundir.service_path(rundir, IPCD_SERVICE)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.setblocking(False)
    try:
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError) as e:
        sock.close()
        raise ServiceNotFoundError(
            f"IPC_NETWORK is set but ipcd is not running (no service {IPCD_SERVICE} in "
            f"{rundir})", e.errno) from None
    except OSError as e:
        sock.close()
        raise IPCError(f"cannot connect to service {IPCD_SERVICE}: {e.strerror}",
                       e.errno) from None
    return sock
