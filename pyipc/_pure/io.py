"""The pure backend's blocking reads and writes (write, write_many, read,
read_many, read_into), and the event loop's reads of a ready connection.
"""

from __future__ import annotations

import os
import select
import socket
from collections import deque
from typing import TYPE_CHECKING, Iterable, Optional, Tuple

from .._checks import (Bytes, as_payload_list, check_max_messages, closed_by_peer,
                       too_large_text, writable_view)
from .._events import EventQueue
from .._types import Buffer, Payload
from .._types import (DEFAULT_READ_MANY, READ_MANY_BYTES, Event, EventType, IPCError,
                      MessageTooLargeError, UnknownFdError)
from .blocking import Blocking, Woken, recv_exactly
from .conn_table import CONNECTION, Conn
from .framing import DIRECT_READ_MIN, HEADER, FrameTooLarge, encode
from .send_queue import advance, frame_rest
from .syscalls import DONTWAIT, SEND_NOW, RawFd, os_error, sending

if TYPE_CHECKING:
    from .state import PureState

#: Bytes read from one fd in one round at most, so one busy peer cannot starve others.
READ_BUDGET = 256 * 1024
#: Messages write_many() gathers into one buffer (and one system call).
WRITE_MANY_BATCH = 512
#: write() joins header and payload up to this payload size into one buffer
#: (a copy this small is cheaper than a two-part sendmsg); larger ones are
#: sent from where they are.
WRITE_JOINED_MAX = 4096

_RX = EventType.MESSAGE_RX


def transfer_error(ctx: PureState, conn: Conn, what: str, errno_: Optional[int]) -> IPCError:
    """The error of a blocking read or write of conn that failed with
    errno_: IPCError "WHAT failed: REASON", or, when a signal handler closed
    conn while the call waited (its socket object closed: EBADF), what the
    call would have raised had it begun then, as native's does:
    UnknownFdError, or the peer's end if the connection had ended."""
    if conn.alive:
        return os_error(f"{what} failed", errno_)
    if conn.fd in ctx._ended:
        return closed_by_peer(conn.fd)
    return UnknownFdError(f"fd {conn.fd} is not managed by this context")


class Writing:
    """PureContext's blocking writes."""

    __slots__ = ()

    def write(self: PureState, fd: int, payload: Payload, timeout: Optional[float] = None) -> None:
        block = self._blocking(fd, timeout, "write", spin=False)    # first, as native
        conn, data = self._prepare(fd, payload)
        self._write_blocking(conn, [encode(data)] if len(data) <= WRITE_JOINED_MAX
                             else [HEADER.pack(len(data)), data], [len(data)], block)

    def write_many(self: PureState, fd: int, payloads: Iterable[Payload],
                   timeout: Optional[float] = None) -> None:
        items = as_payload_list(payloads)
        block = self._blocking(fd, timeout, "write", spin=False)
        conn = self._connection(fd)
        largest = max(map(len, items), default=0)
        if largest > self._max_message_size:
            raise MessageTooLargeError(too_large_text(largest, self._max_message_size))
        if conn.write_closed or conn.closing:
            raise closed_by_peer(fd)
        pack = HEADER.pack
        # Frames gathered into one buffer per batch (one copy, one system call
        # for many small messages), as native copies small frames into one buffer.
        batches = [b"".join([part for p in items[i:i + WRITE_MANY_BATCH]
                             for part in (pack(len(p)), p)])
                   for i in range(0, len(items), WRITE_MANY_BATCH)]
        if not batches:
            self._write_blocking(conn, [], [], block)   # still flushes the queue, as native does
        for k, batch in enumerate(batches):
            self._write_blocking(conn, [batch], list(map(
                len, items[k * WRITE_MANY_BATCH:(k + 1) * WRITE_MANY_BATCH])), block)

    def _write_blocking(self: PureState, conn: Conn, frame: list[Bytes], lens: list[int],
                        block: Blocking) -> None:
        """Flush conn's queue, then write every byte of `frame` (buffers:
        frames of payload sizes `lens`), waiting as `block` says while the
        socket is full.

        While a frame is being written, conn.stopped records it and how much
        went out (stored with no call since the bytes left). A signal's
        handler that sends on conn meanwhile (a nested write, schedule)
        queues that frame's rest first (_keep_framed), so its message never
        lands inside it; this write then goes on from its next frame, after
        what is queued. Stopped midway (a handler's exception, the timeout),
        the rest of the frame in progress is queued the same way."""
        fd = conn.fd
        # MSG_DONTWAIT, then poll() for room: a send that waits in the kernel
        # returns a partial count when a signal comes, and a handler that
        # raises right after it would leave those bytes unaccounted (the
        # stream then corrupt). poll() moves no bytes: an exception there is
        # harmless (_keep_framed).
        sent, size = 0, sum(map(len, frame))
        mine: Optional[Tuple[list[Bytes], list[int], int]] = None   # our record in conn.stopped
        if conn.stopped is not None:        # an earlier write's rest goes first
            self._keep_framed(conn)
        try:
            while True:
                while conn.queue:
                    if not self._send_queued(conn):
                        block.idle(fd, select.POLLOUT)
                rest = advance(frame, sent)
                sends = sending(conn.io, rest, SEND_NOW)
                # From this check to the send, no call: a handler cannot take
                # the frame's rest in between (the same bytes would go twice).
                if mine is not None and conn.stopped is not mine:
                    sent += frame_rest(lens, sent)      # its rest was queued: the next frame
                    mine = None
                    if not conn.alive:      # by the handler's close(), which sent it
                        raise transfer_error(self, conn, "write", None)
                    continue
                if not rest:
                    break
                mine = (frame, lens, sent)
                conn.stopped = mine
                try:
                    for n in sends:
                        sent += n       # counted and recorded at once (see _sending)
                        mine = (frame, lens, sent)
                        conn.stopped = mine
                    if sent == size:    # every byte out (a handler taking the record now finds no rest)
                        break
                except BlockingIOError:
                    block.idle(fd, select.POLLOUT)
                except InterruptedError:
                    pass
            conn.stopped = None
        except (BrokenPipeError, ConnectionResetError):
            conn.write_closed = True
            conn.stopped = None
            raise closed_by_peer(fd) \
                from None
        except BaseException as e:
            # conn.stopped is this write's record of its frame in progress,
            # or None (nothing begun, or a handler's send queued its rest).
            if conn.alive and not conn.write_closed:
                self._dirty[conn] = None            # flushed by the loop (see _keep_framed)
            # An OS error of the write itself (not the timeout, an IPCError,
            # nor a handler's, with no errno) leaves nothing to keep.
            if isinstance(e, OSError) and not isinstance(e, IPCError) and e.errno is not None:
                conn.stopped = None
                raise transfer_error(self, conn, "write", e.errno) from None  # native's text
            self._keep_framed(conn)
            raise


#: A direct read in progress (read_into's frame read straight into the
#: caller's buffer): its connection, what the decoder had, the header read,
#: how far header and payload got, the buffer (see _read_frame_into).
DirectRead = Tuple[Conn, bytes, bytearray, list[int], memoryview]

#: deque.extend itself (C): what _settle calls with no Python step.
_deque_extend = deque.extend
#: The ERROR of a connection whose stream a signal handler broke between the
#: read of some bytes and their delivery: by raising there (the bytes are
#: lost), or by reading the connection itself (pure only: the core takes no
#: Python step there); the read that finds it raises it.
FRAMING_LOST = ("a signal handler interrupted a read of this connection between its "
                "bytes and their delivery: the stream's framing is lost")


class Reading:
    """PureContext's blocking reads and the event loop's reads."""

    __slots__ = ()
    _direct_read: Optional[DirectRead]     # (PureContext's slot: see _read_frame_into)

    # Each read, woken by another thread (Woken: nothing consumed), makes the
    # calls handed over to it, then reads again (pyipc/_threads.py).

    def read(self: PureState, fd: int, timeout: Optional[float] = None) -> bytes:
        # The timeout first: a bad one is refused even when a message is there.
        block = self._blocking(fd, timeout, "read")
        self._not_in_callback("read")
        if self._direct_read is not None:   # a handler's read, inside a read_into
            self._take_direct_read()
        while True:
            if self._pending:
                message = self._pending.take_message(fd)
                if message is not None:
                    return message
            try:
                return self._receive(fd, 1, block)[0]
            except Woken:
                self._guard.apply(self)

    def read_many(self: PureState, fd: int, max_messages: int = DEFAULT_READ_MANY,
                  timeout: Optional[float] = None) -> list[bytes]:
        check_max_messages(max_messages)
        block = self._blocking(fd, timeout, "read")
        self._not_in_callback("read")
        if self._direct_read is not None:   # (see read)
            self._take_direct_read()
        while True:
            taken = self._pending.take_messages(fd, max_messages)
            try:
                return taken or self._receive(fd, max_messages, block, READ_MANY_BYTES)
            except Woken:
                self._guard.apply(self)

    def read_into(self: PureState, fd: int, buffer: Buffer, timeout: Optional[float] = None) -> int:
        view = writable_view(buffer)
        spin = self._blocking(fd, timeout, "read")   # one busy_poll for the whole call
        self._not_in_callback("read")
        while True:
            try:
                return self._read_into(fd, view, spin)
            except Woken:
                self._guard.apply(self)

    def _read_into(self: PureState, fd: int, view: memoryview, spin: Blocking) -> int:
        """read_into's one try (Woken when another thread wakes it)."""
        if self._direct_read is not None:   # (see read)
            self._take_direct_read()
        reads = self._stream_reads          # (see _read_frame_into)
        size = self._pending.take_into(fd, view)
        if size is not None:
            return size
        conn = self._connection(fd)
        if len(view) >= DIRECT_READ_MIN and conn.kind == CONNECTION:
            size = self._read_frame_into(conn, view, spin, reads)
            if size is None:
                size = self._pending.take_into(fd, view)
            if size is not None:
                return size
        self._receive(fd, 0, spin)      # every new message waits as an event...
        size = self._pending.take_into(fd, view)   # ...and the first is taken
        assert size is not None
        return size

    def _read_frame_into(self: PureState, conn: Conn, view: memoryview,
                         spin: Blocking, reads: int) -> Optional[int]:
        """The next frame of conn read into `view` when it is large (or
        empty) and fits (as native does): its size; else None, with the
        header bytes read given to the decoder. The reads wait as `spin`
        says (poll()).

        While it reads, self._direct_read records it: a signal's handler that
        reads conn meanwhile (a nested read, read_into, wait) first takes what
        it has of the frame (_take_direct_read), and this read, finding its
        record gone before it next touches the stream or the decoder, ends
        with Woken (nothing consumed: the caller takes the next message from
        the events, as after another thread's wake-up). So does a handler's
        read that came since `reads` was counted (_stream_reads), before the
        caller looked at the events."""
        self._check_settled(conn)
        had = conn.decoder.buffered()
        known = min(len(had), HEADER.size)
        header = bytearray(HEADER.size)
        header[:known] = had[:known]
        sock = conn.io
        decoder = conn.decoder
        # How far the header and the payload were read: what the decoder gets
        # back if a signal handler's exception (Ctrl-C) stops the read midway,
        # or a handler's read takes it over, so that no byte is lost or doubled.
        got = [known, 0]
        mine: DirectRead = (conn, had, header, got, view)
        # A handler's read since `reads` may have changed the decoder (`had`
        # is stale) and left messages as events, which come before the frame
        # read here: start again from them. No call from the check to the
        # record: from the record on, a handler's read takes this one over.
        if self._stream_reads != reads:
            raise Woken()
        self._stream_reads += 1
        self._direct_read = mine
        try:
            if not recv_exactly(sock, header, got, 0, HEADER.size, spin, self, mine):
                return self._direct_eof(conn)
            size: int
            (size,) = HEADER.unpack(header)
            if size > self._max_message_size:
                self._drop(conn, None)
                raise MessageTooLargeError(too_large_text(size, self._max_message_size))
            if size > len(view) or 0 < size < DIRECT_READ_MIN:
                # Not read here: the decoder gets the header back (it holds
                # it already when it had more) and the caller reads on. No
                # call from the check to the hand-over (see above).
                start = bytearray(header) if len(had) < HEADER.size else decoder._buf
                if self._direct_read is not mine:
                    raise Woken()
                decoder._buf = start
                self._direct_read = None
                return None
            # The payload bytes the decoder held move to `view`, counted, and
            # only then is the decoder emptied (see _read_so_far); no
            # call from the check on.
            moved = max(len(had) - HEADER.size, 0)
            emptied = bytearray()
            if self._direct_read is not mine:
                raise Woken()
            view[:moved] = had[HEADER.size:]
            got[1] = moved
            decoder._buf = emptied
            if not recv_exactly(sock, view, got, 1, size, spin, self, mine):
                return self._direct_eof(conn)
            if self._direct_read is not mine:   # a handler took the whole frame
                raise Woken()
            self._direct_read = None
            return size
        except ConnectionResetError:
            return self._direct_eof(conn)
        except OSError as e:
            if not isinstance(e, IPCError) and e.errno is not None:
                err = transfer_error(self, conn, "read", e.errno)
                self._drop(conn, str(err))
                raise err from None
            # Ours (an IPCError is an OSError) or a signal handler's (no
            # errno), as raised; what was read is kept.
            self._take_direct_read(mine)
            raise
        except BaseException:
            self._take_direct_read(mine)
            raise
        finally:
            if self._direct_read is mine:       # ended otherwise (EOF, too large)
                self._direct_read = None

    def _take_direct_read(self: PureState, record: Optional[DirectRead] = None) -> None:
        """Give the decoder (or the events) what the direct read in progress
        has of its frame (_read_so_far): before a nested read touches
        the stream, or when that read stops (then only if it is `record`,
        not taken already)."""
        current = self._direct_read
        if current is None or (record is not None and current is not record):
            return
        conn, had, header, got, view = current
        if not conn.alive:
            self._direct_read = None
            return
        kept, whole = self._read_so_far(conn, had, header, got, view)
        # What was read goes back and the record goes, with no call in
        # between: a handler's read never sees the stream without it, nor
        # finds the record to give it back a second time.
        if self._direct_read is not current:    # a handler's read took it meanwhile
            return
        if whole is None:
            conn.decoder._buf = kept
            self._direct_read = None
            return
        pending = self._pending
        for _ in map(_deque_extend, (pending,), ([whole],)):
            self._direct_read = None
        if type(pending) is not EventQueue:
            pending.extend(())              # PendingQueue: the pipe follows the queue

    def _read_so_far(self: PureState, conn: Conn, had: bytes, header: bytearray,
                     got: list[int], view: memoryview) -> Tuple[bytearray, Optional[Event]]:
        """What a direct read stopped midway (a signal handler's exception or
        read) gives back, wherever it stopped, so that no byte is lost or
        doubled: (the decoder's new buffer, None), or (unused, the frame as
        the next message) when it is whole. While the decoder still holds
        what it `had` (not yet emptied): that and the header bytes read
        since. Once emptied: the header and the payload counted in `view`; a
        whole frame is a message (held in the decoder, it waited for more
        bytes to come before a read() or an event saw it)."""
        if conn.decoder.partial:
            known = min(len(had), HEADER.size)
            return bytearray(had + bytes(header[known:got[0]])), None
        if got[0] == HEADER.size and got[1] == HEADER.unpack(header)[0]:
            return bytearray(), Event(_RX, conn.fd, conn.index, bytes(view[:got[1]]))
        return bytearray(bytes(header[:got[0]]) + bytes(view[:got[1]])), None

    def _not_in_callback(self: PureState, what: str) -> None:
        """Reads and waits are refused inside a switch callback, as native's
        core refuses them (there they decode into buffers the loop that
        called the callback is still decoding from)."""
        if self._callback_depth:
            raise IPCError(f"cannot {what} inside a switch callback")

    def _direct_eof(self: PureState, conn: Conn) -> int:
        """The peer closed during a direct read: as read() reports it."""
        self._drop(conn, None)
        raise closed_by_peer(conn.fd)

    def _receive(self: PureState, fd: int, keep: int, spin: Blocking,
                 room: Optional[int] = None) -> list[bytes]:
        """Block until fd delivers at least one new message; return the first
        `keep` of those that came (and, with `room`, no more than `room`
        bytes together, a larger first one alone: read_many's batch, as native
        fills its buffer); the rest wait as MESSAGE_RX events."""
        conn = self._connection(fd)
        msgs, error = self._read_until_message(conn, spin)
        if not msgs:
            assert error is not None    # no message: a bad header stopped the read
            self._drop(conn, None)
            raise MessageTooLargeError(error)
        if room is not None:
            keep = min(keep, _fitting(msgs, room))
        # Messages beyond `keep` wait as events, like any received, before the
        # ERROR and DISCONNECTION of a bad header that followed them.
        if len(msgs) > keep:
            self._settle(conn, [Event(_RX, fd, conn.index, m) for m in msgs[keep:]])
            del msgs[keep:]
        if error is not None:
            self._drop(conn, error)
        # The rest is returned: a signal's exception on the way replaces the
        # call's return value (docs/reference.md), as native's.
        conn.decoder.unsettled = False
        return msgs

    def _settle(self: PureState, conn: Conn, events: list[Event]) -> None:
        """Queue the events of messages decoded from conn, marked settled with
        no call in between (a signal's exception lands before both or after)."""
        decoder, pending = conn.decoder, self._pending
        # deque's own extend, in C: the queue fileno() made overrides it in
        # Python (then its readiness pipe is raised after).
        for _ in map(_deque_extend, (pending,), (events,)):
            decoder.unsettled = False
        if type(pending) is not EventQueue:
            pending.extend(())              # PendingQueue: the pipe follows the queue

    def _check_settled(self: PureState, conn: Conn) -> None:
        """A read of conn was stopped by a signal's exception between taking
        bytes from the socket and delivering them (FrameDecoder.unsettled):
        the stream has a hole, so the connection ends (ERROR FRAMING_LOST,
        DISCONNECTION) and the read raises IPCError(FRAMING_LOST), rather
        than decode what follows the hole as frames."""
        if conn.decoder.unsettled:
            self._drop(conn, FRAMING_LOST)
            raise IPCError(FRAMING_LOST)

    def _read_until_message(self: PureState, conn: Conn,
                            spin: Blocking) -> Tuple[list[bytes], Optional[str]]:
        """Read conn until at least one message is whole; (messages, the
        too-large text if a bad header followed them or came first). The
        reads wait in poll() on conn and the wake-up pipe (another thread's
        hand-over ends the wait: Woken), after busy_poll's reads that do not
        wait; a plain read polls first (a recv that finds nothing costs a
        Python exception more)."""
        fd = conn.fd
        self._stream_reads += 1             # (see _stream_reads)
        self._check_settled(conn)
        msgs: list[bytes] = []
        error: Optional[str] = None
        if spin.poll_first and type(conn.io) is socket.socket:     # a RawFd never waits
            spin.idle(fd)
        decoder, io, view = conn.decoder, conn.io, self._scratch_view
        n = 0
        while not msgs and error is None:
            reads = taking(io, view, spin.flags())
            # No call from here to the read: messages a handler's read left
            # as events come before anything read now (see _nested_call).
            if self._nested_events:
                self._nested_events = False
                raise Woken()
            try:
                # Taken and marked with no call in between (see taking).
                for n in reads:
                    decoder.unsettled = True
            except (BlockingIOError, InterruptedError):
                spin.idle(fd)
                continue
            except ConnectionResetError:
                n = 0
            except OSError as e:
                if e.errno is None:     # a signal handler's (a TimeoutError): as it is
                    raise
                # Like the event loop (and native): the connection ends with an
                # ERROR and a DISCONNECTION; the caller gets the same text.
                err = transfer_error(self, conn, "read", e.errno)
                self._drop(conn, str(err))
                raise err from None
            if n == 0:
                self._drop(conn, None)
                raise closed_by_peer(fd)
            try:
                decoder.feed(view[:n], msgs)
            except FrameTooLarge as e:
                error = str(e)
        return msgs, error

    def _read_conn(self: PureState, conn: Conn, budget: float = READ_BUDGET) -> None:
        """Read conn until it would block (or `budget` bytes are read: the
        round's fairness; a peer that is gone is read with no budget, its
        input being all there is); deliver messages."""
        if self._direct_read is not None:   # a handler's wait, inside a read_into
            self._take_direct_read()
        self._stream_reads += 1             # (see _stream_reads)
        if conn.decoder.unsettled:        # see _check_settled
            self._drop(conn, FRAMING_LOST)
            return
        msgs: list[bytes] = []
        error: Optional[str] = None
        ended = False
        view, total = self._scratch_view, 0
        decoder, io, n = conn.decoder, conn.io, 0
        while total < budget:
            try:
                # Taken and marked with no call in between (see taking).
                for n in taking(io, view, DONTWAIT):
                    decoder.unsettled = True
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            except ConnectionResetError:
                n = 0
            except OSError as e:
                error, ended = f"read failed: {os.strerror(e.errno or 0)}", True
                break
            if n == 0:
                ended = True
                if conn.decoder.partial:
                    error = "peer closed the connection in the middle of a message"
                break
            total += n
            try:
                decoder.feed(view[:n], msgs)
            except FrameTooLarge as e:
                error, ended = str(e), True
                break
            if n < len(view):
                break       # drained: another read now would only say EAGAIN
        self._deliver(conn, msgs)
        if ended:
            self._drop(conn, error)

    def _deliver(self: PureState, conn: Conn, msgs: Iterable[bytes]) -> None:
        """MESSAGE_RX events, or forwarded to the switch peer; then the
        decoder is settled (see _check_settled)."""
        if conn.peer is None:
            fd, index = conn.fd, conn.index
            self._settle(conn, [Event(_RX, fd, index, m) for m in msgs])
            return
        for m in msgs:
            if not conn.alive:
                return
            if _unpaired(conn):
                # The switch ended during this read (a callback failed, or
                # switch_end): the rest of it has nowhere to go, and is dropped
                # as the unread rest of the stream is (conn closes once what
                # was forwarded to it is written). Native does the same.
                break
            self._forward(conn, m)
        conn.decoder.unsettled = False


def _unpaired(conn: Conn) -> bool:
    """conn's switch has ended (a function: a callback may have ended it
    since conn.peer was last looked at)."""
    return conn.peer is None


def _fitting(msgs: list[bytes], room: int) -> int:
    """How many of `msgs` fit in `room` bytes together (at least one)."""
    count = 0
    for m in msgs:
        room -= len(m)
        if room < 0 and count:
            break
        count += 1
    return count


def taking(io: "socket.socket | RawFd", view: memoryview, flags: int) -> "map[int]":
    """One read into `view`, made when the result is iterated (see
    syscalls.sending): `for n in taking(...)`, so that no Python step comes
    between the bytes taken and their count. A RawFd (a pipe switched in) is
    read with os.readv itself: its recv_into is a Python method."""
    if type(io) is socket.socket:
        return map(io.recv_into, (view,), (0,), (flags,))
    return map(os.readv, (io.fileno(),), ([view],))
