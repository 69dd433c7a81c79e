"""The bytes the networking daemons exchange (docs/networking.md):

- ipcd's answer to a client, and a scheme daemon's to ipcd: `ok` with the
  connected fd (SCM_RIGHTS, in the same sendmsg), or a refusal
  `ne CODE TEXT` (one line, no fd);
- framed messages (4-byte big-endian length) on the daemons' own sockets,
  decoded here where the daemon reads the socket itself (to receive a fd).
"""

from __future__ import annotations

import argparse
import errno
import os
import socket
import struct
import urllib.parse
from typing import FrozenSet, Iterable, List, Optional, Tuple

from .._checks import cut_utf8
from .._types import MAX_IPCD_REASON, MAX_SOCKET_PATH

#: The refusal codes (the client raises ServiceNotFoundError for the first two,
#: NetworkError for the others).
NORULE = "norule"          # no rule of IPC_NETWORK names the service
NOSERVICE = "noservice"    # the (local or remote) service does not exist
NODAEMON = "nodaemon"      # no daemon for the scheme, or it failed
UNREACHABLE = "unreachable"  # the remote host cannot be reached
REFUSED = "refused"        # the remote daemon refused (not exposed, bad name)
TLS = "tls"                # a TLS failure
TIMEOUT = "timeout"        # no answer in time
BUSY = "busy"              # a bound on concurrent requests is reached
BADREQUEST = "badrequest"  # the request itself is malformed

#: Longest service name a remote may send tcpd or tlsd, in bytes (the line's
#: "\n" not counted, nor the "\r" of a line typed into tcpd). DESIGN's bound on
#: names: a service's socket path RUNDIR/NAME must fit `sun_path`
#: (MAX_SOCKET_PATH, 107 bytes), so no longer name is a service in any run dir.
#: A longer one is refused as soon as it is seen, never buffered; a dialing
#: daemon refuses to send one.
MAX_NAME = MAX_SOCKET_PATH
#: The refusal's text for a longer name (tcpd and tlsd, both ways).
NAME_TOO_LONG = f"service name longer than {MAX_NAME} bytes"
#: Longest name line read before its newline: the name (MAX_NAME) and the
#: "\r" of a line typed into the daemon (tcpd and tlsd).
MAX_NAME_LINE = MAX_NAME + 1
#: Longest URI ipcd hands a scheme daemon, in bytes: a host name (253), a
#: port and a service name (MAX_NAME), all percent-encoded, fit with room to
#: spare. A longer rule's target is refused as a bad request by ipcd itself.
MAX_URI = 2048
#: Seconds a listening daemon (tcpd, tlsd) waits for more of a name (its
#: newline) after the last bytes it got, before it takes them as libIPC's
#: bare name.
NAME_GRACE = 0.2
#: Bytes of a refusal kept at most (code and text): the client shows no more.
MAX_REFUSAL = MAX_IPCD_REASON
#: Largest answer a daemon may send ipcd (a frame of "ok" or "ne ..."):
#: anything longer is a faulty daemon.
MAX_ANSWER = 4096
#: Fds received with one answer at most (the first is used, the rest closed).
MAX_FDS = 8
#: Bytes a FrameReader asks of the socket per read at most.
READ_CHUNK = 64 * 1024

_HEADER = struct.Struct(">I")
_CMSG_CLOEXEC = getattr(socket, "MSG_CMSG_CLOEXEC", 0)
#: Never block, never raise SIGPIPE (macOS has no MSG_NOSIGNAL: Python ignores
#: SIGPIPE there anyway, so EPIPE comes back as an error either way).
SEND_FLAGS = getattr(socket, "MSG_NOSIGNAL", 0) | socket.MSG_DONTWAIT


def printable(text: str) -> str:
    """`text` as one line with no control characters (they become spaces):
    what a refusal sends, and what a log line shows of a text a remote peer
    chose (a name, a refusal), so that it cannot write escape sequences to
    the operator's terminal or forge a log line."""
    return "".join(ch if ch.isprintable() else " " for ch in text)


def names_argument(what: str, names: Iterable[str]) -> FrozenSet[str]:
    """A daemon class's collection of names (expose=, origins=), as a set.
    A str is refused: it would be taken letter by letter (expose="pong"
    exposed p, o, n and g)."""
    if isinstance(names, (str, bytes)):
        raise TypeError(f"{what} must be a collection of names, not "
                        f"{type(names).__name__} {names!r}")
    return frozenset(names)


def refusal(code: str, text: str) -> bytes:
    """`ne CODE TEXT` as sent: one line (control characters become spaces),
    cut at MAX_REFUSAL bytes (on a character boundary)."""
    return cut_answer(f"ne {code} {printable(text)}".encode("utf-8", "replace"))


def cut_answer(answer: bytes) -> bytes:
    """An `ne ...` answer cut to MAX_REFUSAL bytes after its `ne `, not inside
    a UTF-8 character: a cut one would reach the client as U+FFFD."""
    return cut_utf8(answer, MAX_REFUSAL + 3)


def name_of_line(line: bytes) -> bytes:
    """The service name a name line (its newline left out) holds: a typed
    line's trailing "\r" is not part of it (tcpd and tlsd)."""
    return line.rstrip(b"\r")


def name_too_long(line: bytes) -> bool:
    """Whether a name line (or its start; its newline left out) holds a name
    over MAX_NAME bytes (a typed line's trailing "\r" not counted)."""
    return len(line) > MAX_NAME_LINE or len(name_of_line(line)) > MAX_NAME


def uri_too_long(uri: bytes, daemon: str) -> Optional[str]:
    """The refusal's text (code BADREQUEST) for a URI longer than MAX_URI, or
    None. ipcd hands a scheme daemon none; any local client of the daemon's
    service may send one, and each daemon answers it as ipcd would."""
    if len(uri) <= MAX_URI:
        return None
    return f"a URI of {len(uri)} bytes; {daemon} takes at most {MAX_URI}"


def parse_uri(uri: str, scheme: str, default_port: int) -> Tuple[str, int, str]:
    """(host, port, service name) of `SCHEME://HOST[:PORT]/NAME` (an IPv6
    host in brackets; NAME percent-decoded, as websocketd decodes a path),
    the dial tcpd and tlsd make for ipcd. ValueError saying what is wrong:
    anything a dial would otherwise take silently in another sense (a user
    part, port 0, a query) included, and a name the remote could not take
    (check_remote_name)."""
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme.lower() != scheme:
        raise ValueError(f"{uri}: not a {scheme}:// URI")
    if not parts.hostname:
        raise ValueError(f"{uri}: no host")
    if parts.username is not None:
        raise ValueError(f"{uri}: a user part is not taken ({scheme}://HOST:PORT/NAME)")
    try:
        port = parts.port         # ValueError when not a number from 0 to 65535
    except ValueError as e:       # urllib's text does not say which URI
        raise ValueError(f"{uri}: {e}") from None
    if port == 0:
        raise ValueError(f"{uri}: port 0")
    name = urllib.parse.unquote(parts.path[1:]) if parts.path.startswith("/") else ""
    if not name or "/" in name or parts.query or parts.fragment:
        raise ValueError(f"{uri}: no service name after the address "
                         f"({scheme}://HOST:PORT/NAME)")
    check_remote_name(name)
    host = parts.hostname
    if ":" in host:             # an IPv6 address: its zone is written %25 (RFC 6874)
        host = urllib.parse.unquote(host)
    else:
        try:                    # as the name lookup will (an empty or too long label)
            host.encode("idna")
        except UnicodeError:
            raise ValueError(f"{uri}: bad host name {host!r} (a label is empty or "
                             "longer than 63 bytes)") from None
    return host, default_port if port is None else port, name


def expose_option(text: str) -> List[str]:
    """The argparse `type=` of tcpd's and tlsd's --expose NAME[,NAME...]:
    its names, without the spaces around them ("pong, kv" is pong and kv,
    as websocketd's lists); an argument that names none ('', ',') is a
    usage error (it used to start the daemon exposing nothing, without a word)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"{text!r} names no service (NAME[,NAME...])")
    return names


def check_remote_name(name: str) -> None:
    """ValueError for a name a remote tcpd or tlsd could not take: longer
    than MAX_NAME, or with a control character (a newline would end the name
    line early and make the rest of the name the stream's first bytes)."""
    if len(name.encode()) > MAX_NAME:
        raise ValueError(NAME_TOO_LONG)
    if any(not ch.isprintable() for ch in name):
        raise ValueError(f"service name {name!r} has a control character")


def frame(payload: bytes) -> bytes:
    """One framed message."""
    return _HEADER.pack(len(payload)) + payload


def scan_frames(data: "bytes | bytearray | memoryview", start: int, end: int,
                limit: Optional[int] = None) -> Tuple[int, int]:
    """Where the whole frames of data[start:end] end, and the size a frame
    after them announces when it is over `limit` (None: no limit), else -1:
    nothing from such a header on is taken (tlsd's relay, both ways)."""
    at = start
    while end - at >= _HEADER.size:
        (size,) = _HEADER.unpack_from(data, at)
        if limit is not None and size > limit:
            return at, size
        if end - at < _HEADER.size + size:
            break
        at += _HEADER.size + size
    return at, -1


def send_now(fd: int, data: bytes) -> int:
    """One send() of `data` on socket fd that neither blocks nor raises
    SIGPIPE (a daemon embedded in a program that restored SIGPIPE's default
    must not be killed by a peer that reset); how many bytes went. Raises
    OSError (fd not a socket, or closed, included)."""
    sock = socket.socket(fileno=fd)
    try:
        return sock.send(data, SEND_FLAGS)
    finally:
        sock.detach()                            # fd stays the caller's


def send_raw(fd: int, data: bytes) -> bool:
    """Send a short raw answer on fd without blocking; False when it could not
    go out whole (the peer is gone or not reading: it will see EOF)."""
    try:                                         # small: fits an empty socket buffer
        return send_now(fd, data) == len(data)
    except OSError:
        return False


def send_with_fd(fd: int, data: bytes, passed: int) -> bool:
    """Send `data` and the fd `passed` in one sendmsg; False on failure."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return False
    try:
        return socket.send_fds(sock, [data], [passed], SEND_FLAGS) == len(data)
    except OSError:
        return False
    finally:
        sock.detach()                            # fd stays the caller's


class FrameTooLarge(ValueError):
    """A frame announced over a FrameReader's limit (`size`: what it announced)."""

    def __init__(self, what: str, size: int, limit: int) -> None:
        super().__init__(f"{what} of {size} bytes (at most {limit})")
        self.size = size


class FrameReader:
    """Reads one framed message from a non-blocking socket, in as many reads
    as it takes, and no further than its end: a scheme daemon's answer to
    ipcd (at most MAX_ANSWER bytes, with the fd that comes with it), or a
    client's request (`take_fds` False: any fd sent with it is dropped by the
    kernel, so that a client cannot make ipcd hold fds)."""

    __slots__ = ("data", "fds", "limit", "what", "take_fds")

    def __init__(self, limit: int = MAX_ANSWER, what: str = "an answer", *,
                 take_fds: bool = True) -> None:
        self.data = bytearray()
        self.fds: List[int] = []
        #: Largest payload taken: one announced over it is refused at its header.
        self.limit = limit
        self.what = what
        self.take_fds = take_fds

    def read(self, fd: int) -> Optional[bytes]:
        """Read what is there: the payload once whole, else None.
        EOFError when the peer closed first; FrameTooLarge (a ValueError) for
        a frame announced over `limit`, raised as soon as its header is read;
        ValueError when bytes follow the frame in the same read."""
        sock = socket.socket(fileno=fd)
        try:
            data = self._recv(sock, self._room())
        except BlockingIOError:
            return None
        except OSError as e:
            raise EOFError(os.strerror(e.errno or errno.EIO)) from None
        finally:
            sock.detach()
        if not data:
            raise EOFError(f"closed in the middle of {self.what}" if self.data
                           else "closed without answering")
        self.data += data
        if len(self.data) < _HEADER.size:
            return None
        (size,) = _HEADER.unpack_from(self.data)
        if size > self.limit:
            raise FrameTooLarge(self.what, size, self.limit)
        end = _HEADER.size + size
        if len(self.data) > end:
            raise ValueError(f"bytes after {self.what}")
        if len(self.data) < end:
            return None
        return bytes(self.data[_HEADER.size:])

    def _room(self) -> int:
        """Bytes to ask for: the header's rest, else the frame's rest and one
        more (which says that something follows it), at most READ_CHUNK."""
        if len(self.data) < _HEADER.size:
            return _HEADER.size - len(self.data)
        size: int = _HEADER.unpack_from(self.data)[0]
        return min(READ_CHUNK, _HEADER.size + size + 1 - len(self.data))

    def _recv(self, sock: socket.socket, room: int) -> bytes:
        if not self.take_fds:
            return sock.recv(room)
        data, fds, _, _ = socket.recv_fds(sock, room, MAX_FDS, _CMSG_CLOEXEC)
        self.fds.extend(fds)
        return data

    def take_fd(self) -> Optional[int]:
        """The first fd received (the caller owns it); the others are closed."""
        fds, self.fds = self.fds, []
        for extra in fds[1:]:
            os.close(extra)
        return fds[0] if fds else None

    def close(self) -> None:
        """Close every fd received and not taken."""
        for fd in self.fds:
            os.close(fd)
        self.fds = []
