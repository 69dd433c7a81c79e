"""tlsd's configuration: its options, the `tls://` URIs it dials, the address
it listens on, and the two SSL contexts (server side, client side) made from
the certificate paths.
"""

from __future__ import annotations

import dataclasses
import ssl
from typing import Callable, FrozenSet, Optional, Tuple, cast

from . import _netwire, _sockets
from ._timers import check_timeout

#: The port of a `tls://` URI without one, and of `--listen HOST` without one.
DEFAULT_PORT = 9443


@dataclasses.dataclass(frozen=True)
class TlsdConfig:
    """What `pyipc tlsd` is told on its command line (see add_command)."""

    #: Addresses ("HOST[:PORT]", "[IPV6][:PORT]") to accept TLS connections
    #: on; none: only dial (unless systemd passed listening sockets).
    listen: Tuple[str, ...] = ()
    #: Our certificate chain and key (PEM): the server's certificate when
    #: listening (required then), the client certificate when dialing.
    cert: Optional[str] = None
    key: Optional[str] = None
    #: Local services a remote peer may reach (deny by default).
    expose: FrozenSet[str] = frozenset()
    #: CA bundle clients must present a certificate from (mutual TLS); None:
    #: no client certificate asked.
    client_ca: Optional[str] = None
    #: CA bundle the servers we dial are verified against; None: the
    #: system's default trust store.
    ca: Optional[str] = None
    #: Seconds one dial may take: connect, TLS handshake, the remote's answer
    #: (at most _timers.MAX_TIMEOUT, a day, as the other timeouts).
    connect_timeout: float = 10.0
    #: Seconds a remote peer has for the TLS handshake and the service name.
    handshake_timeout: float = 10.0
    #: A connection whose peer is silent this long ends (keepalive and
    #: TCP_USER_TIMEOUT, as tcpd); 0: never; at most
    #: _sockets.MAX_DEAD_PEER_TIMEOUT (32767, Linux's keepalive bound).
    dead_peer_timeout: float = 30.0
    #: Dials and incoming handshakes in progress at once, at most; more are
    #: refused (`ne busy`) or closed at once.
    max_pending: int = 64
    #: Incoming handshakes in progress at once from one address, at most
    #: (more are closed at once), and dials to one host whose worker is not
    #: back (a hung name lookup outlives its request's answer; more are
    #: refused `ne busy`). None: half of max_pending (as tcpd's).
    max_pending_per_host: Optional[int] = None

    def __post_init__(self) -> None:
        check_timeout("connect_timeout", self.connect_timeout)
        check_timeout("handshake_timeout", self.handshake_timeout)
        _sockets.check_dead_peer_timeout(self.dead_peer_timeout)
        if self.max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, not {self.max_pending}")
        if self.max_pending_per_host is not None and self.max_pending_per_host < 1:
            raise ValueError(f"max_pending_per_host must be at least 1, "
                             f"not {self.max_pending_per_host}")
        if self.key is not None and self.cert is None:
            raise ValueError("--key needs --cert")
        if isinstance(cast(object, self.listen), str):  # would be taken letter by letter
            raise TypeError(f"listen must be a tuple of addresses, not str {self.listen!r}")
        # A list of addresses, any collection of names: kept as the fields say.
        object.__setattr__(self, "listen", tuple(self.listen))
        object.__setattr__(self, "expose", _netwire.names_argument("expose", self.expose))
        if self.listen and self.cert is None:
            raise ValueError("listening for TLS needs --cert (and --key unless the "
                             "certificate file holds it)")

    @property
    def pending_per_host(self) -> int:
        """max_pending_per_host, or its default (_sockets.default_per_host,
        as tcpd's): computed, so that dataclasses.replace() of max_pending
        moves it too."""
        if self.max_pending_per_host is not None:
            return self.max_pending_per_host
        return _sockets.default_per_host(self.max_pending)


def parse_uri(uri: str) -> Tuple[str, int, str]:
    """(host, port, service name) of `tls://host[:port]/NAME` (IPv6 hosts in
    brackets: `tls://[::1]:9443/pong`). ValueError saying what is wrong
    (_netwire.parse_uri)."""
    return _netwire.parse_uri(uri, "tls", DEFAULT_PORT)


#: TLS 1.2 renegotiation refused both ways (TLS 1.3 has none): a session
#: renegotiating while the relay writes made ssl's write ask to read first
#: (SSLWantReadError), which ended the session; renegotiation also lets a
#: remote make tlsd spend CPU on handshakes at will. A remote's request is
#: answered with the no_renegotiation alert.
_NO_RENEGOTIATION = getattr(ssl, "OP_NO_RENEGOTIATION", 0)

#: A peer's end of stream without close_notify (a FIN) reads as an end
#: (SSLZeroReturnError), as close_notify does, not as OpenSSL 3's fatal
#: UNEXPECTED_EOF_WHILE_READING: that error killed the session and queued a
#: decode_error alert, so a bare name followed by a FIN got that alert, never
#: an answer. Whether the end cut anything is the frames' to say (pyipc's
#: framing tells a whole message from a cut one), as the relay does already.
_IGNORE_UNEXPECTED_EOF = getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)


def server_context(config: TlsdConfig) -> ssl.SSLContext:
    """The context of connections we accept: our certificate; the client's
    verified against --client-ca when given (mutual TLS)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= _NO_RENEGOTIATION | _IGNORE_UNEXPECTED_EOF
    cert = config.cert
    assert cert is not None             # checked by TlsdConfig
    load_tls_file("--cert/--key", cert, lambda: ctx.load_cert_chain(cert, config.key))
    if config.client_ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        load_tls_file("--client-ca", config.client_ca,
              lambda: ctx.load_verify_locations(config.client_ca))
    return ctx


def client_context(config: TlsdConfig) -> ssl.SSLContext:
    """The context of connections we dial: the server's certificate and host
    name always verified (against --ca, else the system's trust store); our
    certificate presented when we have one."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)   # CERT_REQUIRED, check_hostname
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= _NO_RENEGOTIATION | _IGNORE_UNEXPECTED_EOF
    if config.ca is not None:
        load_tls_file("--ca", config.ca, lambda: ctx.load_verify_locations(config.ca))
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    cert = config.cert
    if cert is not None:
        load_tls_file("--cert/--key", cert, lambda: ctx.load_cert_chain(cert, config.key))
    return ctx


def load_tls_file(option: str, path: str, load: Callable[[], None]) -> None:
    """Run `load`; a missing or bad file becomes a ValueError naming it."""
    try:
        load()
    except ssl.SSLError as e:           # (an OSError too: test it first)
        raise ValueError(f"{option} {path}: {e}") from e
    except OSError as e:
        raise ValueError(f"{option} {path}: {e.strerror or e}") from e
