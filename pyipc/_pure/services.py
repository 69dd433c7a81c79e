"""The pure backend's services and connections: listening, accepting,
connecting, foreign fds, peer credentials (the core's rundir.zig and
credentials.zig do this for native).
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import struct
import time
from typing import TYPE_CHECKING, Optional, Tuple

from .. import _rundir
from .._checks import check_fd, check_paused, check_timeout, closed_by_peer
from .._types import (Event, EventType, IPCError, ServiceNotFoundError, TimeoutError,
                      UnknownFdError)
from .conn_table import CONNECTION, EXTERNAL, SERVICE, Conn
from .syscalls import RawFd, os_error

#: Socket families a connection may be: Unix, and TCP (tcpd's dialled socket
#: travels as is from ipcd to the client, libIPC's way: no relay on its side).
STREAM_FAMILIES = (socket.AF_UNIX, socket.AF_INET, socket.AF_INET6)

if TYPE_CHECKING:
    from .state import PureState

#: struct ucred: pid_t (signed), uid_t and gid_t (unsigned: a TCP socket's
#: "no one" is 4294967295, as the core's uint32 out-params say, not -1).
_PEERCRED = struct.Struct("iII")


class Services:
    """PureContext's services, connections and foreign fds."""

    __slots__ = ()

    def service_init(self: PureState, name: str) -> int:
        path = _rundir.service_path(self.rundir, name)
        self._check_room()
        sock, lock_fd, file_id = _rundir.listen_service(self.rundir, name, path)
        conn = Conn(sock.fileno(), sock, SERVICE, self._max_message_size)
        conn.path, conn.lock_fd = path, lock_fd
        conn.path_id = file_id
        self._spare_fd.open()
        return self._add(conn).fd

    def connect_service(self: PureState, name: str) -> int:
        return self._connect_direct(name, None)

    def _connect_direct(self: PureState, name: str, timeout: Optional[float]) -> int:
        """connect_service(), and connect() without IPC_NETWORK: `timeout`
        bounds the wait of a service whose listen backlog is full (the core's
        connectUnix)."""
        timeout = check_timeout(timeout)
        path = _rundir.service_path(self.rundir, name)
        self._check_room()
        if not _rundir.check_rundir(self.rundir, create=False):
            raise ServiceNotFoundError(f"no service {name} in {self.rundir}", errno.ENOENT)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        except OSError as e:        # out of fds: native's text, with errno
            raise os_error(f"cannot connect to service {name}", e.errno) from None
        try:
            while not connected_unix(sock, path, deadline):
                pass                # a signal whose handler returned: connect again
            if deadline is not None:
                set_send_timeout(sock, None)    # the writes wait as before
        except (FileNotFoundError, ConnectionRefusedError) as e:
            sock.close()
            raise ServiceNotFoundError(f"no service {name} in {self.rundir}", e.errno) from None
        except BlockingIOError as e:    # SO_SNDTIMEO ran out
            sock.close()
            if deadline is None:
                raise os_error(f"cannot connect to service {name}", e.errno) from None
            raise TimeoutError(f"connect to service {name} timed out") from None
        except OSError as e:
            sock.close()
            raise os_error(f"cannot connect to service {name}", e.errno) from None
        except BaseException:       # a signal handler's exception
            sock.close()
            raise
        return self._add(Conn(sock.fileno(), sock, CONNECTION, self._max_message_size)).fd

    def _check_new_fd(self: PureState, fd: int) -> None:
        """What add_external and add_connection check first: fd is not
        managed (nor just ended) here, nor one of the context's own fds."""
        check_fd(fd)
        if fd in self._ended:
            raise closed_by_peer(fd)
        if fd in self._by_fd:
            raise IPCError(f"fd {fd} is already managed by this context")
        # Watched or closed as a connection, one of these would be closed
        # twice (the second time maybe someone else's fd) or lose the
        # context its wake-ups.
        if fd >= 0 and (fd in (self._poller.fileno(), self._wake_r, self._wake_w,
                               self._spare_fd.fd)
                        or (self._ready is not None and self._ready.owns(fd))):
            raise IPCError(f"fd {fd} is the context's own (its poller, wake-up pipe or "
                           "spare fd)")

    def add_external(self: PureState, fd: int) -> None:
        self._check_new_fd(fd)
        try:
            mode = os.fstat(fd).st_mode
        except (OSError, OverflowError, TypeError):
            raise UnknownFdError(f"fd {fd} is not an open file descriptor") from None
        self._check_room()
        # A RawFd stands in for a socket (it has the methods used on an external fd).
        io: socket.socket = socket.socket(fileno=fd) if stat.S_ISSOCK(mode) \
            else RawFd(fd)  # type: ignore[assignment]
        self._add(Conn(fd, io, EXTERNAL, self._max_message_size))

    def pause_reading(self: PureState, fd: int, paused: bool = True) -> None:
        check_fd(fd)
        check_paused(paused)
        conn = self._lookup(fd)
        if conn.kind == SERVICE:
            raise UnknownFdError(f"fd {fd} is not a connection")
        conn.read_paused = paused
        self._set_interest(conn)

    def add_connection(self: PureState, fd: int) -> None:
        self._check_new_fd(fd)
        try:
            os.fstat(fd)
        except (OSError, OverflowError):
            raise UnknownFdError(f"fd {fd} is not an open file descriptor") from None
        if not _is_connected_stream(fd):
            raise IPCError(f"fd {fd} is not a connected Unix or TCP stream socket")
        self._check_room()
        sock = socket.socket(fileno=fd)
        sock.setblocking(True)        # as the context's own connections (see DONTWAIT)
        self._add(Conn(fd, sock, CONNECTION, self._max_message_size))

    def peer_credentials(self: PureState, fd: int) -> Tuple[int, int, int]:
        conn = self._connection(fd)
        if not hasattr(socket, "SO_PEERCRED"):
            raise IPCError("peer credentials are not supported on this platform")
        try:
            # A RawFd (a pipe switched in) has no getsockopt: AttributeError.
            raw = conn.io.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                     _PEERCRED.size)
        except AttributeError:      # not a socket (a pipe switched in)
            raise os_error(f"cannot read peer credentials of fd {fd}", errno.ENOTSOCK) \
                from None
        except OSError as e:
            raise os_error(f"cannot read peer credentials of fd {fd}", e.errno) from None
        # Linux answers SO_PEERCRED on a TCP socket too, with "nobody"
        # (0, 2**32-1, 2**32-1): that is no answer.
        if conn.io.family != socket.AF_UNIX:
            raise IPCError(f"cannot read peer credentials of fd {fd}: not a Unix socket")
        return _PEERCRED.unpack(raw)

    def _accept(self: PureState, service: Conn) -> None:
        while True:
            try:
                sock, _ = service.io.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                # Out of fds: a waiting client is refused, so the round does not
                # spin on it; with no client waiting there is nothing to say.
                refused = self._refuse_with_spare(service) \
                    if e.errno in (errno.EMFILE, errno.ENFILE) else None
                if refused is False:
                    return
                self._pending.append(Event(EventType.ERROR, service.fd, service.index, None,
                                           f"accept failed: {os.strerror(e.errno or 0)}"))
                if refused:
                    continue
                return
            if len(self._by_fd) >= self._max_connections:
                sock.close()
                self._pending.append(Event(
                    EventType.ERROR, service.fd, service.index, None,
                    f"connection refused: max_connections ({self._max_connections}) reached"))
                continue
            sock.setblocking(True)        # blocking mode, whatever the listener's (see DONTWAIT)
            try:
                conn = self._add(Conn(sock.fileno(), sock, CONNECTION, self._max_message_size))
            except IPCError as e:
                # The poller refused it (epoll's max_user_watches): that client
                # is closed and the service told why; the wait goes on.
                sock.close()
                self._pending.append(Event(EventType.ERROR, service.fd, service.index, None,
                                           str(e)))
                continue
            self._pending.append(Event(EventType.CONNECTION, conn.fd, conn.index))

    def _refuse_with_spare(self: PureState, service: Conn) -> Optional[bool]:
        """Out of fds with a client waiting: accept() would fail at once every
        round (level-triggered readiness), a busy loop. Free the spare fd, accept
        the client with it and close it (it sees EOF), then take the spare again.
        True: a client was refused; False: none was waiting; None: no spare."""
        if not self._spare_fd.close():
            return None
        try:
            sock, _ = service.io.accept()
            sock.close()
            taken = True
        except OSError:
            taken = False
        self._spare_fd.open()
        return taken


def connected_unix(sock: socket.socket, path: str, deadline: Optional[float]) -> bool:
    """One connect() attempt within the deadline (one attempt that does not
    wait when it has passed; SO_SNDTIMEO bounds a Unix connect held by a full
    listen backlog on Linux and the BSDs: BlockingIOError): whether sock is
    connected. False when a signal interrupted it and its handler returned:
    CPython then takes the socket for connecting in the background and
    reports success, which a Unix socket never is (Linux leaves it
    unconnected): the caller connects again."""
    if deadline is not None:
        set_send_timeout(sock, max(0.0, deadline - time.monotonic()))
    try:
        sock.connect(path)
    except OSError as e:
        if e.errno != errno.EISCONN:
            raise
    try:
        sock.getpeername()
        return True
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            return False
        raise


def set_send_timeout(sock: socket.socket, seconds: Optional[float]) -> None:
    """SO_SNDTIMEO: `seconds` (at least 1 µs: 0 means none), or None for none."""
    usec = 0 if seconds is None else max(1, round(seconds * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                    struct.pack("@ll", usec // 1_000_000, usec % 1_000_000))


def _is_connected_stream(fd: int) -> bool:
    """Whether fd is a connected Unix or TCP stream socket (fd stays open either way)."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:             # not a socket at all (a pipe, /dev/null)
        return False
    try:
        if sock.family not in STREAM_FAMILIES or sock.type != socket.SOCK_STREAM:
            return False
        sock.getpeername()      # ENOTCONN when it is not connected
        return True
    except OSError:
        return False
    finally:
        sock.detach()
