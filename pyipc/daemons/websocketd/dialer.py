"""websocketd's dialling side: the local daemon of the `ws` and `wss` schemes.

ipcd asks the service `ws` (or `wss`) in the run directory with one framed
URI, ws://HOST[:PORT]/NAME or wss://HOST[:PORT]/NAME (an IPC_NETWORK rule
such as `pong ws://hostb:8080/pong`). websocketd connects to HOST:PORT
(another websocketd, or any WebSocket server), for wss:// makes a TLS
session with it (the remote's certificate verified, as Options'
dial_ssl_context says), asks for /NAME with a WebSocket handshake (the
`websockets` package's ClientProtocol), and on its 101 answers ipcd `ok`
with one end of a local socket pair; the other end is switched with the
WebSocket by a Session, as an accepted WebSocket is with its service: one
pyipc message is one binary WebSocket message, both ways. Anything else is
answered `ne CODE TEXT`: the remote's HTTP refusal (404: not exposed there;
503: not running there, or busy), a TLS failure, unreachable, or no answer
in time.

The connect (name lookup included) runs on a worker thread (the runtime's
offload); the handshake is read in the loop, never blocking it.
"""

from __future__ import annotations

import logging
import socket
import ssl
import urllib.parse
from typing import TYPE_CHECKING, Dict, Optional, Sequence

from websockets.client import ClientProtocol
from websockets.http11 import Response
from websockets.uri import parse_uri as parse_ws_uri

from ... import Event, EventType, IPCError
from .. import _netwire as wire
from .. import _sockets
from .._timers import TimerHandle
from .._tls_handshake import tls_reason
from .handshake import READ_SIZE
from .options import handshakes_per_host
from .transport import Plain, Tls, TransportClosed

if TYPE_CHECKING:
    from .daemon import WebSocketd

log = logging.getLogger("pyipc.daemons.websocketd")

#: The service ipcd asks for ws:// URIs, and the port of one that names none (RFC 6455).
WS_SERVICE = "ws"
WS_DEFAULT_PORT = 80
#: The same for wss:// URIs (WebSocket over TLS).
WSS_SERVICE = "wss"
WSS_DEFAULT_PORT = 443


class _Dial:
    """ipcd's request for a ws:// URI, from its connection to the answer."""

    __slots__ = ("ipcd", "timer", "uri", "host", "port", "where", "name", "secure", "sock",
                 "transport", "request", "protocol", "done", "heard")

    def __init__(self, ipcd: int, timer: TimerHandle) -> None:
        self.ipcd = ipcd
        self.timer = timer
        self.uri = ""
        self.host = ""
        self.port = 0
        self.where = ""                                  # HOST:PORT, as refusals say it
        self.name = ""
        self.secure = False                              # wss://
        self.sock: Optional[socket.socket] = None       # once connected
        self.transport: "Plain | Tls" = Plain()         # a Tls once a wss:// dial connects
        self.request = b""                               # the HTTP request, until sent
        self.protocol: Optional[ClientProtocol] = None  # once connected
        self.done = False                                # answered (or ipcd left)
        self.heard = False                               # the remote sent some answer


class Dialer:
    """The `ws` service of a WebSocketd (see the module's docstring)."""

    def __init__(self, daemon: "WebSocketd") -> None:
        self.daemon = daemon
        self.ctx = daemon.ctx
        self.options = daemon.options
        self._dials: Dict[int, _Dial] = {}          # by ipcd's connection
        self._answers: Dict[int, _Dial] = {}        # by dialled socket, awaiting the 101
        # Dials per remote host whose worker is not back yet (a hung name
        # lookup outlives its dial's answer), as tcpd's.
        self._dialling_to = _sockets.PeerShares(handshakes_per_host(daemon.options))
        self._stopping = False
        # wss:// dials: the caller's context, else one verifying the remote's
        # certificate and name against the system's trust store.
        self._tls = daemon.options.dial_ssl_context or ssl.create_default_context()

    def start(self) -> None:
        """Serve `ws` and `wss` in the run directory."""
        self.ctx.service_init(WS_SERVICE)
        self.ctx.service_init(WSS_SERVICE)

    def in_progress(self) -> int:
        """Dials with a URI being served now (they count as handshakes)."""
        return sum(1 for d in self._dials.values() if d.uri)

    # ------------------------------------------------------------ events

    def on_event(self, ev: Event) -> bool:
        """Handle ev if it is a dial's; False when it is not."""
        fd = ev.fd
        if ev.type == EventType.CONNECTION:         # ipcd, asking (`ws` and `wss` are ours)
            self._dials[fd] = _Dial(fd, self.daemon.call_later(
                self.options.connect_timeout, lambda: self._expired(fd)))
            if self._stopping:                      # while the last WebSockets close
                self._refuse(self._dials[fd], wire.NODAEMON, "websocketd is stopping")
            return True
        if ev.type == EventType.EXTERNAL and fd in self._answers:
            self._read_answer(self._answers[fd])
            return True
        dial = self._dials.get(fd)
        if dial is None:
            return False
        if ev.type == EventType.MESSAGE_RX and not dial.uri:
            self._on_uri(dial, ev.message or b"")
        elif ev.type == EventType.DISCONNECTION:    # ipcd gave up (its own timeout)
            self._end(dial)
        return True

    def on_failure(self, fd: int) -> bool:
        """A fault handling fd's event (logged by the runtime): its dial is
        answered now; False when fd is no dial's."""
        dial = self._answers.get(fd) or self._dials.get(fd)
        if dial is None:
            return False
        self._refuse(dial, wire.NODAEMON, "websocketd failed on this request")
        return True

    def stop(self) -> None:
        """The daemon stops: every dial in progress is told why, and so is
        every new one (the daemon serves a little longer, for the close
        frames of its WebSockets)."""
        self._stopping = True
        for dial in list(self._dials.values()):
            self._refuse(dial, wire.NODAEMON, "websocketd is stopping")

    # ------------------------------------------------------------ a dial

    def _on_uri(self, dial: _Dial, payload: bytes) -> None:
        too_long = wire.uri_too_long(payload, "websocketd")
        if too_long is not None:
            dial.uri = "?"
            return self._refuse(dial, wire.BADREQUEST, too_long)
        try:
            dial.uri = payload.decode("utf-8")
            # The URI's scheme says which (ipcd asks the service named after it).
            dial.secure = dial.uri[:6].lower() == "wss://"
            scheme, port = ("wss", WSS_DEFAULT_PORT) if dial.secure else ("ws", WS_DEFAULT_PORT)
            dial.host, dial.port, dial.name = wire.parse_uri(dial.uri, scheme, port)
            dial.where = _sockets.host_port(dial.host, dial.port)
        except (UnicodeDecodeError, ValueError) as e:
            dial.uri = dial.uri or "?"
            return self._refuse(dial, wire.NORULE, f"bad URI: {e}")
        limit = self.options.max_handshakes
        if self.daemon.handshakes_in_progress() > limit:
            return self._refuse(dial, wire.BUSY, f"websocketd has {limit} handshakes in "
                                                 "progress (max_handshakes)")
        key = dial.host.lower()
        if self._dialling_to.full(key):
            return self._refuse(dial, wire.BUSY, f"websocketd has {self._dialling_to.share} "
                                f"dials to {dial.host} in progress (max_handshakes_per_host)")
        self._dialling_to.add(key)
        deadline = dial.timer.when
        try:
            self.daemon.offload(
                lambda: _sockets.dial_tcp(dial.host, dial.port, deadline, lambda: dial.done),
                lambda sock, exc: self._connected(dial, key, sock, exc))
        except BaseException:                       # no worker (no thread): its share back
            self._dialling_to.remove(key)
            raise

    def _connected(self, dial: _Dial, key: str, sock: Optional[socket.socket],
                   exc: Optional[BaseException]) -> None:
        """In the loop: the worker's connect ended; the handshake's request
        (over TLS: the TLS handshake's first flight) goes out."""
        self._dialling_to.remove(key)               # the worker is back
        if dial.done:                               # timed out, or ipcd left
            if sock is not None:
                sock.close()
            return
        where = dial.where
        if sock is None:
            return self._refuse(dial, *_sockets.dial_failure(where, exc, self._no_answer(dial)))
        path = "/" + urllib.parse.quote(dial.name, safe="")
        scheme = "wss" if dial.secure else "ws"
        protocol = ClientProtocol(parse_ws_uri(f"{scheme}://{where}{path}"),
                                  max_size=self.ctx.max_message_size)
        protocol.send_request(protocol.connect())
        dial.request = b"".join(protocol.data_to_send())
        dial.protocol = protocol
        if dial.secure:
            try:
                dial.transport = Tls(self._tls, server_hostname=dial.host)
            except ValueError as e:                 # a name TLS cannot check
                sock.close()
                return self._refuse(dial, wire.TLS, f"{where}: {e}")
            first = dial.transport.begin()
        else:
            first, dial.request = dial.request, b""
        try:
            _sockets.tune_tcp(sock, self.options.dead_peer_timeout)
            sock.setblocking(False)
            failed = _write_handshake(sock, first, where)
        except OSError as e:
            failed = f"{where}: {e.strerror or e}"
        if failed:
            sock.close()
            return self._refuse(dial, wire.UNREACHABLE, failed)
        try:
            self.ctx.add_external(sock.fileno())
        except IPCError as e:                       # max_connections reached
            sock.close()
            return self._refuse(dial, wire.BUSY, str(e))
        dial.sock = sock
        self._answers[sock.fileno()] = dial

    def _read_answer(self, dial: _Dial) -> None:
        """The dialled socket is readable: the remote's answer, maybe in parts
        (over TLS: first the TLS handshake's)."""
        assert dial.sock is not None and dial.protocol is not None
        where = dial.where
        try:
            data = dial.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            return self._refuse(dial, wire.UNREACHABLE, f"{where}: {e.strerror or e}")
        if dial.secure:
            taken = self._decrypt(dial, data)
            if taken is None:
                return
            data = taken
        if data:
            dial.heard = True
            dial.protocol.receive_data(data)
        if not data or dial.transport.ended:       # (TLS ended after that answer)
            dial.protocol.receive_eof()
        events = dial.protocol.events_received()
        if not events and dial.protocol.handshake_exc is not None and dial.heard:
            # Bytes came that are not an HTTP answer it can read (a bare
            # close is said as such below).
            return self._refuse(dial, wire.REFUSED, f"{where}: not a WebSocket answer: "
                                                    f"{dial.protocol.handshake_exc}")
        if not events or not isinstance(events[0], Response):
            if not data:
                self._refuse(dial, wire.UNREACHABLE, f"{where} closed the connection "
                                                     "without answering the WebSocket request")
            return
        response = events[0]
        if dial.protocol.handshake_exc is not None:
            return self._refuse(dial, *_http_refusal(response, dial.protocol.handshake_exc))
        self._open(dial, events[1:])

    def _decrypt(self, dial: _Dial, data: bytes) -> Optional[bytes]:
        """wss://: the plaintext TLS makes of the bytes read (b"": the end);
        the HTTP request goes out once TLS is up. None when there is nothing
        to take yet (the TLS handshake goes on), or the dial was refused."""
        transport = dial.transport
        was_up = transport.handshake_done
        try:
            plain = transport.receive(data)
        except TransportClosed as e:
            cause = e.__cause__
            ended = not data or isinstance(cause, (ssl.SSLEOFError, ssl.SSLZeroReturnError))
            if ended and was_up:        # the remote ended TLS before its answer: an end
                return b""
            if ended:                   # a websocketd at its bounds closes at once
                self._refuse(dial, wire.UNREACHABLE, f"{dial.where} closed the connection "
                             "during the TLS handshake (at its bounds, or no wss:// there?)")
                return None
            # A failure (our alert goes out: the remote sees why), or the
            # remote's alert (after our certificate).
            assert dial.sock is not None
            _write_handshake(dial.sock, transport.pending(), dial.where)
            self._refuse(dial, wire.TLS, tls_reason(cause, dial.where)
                         if isinstance(cause, ssl.SSLError) else f"{dial.where}: {e}")
            return None
        out = transport.pending()
        if transport.handshake_done and dial.request:
            out += transport.send(dial.request)
            dial.request = b""
        assert dial.sock is not None
        failed = _write_handshake(dial.sock, out, dial.where)
        if failed:
            self._refuse(dial, wire.UNREACHABLE, failed)
            return None
        return plain if plain or not data else None

    def _open(self, dial: _Dial, frames: Sequence[object]) -> None:
        """The remote's 101: ipcd gets one end of a socket pair, switched
        with the WebSocket through a Session."""
        assert dial.sock is not None and dial.protocol is not None
        if self.daemon.open_websockets() >= self.options.max_websockets:
            return self._refuse(dial, wire.BUSY, f"websocketd has {self.options.max_websockets}"
                                                 " WebSockets open (max_websockets)")
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.ctx.add_connection(mine.fileno())
        except IPCError as e:
            mine.close()
            theirs.close()
            return self._refuse(dial, wire.BUSY, str(e))
        local = mine.detach()
        with theirs:
            if not wire.send_with_fd(dial.ipcd, wire.frame(b"ok"), theirs.fileno()):
                log.info("ws: ipcd left before the answer for %s", dial.uri)
                self.ctx.close(local, linger=0)
                return self._end(dial)
        sock, protocol = dial.sock, dial.protocol
        self._answers.pop(sock.fileno(), None)
        dial.sock = None                            # now the session's
        self._end(dial)
        fd = sock.detach()
        if not self.daemon.start_session(fd, local, dial.name, dial.where,
                                         protocol, dial.transport,
                                         lambda session: session.take_early_frames(frames)):
            self.ctx.close(fd, linger=0)
            return
        log.info("ws: connected to %s", dial.uri)

    def _expired(self, ipcd: int) -> None:
        dial = self._dials.get(ipcd)
        if dial is not None:
            self._refuse(dial, wire.TIMEOUT if dial.uri else wire.BADREQUEST,
                         self._no_answer(dial) if dial.uri else "no URI received")

    def _no_answer(self, dial: _Dial) -> str:
        """The text of a dial that ran out of time."""
        return _sockets.no_answer(dial.uri, self.options.connect_timeout)

    def _refuse(self, dial: _Dial, code: str, text: str) -> None:
        log.info("ws: %s: ne %s %s", dial.uri or "?", code, text)
        wire.send_raw(dial.ipcd, wire.frame(wire.refusal(code, text)))
        self._end(dial)

    def _end(self, dial: _Dial) -> None:
        """The dial is over: ipcd's connection and any dialled socket closed."""
        dial.done = True
        self._dials.pop(dial.ipcd, None)
        self.daemon.cancel(dial.timer)
        if dial.sock is not None:
            fd = dial.sock.fileno()
            self._answers.pop(fd, None)
            dial.sock.detach()
            self.ctx.close(fd, linger=0)
            dial.sock = None
        try:
            self.ctx.close(dial.ipcd)
        except IPCError:
            pass                                     # already gone


def _write_handshake(sock: socket.socket, data: bytes, where: str) -> Optional[str]:
    """Write a handshake's bytes (small: they fit an empty socket buffer);
    None when all went out, else why not."""
    try:
        sent = sock.send(data, wire.SEND_FLAGS) if data else 0
    except OSError as e:
        return f"{where}: {e.strerror or e}"
    return None if sent == len(data) else f"{where}: the request did not go out"


def _http_refusal(response: Response, exc: Exception) -> tuple[str, str]:
    """The refusal code and text of a remote's answer other than 101: its
    status and the first line of its body (websocketd says why there)."""
    body = (response.body or b"").decode("utf-8", "replace").strip().split("\n", 1)[0]
    text = body or f"{response.status_code} {response.reason_phrase}"
    if response.status_code == 101:             # a 101 the protocol refused
        return wire.REFUSED, f"bad WebSocket answer: {exc}"
    if response.status_code == 503 and "is not running" in body:
        return wire.NOSERVICE, text
    if response.status_code == 503:
        return wire.BUSY, text
    return wire.REFUSED, text
