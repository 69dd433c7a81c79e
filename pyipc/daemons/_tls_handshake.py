"""One TCP connection of tlsd before its relay starts: the TLS handshake, then
the name line (dialing: we send it and read the answer; listening: we read it).

Only state and the pure steps live here; tlsd (the loop) reads the socket,
writes what `step()` returns and acts on the outcome. Nothing here blocks.
"""

from __future__ import annotations

import ssl
from typing import Any, Optional, Tuple

from . import _netwire as wire
from ._tls_relay import TlsRelay, TlsRelayError

#: Longest `ne ...` answer kept from a remote (the rest is cut).
MAX_ANSWER_BYTES = 1024


class HandshakeFailed(Exception):
    """The handshake cannot succeed: `code` and `text` are what ipcd is
    answered (`ne CODE TEXT`) or the remote peer is refused with."""

    def __init__(self, code: str, text: str, alert: bytes = b"") -> None:
        super().__init__(f"{code} {text}")
        self.code = code
        self.text = text
        #: TLS records to send the peer before anything else: the alert the
        #: session produced on failing, so it learns why (e.g. "certificate
        #: required"), or records the session made before the failure (a
        #: TLS 1.3 server's session tickets), without which whatever we send
        #: next would not decrypt ("bad record mac").
        self.alert = alert


class Handshake:
    """A TCP connection's TLS handshake and name exchange (see module doc).

    Dialing: `name` is the remote service asked for and `request` the ipcd
    connection waiting for the answer. Listening: `name` is set once read.
    """

    __slots__ = ("fd", "relay", "dialing", "name", "request", "peer", "secure", "timer",
                 "grace")

    def __init__(self, fd: int, relay: TlsRelay, *, dialing: bool, peer: str,
                 name: str = "", request: int = -1) -> None:
        self.fd = fd
        self.relay = relay
        self.dialing = dialing
        self.name = name
        self.request = request
        self.peer = peer
        self.secure = False         # the TLS handshake is done
        self.timer: Any = None      # the deadline's handle (the daemon's call_later)
        self.grace: Any = None      # the bare-name grace timer (listening)

    def start(self) -> bytes:
        """The first flight to send (a dialer's ClientHello; b"" when listening)."""
        if self.dialing:
            self.relay.handshake()
        return self.relay.take_output()

    def step(self, ciphertext: bytes) -> Tuple[bytes, Optional[str]]:
        """Take what the peer sent (b"" at its end of stream). Returns (what
        to send, outcome): outcome None means wait for more; "ok" a dialer's
        success (the remote service is connected; the relay's plaintext is
        the stream's first bytes); "name" a listener's name to serve (in
        `name`). Raises HandshakeFailed."""
        relay = self.relay
        if ciphertext:
            relay.incoming.write(ciphertext)
        else:
            relay.incoming.write_eof()
        out = b""
        if not self.secure:
            try:
                done = relay.handshake()
            except (ssl.SSLEOFError, ssl.SSLZeroReturnError) as e:
                # The peer closed before any TLS failure: a daemon at its
                # bounds closes new connections at once (ssl says
                # UNEXPECTED_EOF_WHILE_READING, which sounded like a
                # certificate problem; a zero return under
                # OP_IGNORE_UNEXPECTED_EOF, see _tls_options).
                raise HandshakeFailed(wire.UNREACHABLE, self._closed_in_handshake(),
                                      relay.take_output()) from e
            except ssl.SSLError as e:
                raise HandshakeFailed(wire.TLS, tls_reason(e, self.peer),
                                      relay.take_output()) from e
            out = relay.take_output()
            if not done:
                if not ciphertext:
                    raise HandshakeFailed(wire.UNREACHABLE, self._closed_in_handshake())
                return out, None
            self.secure = True
            if self.dialing:
                out += relay.encrypt_raw(self.name.encode() + b"\n")
        try:
            relay.decrypt(eof=not ciphertext)
            out += relay.take_output()
            return out, (self._answer() if self.dialing else self._name_line())
        except TlsRelayError as e:
            raise HandshakeFailed(wire.TLS, f"{self.peer}: {e}",
                                  out + relay.take_output()) from e
        except HandshakeFailed as e:
            e.alert = out + e.alert     # the records made so far go out first
            raise

    def _closed_in_handshake(self) -> str:
        return (f"{self.peer} closed the connection during the TLS handshake (at its "
                f"bounds, or not a tlsd?)")

    def _answer(self) -> Optional[str]:
        """A dialer reads the remote's `ok` or `ne CODE TEXT` (then its end)."""
        plain = self.relay.plain()
        if plain[:2] == b"ok":
            self.relay.drop_plain(2)
            return "ok"
        if b"ok".startswith(plain) and not self.relay.closed:
            return None
        if plain[:3] == b"ne " and not self.relay.closed and len(plain) < MAX_ANSWER_BYTES:
            return None         # the refusal's text goes on until the remote closes
        if plain[:3] == b"ne ":
            line = plain[3:MAX_ANSWER_BYTES].split(b"\n", 1)[0].decode("utf-8", "replace")
            code, _, text = line.partition(" ")
            if not (code.isascii() and code.isalpha()):   # a code is a word: relayed as one
                code, text = wire.REFUSED, line
            raise HandshakeFailed(code, f"{self.peer}: {text or 'refused'}")
        if not plain:
            raise HandshakeFailed(wire.UNREACHABLE, f"{self.peer} closed the connection "
                                                 f"without answering")
        raise HandshakeFailed(wire.TLS, f"{self.peer} answered {plain[:40]!r}, not ok/ne "
                                     f"(not a pyipc tlsd?)")

    def _name_line(self) -> Optional[str]:
        """A listener reads `NAME\\n` or `NAME\\r\\n` (a typed line, as tcpd
        takes it), or a bare NAME: after the grace, or at once when the peer
        ends its sending side (close_notify or FIN), as tcpd serves it."""
        plain = self.relay.plain()
        # A newline past the bound (the name and a "\r"): none.
        end = plain.find(b"\n", 0, wire.MAX_NAME_LINE + 1)
        if end < 0:
            if wire.name_too_long(plain):
                raise HandshakeFailed(wire.REFUSED, wire.NAME_TOO_LONG)
            if self.relay.closed:
                if plain:                   # all it will send: a bare name
                    return self.take_name(len(plain), len(plain))
                raise HandshakeFailed(wire.REFUSED, "closed before sending a service name")
            return None
        return self.take_name(end, end + 1)

    def take_name(self, end: int, consumed: int) -> str:
        """Take plaintext [0:end] as the service name (`consumed` bytes used;
        a typed line's trailing "\\r" is not part of the name)."""
        line = self.relay.plain()[:end]
        if wire.name_too_long(line):
            raise HandshakeFailed(wire.REFUSED, wire.NAME_TOO_LONG)
        raw = wire.name_of_line(line)
        self.relay.drop_plain(consumed)
        try:
            self.name = raw.decode()
        except UnicodeDecodeError:
            raise HandshakeFailed(wire.REFUSED, "service name is not UTF-8") from None
        return "name"


def tls_reason(e: ssl.SSLError, peer: str) -> str:
    """A TLS failure in a few words a user can act on."""
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"{peer}: certificate verify failed: {e.verify_message}"
    return f"{peer}: {e.reason or e}"
