"""Who may reach what: the URL path names the service, only exposed services
are reachable (deny by default), and browsers' Origin must be allowed.

Origin (RFC 6454) is what a browser sends to say which page opens the
WebSocket; a page from another site must not reach local services through a
user's browser (cross-site WebSocket hijacking). The default allows the
daemon's own host only: the Origin's host:port equals the request's Host
header (the page was served by this websocketd, or by the same host:port).
A request without Origin is not from a browser page and is allowed (a
non-browser client can send any Origin it likes anyway: Origin protects
browser users, it does not authenticate).

The same-host rule holds only where the Host header names this machine: an
IP address, `localhost`, or one of the machine's own names. Else a page
could rebind its own DNS name to 127.0.0.1 (DNS rebinding): its Origin and
the Host the browser then sends are the same attacker's name, and would
match. A page served under another name is allowed by listing its origin.
"""

from __future__ import annotations

import ipaddress
import socket
import urllib.parse
from typing import AbstractSet, FrozenSet, Optional


def service_name(path: str) -> str:
    """The service a request path names: "/pong" and "/pong?x=1" -> "pong",
    "/a%20b" -> "a b". Whatever it is, only an exposed name is reachable
    (and those were checked as service names at start). The request target
    is a path, never parsed as a URL: "//x" would be a netloc to urlsplit,
    which raises ValueError on some ("//[x"). A target that is not a path
    (no leading "/") is refused before this is asked."""
    assert path.startswith("/"), path
    path = path.split("?", 1)[0].split("#", 1)[0]
    return urllib.parse.unquote(path[1:])


def own_names() -> FrozenSet[str]:
    """The names of this machine a Host header may hold for the same-host
    rule (besides IP addresses): localhost and the machine's own names."""
    return frozenset(n.lower() for n in ("localhost", socket.gethostname(), socket.getfqdn())
                     if n)


def origin_allowed(origin: Optional[str], host: Optional[str],
                   allowed: AbstractSet[str], names: AbstractSet[str]) -> bool:
    """Whether a request with header Origin `origin` and Host `host` may
    open a WebSocket: no Origin, or the same host:port where the Host names
    this machine (an IP address or one of `names`, see own_names), or
    listed (exactly, scheme://host[:port]), or the list holds "*"."""
    if origin is None:
        return True
    if "*" in allowed or origin in allowed:
        return True
    try:
        parts = urllib.parse.urlsplit(origin)
    except ValueError:             # e.g. "http://[": no origin we could match
        return False
    if parts.scheme not in ("http", "https") or not parts.netloc or host is None:
        return False
    return _netloc(parts.netloc, parts.scheme) == _netloc(host, parts.scheme) \
        and _names_this_machine(parts.hostname or "", names)


def _names_this_machine(hostname: str, names: AbstractSet[str]) -> bool:
    """An IP address (a browser that was given one asks no DNS), or one of
    this machine's `names` (lower case)."""
    try:
        ipaddress.ip_address(hostname)
        return True
    except ValueError:
        return hostname.lower().rstrip(".") in names


def _netloc(netloc: str, scheme: str) -> str:
    """host:port in lower case with the scheme's default port made explicit."""
    netloc = netloc.lower()
    default = "443" if scheme == "https" else "80"
    if netloc.endswith("]") or ":" not in netloc.rsplit("]", 1)[-1]:
        netloc += ":" + default
    return netloc
