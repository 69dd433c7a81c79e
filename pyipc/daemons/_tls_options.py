"""tlsd's configuration: its options, the `tls://` URIs it dials, the address
it listens on, and the two SSL contexts (server side, client side) made from
the certificate paths.
"""

from __future__ import annotations

import dataclasses
import ssl
import urllib.parse
from typing import FrozenSet, Optional, Tuple

#: The port of a `tls://` URI without one, and of `--listen HOST` without one.
DEFAULT_PORT = 9443
#: Where tlsd listens when --listen names no host.
DEFAULT_LISTEN_HOST = "127.0.0.1"


@dataclasses.dataclass(frozen=True)
class TlsdConfig:
    """What `pyipc tlsd` is told on its command line (see add_command)."""

    #: "HOST:PORT" to accept TLS connections on; None: only dial (unless
    #: systemd passed listening sockets).
    listen: Optional[str] = None
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
    #: Seconds one dial (connect, TLS handshake, remote answer) or one
    #: incoming handshake (TLS, then the service name) may take.
    timeout: float = 10.0
    #: Dials and incoming handshakes in progress at once, at most; more are
    #: refused (`ne busy`) or closed at once.
    max_pending: int = 64

    def __post_init__(self) -> None:
        if self.timeout <= 0:
            raise ValueError(f"timeout must be positive, not {self.timeout}")
        if self.max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, not {self.max_pending}")
        if self.key is not None and self.cert is None:
            raise ValueError("--key needs --cert")
        if self.listen is not None and self.cert is None:
            raise ValueError("listening for TLS needs --cert (and --key unless the "
                             "certificate file holds it)")


def parse_uri(uri: str) -> Tuple[str, int, str]:
    """(host, port, service name) of `tls://host[:port]/NAME` (IPv6 hosts in
    brackets: `tls://[::1]:9443/pong`). ValueError saying what is wrong."""
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme != "tls":
        raise ValueError(f"not a tls:// URI: {uri!r}")
    host = parts.hostname
    if not host:
        raise ValueError(f"no host in {uri!r}")
    port = parts.port or DEFAULT_PORT      # .port raises ValueError when not a number
    name = parts.path[1:] if parts.path.startswith("/") else ""
    if not name or "/" in name or parts.query or parts.fragment:
        raise ValueError(f"no service name in {uri!r} (tls://host:port/NAME)")
    return host, port, urllib.parse.unquote(name)


def parse_address(address: str) -> Tuple[str, int]:
    """(host, port) of `HOST:PORT`, `[IPv6]:PORT`, `HOST` or `:PORT`."""
    host, sep, port = address.rpartition(":")
    if not sep or (host.count(":") and not host.startswith("[")):
        host, port = address, ""            # no port, or a bare IPv6 address
    host = host.strip("[]") or DEFAULT_LISTEN_HOST
    if not port:
        return host, DEFAULT_PORT
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"bad port in {address!r}")
    return host, int(port)


def server_context(config: TlsdConfig) -> ssl.SSLContext:
    """The context of connections we accept: our certificate; the client's
    verified against --client-ca when given (mutual TLS)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    assert config.cert is not None      # checked by TlsdConfig
    ctx.load_cert_chain(config.cert, config.key)
    if config.client_ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(config.client_ca)
    return ctx


def client_context(config: TlsdConfig) -> ssl.SSLContext:
    """The context of connections we dial: the server's certificate and host
    name always verified (against --ca, else the system's trust store); our
    certificate presented when we have one."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)   # CERT_REQUIRED, check_hostname
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if config.ca is not None:
        ctx.load_verify_locations(config.ca)
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if config.cert is not None:
        ctx.load_cert_chain(config.cert, config.key)
    return ctx
