"""IPC_NETWORK: which target a service name is reached at (libIPC's rules).

A request to ipcd is one message "NAME;RULES", RULES being the client's
IPC_NETWORK: rules "SVC URI" separated by ';'. The last rule whose SVC is NAME
wins. Its URI is either a local alias (no "://": the local service of that
name), `unix://X` (the local service X, or the socket at X when it is an
absolute path), or `SCHEME://...`, served by the local daemon whose service
is named after the scheme (`tcp`, `tls`, ...). A scheme is RFC 3986's
(a letter, then letters, digits, '+', '-', '.'), compared in lower case; `ipc`
is none (ipcd itself: it would ask itself).
"""

from __future__ import annotations

import re
from typing import NamedTuple, Optional

from .._types import IPCD_SERVICE

#: A scheme (RFC 3986, 3.1): ALPHA *( ALPHA / DIGIT / "+" / "-" / "." ).
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")


class BadRequest(ValueError):
    """The request is not "NAME;RULES" in UTF-8."""


class Target(NamedTuple):
    """Where a rule sends a name: `scheme` None for a local service (`where`
    is its name or an absolute socket path), else the daemon's scheme and the
    whole URI to hand it in `where`."""

    scheme: Optional[str]
    where: str


def parse_request(payload: bytes) -> tuple[str, str]:
    """(NAME, RULES) of a request; BadRequest when it is not one."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("the request is not UTF-8") from None
    name, sep, rules = text.partition(";")
    if not sep or not name:
        raise BadRequest("the request is not NAME;IPC_NETWORK")
    return name, rules


def find_rule(name: str, rules: str) -> Optional[str]:
    """The URI of the last rule for `name` (None when no rule names it).
    A rule without a URI is ignored."""
    found = None
    for rule in rules.split(";"):
        words = rule.split()
        if len(words) == 2 and words[0] == name:
            found = words[1]
    return found


def target_of(uri: str) -> Target:
    """Where `uri` points (see the module's docstring); ValueError for a
    scheme that cannot name a daemon, or a NUL (no path holds one)."""
    if "\0" in uri:
        raise ValueError(f"{uri!r}: a NUL in a URI")
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return Target(None, uri)                   # a local alias
    if not _SCHEME.fullmatch(scheme):      # (before lower(): the Kelvin sign's is "k")
        raise ValueError(f"{uri}: not a scheme (RFC 3986: a letter, then letters, "
                         f"digits, '+', '-' or '.')")
    scheme = scheme.lower()
    if scheme == "unix":
        if not rest:
            raise ValueError(f"{uri}: no service after unix://")
        return Target(None, rest)
    if scheme == IPCD_SERVICE:
        raise ValueError(f"{uri}: ipc:// would send the request to ipcd itself; name the "
                         f"service (unix://NAME) or a daemon's scheme (tcp://, tls://, ws://)")
    return Target(scheme, uri)
