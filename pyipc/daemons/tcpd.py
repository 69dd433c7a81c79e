"""`pyipc tcpd`: reach services across TCP (libIPC's tcpd; docs/networking.md).

Incoming: tcpd listens on TCP addresses (default 127.0.0.1:9000). A peer
connects and sends a service name and "\\n" (libIPC's tcpd sends the bare
name: taken after _netwire.NAME_GRACE seconds without a newline). Only services
named with `expose` may be reached (deny by default). tcpd connects to the
local service, answers a raw `ok` and switches the TCP socket with the
service's connection: from then on the core relays the framed messages (with
the switching extension, no Python runs per message). Otherwise it answers
`ne CODE TEXT` and closes. The name is read with MSG_PEEK up to its newline
and no further, so the bytes that follow it in the same segment (the first
messages) stay in the socket for the relay: nothing is lost.

Outgoing: ipcd connects to the service `tcp` and sends one message, a URI
`tcp://HOST:PORT/NAME`. tcpd dials HOST:PORT on a worker thread (a slow DNS
or SYN never holds the loop), sends NAME and "\\n", waits for `ok`, and hands
ipcd the TCP socket itself with a framed `ok` (SCM_RIGHTS): the client then
talks to the remote tcpd with no relay on its side. Or a framed `ne ...`.

Every TCP socket gets TCP_NODELAY and dead-peer detection (keepalive and
TCP_USER_TIMEOUT, `dead_peer_timeout`), so a cut link ends the connection.
"""

from __future__ import annotations

import argparse
import socket
import sys
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Tuple

from .. import Event, EventType, IPCError
from . import _netwire as wire
from . import _sockets, _systemd
from ._runtime import Daemon
from ._timers import MAX_TIMEOUT, TimerHandle, check_timeout

#: The local service ipcd asks for tcp:// URIs.
TCP_SERVICE = "tcp"
#: Where tcpd listens by default (libIPC's default).
DEFAULT_LISTEN = "127.0.0.1:9000"
DEFAULT_PORT = 9000
#: Seconds a peer has to send its name (and a dial, to connect and get `ok`).
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
DEFAULT_CONNECT_TIMEOUT = 5.0
#: Seconds after which a silent peer (cut link, host down) ends a connection.
DEFAULT_DEAD_PEER_TIMEOUT = 30.0
#: Handshakes (incoming and outgoing) in progress at once; more: `ne busy`.
DEFAULT_MAX_PENDING = 256
#: Seconds a refused peer has to read the refusal before its socket is closed.
REFUSAL_LINGER = 2.0


class _Incoming:
    """A peer that connected and has not finished sending its name."""

    __slots__ = ("sock", "host", "name", "grace", "deadline")

    def __init__(self, sock: socket.socket, host: str, deadline: TimerHandle) -> None:
        self.sock = sock
        self.host = host                          # the peer's address (_sockets.peer_key)
        self.name = b""
        self.grace: Optional[TimerHandle] = None
        self.deadline = deadline


class _Dial:
    """ipcd's request for a tcp:// URI, from its message to the answer."""

    __slots__ = ("ipcd", "uri", "name", "sock", "deadline", "done", "word", "answer")

    def __init__(self, ipcd: int, deadline: TimerHandle) -> None:
        self.ipcd = ipcd
        self.deadline = deadline                     # its .when: time.monotonic() due
        self.uri = ""
        self.name = ""
        self.sock: Optional[socket.socket] = None   # once dialled
        self.done = False                            # answered (or ipcd left)
        self.word = b""                              # the start of "ok" / "ne " read
        self.answer = b""                            # a refusal being read


class Tcpd(Daemon):
    """tcpd: serves `tcp` (for ipcd) in the run dir, and listens on TCP.

    Args:
        rundir: the run directory (default: env `RUNDIR`, else `/tmp/.libipc-run`).
        backend: the pyipc backend of its context (default: as `Context`).
        listen: addresses to listen on: `HOST[:PORT]`, `[IPV6][:PORT]`, a host
            name (each of its addresses); port 0 takes a free one (see
            `addresses` once `ready` is set). Unused when systemd passes
            TCP sockets.
        expose: the local services peers may reach; nothing else is.
        dead_peer_timeout: seconds after which a silent peer ends its
            connection (keepalive, TCP_USER_TIMEOUT); 0: never; at most
            _sockets.MAX_DEAD_PEER_TIMEOUT (32767, Linux's keepalive bound).
        connect_timeout: seconds to dial a remote tcpd and get its answer.
        handshake_timeout: seconds a peer has to send its service name.
            Both at most _timers.MAX_TIMEOUT (a day).
        max_pending: handshakes in progress at once (both ways); more are
            answered `ne busy`.
        max_pending_per_host: incoming handshakes in progress at once from
            one address, and dials to one host whose worker is not back
            (a hung name lookup outlives its dial's answer); more are
            answered `ne busy` (default: half of max_pending).
    """

    name = "tcpd"

    def __init__(self, *, rundir: Optional[str] = None, backend: Optional[str] = None,
                 listen: Sequence[str] = (DEFAULT_LISTEN,), expose: Iterable[str] = (),
                 dead_peer_timeout: float = DEFAULT_DEAD_PEER_TIMEOUT,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
                 max_pending: int = DEFAULT_MAX_PENDING,
                 max_pending_per_host: Optional[int] = None) -> None:
        check_timeout("connect_timeout", connect_timeout)
        check_timeout("handshake_timeout", handshake_timeout)
        _sockets.check_dead_peer_timeout(dead_peer_timeout)
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, not {max_pending!r}")
        if max_pending_per_host is None:
            max_pending_per_host = _sockets.default_per_host(max_pending)
        if max_pending_per_host < 1:
            raise ValueError(f"max_pending_per_host must be >= 1, not {max_pending_per_host!r}")
        if isinstance(listen, (str, bytes)):     # would be taken letter by letter
            raise TypeError(f"listen must be a list of addresses, not str {listen!r}")
        expose = wire.names_argument("expose", expose)
        for address in listen:
            _sockets.split_address(address, DEFAULT_PORT)     # ValueError now, not later
        super().__init__(rundir=rundir, backend=backend, max_offloads=max_pending)
        self.listen = list(listen)
        self.expose = expose
        self.dead_peer_timeout = dead_peer_timeout
        self.connect_timeout = connect_timeout
        self.handshake_timeout = handshake_timeout
        self.max_pending = max_pending
        self.max_pending_per_host = max_pending_per_host
        #: The TCP addresses tcpd listens on (host, port, ...), once ready.
        self.addresses: List[Tuple[Any, ...]] = []
        self._listeners: Dict[int, socket.socket] = {}
        self._unix_listener: Optional[socket.socket] = None
        self._incoming: Dict[int, _Incoming] = {}
        self._incoming_from = _sockets.PeerShares(max_pending_per_host)
        # Dials per remote host whose worker is not back yet: a name lookup
        # cannot be stopped, and one that hangs outlives its dial's answer.
        self._dialling_to = _sockets.PeerShares(max_pending_per_host)
        self._dials: Dict[int, _Dial] = {}             # by ipcd's connection
        self._answers: Dict[int, _Dial] = {}           # by dialled socket, awaiting ok
        self._closing: Dict[int, Tuple[socket.socket, TimerHandle]] = {}
        self._relayed: Set[int] = set()                 # switched TCP fds

    @property
    def pending(self) -> int:
        """Handshakes in progress (incoming names, outgoing dials)."""
        return len(self._incoming) + sum(1 for d in self._dials.values() if d.uri)

    # ------------------------------------------------------------ set-up

    def setup(self) -> None:
        """Listen (systemd's sockets, else --listen) and serve `tcp` for ipcd."""
        self.check_exposed(self.expose)
        # Relayed messages are not reported: on the native backend no Python
        # runs per message; ends and errors of switched fds still are.
        self.ctx.switch_events = False
        passed = _systemd.passed_sockets(first=("tcp",))
        for sock in passed:
            self._adopt(sock)
        if not self._listeners:
            if passed:
                self.log.warning("tcpd: no TCP socket from systemd: listening on %s",
                                 ", ".join(self.listen))
            for address in self.listen:
                try:
                    listeners = _sockets.tcp_listeners(address, DEFAULT_PORT)
                except OSError as e:            # in use, not ours, no such name
                    raise IPCError(f"tcpd cannot listen on {address}: "
                                   f"{e.strerror or e}", e.errno) from None
                for sock in listeners:
                    self._add_listener(sock)
        if self._unix_listener is None:
            self.ctx.service_init(TCP_SERVICE)
        self.log.info("tcpd: listening on %s; exposing %s", self.addresses,
                      ", ".join(sorted(self.expose)) or "nothing")

    def _adopt(self, sock: socket.socket) -> None:
        """A socket systemd passed: TCP ones are listeners, a Unix one is `tcp`."""
        if _sockets.is_listening(sock, socket.AF_INET) or \
                _sockets.is_listening(sock, socket.AF_INET6):
            sock.setblocking(False)
            self._add_listener(sock)
        elif self._unix_listener is None and _sockets.is_listening(sock, socket.AF_UNIX):
            sock.setblocking(False)
            self._unix_listener = sock
            self.ctx.add_external(sock.fileno())
        else:
            self.log.warning("tcpd: ignoring fd %d from systemd", sock.fileno())
            sock.close()

    def _add_listener(self, sock: socket.socket) -> None:
        self.ctx.add_external(sock.fileno())
        self._listeners[sock.fileno()] = sock
        self.addresses.append(sock.getsockname())

    def teardown(self) -> None:
        """Let go of the socket objects (the context closes their fds)."""
        # The context closes every fd it watches: the objects only let go.
        for sock in self._listeners.values():
            sock.detach()
        if self._unix_listener is not None:
            self._unix_listener.detach()
        # Peers in their handshake and ipcd's requests in progress are told
        # why the end comes (one write that never blocks), not left with a
        # bare EOF.
        stopping = "tcpd is stopping"
        for incoming in self._incoming.values():
            wire.send_raw(incoming.sock.fileno(), wire.refusal(wire.REFUSED, stopping) + b"\n")
            incoming.sock.detach()
        for sock, _ in self._closing.values():
            sock.detach()
        for dial in self._dials.values():
            if not dial.done:
                wire.send_raw(dial.ipcd, wire.frame(wire.refusal(wire.NODAEMON, stopping)))
            dial.done = True
            if dial.sock is not None and dial.sock.fileno() in self._answers:
                dial.sock.detach()

    # ------------------------------------------------------------ events

    def on_event(self, ev: Event) -> None:
        """Handle one event (a failure is logged by the runtime, which goes on)."""
        fd = ev.fd
        if ev.type == EventType.EXTERNAL:
            if fd in self._incoming:
                self._read_name(self._incoming[fd])
            elif fd in self._answers:
                self._read_answer(self._answers[fd])
            elif fd in self._listeners:
                self._accept(self._listeners[fd])
            elif fd in self._closing:
                self._drain(fd)
            elif self._unix_listener is not None and fd == self._unix_listener.fileno():
                self._accept_ipcd()
        elif ev.type == EventType.CONNECTION:
            self._new_dial(fd)
        elif ev.type == EventType.MESSAGE_RX:
            dial = self._dials.get(fd)
            if dial is not None and not dial.uri:
                self._on_uri(dial, ev.message or b"")
        elif ev.type == EventType.DISCONNECTION:
            dial = self._dials.get(fd)
            if dial is not None:                 # ipcd gave up (its timeout)
                self._end_dial(dial)
            elif fd in self._relayed:            # a relay ended: its last bytes kept
                self._relayed.discard(fd)
                self.close_gracefully(fd)
        elif ev.type == EventType.ERROR:
            self.log.debug("tcpd: fd %d: %s", fd, ev.error)

    def on_event_failed(self, ev: Event) -> None:
        """A bug or a resource limit met while handling ev: what its fd was
        doing ends now (a peer's handshake is closed, ipcd's dial answered),
        rather than failing again at every wake-up until its deadline."""
        fd = ev.fd
        incoming = self._incoming.get(fd)
        if incoming is not None:
            return self._forget_incoming(incoming, close=True)
        dial = self._answers.get(fd) or self._dials.get(fd)
        if dial is not None:
            return self._answer_ipcd(dial, wire.refusal(
                wire.REFUSED, "tcpd failed serving this request (see its log)"))
        if fd in self._closing:
            self._close(fd)

    # ------------------------------------------------------------ incoming

    def _accept(self, listener: socket.socket) -> None:
        for sock in _sockets.accept_some(listener):
            sock.setblocking(False)
            try:
                _sockets.tune_tcp(sock, self.dead_peer_timeout)
            except OSError:
                sock.close()
                continue
            if self.pending >= self.max_pending:
                self._refuse_peer(sock, wire.BUSY, f"tcpd has {self.max_pending} "
                                  "handshakes in progress (--max-pending)", watched=False)
                continue
            try:
                host = _sockets.peer_key(sock.getpeername()[0])
            except OSError:                       # already reset by the peer
                sock.close()
                continue
            if self._incoming_from.full(host):
                self._refuse_peer(sock, wire.BUSY, f"tcpd has {self.max_pending_per_host} "
                                  f"handshakes in progress from {host} "
                                  "(--max-pending-per-host)", watched=False)
                continue
            fd = sock.fileno()
            try:
                self.ctx.add_external(fd)
            except IPCError as e:                 # max_connections reached
                self.log.warning("tcpd: cannot take a peer: %s", e)
                sock.close()
                continue
            self._incoming[fd] = _Incoming(sock, host, self.call_later(
                self.handshake_timeout, lambda: self._name_expired(fd)))
            self._incoming_from.add(host)

    def _read_name(self, incoming: _Incoming) -> None:
        sock = incoming.sock
        try:
            # Peek, then take the name and its newline only: what follows is
            # the first messages, left in the socket for the relay.
            seen = sock.recv(wire.MAX_NAME_LINE + 1 - len(incoming.name), socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:                           # reset: nobody to answer
            return self._forget_incoming(incoming, close=True)
        if not seen:
            if not incoming.name:                 # gone before naming anything
                return self._forget_incoming(incoming, close=True)
            # A name without its newline, then the end of what the peer
            # sends: the name is whole (answered, not dropped).
            if incoming.grace is not None:
                self.cancel(incoming.grace)
                incoming.grace = None
            return self._serve_name(incoming)
        end = seen.find(b"\n")
        taken = sock.recv(end + 1 if end >= 0 else len(seen))
        incoming.name += taken[:end] if end >= 0 else taken
        if end >= 0:
            return self._serve_name(incoming)
        if wire.name_too_long(incoming.name):
            return self._refuse_incoming(incoming, wire.REFUSED, wire.NAME_TOO_LONG)
        # libIPC's tcpd sends no newline: the name is whole once NAME_GRACE
        # passed after its last byte (from the first, a name typed or sent
        # a byte at a time was cut short).
        if incoming.grace is not None:
            self.cancel(incoming.grace)
        fd = sock.fileno()
        incoming.grace = self.call_later(wire.NAME_GRACE, lambda: self._bare_name(fd))

    def _bare_name(self, fd: int) -> None:
        incoming = self._incoming.get(fd)
        if incoming is not None:
            incoming.grace = None
            self._serve_name(incoming)

    def _name_expired(self, fd: int) -> None:
        incoming = self._incoming.get(fd)
        if incoming is not None:
            self._refuse_incoming(incoming, wire.TIMEOUT, "no service name in "
                                  f"{self.handshake_timeout:g} s")

    def _serve_name(self, incoming: _Incoming) -> None:
        if wire.name_too_long(incoming.name):
            return self._refuse_incoming(incoming, wire.REFUSED, wire.NAME_TOO_LONG)
        raw = wire.name_of_line(incoming.name)     # a typed line may end with CR LF
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            return self._refuse_incoming(incoming, wire.REFUSED, "the name is not UTF-8")
        if name not in self.expose:
            return self._refuse_incoming(incoming, wire.REFUSED,
                                         f"service {name} is not exposed by this tcpd")
        try:
            local = _sockets.connect_service(self.ctx.rundir, name)
        except _sockets.LocalRefusal as e:
            text = f"no service {name} on {socket.gethostname()}" \
                if e.code == wire.NOSERVICE else str(e)
            return self._refuse_incoming(incoming, e.code, text)
        self._forget_incoming(incoming, close=False)
        tcp = incoming.sock.detach()               # the context owns it (external)
        try:
            self.ctx.add_connection(local)
        except IPCError as e:                      # max_connections reached
            socket.socket(fileno=local).close()
            self.log.warning("tcpd: cannot relay to %s: %s", name, e)
            self.ctx.close(tcp)
            return
        if not wire.send_raw(tcp, b"ok"):
            self.ctx.close(local)
            self.ctx.close(tcp)
            return
        self.ctx.add_switch(tcp, local)
        self._relayed.add(tcp)
        self.log.info("tcpd: a peer reached %s", name)

    def _refuse_incoming(self, incoming: _Incoming, code: str, text: str) -> None:
        sock = incoming.sock
        self._forget_incoming(incoming, close=False)
        self._refuse_peer(sock, code, text, watched=True)

    def _forget_incoming(self, incoming: _Incoming, close: bool) -> None:
        fd = incoming.sock.fileno()
        del self._incoming[fd]
        self._incoming_from.remove(incoming.host)
        self.cancel(incoming.deadline)
        if incoming.grace is not None:
            self.cancel(incoming.grace)
        if close:
            incoming.sock.detach()
            self.ctx.close(fd)

    def _refuse_peer(self, sock: socket.socket, code: str, text: str, watched: bool) -> None:
        """Answer `ne CODE TEXT` and close once the peer has read it (or after
        REFUSAL_LINGER): closing with its bytes unread would send a reset,
        which may destroy the refusal before the peer reads it."""
        self.log.info("tcpd: refused a peer: %s %s", code, wire.printable(text))
        fd = sock.fileno()
        wire.send_raw(fd, wire.refusal(code, text) + b"\n")
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        if not watched:
            try:
                self.ctx.add_external(fd)
            except IPCError:                      # max_connections: no linger then
                sock.close()
                return
        self._closing[fd] = (sock, self.call_later(REFUSAL_LINGER, lambda: self._close(fd)))

    def _drain(self, fd: int) -> None:
        if _sockets.drop_input(fd):
            self._close(fd)

    def _close(self, fd: int) -> None:
        entry = self._closing.pop(fd, None)
        if entry is not None:
            sock, timer = entry
            self.cancel(timer)
            sock.detach()
            self.ctx.close(fd)

    # ------------------------------------------------------------ outgoing

    def _accept_ipcd(self) -> None:
        assert self._unix_listener is not None
        for sock in _sockets.accept_some(self._unix_listener):
            fd = sock.detach()
            try:
                self.ctx.add_connection(fd)
            except IPCError:
                socket.socket(fileno=fd).close()
                continue
            self._new_dial(fd)

    def _new_dial(self, ipcd: int) -> None:
        """ipcd connected to `tcp`: its URI comes next, within connect_timeout."""
        self._dials[ipcd] = _Dial(ipcd, self.call_later(self.connect_timeout,
                                                        lambda: self._dial_expired(ipcd)))

    def _on_uri(self, dial: _Dial, payload: bytes) -> None:
        too_long = wire.uri_too_long(payload, "tcpd")
        if too_long is not None:
            dial.uri = "?"
            return self._answer_ipcd(dial, wire.refusal(wire.BADREQUEST, too_long))
        try:
            dial.uri = payload.decode("utf-8")
            host, port, dial.name = parse_uri(dial.uri)
        except (UnicodeDecodeError, ValueError) as e:
            dial.uri = dial.uri or "?"
            return self._answer_ipcd(dial, wire.refusal(wire.NORULE, f"bad URI: {e}"))
        if self.pending > self.max_pending:
            return self._answer_ipcd(dial, wire.refusal(
                wire.BUSY, f"tcpd has {self.max_pending} handshakes in progress"))
        key = host.lower()
        if self._dialling_to.full(key):
            return self._answer_ipcd(dial, wire.refusal(
                wire.BUSY, f"tcpd has {self.max_pending_per_host} dials to {host} in "
                           "progress (--max-pending-per-host)"))
        self._dialling_to.add(key)
        # Within the dial's own deadline, on a worker that gives up as soon
        # as the dial is answered (its deadline, or ipcd leaving).
        try:
            self.offload(lambda: _sockets.dial_tcp(host, port, dial.deadline.when,
                                                   lambda: dial.done),
                         lambda sock, exc: self._dialled(dial, host, port, sock, exc))
        except BaseException:                     # no worker (no thread): its share back
            self._dialling_to.remove(key)
            raise

    def _dialled(self, dial: _Dial, host: str, port: int, sock: Optional[socket.socket],
                 exc: Optional[BaseException]) -> None:
        self._dialling_to.remove(host.lower())       # the worker is back
        if dial.done:                                # timed out, or ipcd left
            if sock is not None:
                sock.close()
            return
        where = _sockets.host_port(host, port)
        if sock is None:
            return self._answer_ipcd(dial, wire.refusal(
                *_sockets.dial_failure(where, exc, self._no_answer(dial))))
        try:
            _sockets.tune_tcp(sock, self.dead_peer_timeout)
            sock.setblocking(False)
            sock.send((dial.name + "\n").encode(), wire.SEND_FLAGS)
        except OSError as e:
            sock.close()
            return self._answer_ipcd(dial, wire.refusal(
                wire.UNREACHABLE, f"{where}: {e.strerror or e}"))
        try:
            self.ctx.add_external(sock.fileno())
        except IPCError as e:                     # max_connections reached
            sock.close()
            return self._answer_ipcd(dial, wire.refusal(wire.BUSY, str(e)))
        dial.sock = sock
        self._answers[sock.fileno()] = dial

    def _read_answer(self, dial: _Dial) -> None:
        assert dial.sock is not None
        try:
            # Peek: the bytes after "ok" are the remote service's first
            # messages, left in the socket for the client.
            seen = dial.sock.recv(wire.MAX_REFUSAL + 4, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            seen = b""
        if dial.answer:
            return self._read_refusal(dial, seen)
        word = dial.word + seen
        if word.startswith(b"ne "):
            dial.answer, dial.word = dial.word, b""
            return self._read_refusal(dial, seen)
        if word.startswith(b"ok"):
            dial.sock.recv(2 - len(dial.word))
            return self._hand_over(dial)
        if seen and (b"ok".startswith(word) or b"ne ".startswith(word)):
            # The word's start: taken (it is no part of the stream), so that
            # the socket is not readable again until more comes.
            dial.word += dial.sock.recv(len(seen))
            return
        what = repr(word[:40]) if word else "nothing (closed)"
        self._answer_ipcd(dial, wire.refusal(wire.UNREACHABLE if not word else wire.REFUSED,
                                             f"the peer at {dial.uri} answered {what}, "
                                             "not ok: is it a pyipc or libIPC tcpd?"))

    def _read_refusal(self, dial: _Dial, seen: bytes) -> None:
        """The remote's `ne ...` line: read up to its newline or its end."""
        assert dial.sock is not None
        end = seen.find(b"\n")
        dial.answer += dial.sock.recv(end + 1 if end >= 0 else max(1, len(seen)))
        if end < 0 and seen and len(dial.answer) <= wire.MAX_REFUSAL + 3:
            return
        line = wire.cut_answer(dial.answer.split(b"\n", 1)[0])
        self._answer_ipcd(dial, line)

    def _hand_over(self, dial: _Dial) -> None:
        assert dial.sock is not None
        if not wire.send_with_fd(dial.ipcd, wire.frame(b"ok"), dial.sock.fileno()):
            self.log.info("tcpd: ipcd left before the answer for %s", dial.uri)
        self.log.info("tcpd: connected to %s", dial.uri)
        self._end_dial(dial)

    def _dial_expired(self, ipcd: int) -> None:
        dial = self._dials.get(ipcd)
        if dial is not None:
            self._answer_ipcd(dial, wire.refusal(
                wire.TIMEOUT if dial.uri else wire.BADREQUEST,
                self._no_answer(dial) if dial.uri else "no URI received"))

    def _no_answer(self, dial: _Dial) -> str:
        """The text of a dial that ran out of time."""
        return _sockets.no_answer(dial.uri, self.connect_timeout)

    def _answer_ipcd(self, dial: _Dial, refusal: bytes) -> None:
        self.log.info("tcpd: %s: %s", dial.uri,
                      wire.printable(refusal.decode("utf-8", "replace")))
        wire.send_raw(dial.ipcd, wire.frame(refusal))
        self._end_dial(dial)

    def _end_dial(self, dial: _Dial) -> None:
        dial.done = True
        self._dials.pop(dial.ipcd, None)
        self.cancel(dial.deadline)
        if dial.sock is not None:
            fd = dial.sock.fileno()
            self._answers.pop(fd, None)
            dial.sock.detach()
            self.ctx.close(fd)                       # our copy; ipcd has its own
            dial.sock = None
        try:
            self.ctx.close(dial.ipcd)
        except IPCError:
            pass                                     # already gone


def parse_uri(uri: str) -> Tuple[str, int, str]:
    """(host, port, service name) of `tcp://HOST[:PORT]/NAME` (IPv6 in
    brackets); ValueError when it is not one (_netwire.parse_uri)."""
    return wire.parse_uri(uri, "tcp", DEFAULT_PORT)


# ---------------------------------------------------------------- command line

def add_command(subparsers: Any) -> None:
    """`pyipc tcpd`."""
    p = subparsers.add_parser(
        "tcpd", help="reach services across TCP (the tcp:// scheme of IPC_NETWORK)",
        description="Listen on TCP for peers asking for an exposed local service, and "
                    "dial remote tcpds for ipcd (service tcp). Deny by default: only "
                    "services given with --expose can be reached. Foreground; stops on "
                    "SIGTERM or Ctrl-C; systemd socket activation and readiness "
                    "(docs/networking.md).")
    # --rundir and --backend are pyipc's own options (pyipc --rundir DIR tcpd).
    p.add_argument("--listen", action="append", metavar="ADDRESS",
                   help=f"HOST[:PORT] or [IPV6][:PORT] to listen on, a host name listens on "
                        f"each of its addresses; repeat for several (default {DEFAULT_LISTEN})")
    p.add_argument("--expose", action="append", default=[], metavar="NAME[,NAME...]",
                   type=wire.expose_option,
                   help="services that peers may reach (none by default)")
    p.add_argument("--dead-peer-timeout", type=float, default=DEFAULT_DEAD_PEER_TIMEOUT,
                   metavar="SECONDS", help="end a connection whose peer is silent this long "
                   f"(cut link, host down; default {DEFAULT_DEAD_PEER_TIMEOUT:g}, 0: never, "
                   f"at most {_sockets.MAX_DEAD_PEER_TIMEOUT})")
    p.add_argument("--connect-timeout", type=float, default=DEFAULT_CONNECT_TIMEOUT,
                   metavar="SECONDS", help="time to dial a remote tcpd and get its answer "
                   f"(default {DEFAULT_CONNECT_TIMEOUT:g}, at most {MAX_TIMEOUT:g})")
    p.add_argument("--handshake-timeout", type=float, default=DEFAULT_HANDSHAKE_TIMEOUT,
                   metavar="SECONDS", help="time a peer has to send a service name "
                   f"(default {DEFAULT_HANDSHAKE_TIMEOUT:g}, at most {MAX_TIMEOUT:g})")
    p.add_argument("--max-pending", type=int, default=DEFAULT_MAX_PENDING, metavar="N",
                   help=f"handshakes in progress at once; more are answered 'busy' "
                        f"(default {DEFAULT_MAX_PENDING})")
    p.add_argument("--max-pending-per-host", type=int, default=None, metavar="N",
                   help="incoming handshakes in progress at once from one address, and "
                        "dials to one host whose worker is not back; more are answered "
                        "'busy' (default: half of --max-pending)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    expose = [name for names in args.expose for name in names]
    try:
        daemon = Tcpd(rundir=args.rundir, backend=args.backend,
                      listen=args.listen or [DEFAULT_LISTEN], expose=expose,
                      dead_peer_timeout=args.dead_peer_timeout,
                      connect_timeout=args.connect_timeout,
                      handshake_timeout=args.handshake_timeout, max_pending=args.max_pending,
                      max_pending_per_host=args.max_pending_per_host)
    except ValueError as e:                     # a bad option value: usage error
        print(f"pyipc tcpd: {e}", file=sys.stderr)
        return 2
    try:
        daemon.run()
    except (OSError, ValueError) as e:
        if isinstance(e, IPCError):
            raise                       # pyipc's own: the CLI says it (exit 1)
        print(f"pyipc tcpd: {e}", file=sys.stderr)  # e.g. a daemon's service exposed
        return 1
    return 0

