"""tlsd: the `tls` scheme of IPC_NETWORK (`pyipc tlsd`).

Dialing: ipcd connects to the local service `tls` and sends one framed URI,
`tls://host:port/NAME`. tlsd connects to the remote tlsd (on a worker thread:
name resolution and connect block), makes the TLS handshake in its loop
(verifying the server's certificate), sends `NAME\\n`, waits for `ok`, then
answers ipcd a framed `ok` with one end of a new socket pair (SCM_RIGHTS).
Failures are answered `ne CODE TEXT` (`unreachable`, `tls`, `timeout`,
`busy`, or the remote's own code such as `noservice`).

Listening (`--listen`): a remote peer makes the TLS handshake (its
certificate verified against `--client-ca` for mutual TLS), sends the name of
an exposed service and is answered `ok` inside TLS, or `ne CODE TEXT` and
close_notify.

Then, both ways, a TLS session cannot travel as a fd, so tlsd keeps it: the
TCP fd is switched with the local end (socket pair or service connection) and
the switching callbacks of both decrypt and encrypt (pyipc.daemons._tls_relay).
Inside TLS the plaintext is the pyipc stream itself, so it is relayed by the
read in whole frames as they are (one TLS write or one switch_send a read, not
a callback a message), with the core's framing rules: a frame goes on only once
whole, and one announced over max_message_size ends the relay at its header.
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import socket
import ssl
import struct
import sys
from typing import Any, Deque, Dict, Iterator, List, Optional, Tuple

from .. import CBEvent, Event, EventType, IPCError, QueueFullError
from .._checks import too_large_text
from . import _netwire as wire
from . import _sockets, _systemd
from ._runtime import Daemon
from ._timers import MAX_TIMEOUT
from ._tls_handshake import Handshake, HandshakeFailed, tls_reason
from ._tls_options import DEFAULT_PORT, TlsdConfig, client_context, parse_uri, server_context
from ._tls_relay import TlsRelay, TlsRelayError

__all__ = ["Tlsd", "TlsdConfig", "add_command"]

#: The local service ipcd asks for `tls://` URIs (the scheme's name).
SERVICE = "tls"
#: Ciphertext read from a TCP socket per call (several TLS records).
READ_SIZE = 256 * 1024
#: The reason a switch ends with when the local side's stream ends inside a
#: frame (the core's own, for a connection it frames).
MID_MESSAGE = "peer closed the connection in the middle of a message"
#: A frame's header: its payload's length, 4 bytes big-endian.
_HEADER = struct.Struct(">I")
#: Seconds between two attempts to queue records the TCP side refused for
#: now (see Tlsd._send_tcp; only while its queue is over its bound).
BACKLOG_RETRY_S = 0.005
#: Bytes tlsd holds back for one switched fd beyond the core's queue (see
#: Tlsd._send_tcp). What a working peer needs is one read's worth (READ_SIZE,
#: its records' overhead included); a remote that never reads yet keeps
#: tlsd answering (TLS 1.3 key update requests) reaches the bound, and its
#: connection ends with an ERROR rather than tlsd's memory growing.
MAX_BACKLOG = 4 * READ_SIZE


class Tlsd(Daemon):
    """The TLS daemon (see the module doc); `config` is its whole configuration."""

    name = "tlsd"

    def __init__(self, config: TlsdConfig, *, rundir: Optional[str] = None,
                 backend: Optional[str] = None) -> None:
        super().__init__(rundir=rundir, backend=backend, max_offloads=config.max_pending)
        self.config = config
        self._client_ctx = client_context(config)
        self._server_ctx = server_context(config) if config.cert is not None else None
        self._listeners: Dict[int, socket.socket] = {}
        self._unix_listener: Optional[socket.socket] = None   # `tls`, when systemd made it
        self._handshakes: Dict[int, Handshake] = {}     # TCP fd -> its handshake
        self._incoming_host: Dict[int, str] = {}        # incoming handshake's fd -> address
        self._incoming_from = _sockets.PeerShares(config.pending_per_host)
        # Dials per remote host whose worker is not back yet: a name lookup
        # cannot be stopped, and one that hangs outlives its request's answer.
        self._dialling_to = _sockets.PeerShares(config.pending_per_host)
        self._requests: Dict[int, Optional[Any]] = {}   # ipcd fd -> its deadline, once asked
        self._connecting: Dict[int, Tuple[str, int, str, str]] = {}   # ipcd fd -> host, port, name, URI
        self._uri_timers: Dict[int, Any] = {}    # ipcd fd -> the deadline of its URI
        self._relays: Dict[int, TlsRelay] = {}          # switched TCP fd -> its session
        self._local_of: Dict[int, int] = {}             # switched TCP fd -> its local side
        self._tcp_of: Dict[int, int] = {}               # local side -> its TCP fd
        #: local side -> the start of a frame it wrote, held until it is whole
        self._partials: Dict[int, bytearray] = {}
        self._backlog: Dict[int, _Backlog] = {}     # switched fd -> bytes refused for now
        self._read_buffer = bytearray(READ_SIZE)        # ciphertext, one read at a time
        self._read_buffers = [self._read_buffer]
        self._read_view = memoryview(self._read_buffer)
        #: Where the listening sockets are bound (tests read the port).
        self.addresses: List[Tuple[Any, ...]] = []

    # ------------------------------------------------------------ setup

    def setup(self) -> None:
        self.check_exposed(self.config.expose)
        self.ctx.switch_events = False      # no event (no Python) per relayed message
        socks = self._passed_listeners()
        if self._unix_listener is None:
            self.ctx.service_init(SERVICE)
        if not socks:
            for address in self.config.listen:
                try:
                    socks += _sockets.tcp_listeners(address, DEFAULT_PORT)
                except OSError as e:            # in use, not ours, no such name (as tcpd)
                    for sock in socks:
                        sock.close()
                    raise IPCError(f"tlsd cannot listen on {address}: "
                                   f"{e.strerror or e}", e.errno) from None
        if socks and self._server_ctx is None:
            for sock in socks:
                sock.close()
            raise ValueError("listening for TLS needs --cert")
        if not socks and self.config.client_ca:
            raise ValueError("--client-ca checks the peers we accept: it needs --listen "
                             "(or listening sockets passed by systemd)")
        for sock in socks:
            sock.setblocking(False)
            self.ctx.add_external(sock.fileno())
            self._listeners[sock.fileno()] = sock
            self.addresses.append(sock.getsockname())
        self.log.info("tlsd: listening on %s; exposing %s", self.addresses or "nothing",
                      ", ".join(sorted(self.config.expose)) or "nothing")

    def _passed_listeners(self) -> List[socket.socket]:
        """The TCP listening sockets systemd passed (socket activation); a
        Unix one becomes our service `tls` (what ipcd connects to)."""
        found = []
        for sock in _systemd.passed_sockets(first=("tls",)):
            fd = sock.fileno()
            if _sockets.is_listening(sock, socket.AF_INET) or \
                    _sockets.is_listening(sock, socket.AF_INET6):
                found.append(sock)
            elif self._unix_listener is None and _sockets.is_listening(sock, socket.AF_UNIX):
                sock.setblocking(False)
                self._unix_listener = sock
                self.ctx.add_external(fd)
            else:
                self.log.warning("tlsd: ignoring fd %d from systemd", fd)
                sock.close()
        return found

    def _accept_ipcd(self, listener: socket.socket) -> None:
        """ipcd connected to the `tls` socket systemd made: a request."""
        for fd in _sockets.accept_connections(self.ctx, listener, "request"):
            self._await_uri(fd)

    def teardown(self) -> None:
        self._end_sessions()
        for req in self._requests:      # ipcd's dials in progress: told why, no bare EOF
            wire.send_raw(req, wire.frame(wire.refusal(wire.NODAEMON, "tlsd is stopping")))
        # The context closes every fd it watches (listeners included): the
        # socket objects must not close them a second time.
        for sock in self._listeners.values():
            sock.detach()
        self._listeners.clear()
        if self._unix_listener is not None:
            self._unix_listener.detach()

    def _end_sessions(self) -> None:
        """tlsd stops: queue close_notify after what each remote still has to
        get (close_all then writes the queues, for the context's linger), so
        no remote sees a ragged EOF."""
        for fd, relay in list(self._relays.items()):
            goodbye = relay.goodbye()
            if goodbye:
                try:
                    self._send_tcp(fd, goodbye)
                except IPCError:
                    pass                        # that connection is ending anyway

    # ------------------------------------------------------------ events

    def on_event_failed(self, ev: Event) -> None:
        """After an unexpected failure about ev's fd: forget and close what it was."""
        fd = ev.fd
        hs = self._handshakes.get(fd)
        if hs is not None:
            self._drop(hs)
        if fd in self._requests:               # answered, as tcpd does (not a bare EOF)
            self._answer(fd, wire.REFUSED, "tlsd failed serving this request (see its log)")

    def on_event(self, ev: Event) -> None:
        """Handle one event (see on_event_failed for a failure)."""
        t = ev.type
        if t == EventType.EXTERNAL:
            if ev.fd in self._listeners:
                self._accept(self._listeners[ev.fd])
            elif self._unix_listener is not None and ev.fd == self._unix_listener.fileno():
                self._accept_ipcd(self._unix_listener)
            elif ev.fd in self._handshakes:
                self._readable(self._handshakes[ev.fd])
        elif t == EventType.CONNECTION:
            self._await_uri(ev.fd)              # ipcd, about to send a URI
        elif t == EventType.MESSAGE_RX and ev.fd in self._requests:
            self._request(ev.fd, ev.message or b"")
        elif t == EventType.DISCONNECTION:
            self._gone(ev.fd)
        elif t == EventType.ERROR:
            self.log.warning("fd %d: %s", ev.fd, ev.error)

    def _gone(self, fd: int) -> None:
        """fd was closed by the context (peer gone, switch ended)."""
        relay = self._relays.pop(fd, None)
        backlog = self._backlog.pop(fd, None)
        local = self._local_of.pop(fd, None)
        if local is not None:
            self._tcp_of.pop(local, None)
        tcp = self._tcp_of.pop(fd, None)
        if tcp is not None:
            self._local_of.pop(tcp, None)
        self._partials.pop(fd, None)
        if relay is not None:
            self._say_goodbye(fd, relay, backlog)
            self.close_gracefully(fd)           # its last records kept
        if fd in self._requests:                # ipcd gave up: its dial is abandoned
            self._end_request(fd)

    def _say_goodbye(self, fd: int, relay: TlsRelay, backlog: Optional[_Backlog]) -> None:
        """A switched TCP fd ended (its local side closed, or the remote):
        end its TLS session with close_notify, after the records still held
        back, so the remote sees a clean end and not a ragged EOF. The core
        has written everything queued for fd and keeps its number open until
        this DISCONNECTION is handed out, so the alert follows the last
        record. One write that never blocks: a remote that does not read
        (full socket buffer) or has gone gets what fits, then the close."""
        goodbye = relay.goodbye()
        if goodbye:
            wire.send_raw(fd, b"".join(backlog.pieces if backlog else ()) + goodbye)

    # ------------------------------------------------------------ dialing

    def _await_uri(self, req: int) -> None:
        """A local client (ipcd) connected: its URI must come within
        connect_timeout, or it is answered and closed (a silent client would
        hold its connection for good)."""
        self._requests[req] = None
        self._uri_timers[req] = self.call_later(self.config.connect_timeout,
                                                lambda: self._no_uri(req))

    def _no_uri(self, req: int) -> None:
        if self._uri_timers.pop(req, None) is not None:
            self._answer(req, wire.BADREQUEST, "no URI received within "
                                               f"{self.config.connect_timeout:g} s")

    def _request(self, req: int, message: bytes) -> None:
        timer = self._uri_timers.pop(req, None)
        if timer is not None:
            self.cancel(timer)
        if self._requests[req] is not None or req in self._connecting:
            self._answer(req, wire.BADREQUEST, "one URI per request")
            return
        too_long = wire.uri_too_long(message, "tlsd")
        if too_long is not None:
            self._answer(req, wire.BADREQUEST, too_long)
            return
        uri = message.decode("utf-8", "replace")
        try:
            host, port, name = parse_uri(uri)
        except ValueError as e:
            self._answer(req, wire.NORULE, f"bad URI: {e}")
            return
        if self._pending() >= self.config.max_pending:
            self._answer(req, wire.BUSY, f"tlsd has {self.config.max_pending} dials and "
                                         f"handshakes in progress (--max-pending)")
            return
        if self._dialling_to.full(host.lower()):
            self._answer(req, wire.BUSY, f"tlsd has {self.config.pending_per_host} dials "
                                         f"to {host} in progress (--max-pending-per-host)")
            return
        self._dialling_to.add(host.lower())
        deadline = self.call_later(self.config.connect_timeout,
                                   lambda: self._timed_out(req, uri))
        self._requests[req] = deadline
        # This tuple object stands for this request: `req` is an fd number,
        # which ipcd's next request may get once this one is answered.
        target = (host, port, name, uri)
        self._connecting[req] = target
        # Within the request's deadline, on a worker that gives up as soon as
        # the request is answered (its deadline, or ipcd leaving).
        try:
            self.offload(lambda: _sockets.dial_tcp(
                             host, port, deadline.when,
                             lambda: self._connecting.get(req) is not target),
                         lambda sock, exc: self._connected(req, target, sock, exc))
        except BaseException:   # no worker (no thread): its share back; the deadline answers
            self._dialling_to.remove(host.lower())
            self._connecting.pop(req, None)
            raise

    def _pending(self) -> int:
        return len(self._connecting) + len(self._handshakes)

    def _connected(self, req: int, target: Tuple[str, int, str, str],
                   sock: Optional[socket.socket], exc: Optional[BaseException]) -> None:
        """In the loop: the worker's TCP connect for request `target` ended."""
        self._dialling_to.remove(target[0].lower())     # the worker is back
        try:
            self._start_handshake(req, target, sock, exc)
        except Exception as e:  # a bug or a resource limit: this request, not the daemon
            self.log.exception("tlsd: request %d failed", req)
            if sock is not None and sock.fileno() >= 0:
                sock.close()                    # not yet the context's
            if req in self._requests:
                self._answer(req, wire.TLS, f"tlsd could not start TLS: {e}")

    def _start_handshake(self, req: int, target: Tuple[str, int, str, str],
                         sock: Optional[socket.socket], exc: Optional[BaseException]) -> None:
        if self._connecting.get(req) is not target:
            # Timed out or ipcd left meanwhile (and `req` may be another
            # request's by now): not this dial's to go on with.
            if sock is not None:
                sock.close()
            return
        del self._connecting[req]
        host, port, name, uri = target
        peer = _sockets.host_port(host, port)
        if exc is not None or sock is None:
            self._answer(req, *_sockets.dial_failure(peer, exc, self._no_answer(uri)))
            return
        relay = TlsRelay(self._client_ctx, server_side=False, server_hostname=host,
                         max_message_size=self.ctx.max_message_size)
        fd = self._adopt(sock)
        if fd < 0:
            self._answer(req, wire.UNREACHABLE, f"{peer}: cannot set up the socket")
            return
        try:
            self.ctx.add_external(fd)
        except IPCError as e:                   # e.g. max_connections reached
            os.close(fd)
            self._answer(req, wire.BUSY, f"tlsd cannot take a connection: {e}")
            return
        hs = Handshake(fd, relay, dialing=True, peer=peer, name=name, request=req)
        self._handshakes[fd] = hs
        try:
            self._send(hs, hs.start())
        except HandshakeFailed as e:
            self._failed(hs, e)

    def _timed_out(self, req: int, uri: str) -> None:
        self._requests[req] = None              # the timer has run: nothing to cancel
        self._answer(req, wire.TIMEOUT, self._no_answer(uri))

    def _no_answer(self, uri: str) -> str:
        """The text of a request that ran out of time."""
        return f"{uri}: no answer within {self.config.connect_timeout:g} s"

    def _answer(self, req: int, code: str, text: str) -> None:
        """Answer ipcd `ne CODE TEXT` and end its request."""
        self.log.info("request %d: ne %s %s", req, code, wire.printable(text))
        # Without waiting: a small answer fits an empty socket buffer, and an
        # ipcd that does not read must not hold the loop.
        if not wire.send_raw(req, wire.frame(wire.refusal(code, text))):
            self.log.info("request %d: ipcd left before the answer", req)
        self._end_request(req)

    def _end_request(self, req: int) -> None:
        """Forget ipcd's request `req` and whatever still works on it."""
        for timer in (self._requests.pop(req, None), self._uri_timers.pop(req, None)):
            if timer is not None:
                self.cancel(timer)
        self._connecting.pop(req, None)
        for hs in [h for h in self._handshakes.values() if h.request == req]:
            self._drop(hs)
        try:
            self.ctx.close(req)
        except IPCError:
            pass                                # already closed by the context

    def _dialed(self, hs: Handshake) -> None:
        """The remote answered `ok`: hand ipcd our end of a new socket pair."""
        req = hs.request
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        local = mine.detach()
        try:
            self.ctx.add_connection(local)
        except IPCError as e:                   # e.g. max_connections reached
            os.close(local)
            theirs.close()
            self._drop(hs)
            self._answer(req, wire.BUSY, f"tlsd cannot take a connection: {e}")
            return
        if not self._switch(hs, local):
            theirs.close()
            self._answer(req, wire.TLS, f"{hs.peer}: bad stream after ok")
            return
        relay_ended = hs.relay.closed           # _switch ended the switch already
        try:
            if wire.send_with_fd(req, wire.frame(b"ok"), theirs.fileno()):
                self.log.info("dialed %s for service %s", hs.peer, hs.name)
            else:
                self.log.info("request %d: ipcd left before the answer", req)
                # Both sides closed by the core; the remote gets close_notify
                # at the TCP side's DISCONNECTION (_gone), while its fd is open.
                if not relay_ended:
                    self.ctx.switch_end(hs.fd)
        finally:
            theirs.close()
        self._end_request(req)

    # ------------------------------------------------------------ listening

    def _accept(self, listener: socket.socket) -> None:
        assert self._server_ctx is not None
        for sock in _sockets.accept_some(listener):
            try:
                address = sock.getpeername()
            except OSError:                     # already reset by the peer
                sock.close()
                continue
            peer = _sockets.host_port(address[0], address[1])
            if self._pending() >= self.config.max_pending:
                # Before TLS there is no way to answer: closed at once.
                self.log.warning("refusing %s: %d handshakes already in progress "
                                 "(--max-pending)", peer, self.config.max_pending)
                sock.close()
                continue
            host = _sockets.peer_key(address[0])
            if self._incoming_from.full(host):
                self.log.warning("refusing %s: %d handshakes already in progress from "
                                 "%s (--max-pending-per-host)", peer,
                                 self._incoming_from.share, host)
                sock.close()
                continue
            fd = self._adopt(sock)
            if fd < 0:
                continue
            try:
                self.ctx.add_external(fd)
            except IPCError as e:               # e.g. max_connections reached
                self.log.warning("refusing %s: %s", peer, e)
                os.close(fd)
                continue
            relay = TlsRelay(self._server_ctx, server_side=True,
                             max_message_size=self.ctx.max_message_size)
            hs = Handshake(fd, relay, dialing=False, peer=peer)
            hs.timer = self.call_later(self.config.handshake_timeout,
                                       functools.partial(self._expired, hs))
            self._handshakes[fd] = hs
            self._incoming_host[fd] = host
            self._incoming_from.add(host)

    def _adopt(self, sock: socket.socket) -> int:
        """The raw fd of a TCP socket the context is to own: non-blocking, no
        Nagle delay, dead-peer detection (as tcpd's); -1 (closed) on failure."""
        try:
            sock.setblocking(False)
            _sockets.tune_tcp(sock, self.config.dead_peer_timeout)
        except OSError as e:
            self.log.info("cannot set up a TCP socket: %s", e)
            sock.close()
            return -1
        return sock.detach()

    def _expired(self, hs: Handshake) -> None:
        hs.timer = None
        if self._handshakes.get(hs.fd) is not hs:
            return
        if hs.secure:           # TLS is up: the peer can be told, as tcpd tells it
            self._refuse(hs, HandshakeFailed(wire.TIMEOUT, "no service name within "
                                             f"{self.config.handshake_timeout:g} s"))
            return
        self.log.info("%s: no TLS handshake within %g s", hs.peer,
                      self.config.handshake_timeout)
        self._drop(hs)

    def _bare_name(self, hs: Handshake) -> None:
        """The grace is over: what the remote sent without a newline is the name."""
        hs.grace = None
        if self._handshakes.get(hs.fd) is not hs:
            return
        n = len(hs.relay.plain())
        try:
            self._serve(hs, hs.take_name(n, n))
        except HandshakeFailed as e:
            self._refuse(hs, e)

    def _serve(self, hs: Handshake, _: str) -> None:
        """Connect the remote to the local service it named, or refuse."""
        name = hs.name
        if name not in self.config.expose:
            raise HandshakeFailed(wire.REFUSED, f"service {name} is not exposed")
        local = self._connect_local(name)
        try:
            self._send(hs, hs.relay.encrypt_raw(b"ok"))
        except HandshakeFailed:                 # the remote is gone: so is its link
            self.ctx.close(local, linger=0)
            raise
        except ssl.SSLError as e:               # the session broke: no answer can go
            self.ctx.close(local, linger=0)
            raise HandshakeFailed(wire.TLS, tls_reason(e, hs.peer)) from e
        self.log.info("%s connected to service %s", hs.peer, name)
        self._switch(hs, local)

    def _connect_local(self, name: str) -> int:
        """A connection of the context's to local service `name`, made without
        blocking (as tcpd's): a service whose backlog is full is refused
        `busy` at once, never holding the loop (every other session with it)."""
        try:
            local = _sockets.connect_service(self.ctx.rundir, name)
        except _sockets.LocalRefusal as e:
            raise HandshakeFailed(e.code, f"no service {name}"
                                  if e.code == wire.NOSERVICE else str(e)) from None
        try:
            self.ctx.add_connection(local)
        except IPCError as e:                   # e.g. max_connections reached
            os.close(local)
            raise HandshakeFailed(wire.BUSY, f"tlsd cannot take a connection: {e}") from None
        return local

    def _refuse(self, hs: Handshake, e: HandshakeFailed) -> None:
        self.log.info("refusing %s: %s %s", hs.peer, e.code, wire.printable(e.text))
        out = e.alert
        if hs.secure:
            try:
                out += hs.relay.encrypt_raw(wire.refusal(e.code, e.text)) + \
                    hs.relay.close_notify()
            except ssl.SSLError:        # the session broke: nothing can be said in it
                pass
        if out:
            try:
                self._send(hs, out)
            except HandshakeFailed:
                pass                            # the remote is gone: nothing to tell
        self._drop(hs)

    # ------------------------------------------------------------ both sides

    def _readable(self, hs: Handshake) -> None:
        try:
            data = os.read(hs.fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError as e:
            self._failed(hs, HandshakeFailed(wire.UNREACHABLE, f"{hs.peer}: {e.strerror or e}"))
            return
        try:
            out, outcome = hs.step(data)
            self._send(hs, out)
            if outcome == "ok":
                self._dialed(hs)
            elif outcome == "name":
                self._serve(hs, hs.name)
            elif not hs.dialing and hs.secure and hs.relay.plain():
                # NAME_GRACE after the last bytes (see tcpd's)
                if hs.grace is not None:
                    self.cancel(hs.grace)
                hs.grace = self.call_later(wire.NAME_GRACE, lambda: self._bare_name(hs))
        except HandshakeFailed as e:
            self._failed(hs, e)

    def _failed(self, hs: Handshake, e: HandshakeFailed) -> None:
        if hs.dialing:
            if hs.request in self._requests:
                self._answer(hs.request, e.code, e.text)    # drops hs too
            else:
                self._drop(hs)
        else:
            self._refuse(hs, e)

    def _send(self, hs: Handshake, data: bytes) -> None:
        """Write handshake bytes now. A fresh socket's send buffer holds a
        whole handshake flight; if it does not, the handshake fails rather
        than blocking the loop."""
        if not data:
            return
        try:
            sent = wire.send_now(hs.fd, data)   # no SIGPIPE from a reset peer
        except OSError as e:
            raise HandshakeFailed(wire.UNREACHABLE, f"{hs.peer}: {e}") from e
        if sent != len(data):
            raise HandshakeFailed(wire.TLS, f"{hs.peer}: send buffer full during the handshake")

    def _forget_handshake(self, hs: Handshake) -> bool:
        """Take `hs` out of the handshakes in progress (and its address's
        share); False if it was not in them."""
        if self._handshakes.pop(hs.fd, None) is None:
            return False
        host = self._incoming_host.pop(hs.fd, None)
        if host is not None:
            self._incoming_from.remove(host)
        return True

    def _drop(self, hs: Handshake) -> None:
        """End a handshake: its timers and its TCP fd."""
        if not self._forget_handshake(hs):
            return
        for timer in (hs.timer, hs.grace):
            if timer is not None:
                self.cancel(timer)
        self.ctx.close(hs.fd)

    def _switch(self, hs: Handshake, local: int) -> bool:
        """The handshake is over: relay between the TCP fd and `local`.
        False (both closed) when what came with the handshake is not frames."""
        self._forget_handshake(hs)
        for timer in (hs.timer, hs.grace):
            if timer is not None:
                self.cancel(timer)
        relay, fd = hs.relay, hs.fd
        relay.framed = True
        try:
            # Frames that came with the handshake go first, in order.
            while (payload := relay.next_payload()) is not None:
                self.ctx.schedule(local, payload)
            if relay.closed:            # and the end of the session came with them
                relay.check_ended_whole()
        except TlsRelayError as e:
            self.log.warning("%s: %s", hs.peer, e)
            self.ctx.close(local)
            self.ctx.close(fd)
            return False
        self.ctx.add_switch(fd, local)
        self.ctx.set_switch_callbacks(fd, self._on_in, self._on_out)
        # Both ways the plaintext is the same pyipc stream: relayed in whole
        # frames as they are, by the read, not cut into payloads (see
        # _on_in and _on_local_in; _on_out then never runs).
        self.ctx.set_switch_callbacks(local, self._on_local_in, None)
        self._relays[fd] = relay
        self._local_of[fd] = local
        self._tcp_of[local] = fd
        if relay.closed:
            # The remote ended the session right after the handshake: no read
            # of the TCP side would report it (nothing more comes), so the
            # switch ends now: the frames go to the local side first, and the
            # remote gets close_notify at the TCP side's DISCONNECTION.
            self.ctx.switch_end(fd)
        return True

    # ------------------------------------------------------------ the relay's callbacks

    def _on_in(self, fd: int) -> Tuple[CBEvent, Optional[bytes]]:
        """Ciphertext from the remote in; the whole frames it completes out to
        the local side as they are (one switch_send a read, no payload a
        message: the core would only frame each payload again). A frame stays
        in the relay until it is whole, so the local side gets whole frames
        only, as before; one announced over the limit ends the stream as soon
        as its header is held, never buffered up to its size."""
        relay = self._relays[fd]
        if relay.closed:
            return CBEvent.FD_CLOSING, None
        try:
            # Into one reused buffer: a new 256 KiB bytes object per read
            # costs page faults (glibc maps large blocks afresh).
            n = os.readv(fd, self._read_buffers)
        except BlockingIOError:
            return CBEvent.IGNORE, None
        except OSError as e:
            self.log.info("fd %d: %s", fd, e)
            return CBEvent.ERROR, None
        try:
            relay.feed(self._read_view[:n])
        except TlsRelayError as e:
            # The stream broke or ended inside a frame: the whole frames
            # decrypted before that still go out first, as from the local side.
            self._relay_whole_frames(fd, relay)
            self.log.warning("fd %d: %s", fd, e)
            return CBEvent.ERROR, None
        out = relay.take_output()            # TLS 1.3 tickets, key updates
        if out and not relay.closed:         # (the remote ended: it reads no more)
            try:
                self._send_tcp(fd, out)
            except IPCError as e:            # past MAX_BACKLOG, or the switch ending
                self.log.warning("fd %d: %s", fd, e)
                return CBEvent.ERROR, None
        if not self._relay_whole_frames(fd, relay):
            return CBEvent.ERROR, None
        return (CBEvent.FD_CLOSING if relay.closed else CBEvent.IGNORE), None

    def _relay_whole_frames(self, fd: int, relay: TlsRelay) -> bool:
        """Send the whole frames the relay of TCP fd holds to its local side,
        as they are; False when the stream is to end (the frame after them
        announced over the limit, or the local side ending)."""
        size, error = relay.whole_frames()
        if size:
            local = self._local_of[fd]
            try:
                with relay.frames_view(size) as frames:
                    self._send_tcp(local, frames)
            except IPCError as e:           # the local side is ending: the switch with it
                self.log.info("fd %d: %s", local, e)
                return False
            relay.drop_plain(size)
        if error is not None:
            self.log.warning("fd %d: %s", fd, error)
            return False
        return True

    def _on_local_in(self, local: int) -> Tuple[CBEvent, Optional[bytes]]:
        """The local side's stream in (the frames its client or service
        wrote); its whole frames out to the remote, encrypted as they are:
        one TLS write and one switch_send a read, not a payload a message.
        The core's own framing is kept: a frame is sent only once whole,
        one over the limit or cut by the end of the stream ends the switch
        with the core's reason."""
        fd = self._tcp_of[local]
        try:
            n = os.readv(local, self._read_buffers)
        except BlockingIOError:
            return CBEvent.IGNORE, None
        except OSError as e:
            self.ctx.switch_end(local, f"read failed: {e.strerror or e}")
            return CBEvent.IGNORE, None
        if not n:
            if self._partials.pop(local, None) is not None:
                self.ctx.switch_end(local, MID_MESSAGE)
                return CBEvent.IGNORE, None
            return CBEvent.FD_CLOSING, None
        limit = self.ctx.max_message_size
        frames, too_large = _whole_frames(self._partials, local, self._read_view[:n], limit)
        if frames:
            try:
                self._send_tcp(fd, self._relays[fd].encrypt_frames(frames))
            except (IPCError, ssl.SSLError) as e:
                # The TCP side is ending (the switch with it), or the session
                # is (tlsd stopping has said goodbye on it already).
                self.log.info("fd %d: %s", fd, e)
                return CBEvent.ERROR, None
        if too_large >= 0:
            self._partials.pop(local, None)
            self.ctx.switch_end(local, too_large_text(too_large, limit))
        return CBEvent.IGNORE, None

    def _on_out(self, fd: int, payload: bytes) -> CBEvent:
        """A payload the core forwards to the TCP side, encrypted (none does
        while _on_local_in reads the local side: kept for completeness)."""
        self._send_tcp(fd, self._relays[fd].encrypt(payload))
        return CBEvent.NO_ERROR

    # ------------------------------------------------------------ the TCP side's backlog

    def _send_tcp(self, fd: int, records: "bytes | memoryview") -> None:
        """Queue bytes for a switched fd, in order: TLS records for the TCP
        fd, or frames for the local side. The core refuses them while the
        fd's queue is over its bound (QueueFullError; it does not read the
        other side then, so only records made while reading, such as TLS 1.3
        key updates and tickets, meet that): those wait here, in order, and
        are queued as soon as there is room (at the next bytes, or a retry
        timer). The bytes are a stream (switch_send does not frame them), so
        more than half of max_queue_size at once goes in pieces: the core
        refuses anything larger than the bound for good, which would keep it
        here forever."""
        piece = max(1, self.ctx.max_queue_size // 2)
        if len(records) > piece:
            view = memoryview(records)
            for at in range(0, len(view), piece):
                self._send_tcp(fd, view[at:at + piece])
            return
        backlog = self._backlog.get(fd)
        if backlog is None:
            try:
                self.ctx.switch_send(fd, records)
                return
            except QueueFullError:
                self._backlog[fd] = backlog = _Backlog()
                self._retry_backlog_later(fd)
        elif backlog.size + len(records) > MAX_BACKLOG:
            # Never sent, not even close_notify: the peer sees a broken
            # session, not a clean end after missing bytes.
            relay = self._relays.get(fd) or self._relays.get(self._tcp_of.get(fd, -1))
            if relay is not None:
                relay.failed = True
            # (no fd in the text: the callers' log lines name the fd)
            raise QueueFullError(f"its peer does not read; tlsd holds back at "
                                 f"most {MAX_BACKLOG} bytes for it (MAX_BACKLOG)")
        backlog.append(bytes(records))
        if len(backlog) > 1:
            self._flush_backlog(fd)

    def _flush_backlog(self, fd: int) -> None:
        backlog = self._backlog[fd]
        while backlog:
            try:
                self.ctx.switch_send(fd, backlog.first())
            except QueueFullError:
                return
            except IPCError as e:
                # The switch ended (its DISCONNECTION is coming): nothing more
                # can go out on it; the retry timer stops here.
                self.log.info("fd %d: backlog dropped: %s", fd, e)
                del self._backlog[fd]
                return
            backlog.pop_first()
        del self._backlog[fd]

    def _retry_backlog_later(self, fd: int) -> None:
        def retry() -> None:
            if fd in self._backlog and (fd in self._relays or fd in self._tcp_of):
                self._flush_backlog(fd)
                if fd in self._backlog:
                    self._retry_backlog_later(fd)
        self.call_later(BACKLOG_RETRY_S, retry)


class _Backlog:
    """The bytes a switched fd's queue refused for now, in order, and how
    many they are (bounded by MAX_BACKLOG)."""

    __slots__ = ("pieces", "size")

    def __init__(self) -> None:
        self.pieces: Deque[bytes] = collections.deque()
        self.size = 0

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.pieces)

    def __len__(self) -> int:
        return len(self.pieces)

    def append(self, data: bytes) -> None:
        self.pieces.append(data)
        self.size += len(data)

    def first(self) -> bytes:
        return self.pieces[0]

    def pop_first(self) -> None:
        self.size -= len(self.pieces.popleft())


# ------------------------------------------------------------ the local side's frames

def _whole_frames(partials: Dict[int, bytearray], fd: int, data: memoryview,
                  limit: int) -> Tuple[List["bytearray | memoryview"], int]:
    """The whole frames of `data`, read from the local side `fd`, as they are,
    in order: first the frame held in `partials[fd]` if `data` completes it,
    then one view of `data`'s whole frames. The start of a frame left over
    goes to `partials[fd]`. With them, the size of the frame that follows when
    it is announced over `limit` (nothing after it is taken), else -1."""
    frames: List["bytearray | memoryview"] = []
    at, end = 0, len(data)
    held = partials.get(fd)
    if held is not None:
        if len(held) < 4:
            at = min(4 - len(held), end)
            held += data[:at]
            if len(held) < 4:
                return frames, -1
        (size,) = _HEADER.unpack_from(held)
        if size > limit:
            return frames, size
        take = min(4 + size - len(held), end - at)
        held += data[at:at + take]
        at += take
        if len(held) < 4 + size:
            return frames, -1
        frames.append(held)
        del partials[fd]
    first = at
    at, too_large = wire.scan_frames(data, first, end, limit)
    if at > first:
        frames.append(data[first:at])
    if too_large < 0 and at < end:
        partials[fd] = bytearray(data[at:])
    return frames, too_large


# ------------------------------------------------------------ sockets

# ------------------------------------------------------------ command line

def add_command(subparsers: Any) -> None:
    """`pyipc tlsd`: its options (docs/networking.md, TLS)."""
    p = subparsers.add_parser(
        "tlsd", help="serve the tls:// scheme (TLS tunnels between hosts)",
        description="Serve the local service 'tls' that ipcd asks for tls:// URIs, and "
                    "with --listen accept TLS connections from remote tlsd daemons to the "
                    "services named by --expose. Stops cleanly on SIGTERM/SIGINT.")
    # --rundir and --backend are pyipc's own options (pyipc --rundir DIR tlsd).
    p.add_argument("--listen", action="append", default=[], metavar="ADDRESS",
                   help=f"accept TLS on HOST[:PORT] or [IPV6][:PORT] (default port "
                        f"{DEFAULT_PORT}); repeat for several; needs --cert")
    p.add_argument("--cert", help="our certificate chain (PEM): the server's when "
                                  "listening, the client certificate when dialing")
    p.add_argument("--key", help="the private key of --cert (PEM), when not in that file")
    p.add_argument("--expose", action="append", default=[], metavar="NAME[,NAME...]",
                   type=wire.expose_option,
                   help="services remote peers may reach (none by default)")
    p.add_argument("--client-ca", help="require client certificates issued by this CA "
                                       "bundle (mutual TLS)")
    p.add_argument("--ca", help="verify the servers we dial against this CA bundle "
                                "(default: the system's trust store)")
    d = TlsdConfig()
    p.add_argument("--connect-timeout", type=float, default=d.connect_timeout,
                   metavar="SECONDS", help="time to dial a remote tlsd: connect, TLS "
                   f"handshake, its answer (default {d.connect_timeout:g}, at most {MAX_TIMEOUT:g})")
    p.add_argument("--handshake-timeout", type=float, default=d.handshake_timeout,
                   metavar="SECONDS", help="time a remote peer has for the TLS handshake "
                   f"and the service name (default {d.handshake_timeout:g}, at most {MAX_TIMEOUT:g})")
    p.add_argument("--dead-peer-timeout", type=float, default=d.dead_peer_timeout,
                   metavar="SECONDS", help="end a connection whose peer is silent this long "
                   f"(cut link, host down; default {d.dead_peer_timeout:g}, 0: never, "
                   f"at most {_sockets.MAX_DEAD_PEER_TIMEOUT})")
    p.add_argument("--max-pending", type=int, default=d.max_pending, metavar="N",
                   help=f"dials and handshakes in progress at once (default {d.max_pending})")
    p.add_argument("--max-pending-per-host", type=int, default=None, metavar="N",
                   help="incoming handshakes in progress at once from one address, and "
                        "dials to one host whose worker is not back "
                        "(default: half of --max-pending)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    try:
        config = TlsdConfig(
            listen=tuple(args.listen), cert=args.cert, key=args.key,
            expose=frozenset(name for names in args.expose for name in names),
            client_ca=args.client_ca, ca=args.ca, connect_timeout=args.connect_timeout,
            handshake_timeout=args.handshake_timeout,
            dead_peer_timeout=args.dead_peer_timeout, max_pending=args.max_pending,
            max_pending_per_host=args.max_pending_per_host)
        daemon = Tlsd(config, rundir=args.rundir, backend=args.backend)
    except ValueError as e:             # a bad option, a missing or bad certificate file
        print(f"pyipc tlsd: {e}", file=sys.stderr)
        return 2
    try:
        daemon.run()
    except (OSError, ValueError) as e:
        if isinstance(e, IPCError):
            raise                       # pyipc's own: the CLI says it (exit 1)
        print(f"pyipc tlsd: {e}", file=sys.stderr)     # e.g. the port is taken
        return 1
    return 0

