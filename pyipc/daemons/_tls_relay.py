"""The TLS session tlsd keeps for one switched TCP connection, sans I/O.

A TLS session cannot travel as a file descriptor, so tlsd keeps it: the
client gets one end of a local socket pair, the daemon switches the other end
with the TCP socket, and the TCP side's switching callbacks go through this
relay. It owns an `ssl.SSLObject` over two `ssl.MemoryBIO`s and never touches a
socket itself:

- ciphertext read from TCP goes in with `feed()`; the plaintext it decrypts is
  the remote's pyipc stream (4-byte big-endian length, payload), taken as
  whole frames by `whole_frames()` / `frames_view()` (tlsd relays them as
  they are), or cut into whole payloads by `next_payload()`;
- `encrypt_frames(frames)` returns the TLS records carrying whole frames as
  they are, `encrypt(payload)` those of one payload it frames;
- `take_output()` returns records the session produced on its own (handshake
  messages, TLS 1.3 session tickets, alerts, close_notify).

The same object drives the handshake (`handshake()`), so the session made on
a worker thread is the one the loop thread relays with afterwards.
"""

from __future__ import annotations

import ssl
import struct
from typing import Iterable, List, Optional, Tuple

from ._netwire import scan_frames

_HEADER = struct.Struct(">I")
#: Room made in the plaintext buffer per SSLObject.read() call (one TLS
#: record holds at most 16 KiB; a read returns at most one record's data).
RECORD_ROOM = 64 * 1024
#: An empty plaintext buffer larger than this (it grew for a large message)
#: is given back, so an idle connection holds little memory.
KEEP_BUFFER_BELOW = 256 * 1024
#: Payloads at least this large are encrypted apart from their 4-byte header
#: (two records, no copy of the payload); smaller ones with it (one record).
SPLIT_HEADER_FROM = 16 * 1024


class TlsRelayError(Exception):
    """The remote broke the stream: a TLS error, a frame over the limit, or an
    end of stream in the middle of a frame."""


class TlsRelay:
    """One TLS session and the plaintext stream it carries (see module doc)."""

    __slots__ = ("ssl", "incoming", "outgoing", "_plain", "max_message_size", "closed",
                 "framed", "failed")

    def __init__(self, context: ssl.SSLContext, *, server_side: bool,
                 server_hostname: Optional[str] = None,
                 max_message_size: int = 16 << 20) -> None:
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.ssl = context.wrap_bio(self.incoming, self.outgoing, server_side=server_side,
                                    server_hostname=server_hostname)
        self._plain = _Plain()
        self.max_message_size = max_message_size
        #: The remote ended the session (close_notify, or EOF between frames).
        self.closed = False
        #: Set once the handshake's lines are read: from then on the plaintext
        #: is frames, and an end inside one is an error.
        self.framed = False
        #: The remote broke the stream (a TlsRelayError was raised): the
        #: session says nothing more, not even close_notify.
        self.failed = False

    # ------------------------------------------------------------ handshake

    def handshake(self) -> bool:
        """One step of the handshake: True once it is complete. Write
        take_output() to the peer after each step and feed() what it sends.
        Raises ssl.SSLError (certificate refused, not TLS at all, ...)."""
        try:
            self.ssl.do_handshake()
        except ssl.SSLWantReadError:
            return False
        return True

    # ------------------------------------------------------------ input

    def feed(self, ciphertext: "bytes | memoryview") -> None:
        """Take ciphertext from the peer; decrypt what it completes. An empty
        `ciphertext` is the TCP end of stream. Raises TlsRelayError."""
        if ciphertext:
            self.incoming.write(ciphertext)
        else:
            self.incoming.write_eof()
        self.decrypt(eof=not ciphertext)

    def decrypt(self, eof: bool = False) -> None:
        """Decrypt what the incoming BIO holds (records that came with the end
        of the handshake). Raises TlsRelayError."""
        plain = self._plain
        read = self.ssl.read
        try:
            while True:
                # Straight into the buffer: no bytes object per record, and
                # no Python work per record but a slice and the call.
                if len(plain.buf) - plain.end < RECORD_ROOM:
                    plain.make_room(RECORD_ROOM)
                end = plain.end
                room = plain.view[end:end + RECORD_ROOM]
                # With a buffer, read() returns a count (typeshed says bytes).
                n: int = read(RECORD_ROOM, room)  # type: ignore[assignment]
                del room           # a live slice would keep the buffer from growing
                if not n:          # defensive: read() returns 0 only at EOF
                    self._end()
                    return
                plain.end = end + n
        except ssl.SSLWantReadError:
            if eof:
                self._end()
        except ssl.SSLZeroReturnError:     # close_notify
            self._end()
        except ssl.SSLEOFError:    # TCP ended without close_notify (a "ragged" EOF):
            self._end()            # the frames say whether a message was cut
        except ssl.SSLError as e:
            raise self._failure(f"TLS error: {e.reason or e}") from e

    def _failure(self, text: str) -> TlsRelayError:
        """The error to raise for a broken stream (the session is marked failed)."""
        self.failed = True
        return TlsRelayError(text)

    def _end(self) -> None:
        """The session ended. Between two frames that is a clean end; inside
        one, the last message was cut (never delivered as if whole)."""
        self.closed = True
        if self.framed:
            self.check_ended_whole()

    def check_ended_whole(self) -> None:
        """Raise TlsRelayError when the stream ended inside a frame. _end()
        checks once the plaintext is frames; tlsd checks again when the end
        came with the handshake (the name or `ok` line, then the end)."""
        if self._whole_frames_length() != len(self._plain):
            raise self._failure(
                f"stream ended inside a message ({len(self._plain)} bytes left over)")

    def _whole_frames_length(self) -> int:
        """How many leading plaintext bytes are whole frames (whatever their size)."""
        p = self._plain
        return scan_frames(p.buf, p.start, p.end)[0] - p.start

    def plain(self) -> bytes:
        """A copy of the plaintext held (the handshake reads the name or the
        answer from it before any frame)."""
        p = self._plain
        return bytes(p.buf[p.start:p.end])

    def drop_plain(self, n: int) -> None:
        """Forget the first `n` plaintext bytes (a handshake line consumed)."""
        self._plain.consume(min(n, len(self._plain)))

    def next_payload(self) -> Optional[bytes]:
        """The next whole payload of the stream, or None when none is complete.
        Raises TlsRelayError when the remote announces one over the limit."""
        p = self._plain
        held = p.end - p.start
        if held < 4:
            return None
        (size,) = _HEADER.unpack_from(p.buf, p.start)
        if size > self.max_message_size:
            raise self._failure(f"message of {size} bytes exceeds the limit of "
                                f"{self.max_message_size} bytes")
        if held < 4 + size:
            return None
        first = p.start + 4
        payload = p.view[first:first + size].tobytes()        # the one copy
        p.consume(4 + size)
        return payload

    def whole_frames(self) -> "Tuple[int, Optional[TlsRelayError]]":
        """How many leading plaintext bytes are whole frames, to be relayed
        as they are (`frames_view`, then `drop_plain`): a stream needs no
        cutting into payloads. With them, the error to end the stream with
        (after relaying them) when the frame that follows is announced over
        the limit, else None: that frame is never buffered up to its size."""
        p, limit = self._plain, self.max_message_size
        at, too_large = scan_frames(p.buf, p.start, p.end, limit)
        if too_large >= 0:
            return at - p.start, self._failure(
                f"message of {too_large} bytes exceeds the limit of {limit} bytes")
        return at - p.start, None

    def frames_view(self, n: int) -> memoryview:
        """The first `n` plaintext bytes, without a copy: release the view
        (`with`) before feeding the relay again."""
        p = self._plain
        return p.view[p.start:p.start + n]

    def buffered(self) -> int:
        """Plaintext bytes held (not yet returned as payloads)."""
        return len(self._plain)

    # ------------------------------------------------------------ output

    def encrypt(self, payload: bytes) -> bytes:
        """TLS records carrying one pyipc frame of `payload` (with any records
        the session had pending before it, in order)."""
        if len(payload) >= SPLIT_HEADER_FROM:
            self.ssl.write(_HEADER.pack(len(payload)))
            self.ssl.write(payload)
        else:
            self.ssl.write(_HEADER.pack(len(payload)) + payload)
        return self.outgoing.read()

    def encrypt_frames(self, frames: "Iterable[bytes | bytearray | memoryview]") -> bytes:
        """TLS records carrying `frames` (whole pyipc frames, header
        included) as they are, with any records pending before them."""
        write = self.ssl.write
        for frame in frames:
            write(frame)
        return self.outgoing.read()

    def encrypt_raw(self, data: bytes) -> bytes:
        """TLS records carrying `data` as it is (the handshake's name and answer)."""
        self.ssl.write(data)
        return self.outgoing.read()

    def take_output(self) -> bytes:
        """Records the session produced by itself, to write to the peer."""
        return self.outgoing.read()

    def close_notify(self) -> bytes:
        """The close_notify alert ending the session, to write to the peer."""
        try:
            self.ssl.unwrap()
        except ssl.SSLError:
            pass        # the peer's close_notify has not come: not waited for
        return self.outgoing.read()

    def goodbye(self) -> bytes:
        """What to write to the peer as the connection closes: close_notify,
        so it sees a clean end of the session rather than a truncation
        attack's "ragged" EOF; nothing when the stream broke (a failed
        session says no more) or the alert cannot be made."""
        if self.failed:
            return b""
        try:
            return self.close_notify()
        except (ssl.SSLError, ValueError):
            return b""


class _Plain:
    """The decrypted stream not yet taken: `buf[start:end]`. Taking moves
    `start` (no copy of what follows); room for new data is made at the end,
    moving the rest to the front only when the end is reached. `view` is a
    memoryview of `buf`, kept (one per buffer, not one per record)."""

    __slots__ = ("buf", "view", "start", "end")

    def __init__(self) -> None:
        self.buf = bytearray()
        self.view = memoryview(self.buf)
        self.start = 0
        self.end = 0

    def __len__(self) -> int:
        return self.end - self.start

    def make_room(self, n: int) -> None:
        """Make `n` bytes free after the data: move it to the front, or
        grow (empty: into the spare buffer, when there is one)."""
        held = self.end - self.start
        if self.start:
            self.view[:held] = self.view[self.start:self.end]    # a memmove
            self.start, self.end = 0, held
        if len(self.buf) - self.end < n:
            self.view.release()         # a bytearray with a view cannot grow
            spare = _take_spare(n) if not held else None
            if spare is not None:
                self.buf = spare
            else:
                self.buf.extend(bytes(max(n, len(self.buf))))
            self.view = memoryview(self.buf)

    def consume(self, n: int) -> None:
        self.start += n
        if self.start == self.end:
            self.start = self.end = 0
            if len(self.buf) > KEEP_BUFFER_BELOW:
                self.view.release()
                _give_spare(self.buf)
                self.buf = bytearray()
                self.view = memoryview(self.buf)


#: Emptied large plaintext buffers kept for reuse (one at most, of at most
#: SPARE_AT_MOST bytes), shared by the relays of the process. A relay gives
#: its buffer back as soon as all of it is taken, so an idle connection
#: holds none; a busy one takes it again at its next read instead of
#: allocating, zeroing and faulting in a fresh one (when a read ends on a
#: frame's end, as it often does, that was 10-15 us per 64 KiB message).
_spares: List[bytearray] = []
SPARE_AT_MOST = 1 << 20


def _take_spare(n: int) -> Optional[bytearray]:
    """The spare buffer if it has `n` bytes, else None (it stays)."""
    try:
        spare = _spares.pop()           # atomic: relays of other threads too
    except IndexError:
        return None
    if len(spare) >= n:
        return spare
    _give_spare(spare)
    return None


def _give_spare(buf: bytearray) -> None:
    if len(buf) <= SPARE_AT_MOST and not _spares:
        _spares.append(buf)
