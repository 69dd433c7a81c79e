"""websocketd's settings, with their defaults and bounds (one place, so the
CLI, the class and the docs agree)."""

from __future__ import annotations

import dataclasses
import ssl
from typing import FrozenSet, Optional, Tuple

from ..._types import DEFAULT_MAX_MESSAGE_SIZE
from .._netwire import names_argument
from .._sockets import check_dead_peer_timeout
from .._timers import check_timeout

#: Default TCP port (the CLI's --port).
DEFAULT_PORT = 8080
#: Bytes queued toward one WebSocket client before websocketd stops reading
#: its service (and bytes queued toward a service before it stops reading the
#: client). The backpressure bound: see docs/websocket.md.
DEFAULT_MAX_BUFFER = 1 << 20
#: Seconds a client has to complete its TLS and HTTP handshake.
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
#: Seconds a dial for ipcd (a ws:// rule) has to connect and get the remote's 101.
DEFAULT_CONNECT_TIMEOUT = 10.0
#: Connections still in their handshake at once; more are refused at accept.
DEFAULT_MAX_HANDSHAKES = 256
#: WebSockets open at once (each holds two connections: its client's and its
#: service's; 3 fds, 4 while it waits for a close answer: docs/websocket.md); a
#: request past it is answered 503.
DEFAULT_MAX_WEBSOCKETS = 1024
#: Seconds after which a client that vanished (a cut link, a host down) is
#: noticed: TCP keepalive while idle, TCP_USER_TIMEOUT while data waits to be
#: acknowledged (as tcpd's and tlsd's --dead-peer-timeout); 0: never; at most
#: _sockets.MAX_DEAD_PEER_TIMEOUT. The timeouts: at most _timers.MAX_TIMEOUT.
DEFAULT_DEAD_PEER_TIMEOUT = 30.0


@dataclasses.dataclass(frozen=True)
class Options:
    """What a WebSocketd serves and how (see `WebSocketd`)."""

    #: Services reachable as ws://HOST:PORT/NAME (deny by default: none).
    expose: FrozenSet[str] = frozenset()
    #: Address and port to listen on (ignored under socket activation).
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    #: Origins allowed besides the request's own host ("*": any).
    origins: FrozenSet[str] = frozenset()
    #: Largest message either way, as the services' own max_message_size.
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    #: The backpressure bound per direction of a connection.
    max_buffer: int = DEFAULT_MAX_BUFFER
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    max_handshakes: int = DEFAULT_MAX_HANDSHAKES
    #: Connections in their handshake at once from one peer (an IPv4
    #: address, an IPv6 /64); None: half of max_handshakes (as tcpd's and
    #: tlsd's --max-pending-per-host), so one host cannot take every slot.
    max_handshakes_per_host: Optional[int] = None
    max_websockets: int = DEFAULT_MAX_WEBSOCKETS
    dead_peer_timeout: float = DEFAULT_DEAD_PEER_TIMEOUT
    #: wss://: a server-side SSLContext (None: plain ws://).
    ssl_context: Optional[ssl.SSLContext] = None
    #: Serve the `ws` and `wss` schemes for ipcd (the services `ws` and
    #: `wss` in the run dir): dial ws://HOST:PORT/NAME (or wss://) and hand
    #: the client a connection to it.
    dial: bool = True
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    #: wss:// dials: a client-side SSLContext (our certificate for mutual
    #: TLS, the CAs the remote's is checked against). None: the system's
    #: trust store, the remote's certificate and host name always verified.
    dial_ssl_context: Optional[ssl.SSLContext] = None

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be 0..65535, not {self.port}")
        for name in ("max_message_size", "max_buffer", "max_handshakes",
                     "max_handshakes_per_host", "max_websockets"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        for name in ("expose", "origins"):
            object.__setattr__(self, name, names_argument(name, getattr(self, name)))
        check_dead_peer_timeout(self.dead_peer_timeout)
        check_timeout("handshake_timeout", self.handshake_timeout)
        check_timeout("connect_timeout", self.connect_timeout)


def handshakes_per_host(options: Options) -> int:
    """The share of the handshake slots one peer may hold (see Options)."""
    if options.max_handshakes_per_host is not None:
        return options.max_handshakes_per_host
    return max(1, options.max_handshakes // 2)


def parse_list(text: Optional[str]) -> Tuple[str, ...]:
    """"a,b, c" -> ("a", "b", "c"); None or "" -> ()."""
    return tuple(p.strip() for p in (text or "").split(",") if p.strip())
