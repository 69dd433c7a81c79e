"""The websocketd daemon: listens for WebSocket clients (ws:// or wss://),
checks each request, connects to the service its path names and switches the
two fds with a Session's callbacks.

A connection goes through two phases:
1. handshake: its socket is an external fd of the context; each EXTERNAL
   event feeds what arrived to its Handshake (TLS, then HTTP). The request
   is answered with a static file, a clear HTTP error, or a 101;
2. switched: from the 101 on, the core moves the messages (Session's
   callbacks), and this module only sees the two fds' DISCONNECTION, and
   the MESSAGE_TX of the messages it scheduled for a service (those that
   came with the handshake, and marks: credit.py), each making room.
"""

from __future__ import annotations

import logging
import os
import socket
from http import HTTPStatus
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

from websockets.datastructures import MultipleValuesError
from websockets.http11 import Request, Response
from websockets.protocol import Protocol

from ... import Event, EventType, IPCError
from ..._signal_wakeup import drain_pipe
from .. import _sockets, _systemd
from .._netwire import printable, send_raw
from .._runtime import Daemon
from .._timers import TimerHandle
from . import responses
from .dialer import Dialer
from .handshake import Handshake, HandshakeFailed
from .options import Options, handshakes_per_host
from .policy import origin_allowed, own_names, service_name
from .session import Session
from .transport import Plain, Tls, make_transport

log = logging.getLogger("pyipc.daemons.websocketd")

#: Seconds a client has to answer our close frame before its socket is closed.
CLOSE_TIMEOUT = 2.0
#: Seconds an ended WebSocket's client has to read what was queued for it
#: (the service's last messages, the close frame) before both its fds are
#: closed: a client that never reads would hold them, and its queue, for good.
FLUSH_TIMEOUT = 10.0


class WebSocketd(Daemon):
    """Serve pyipc services to WebSocket clients (browsers): the URL path
    names the service (ws://HOST:PORT/NAME), and only the services in
    `options.expose` are reachable. See docs/websocket.md.

    `listen_fds`: listening sockets made by the caller (they become the
    daemon's); else systemd's (socket activation), else one on
    options.host:options.port (a given one may be a Unix socket, e.g. behind a
    reverse proxy). `addresses` holds what they are bound to once `ready` is
    set: (host, port), or (path, 0) for a Unix socket.
    """

    name = "websocketd"

    def __init__(self, options: Optional[Options] = None, *, rundir: Optional[str] = None,
                 backend: Optional[str] = None,
                 listen_fds: Optional[Sequence[int]] = None) -> None:
        self.options = options or Options()
        # websocketd's message size and backpressure bound are its own.
        # Its dials count against max_handshakes: that many workers at least.
        super().__init__(rundir=rundir, backend=backend,
                         max_offloads=self.options.max_handshakes,
                         max_message_size=self.options.max_message_size,
                         max_queue_size=queue_bound(self.options))
        self._given_fds = list(listen_fds) if listen_fds is not None else None
        self.listeners: Dict[int, socket.socket] = {}
        self.addresses: List[Tuple[str, int]] = []
        self.handshakes: Dict[int, Handshake] = {}
        self.sessions: Dict[int, Session] = {}     # by client fd and by service fd
        # Dups of client sockets waiting for the answer to our close frame,
        # and the dup of each client fd (until that fd's DISCONNECTION).
        self.lingering: Dict[int, Tuple[Session, object]] = {}
        self._dup_of: Dict[int, int] = {}
        #: The Host names the same-origin rule takes (policy.origin_allowed).
        self._own_names = own_names()
        #: Handshakes in progress per peer, and the peer of each (TCP only).
        self._per_host = _sockets.PeerShares(handshakes_per_host(self.options))
        self._host_of: Dict[int, str] = {}
        #: The `ws` scheme for ipcd (options.dial), else None.
        self.dialer = Dialer(self) if self.options.dial else None
        #: A pipe whose byte wakes the loop's wait (later()); -1 when closed.
        self._nudge_r, self._nudge_w = -1, -1

    # ------------------------------------------------------------ runtime hooks

    def setup(self) -> None:
        """Listen (given fds, systemd's, or options.host:port)."""
        self.check_exposed(self.options.expose)
        if self._given_fds is not None:
            given = [socket.socket(fileno=fd) for fd in self._given_fds]
        else:
            given = _systemd.passed_sockets()
        sockets = given or [self._listen()]
        self.ctx.switch_events = False   # no SWITCH_RX/TX: nothing to do per message
        nudge_r, nudge_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            self.ctx.add_external(nudge_r)       # the context closes it (close_all)
        except BaseException:
            os.close(nudge_r)
            os.close(nudge_w)
            raise
        self._nudge_r, self._nudge_w = nudge_r, nudge_w
        for sock in sockets:
            sock.setblocking(False)
            self.ctx.add_external(sock.fileno())
            self.listeners[sock.fileno()] = sock
            name = sock.getsockname()
            self.addresses.append(name[:2] if isinstance(name, tuple) else (name, 0))
        if self.dialer is not None:
            self.dialer.start()
        scheme = "wss" if self.options.ssl_context else "ws"
        log.info("websocketd: %s on %s, exposing %s", scheme, self.addresses,
                 ", ".join(sorted(self.options.expose)) or "nothing")

    def _listen(self) -> socket.socket:
        host, port = self.options.host, self.options.port
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # "::" is every address, IPv4's too (as the help says), where the
        # system can (else IPv6 only, as create_server makes it).
        dual = host == "::" and socket.has_dualstack_ipv6()
        return socket.create_server((host, port), family=family, backlog=128,
                                    dualstack_ipv6=dual)

    def on_event_failed(self, ev: Event) -> None:
        """After a failure (logged by the runtime): a handshake in progress on
        ev's fd is dropped, so that it costs that connection only."""
        hs = self.handshakes.get(ev.fd)
        if hs is not None:
            self._drop(hs)
        elif self.dialer is not None:
            self.dialer.on_failure(ev.fd)

    def on_event(self, ev: Event) -> None:
        """Accept, advance a handshake, serve a dial, or forget an ended WebSocket."""
        if self.dialer is not None and self.dialer.on_event(ev):
            return
        if ev.type == EventType.EXTERNAL:
            if ev.fd == self._nudge_r:
                drain_pipe(ev.fd)                 # the loop's wait is over: timers run
            elif ev.fd in self.listeners:
                self._accept(self.listeners[ev.fd])
            elif ev.fd in self.handshakes:
                self._step(self.handshakes[ev.fd])
            elif ev.fd in self.lingering:
                if self.lingering[ev.fd][0].linger_read(ev.fd):
                    self._unlinger(ev.fd)
            else:       # no one's: closed, or its readiness would wake the loop forever
                log.warning("fd %d: readable but not websocketd's: closed", ev.fd)
                self.ctx.close(ev.fd, linger=0)
        elif ev.type == EventType.MESSAGE_TX:     # a mark written: room
            session = self.sessions.get(ev.fd)
            if session is not None and ev.fd == session.service_fd:
                session.service_wrote()
        elif ev.type == EventType.DISCONNECTION:
            self._half_close(ev.fd)
            self._forget(ev.fd)
        elif ev.type == EventType.ERROR:
            log.warning("fd %d: %s", ev.fd, ev.error)

    def teardown(self) -> None:
        """Close every WebSocket with 1001 (going away) and wait, CLOSE_TIMEOUT
        at most, for the clients' answers (RFC 6455 7.1.1: the TCP close comes
        after them; closed before, a client's answer meets a reset and a
        browser reports an unclean close); then the rest."""
        # Nothing new: a client waiting in a listener's backlog would make
        # every wait below return at once (a spinning CPU for CLOSE_TIMEOUT).
        for sock in self.listeners.values():
            self.ctx.close(sock.detach())
        self.listeners.clear()
        for hs in list(self.handshakes.values()):
            self._drop(hs)
        if self.dialer is not None:
            self.dialer.stop()
        for session in set(self.sessions.values()):
            session.going_away("websocketd is stopping")
        self.serve_while(lambda: bool(self.sessions or self.lingering), CLOSE_TIMEOUT)
        for session in set(self.sessions.values()):
            session.release()
        if self._nudge_w >= 0:
            os.close(self._nudge_w)
            self._nudge_w = -1

    def later(self, delay: float, callback: Callable[[], None]) -> TimerHandle:
        """call_later from a switching callback: those run inside the loop's
        wait, whose timeout was set for the timers before; a byte on the
        nudge pipe ends that wait, so that the next one counts this timer
        (else it ran only at the next event, however late)."""
        handle = self.call_later(delay, callback)
        if self._nudge_w >= 0:
            try:
                os.write(self._nudge_w, b"x")
            except BlockingIOError:
                pass                              # full: a wake is pending anyway
        return handle

    # ------------------------------------------------------------ handshake phase

    def _accept(self, listener: socket.socket) -> None:
        # accept_some: at most MAX_ACCEPT_PER_EVENT, so a flood cannot starve
        # the open WebSockets; out of fds, it closes what it cannot take.
        for sock in _sockets.accept_some(listener):
            try:
                peer = _peer_text(sock.getpeername())
            except OSError:           # already reset by the peer
                sock.close()
                continue
            host = _host_key(sock)
            in_progress = self.handshakes_in_progress()
            if in_progress >= self.options.max_handshakes:
                self._refuse(sock, f"{peer}: refused: {in_progress} connections already "
                                   f"in their handshake (max_handshakes)")
                continue
            if host is not None and self._per_host.full(host):
                self._refuse(sock, f"{peer}: refused: {self._per_host.share} connections "
                                   f"from {host} already in their handshake "
                                   f"(max_handshakes_per_host)")
                continue
            try:
                fd = self._start(sock, peer)
            except (OSError, IPCError) as e:
                log.warning("%s: refused: %s", peer, e)
                sock.close()
                continue
            if host is not None:
                self._host_of[fd] = host
                self._per_host.add(host)

    def handshakes_in_progress(self) -> int:
        """Handshakes being served and dials for ipcd in progress: both
        count against max_handshakes."""
        dialling = self.dialer.in_progress() if self.dialer is not None else 0
        return len(self.handshakes) + dialling

    def _refuse(self, sock: socket.socket, why: str) -> None:
        """Close a connection over a bound, with a 503 saying which (on ws://;
        before TLS nothing can be said on wss://). One write that never blocks."""
        log.warning("%s", why)
        if self.options.ssl_context is None:
            text = why.split("refused: ", 1)[-1]
            response = responses.error(HTTPStatus.SERVICE_UNAVAILABLE, f"busy: {text}")
            send_raw(sock.fileno(), response.serialize())
        sock.close()

    def _start(self, sock: socket.socket, peer: str) -> int:
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):   # given fds may be Unix ones
            _sockets.tune_tcp(sock, self.options.dead_peer_timeout)
        # What can fail comes before the context owns the socket: a failure
        # then closes it with the socket object, never leaving an fd watched
        # by the context that no handshake knows (its readiness would spin).
        hs = Handshake(sock.fileno(), peer, make_transport(self.options.ssl_context),
                       self.options.max_message_size)
        hs.timer = self.call_later(self.options.handshake_timeout, lambda: self._expire(hs))
        try:
            self.ctx.add_external(sock.fileno())
        except IPCError:                            # e.g. max_connections reached
            self.cancel(hs.timer)
            raise
        fd = sock.detach()
        self.handshakes[fd] = hs
        return fd

    def _expire(self, hs: Handshake) -> None:
        if self.handshakes.get(hs.fd) is hs:
            log.info("%s: no complete request within %g s, closed", hs.peer,
                     self.options.handshake_timeout)
            self._drop(hs)

    def _drop(self, hs: Handshake) -> None:
        self._end_handshake(hs)
        self.ctx.close(hs.fd)

    def _end_handshake(self, hs: Handshake) -> None:
        """`hs` is no longer in its handshake: its slot, its peer's share and
        its timer are given back."""
        del self.handshakes[hs.fd]
        self.cancel(hs.timer)     # type: ignore[arg-type]
        host = self._host_of.pop(hs.fd, None)
        if host is not None:
            self._per_host.remove(host)

    def _step(self, hs: Handshake) -> None:
        try:
            request = hs.step()
            if request is not None:
                self._answer(hs, request)
        except HandshakeFailed as e:
            log.info("%s: %s", hs.peer, e)
            self._drop(hs)

    def _answer(self, hs: Handshake, request: Request) -> None:
        response = (responses.malformed(request) or responses.static_response(request)
                    or self._check(hs, request))
        if response.status_code == 101:
            self._open(hs, request, response)
            return
        log.info("%s: %s %s -> %d", hs.peer, request.method, printable(request.path),
                 response.status_code)
        hs.respond(responses.for_method(response, request.method))
        self._drop(hs)

    def _check(self, hs: Handshake, request: Request) -> Response:
        """The 101 of a valid WebSocket request to an exposed service from an
        allowed origin; else the HTTP error that says what is wrong."""
        name = service_name(request.path)
        exposed = name in self.options.expose
        if not responses.is_upgrade(request):
            if exposed:
                response = responses.error(
                    HTTPStatus.UPGRADE_REQUIRED,
                    f"/{name} is a WebSocket endpoint; open it with a WebSocket client")
                response.headers["Upgrade"] = "websocket"
                return response
            return responses.error(HTTPStatus.NOT_FOUND, f"nothing at {request.path}")
        if not exposed:
            return responses.error(HTTPStatus.NOT_FOUND,
                                   f"no service {name!r} is exposed here")
        try:
            origin, host = request.headers.get("Origin"), request.headers.get("Host")
        except MultipleValuesError as e:
            return responses.error(HTTPStatus.BAD_REQUEST,
                                   f"more than one {e.args[0] if e.args else ''} header")
        if not origin_allowed(origin, host, self.options.origins, self._own_names):
            return responses.error(HTTPStatus.FORBIDDEN, f"origin {origin} is not allowed")
        if self.open_websockets() >= self.options.max_websockets:
            log.warning("%s: refused: %d WebSockets already open (max_websockets)",
                        hs.peer, self.open_websockets())
            return responses.error(HTTPStatus.SERVICE_UNAVAILABLE,
                                   f"busy: {self.open_websockets()} WebSockets already "
                                   f"open (max_websockets)")
        return hs.protocol.accept(request)   # 101, or 400/426... for a bad handshake

    def _open(self, hs: Handshake, request: Request, response: Response) -> None:
        name = service_name(request.path)
        service_fd = self._connect_service(name)
        if isinstance(service_fd, str):
            hs.respond(responses.error(HTTPStatus.SERVICE_UNAVAILABLE, service_fd))
            self._drop(hs)
            return
        try:
            hs.respond(response)
        except HandshakeFailed:
            self.ctx.close(service_fd)
            raise
        self._switch(hs, name, service_fd)

    def _connect_service(self, name: str) -> "int | str":
        """A connection of the context's to service `name`, made without
        blocking (as tcpd's): a service whose backlog is full is answered at
        once, never holding the loop (every other WebSocket with it). Else
        why it cannot be made (the 503's text)."""
        try:
            fd = _sockets.connect_service(self.ctx.rundir, name)
        except _sockets.LocalRefusal as e:
            if e.code == "refused":                 # a name no service could have
                return f"cannot connect to service {name!r}: {e}"
            return f"service {name!r} is not running" if e.code == "noservice" \
                else f"service {name!r} is busy: its listen backlog is full"
        try:
            self.ctx.add_connection(fd)
        except IPCError as e:                       # e.g. max_connections reached
            os.close(fd)
            return f"cannot connect to service {name!r}: {e}"
        return fd

    def _switch(self, hs: Handshake, name: str, service_fd: int) -> None:
        if self.start_session(hs.fd, service_fd, name, hs.peer, hs.protocol, hs.transport,
                              lambda session: session.take_early_messages(hs.rest)):
            self._end_handshake(hs)
        else:
            self._drop(hs)

    def start_session(self, fd: int, service_fd: int, name: str, peer: str,
                      protocol: Protocol, transport: Union[Plain, Tls],
                      early: Callable[[Session], None]) -> bool:
        """Switch the WebSocket on `fd` (open) with `service_fd`, a connection
        of the context, through a Session; `early(session)` gives it the
        frames that came with the handshake: their messages go to the
        service first, with back-pressure (Session.feed_early). False when
        it cannot be done: `service_fd` is closed then, `fd` is the caller's
        to close."""
        session: Optional[Session] = None
        try:
            session = Session(self.ctx, fd, service_fd, name, peer, protocol,
                              transport, self._linger, self.later, FLUSH_TIMEOUT)
            early(session)
            self.ctx.add_switch(fd, service_fd)
            self.ctx.set_switch_callbacks(fd, session.on_in, session.on_out)
            self.ctx.set_switch_callbacks(service_fd, session.on_service_in, None)
        except (OSError, IPCError) as e:
            # Out of fds (the session's dup), or of memory: this WebSocket
            # ends (its client sees the TCP close), every fd of it closed,
            # rather than a socket the daemon no longer knows.
            log.warning("%s: cannot open /%s: %s", peer, name, e)
            if session is not None:
                session.release()
            self.ctx.close(service_fd, linger=0)
            return False
        self.sessions[fd] = self.sessions[service_fd] = session
        log.info("%s: WebSocket open to /%s", peer, name)
        session.start()
        return True

    # ------------------------------------------------------------ switched phase

    def open_websockets(self) -> int:
        """WebSockets open, ending ones included until both their fds are
        closed (each is in `sessions` twice: by client fd and service fd)."""
        return len(self.sessions) // 2

    def _linger(self, session: Session, fd: int) -> None:
        """The switch of `session` ended: its fds close once what is queued
        is written, FLUSH_TIMEOUT at most. `fd`, unless -1: a dup of the
        client's socket, watched until the client answers our close frame,
        CLOSE_TIMEOUT at most."""
        self.later(FLUSH_TIMEOUT, lambda: self._cut(session))
        if fd < 0:
            return
        try:
            self.ctx.add_external(fd)
        except (OSError, IPCError) as e:      # e.g. max_connections, out of memory
            log.warning("%s: /%s: cannot wait for the client's close answer (%s): "
                        "the connection closes after our close frame", session.peer,
                        session.service, e)
            os.close(fd)
            return
        timer = self.later(CLOSE_TIMEOUT, lambda: self._unlinger(fd))
        self.lingering[fd] = (session, timer)
        self._dup_of[session.fd] = fd

    def _half_close(self, fd: int) -> None:
        """The core closed client fd `fd`, everything queued for it written
        (our close frame last). After a failure its dup sends our FIN now,
        a lingering close: the client sees the end after the close frame,
        and we read (discard) what it still sends until its own end, so
        that the close is never a reset that could overtake the frame."""
        dup = self._dup_of.pop(fd, None)
        entry = self.lingering.get(dup) if dup is not None else None
        if entry is None or not entry[0].failed():
            return
        sock = socket.socket(fileno=dup)
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass                                    # already reset by the client
        finally:
            sock.detach()

    def _cut(self, session: Session) -> None:
        """FLUSH_TIMEOUT after its end, the session's fds are still open (its
        client does not read): closed now, what is left dropped."""
        if self.sessions.get(session.fd) is not session:
            return                                  # closed in time (DISCONNECTION)
        log.info("%s: /%s: the client did not read the end within %g s: cut",
                 session.peer, session.service, FLUSH_TIMEOUT)
        for fd in (session.fd, session.service_fd):
            try:
                self.ctx.close(fd, linger=0)
            except IPCError:
                pass                                # closed with its switch peer
        self._forget(session.fd)

    def _unlinger(self, fd: int) -> None:
        entry = self.lingering.pop(fd, None)
        if entry is not None:
            if self._dup_of.get(entry[0].fd) == fd:
                del self._dup_of[entry[0].fd]
            self.cancel(entry[1])     # type: ignore[arg-type]
            self.ctx.close(fd)

    def _forget(self, fd: int) -> None:
        session = self.sessions.pop(fd, None)
        if session is None:
            return
        other = session.service_fd if fd == session.fd else session.fd
        self.sessions.pop(other, None)
        session.release()


def queue_bound(options: Options) -> int:
    """The context's max_queue_size: options.max_buffer, but never below
    what one whole message needs (the core's own rule)."""
    return max(options.max_buffer, options.max_message_size + 4)


def _host_key(sock: socket.socket) -> Optional[str]:
    """The peer a TCP connection counts against (_sockets.peer_key); None
    for a Unix socket (given by the caller or systemd)."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        return _sockets.peer_key(sock.getpeername()[0])
    except OSError:
        return None


def _peer_text(address: object) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host = address[0]
        return f"[{host}]:{address[1]}" if ":" in str(host) else f"{host}:{address[1]}"
    return str(address) or "?"
