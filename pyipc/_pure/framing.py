"""The pure backend's framing (the core's framing.zig): a 4-byte big-endian length, then that many bytes of payload.

The decoder is incremental: bytes arrive in any split (several frames in one
chunk, one frame over many chunks, a header cut in two) and come out as whole
payloads, in order. An announced length above the limit is refused before
anything is allocated for it.
"""

from __future__ import annotations

import struct

from .._checks import too_large_text

HEADER = struct.Struct(">I")
HEADER_SIZE = HEADER.size
#: read_into() reads a frame of this size or more straight into the caller's buffer.
DIRECT_READ_MIN = 64 * 1024
_unpack_from = HEADER.unpack_from
#: Payloads smaller than this are cut from one bytes copy of the rest of the
#: chunk: a bytes slice is one object, a memoryview slice then bytes() two
#: (decoding 64-byte frames: 290 against 584 ns a frame). Larger ones are
#: copied from the view; one that follows a small one in the same chunk is in
#: that copy too (at most one chunk, 64 KiB, copied once more per read).
SLICE_FROM_COPY_BELOW = 4096


class FrameTooLarge(Exception):
    """A peer announced a payload larger than the decoder's limit."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(too_large_text(size, limit))
        self.size = size
        self.limit = limit


def encode(payload: bytes | memoryview) -> bytes:
    """One frame: the header, then the payload (one copy)."""
    return HEADER.pack(len(payload)) + payload


class FrameDecoder:
    """Turns a byte stream into payloads; keeps only an unfinished frame."""

    __slots__ = ("_buf", "_limit", "unsettled")

    def __init__(self, limit: int) -> None:
        self._buf = bytearray()
        self._limit = limit
        #: Bytes were taken from the socket and are neither in this decoder
        #: nor delivered yet (set by the reader right as they are taken,
        #: cleared once they are): a signal handler's exception in between
        #: leaves it set, and the next read ends the connection with
        #: FRAMING_LOST instead of decoding a stream with a hole in it.
        self.unsettled = False

    @property
    def partial(self) -> bool:
        """True when part of a frame (header or payload) is buffered."""
        return bool(self._buf)

    def buffered(self) -> bytes:
        """The start of the one unfinished frame buffered (maybe empty)."""
        return bytes(self._buf)

    def discard(self) -> None:
        """Forget the unfinished frame: the caller took it over (read_into)."""
        self._buf = bytearray()

    def restore(self, start: bytes) -> None:
        """Buffer `start` again (the start of the unfinished frame, as far
        as it was read): read_into was interrupted after discard()."""
        self._buf = bytearray(start)

    def feed(self, data: memoryview, out: list[bytes]) -> None:
        """Decode `data`; append every complete payload (bytes) to `out`.

        Raises FrameTooLarge after appending the payloads that preceded the
        bad header; the decoder must not be used after that.
        """
        if self._buf:
            self._buf += data
            with memoryview(self._buf) as view:
                used = self._decode(view, out)
            if used == len(self._buf):
                self._buf = bytearray()      # shrink back once a large frame is done
            else:
                del self._buf[:used]
        else:
            used = self._decode(data, out)    # fast path: no copy into the buffer
            if used < len(data):
                self._buf = bytearray(data[used:])
        if not out:
            # Every byte is in the buffer: settled (no call from here to the
            # return, so no signal handler runs in between).
            self.unsettled = False

    def _decode(self, view: memoryview, out: list[bytes]) -> int:
        """Decode whole frames from `view`; return the number of bytes used."""
        limit = self._limit
        end = len(view)
        off = 0
        rest, base = b"", 0         # view[base:] as bytes, once a small payload needs it
        while end - off >= HEADER_SIZE:
            (size,) = _unpack_from(view, off)
            if size > limit:
                self._buf = bytearray()
                raise FrameTooLarge(size, limit)
            start = off + HEADER_SIZE
            if end - start < size:
                break
            if size >= SLICE_FROM_COPY_BELOW:
                out.append(bytes(view[start:start + size]))
            else:
                if not rest:
                    rest, base = view[start:].tobytes(), start
                out.append(rest[start - base:start - base + size])
            off = start + size
        return off
