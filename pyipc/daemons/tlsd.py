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
its switching callbacks decrypt and encrypt (pyipc.daemons._tls_relay).
"""

from __future__ import annotations

import argparse
import array
import logging
import os
import socket
import ssl
import struct
from typing import Any, Dict, List, Optional, Tuple

from .. import CBEvent, Event, EventType, IPCError
from . import _systemd
from ._runtime import Daemon
from ._tls_handshake import NAME_GRACE_S, Handshake, HandshakeFailed
from ._tls_options import (TlsdConfig, client_context, parse_address, parse_uri,
                           server_context)
from ._tls_relay import TlsRelay, TlsRelayError

#: The local service ipcd asks for `tls://` URIs (the scheme's name).
SERVICE = "tls"
#: Ciphertext read from a TCP socket per call (several TLS records).
READ_SIZE = 256 * 1024
#: Backlog of the listening socket.
LISTEN_BACKLOG = 128
_FRAME = struct.Struct(">I")


class Tlsd(Daemon):
    """The TLS daemon (see the module doc); `config` is its whole configuration."""

    name = "tlsd"

    def __init__(self, config: TlsdConfig, *, rundir: Optional[str] = None,
                 backend: Optional[str] = None) -> None:
        super().__init__(rundir=rundir, backend=backend)
        self.config = config
        self._client_ctx = client_context(config)
        self._server_ctx = server_context(config) if config.cert is not None else None
        self._listeners: Dict[int, socket.socket] = {}
        self._handshakes: Dict[int, Handshake] = {}     # TCP fd -> its handshake
        self._requests: Dict[int, Optional[Any]] = {}   # ipcd fd -> its deadline, once asked
        self._connecting: Dict[int, Tuple[str, int, str]] = {}   # ipcd fd -> host, port, name
        self._relays: Dict[int, TlsRelay] = {}          # switched TCP fd -> its session
        #: Where the listening sockets are bound (tests read the port).
        self.addresses: List[Tuple[Any, ...]] = []

    # ------------------------------------------------------------ setup

    def setup(self) -> None:
        self.ctx.switch_events = False      # no event (no Python) per relayed message
        self.ctx.service_init(SERVICE)
        activated = [fd for fds in _systemd.listen_fds().values() for fd in fds]
        if activated:
            if self._server_ctx is None:
                raise ValueError("socket-activated: listening for TLS needs --cert")
            socks = [socket.socket(fileno=fd) for fd in activated]
        elif self.config.listen is not None:
            socks = [_listen(self.config.listen)]
        else:
            socks = []
        for sock in socks:
            sock.setblocking(False)
            self.ctx.add_external(sock.fileno())
            self._listeners[sock.fileno()] = sock
            self.addresses.append(sock.getsockname())
            self.log.info("tlsd listening on %s", sock.getsockname())

    def teardown(self) -> None:
        # The context closes every fd it watches (listeners included): the
        # socket objects must not close them a second time.
        for sock in self._listeners.values():
            sock.detach()
        self._listeners.clear()

    # ------------------------------------------------------------ events

    def on_event(self, ev: Event) -> None:
        t = ev.type
        if t == EventType.EXTERNAL:
            if ev.fd in self._listeners:
                self._accept(self._listeners[ev.fd])
            elif ev.fd in self._handshakes:
                self._readable(self._handshakes[ev.fd])
        elif t == EventType.CONNECTION:
            self._requests[ev.fd] = None        # ipcd, about to send a URI
        elif t == EventType.MESSAGE_RX and ev.fd in self._requests:
            self._request(ev.fd, ev.message or b"")
        elif t == EventType.DISCONNECTION:
            self._gone(ev.fd)
        elif t == EventType.ERROR:
            self.log.warning("fd %d: %s", ev.fd, ev.error)

    def _gone(self, fd: int) -> None:
        """fd was closed by the context (peer gone, switch ended)."""
        self._relays.pop(fd, None)
        if fd in self._requests:                # ipcd gave up: its dial is abandoned
            self._end_request(fd)

    # ------------------------------------------------------------ dialing

    def _request(self, req: int, message: bytes) -> None:
        if self._requests[req] is not None or req in self._connecting:
            self._answer(req, "busy", "one URI per request")
            return
        uri = message.decode("utf-8", "replace")
        try:
            host, port, name = parse_uri(uri)
        except ValueError as e:
            self._answer(req, "norule", str(e))
            return
        if self._pending() >= self.config.max_pending:
            self._answer(req, "busy", f"{self.config.max_pending} TLS dials and "
                                      f"handshakes already in progress")
            return
        self._requests[req] = self.call_later(self.config.timeout,
                                              lambda: self._timed_out(req, uri))
        self._connecting[req] = (host, port, name)
        timeout = self.config.timeout
        self.offload(lambda: _tcp_connect(host, port, timeout),
                     lambda sock, exc: self._connected(req, sock, exc))

    def _pending(self) -> int:
        return len(self._connecting) + len(self._handshakes)

    def _connected(self, req: int, sock: Optional[socket.socket],
                   exc: Optional[BaseException]) -> None:
        """In the loop: the worker's TCP connect ended."""
        target = self._connecting.pop(req, None)
        if target is None:                      # timed out or ipcd left meanwhile
            if sock is not None:
                sock.close()
            return
        host, port, name = target
        peer = _host_port(host, port)
        if exc is not None or sock is None:
            self._answer(req, "unreachable", f"{peer}: {exc}")
            return
        fd = _adopt(sock)
        self.ctx.add_external(fd)
        relay = TlsRelay(self._client_ctx, server_side=False, server_hostname=host,
                         max_message_size=self.ctx.max_message_size)
        hs = Handshake(fd, relay, dialing=True, peer=peer, name=name, request=req)
        self._handshakes[fd] = hs
        try:
            self._send(hs, hs.start())
        except HandshakeFailed as e:
            self._failed(hs, e)

    def _timed_out(self, req: int, uri: str) -> None:
        self._requests[req] = None              # the timer has run: nothing to cancel
        self._answer(req, "timeout", f"{uri}: no answer within {self.config.timeout:g} s")

    def _answer(self, req: int, code: str, text: str) -> None:
        """Answer ipcd `ne CODE TEXT` and end its request."""
        self.log.info("request %d: ne %s %s", req, code, text)
        try:
            self.ctx.write(req, f"ne {code} {text}", timeout=1.0)
        except IPCError as e:
            self.log.info("request %d: ipcd left before the answer (%s)", req, e)
        self._end_request(req)

    def _end_request(self, req: int) -> None:
        """Forget ipcd's request `req` and whatever still works on it."""
        timer = self._requests.pop(req, None)
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
        self.ctx.add_connection(local)
        if not self._switch(hs, local):
            theirs.close()
            self._answer(req, "tls", f"{hs.peer}: bad stream after ok")
            return
        try:
            _send_fd(req, b"ok", theirs.fileno())
            self.log.info("dialed %s for service %s", hs.peer, hs.name)
        except OSError as e:
            self.log.info("request %d: ipcd left before the answer (%s)", req, e)
            self.ctx.close(local)               # ends the switch and the TCP side
        finally:
            theirs.close()
        self._end_request(req)

    # ------------------------------------------------------------ listening

    def _accept(self, listener: socket.socket) -> None:
        assert self._server_ctx is not None
        while True:
            try:
                sock, address = listener.accept()
            except BlockingIOError:
                return
            except OSError as e:                # out of fds: the others keep working
                self.log.warning("accept failed: %s", e)
                return
            peer = _host_port(*address[:2])
            if self._pending() >= self.config.max_pending:
                self.log.warning("refusing %s: %d handshakes already in progress", peer,
                                 self.config.max_pending)
                sock.close()
                continue
            fd = _adopt(sock)
            self.ctx.add_external(fd)
            relay = TlsRelay(self._server_ctx, server_side=True,
                             max_message_size=self.ctx.max_message_size)
            hs = Handshake(fd, relay, dialing=False, peer=peer)
            hs.timer = self.call_later(self.config.timeout, lambda hs=hs: self._expired(hs))
            self._handshakes[fd] = hs

    def _expired(self, hs: Handshake) -> None:
        hs.timer = None
        if self._handshakes.get(hs.fd) is hs:
            self.log.info("%s: no TLS handshake and service name within %g s", hs.peer,
                          self.config.timeout)
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
            raise HandshakeFailed("refused", f"service {name} is not exposed")
        try:
            local = self.ctx.connect_service(name)
        except IPCError as e:
            raise HandshakeFailed("noservice", f"no service {name}") from e
        self._send(hs, hs.relay.encrypt_raw(b"ok"))
        self.log.info("%s connected to service %s", hs.peer, name)
        self._switch(hs, local)

    def _refuse(self, hs: Handshake, e: HandshakeFailed) -> None:
        self.log.info("refusing %s: %s %s", hs.peer, e.code, e.text)
        out = e.alert
        if hs.secure:
            out += hs.relay.encrypt_raw(f"ne {e.code} {e.text}".encode()) + \
                hs.relay.close_notify()
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
            self._failed(hs, HandshakeFailed("unreachable", f"{hs.peer}: {e}"))
            return
        try:
            out, outcome = hs.step(data)
            self._send(hs, out)
            if outcome == "ok":
                self._dialed(hs)
            elif outcome == "name":
                self._serve(hs, hs.name)
            elif not hs.dialing and hs.secure and hs.relay.plain() and hs.grace is None:
                hs.grace = self.call_later(NAME_GRACE_S, lambda: self._bare_name(hs))
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
            sent = os.write(hs.fd, data)
        except OSError as e:
            raise HandshakeFailed("unreachable", f"{hs.peer}: {e}") from e
        if sent != len(data):
            raise HandshakeFailed("tls", f"{hs.peer}: send buffer full during the handshake")

    def _drop(self, hs: Handshake) -> None:
        """End a handshake: its timers and its TCP fd."""
        if self._handshakes.pop(hs.fd, None) is None:
            return
        for timer in (hs.timer, hs.grace):
            if timer is not None:
                self.cancel(timer)
        self.ctx.close(hs.fd)

    def _switch(self, hs: Handshake, local: int) -> bool:
        """The handshake is over: relay between the TCP fd and `local`.
        False (both closed) when what came with the handshake is not frames."""
        del self._handshakes[hs.fd]
        for timer in (hs.timer, hs.grace):
            if timer is not None:
                self.cancel(timer)
        relay, fd = hs.relay, hs.fd
        relay.framed = True
        try:
            # Frames that came with the handshake go first, in order.
            while (payload := relay.next_payload()) is not None:
                self.ctx.schedule(local, payload)
        except TlsRelayError as e:
            self.log.warning("%s: %s", hs.peer, e)
            self.ctx.close(local)
            self.ctx.close(fd)
            return False
        self.ctx.add_switch(fd, local)
        self.ctx.set_switch_callbacks(fd, self._on_in, self._on_out)
        self._relays[fd] = relay
        return True

    # ------------------------------------------------------------ the relay's callbacks

    def _on_in(self, fd: int) -> Tuple[CBEvent, Optional[bytes]]:
        """Ciphertext from the remote in; the next whole payload out."""
        relay = self._relays[fd]
        if not relay.has_payload():
            if relay.closed:
                return CBEvent.FD_CLOSING, None
            try:
                data = os.read(fd, READ_SIZE)
            except BlockingIOError:
                return CBEvent.IGNORE, None
            except OSError as e:
                self.log.info("fd %d: %s", fd, e)
                return CBEvent.ERROR, None
            try:
                relay.feed(data)
            except TlsRelayError as e:
                self.log.warning("fd %d: %s", fd, e)
                return CBEvent.ERROR, None
            out = relay.take_output()            # TLS 1.3 tickets, key updates
            if out:
                self.ctx.switch_send(fd, out)
            if not relay.has_payload():
                return (CBEvent.FD_CLOSING if relay.closed else CBEvent.IGNORE), None
        try:
            payload = relay.next_payload()
        except TlsRelayError as e:
            self.log.warning("fd %d: %s", fd, e)
            return CBEvent.ERROR, None
        more = relay.has_payload() or relay.closed
        return (CBEvent.MORE if more else CBEvent.NO_ERROR), payload

    def _on_out(self, fd: int, payload: bytes) -> CBEvent:
        """A payload from the local side out, encrypted."""
        self.ctx.switch_send(fd, self._relays[fd].encrypt(payload))
        return CBEvent.NO_ERROR


# ------------------------------------------------------------ sockets

def _listen(address: str) -> socket.socket:
    host, port = parse_address(address)
    family, kind, proto, _, sockaddr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(LISTEN_BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


def _tcp_connect(host: str, port: int, timeout: float) -> socket.socket:
    """On a worker thread: resolve and connect (blocking, bounded by timeout)."""
    return socket.create_connection((host, port), timeout=timeout)


def _adopt(sock: socket.socket) -> int:
    """The raw fd of a TCP socket the context will own: non-blocking, no Nagle
    delay (each relayed message goes out at once)."""
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock.detach()


def _send_fd(fd: int, message: bytes, passed: int) -> None:
    """One framed `message` with `passed` attached (SCM_RIGHTS), in one sendmsg
    (what ipcd reads). fd is a context's connection: borrowed, not closed."""
    sock = socket.socket(fileno=os.dup(fd))
    try:
        sock.sendmsg([_FRAME.pack(len(message)) + message],
                     [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [passed]))],
                     socket.MSG_DONTWAIT | getattr(socket, "MSG_NOSIGNAL", 0))
    finally:
        sock.close()


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# ------------------------------------------------------------ command line

def add_command(subparsers: Any) -> None:
    """`pyipc tlsd`: its options (docs/networking.md, TLS)."""
    p = subparsers.add_parser(
        "tlsd", help="serve the tls:// scheme (TLS tunnels between hosts)",
        description="Serve the local service 'tls' that ipcd asks for tls:// URIs, and "
                    "with --listen accept TLS connections from remote tlsd daemons to the "
                    "services named by --expose. Stops cleanly on SIGTERM/SIGINT.")
    p.add_argument("--listen", metavar="ADDRESS",
                   help="accept TLS on HOST:PORT ([IPv6]:PORT; default port 9443); "
                        "needs --cert")
    p.add_argument("--cert", help="our certificate chain (PEM): the server's when "
                                  "listening, the client certificate when dialing")
    p.add_argument("--key", help="the private key of --cert (PEM), when not in that file")
    p.add_argument("--expose", default="", metavar="NAMES",
                   help="comma-separated local services remote peers may reach "
                        "(default: none)")
    p.add_argument("--client-ca", help="require client certificates issued by this CA "
                                       "bundle (mutual TLS)")
    p.add_argument("--ca", help="verify the servers we dial against this CA bundle "
                                "(default: the system's trust store)")
    p.add_argument("--timeout", type=float, default=10.0,
                   help="seconds for one dial or one incoming handshake (default 10)")
    p.add_argument("--max-pending", type=int, default=64,
                   help="dials and handshakes in progress at once (default 64)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    try:
        config = TlsdConfig(
            listen=args.listen, cert=args.cert, key=args.key,
            expose=frozenset(n for n in args.expose.split(",") if n),
            client_ca=args.client_ca, ca=args.ca, timeout=args.timeout,
            max_pending=args.max_pending)
        daemon = Tlsd(config, rundir=args.rundir, backend=args.backend)
    except (ValueError, OSError, ssl.SSLError) as e:
        if isinstance(e, IPCError):
            raise
        logging.getLogger("pyipc.daemons.tlsd").error("tlsd: %s", e)
        return 2
    daemon.run()
    return 0

