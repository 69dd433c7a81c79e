"""The sockets the networking daemons open or are given: listening addresses
(IPv4, IPv6, host names), sockets passed by systemd, accepting without
blocking, and the TCP options every network connection gets.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import threading
import time
from typing import Callable, Dict, List, Optional, Tuple

from .. import Context, InvalidNameError, IPCError, _rundir
from . import _netwire as wire

log = logging.getLogger("pyipc.daemons")

#: Pending connections a listening socket queues (listen(2)'s backlog).
LISTEN_BACKLOG = 128
#: Connections accepted from one listening socket per event at most, so a
#: flood of connections cannot hold the loop.
MAX_ACCEPT_PER_EVENT = 64
#: The longest --dead-peer-timeout (seconds) of tcpd, tlsd and websocketd:
#: Linux takes TCP_KEEPIDLE and TCP_KEEPINTVL up to 32767 s (MAX_TCP_KEEPIDLE)
#: and refuses more with EINVAL, which failed every connection the daemon
#: tuned (peers reset, dials "Invalid argument"). At it, the keepalive probes
#: start after 16383 s and TCP_USER_TIMEOUT is 32767000 ms (a C int).
MAX_DEAD_PEER_TIMEOUT = 32767


def split_address(address: str, default_port: int) -> Tuple[str, int]:
    """(host, port) of "HOST", "HOST:PORT", "[IPV6]" or "[IPV6]:PORT";
    ValueError when it is none of these."""
    host, port = address, ""
    if address.startswith("["):
        end = address.find("]")
        if end < 0 or address[end + 1:end + 2] not in ("", ":"):
            raise ValueError(f"{address!r}: bad [IPv6] address")
        host, port = address[1:end], address[end + 2:]
    elif address.count(":") == 1:
        host, port = address.split(":")
    if not host:
        raise ValueError(f"{address!r}: no host")
    if not port:
        return host, default_port
    if not port.isdigit() or not 0 <= int(port) < 65536:       # 0: any free port
        raise ValueError(f"{address!r}: bad port {port!r}")
    return host, int(port)


def tcp_listeners(address: str, default_port: int) -> List[socket.socket]:
    """Listening sockets for every address `address` resolves to (a host name
    may give IPv4 and IPv6 ones); OSError when one cannot be bound."""
    host, port = split_address(address, default_port)
    found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    listeners: List[socket.socket] = []
    seen = set()
    try:
        for family, kind, proto, _, where in found:
            if (family, where) in seen:
                continue
            seen.add((family, where))
            sock = socket.socket(family, kind, proto)     # not inheritable (PEP 446)
            listeners.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:        # this address only, not IPv4 too
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(where)
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
    except BaseException:
        for sock in listeners:
            sock.close()
        raise
    return listeners


#: accept() errors that mean the process (or the system) has no fd to spare.
_OUT_OF_FDS = (errno.EMFILE, errno.ENFILE)


class _Reserve:
    """One fd held in reserve for when the process runs out of them.

    Out of fds, accept() fails and leaves the connection in the backlog, so
    the listener stays readable and the loop would wake, fail and log again
    at once, at full CPU, for as long as the flood lasts. With the reserve
    freed, the connection is accepted and closed at once (the peer sees its
    end), the backlog drains, and the loop sleeps until there is more.
    Shared by every daemon of the process (tests run several), hence the lock.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fd = -1

    def shed(self, listener: socket.socket) -> Optional[bool]:
        """Accept one waiting connection on the reserve fd and close it: True
        when one was; False when none was waiting (the backlog is drained);
        None when there is no reserve fd to do it with."""
        with self._lock:
            if self._fd < 0:
                self._fd = _open_reserve()
                if self._fd < 0:
                    return None
            os.close(self._fd)
            try:
                sock, _ = listener.accept()
                sock.close()
                return True
            except OSError:
                return False
            finally:
                self._fd = _open_reserve()

    def ensure(self) -> None:
        """Hold the reserve fd (taken while fds are still available)."""
        with self._lock:
            if self._fd < 0:
                self._fd = _open_reserve()


def _open_reserve() -> int:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return -1


_reserve = _Reserve()


def accept_some(listener: socket.socket) -> List[socket.socket]:
    """The connections waiting on a non-blocking listener (at most
    MAX_ACCEPT_PER_EVENT: the rest are taken at the next event). Out of fds,
    the waiting ones are closed at once instead (see _Reserve), with one
    warning per event."""
    _reserve.ensure()
    accepted: List[socket.socket] = []
    shed = 0
    for _ in range(MAX_ACCEPT_PER_EVENT):
        try:
            sock, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            break
        except OSError as e:
            if e.errno in _OUT_OF_FDS:
                outcome = _reserve.shed(listener)
                if outcome:
                    shed += 1
                    continue
                if outcome is False:            # nothing left to shed: no failure
                    break
            if e.errno == errno.ECONNABORTED:   # that one left: take the next
                continue
            log.warning("accept on %s failed: %s", listener.getsockname(), e)
            break
        accepted.append(sock)
    if shed:
        log.warning("accept on %s: out of file descriptors (%s): %d connection(s) "
                    "closed at once", listener.getsockname(), os.strerror(errno.EMFILE),
                    shed)
    return accepted


def accept_connections(ctx: Context, listener: socket.socket, what: str) -> List[int]:
    """accept_some(), each socket then made a connection of `ctx` (a Unix
    listening socket systemd passed: its clients are as a service's); the fds
    taken. One that ctx refuses (e.g. past max_connections) is logged, as
    `what` ("client", "request"), and closed."""
    taken: List[int] = []
    for sock in accept_some(listener):
        fd = sock.detach()
        try:
            ctx.add_connection(fd)
        except IPCError as e:
            log.warning("cannot take a %s: %s", what, e)
            os.close(fd)
            continue
        taken.append(fd)
    return taken


class LocalRefusal(Exception):
    """A local service could not be connected: `code` (noservice, busy) and why."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(text)
        self.code = code


def connect_local(path: str, name: str, rundir: str) -> socket.socket:
    """A connection to the service socket at `path`, made without blocking:
    a service whose backlog is full is refused `busy` at once rather than
    holding the daemon's loop. LocalRefusal when it cannot be made."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)   # not inheritable
    sock.setblocking(False)
    try:
        sock.connect(path)
        return sock
    except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
        sock.close()
        raise LocalRefusal("noservice", f"no service {name} in {rundir}") from None
    except BlockingIOError:
        sock.close()
        raise LocalRefusal("busy", f"service {name} has a full backlog") from None
    except OSError as e:
        sock.close()
        raise LocalRefusal("noservice", f"cannot connect to {name}: "
                           f"{e.strerror or e}") from None


def connect_service(rundir: str, name: str) -> int:
    """The fd of a new connection to local service `name` of `rundir`, made
    without blocking (connect_local), for the daemon's context to adopt.
    LocalRefusal: `refused` for a name no service could have (the reason is
    InvalidNameError's), else connect_local's `noservice` or `busy`."""
    try:
        path = _rundir.service_path(rundir, name)
    except InvalidNameError as e:
        raise LocalRefusal("refused", str(e)) from None
    return connect_local(path, name, rundir).detach()


def is_listening(sock: socket.socket, family: int) -> bool:
    """Whether `sock` (given by systemd) is a listening stream socket of `family`."""
    try:
        return (sock.family == family and sock.type == socket.SOCK_STREAM
                and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1)
    except OSError:
        return False


def check_dead_peer_timeout(seconds: float) -> None:
    """ValueError unless `seconds` is a --dead-peer-timeout tune_tcp can set:
    0 (never) up to MAX_DEAD_PEER_TIMEOUT (NaN and infinity refused)."""
    if not 0 <= seconds <= MAX_DEAD_PEER_TIMEOUT:       # NaN fails both
        raise ValueError(f"dead_peer_timeout must be >= 0 and at most "
                         f"{MAX_DEAD_PEER_TIMEOUT} seconds (Linux's longest TCP keepalive "
                         f"idle time), not {seconds!r}")


def tune_tcp(sock: socket.socket, dead_peer_timeout: float) -> None:
    """No Nagle delay (messages are often small), and a peer that vanished
    (a cut link, a host down) ends the connection within about
    `dead_peer_timeout` seconds: keepalive probes while idle, and
    TCP_USER_TIMEOUT while data waits to be acknowledged. A value past
    MAX_DEAD_PEER_TIMEOUT is taken as it (the daemons refuse one, but a
    value the kernel refuses would fail the connection); 0 or NaN: off."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if not dead_peer_timeout > 0:
        return
    seconds = min(dead_peer_timeout, MAX_DEAD_PEER_TIMEOUT)
    idle = max(1, int(seconds / 2))
    probes = 3
    interval = max(1, int((seconds - idle) / probes))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", interval),
                          ("TCP_KEEPCNT", probes),
                          ("TCP_USER_TIMEOUT", int(seconds * 1000))):
        if hasattr(socket, option):                 # Linux has them all
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


def default_per_host(max_pending: int) -> int:
    """Incoming handshakes one peer (peer_key) may have in progress unless
    told (tcpd's and tlsd's --max-pending-per-host): half of max_pending, as
    Postfix bounds one client to half its processes, so that one host cannot
    take every slot and have the others refused."""
    return max(1, max_pending // 2)


def peer_key(address: str) -> str:
    """What a peer's handshakes are counted by (--max-pending-per-host): its
    IPv4 address (also when it comes as an IPv4-mapped IPv6 one, from a
    dual-stack socket), or the /64 its IPv6 address lies in, since one IPv6
    host usually has a whole /64 to send from."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:                  # not an IP address (cannot be for TCP): as is
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


#: Bytes drop_input() reads per call.
DROP_CHUNK = 64 * 1024


def drop_input(fd: int, reads: int = 1) -> bool:
    """Read and drop what a refused peer still sends (at most `reads` reads,
    so that one peer cannot hold the loop): True once its sending side has
    ended (EOF, or an error), False while more may come."""
    try:
        for _ in range(reads):
            if not os.read(fd, DROP_CHUNK):
                return True
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True
    return False


class PeerShares:
    """Incoming handshakes in progress per peer (peer_key), each peer allowed
    `share` of them at once (tcpd's and tlsd's --max-pending-per-host)."""

    __slots__ = ("share", "_counts")

    def __init__(self, share: int) -> None:
        self.share = share
        self._counts: Dict[str, int] = {}

    def __len__(self) -> int:
        """Peers with a handshake in progress."""
        return len(self._counts)

    def full(self, peer: str) -> bool:
        """Whether `peer` has its whole share in progress."""
        return self._counts.get(peer, 0) >= self.share

    def add(self, peer: str) -> None:
        """One more handshake of `peer` in progress."""
        self._counts[peer] = self._counts.get(peer, 0) + 1

    def remove(self, peer: str) -> None:
        """One handshake of `peer` ended (a peer with none is forgotten)."""
        left = self._counts[peer] - 1
        if left:
            self._counts[peer] = left
        else:
            del self._counts[peer]


def host_port(host: str, port: int) -> str:
    """HOST:PORT as refusals and logs write it ([HOST]:PORT for IPv6)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def no_answer(uri: str, seconds: float) -> str:
    """The text of a dial for `uri` that ran out of its `seconds` (tcpd's
    and websocketd's `ne timeout`)."""
    return f"no answer from {uri} in {seconds:g} s"


def dial_failure(where: str, exc: Optional[BaseException],
                 no_answer: str) -> Tuple[str, str]:
    """The refusal code and text for a dial (dial_tcp) that raised `exc`
    (tcpd, tlsd and websocketd). A dial out of time is `timeout` with the
    text of the daemon's own deadline (`no_answer`): its worker and its
    timer end at the same moment, and either may be handled first."""
    if isinstance(exc, socket.gaierror):
        return wire.UNREACHABLE, f"cannot resolve {where}: {exc.strerror}"
    if isinstance(exc, TimeoutError):        # socket.timeout, ETIMEDOUT too
        return wire.TIMEOUT, no_answer
    if isinstance(exc, OSError):
        return wire.UNREACHABLE, f"{where}: {exc.strerror or exc}"
    return wire.UNREACHABLE, f"{where}: {exc}"


def dial_tcp(host: str, port: int, deadline: float,
             abandoned: Callable[[], bool] = lambda: False) -> socket.socket:
    """On a worker thread: resolve `host`, then connect to its addresses in
    turn, each attempt given an equal share of the time left before
    `deadline` (a time.monotonic() value), the last all of it: not a full
    timeout each (socket.create_connection), and not all of it to the first
    (an address that drops the attempts, a broken IPv6 route, would leave
    none to the others).
    TimeoutError once the deadline has passed or the caller has given up
    (`abandoned()`: its request was answered meanwhile), so that a dial
    nobody waits for gives its worker back. The name lookup is bounded by
    the resolver's own timeouts only (resolv.conf)."""
    if deadline - time.monotonic() <= 0 or abandoned():
        raise TimeoutError("timed out")     # waited for a worker past it: no lookup
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    error: Optional[OSError] = None
    for tried, (family, kind, proto, _, address) in enumerate(infos):
        left = deadline - time.monotonic()
        if left <= 0 or abandoned():
            break
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(left / (len(infos) - tried))
            sock.connect(address)
            return sock
        except OSError as e:
            sock.close()
            error = e
    if error is None or deadline - time.monotonic() <= 0 or abandoned():
        raise TimeoutError("timed out")
    raise error
