"""One open WebSocket, switched with its service: the switching callbacks
that turn WebSocket messages into pyipc messages and back.

The core calls `on_in` when the client's socket is readable: it reads once,
lets the `websockets` ServerProtocol parse the frames (and queue the replies
it owes: pongs, the close frame), and returns one whole message; when the
read held several, it returns CBEvent.MORE so the core calls again for the
next without waiting for the socket. The core calls `on_out` with each
message of the service: it becomes one binary WebSocket message. Every byte
for the client goes through ctx.switch_send, so the core's send queue of the
client's fd orders it and bounds it (backpressure: while that queue is over
the context's max_queue_size the core stops reading the service).

Messages toward the service are also counted (credit.py): past a count the
client is no longer read (pause_reading) until the service takes some, as a
queued message costs more memory than the bytes the core's bound counts.

The service's side is read by `on_service_in` through a ServiceReader
(service_side.py), so that the service's end becomes a close frame with a code.

Message mapping: a binary message is one pyipc message (its bytes); a text
message is one pyipc message too, its UTF-8 bytes (what ctx.write(fd, str)
sends); every message from the service is sent as binary (a pyipc payload has
no text/binary flag).
"""

from __future__ import annotations

import collections
import logging
import os
import struct
import time
from typing import Callable, Deque, Optional, Sequence, Tuple, Union

from websockets.frames import CloseCode, Frame, Opcode
from websockets.protocol import Protocol, State

from ... import CBEvent, Context, QueueFullError
from ..._checks import cut_utf8
from ..._types import IPCError
from .credit import Credit
from .handshake import READ_SIZE
from .service_side import ServiceReader
from .transport import Plain, Tls, TransportClosed

#: A pyipc frame's header: the payload's length, 4 bytes big-endian.
_HEADER = struct.Struct(">I")

log = logging.getLogger("pyipc.daemons.websocketd")

_DATA = (Opcode.TEXT, Opcode.BINARY)

#: Seconds between two tries to queue the replies owed to a client (pongs, a
#: close frame) that its queue refused, being over its bound (backpressure: the
#: client reads slower than its service writes). The service's next message
#: takes them along at once (on_out is never refused); this is for a service
#: that sends nothing more.
OWED_RETRY = 0.05

#: later(delay, callback): the daemon's call_later.
Later = Callable[[float, Callable[[], None]], object]


class Session:
    """A WebSocket client's fd switched with its service's fd."""

    __slots__ = ("ctx", "fd", "service_fd", "service", "peer", "protocol", "transport",
                 "linger", "_parts", "_text", "_messages", "_ending", "_ended", "_service",
                 "_credit", "_paused", "_not_read", "_owed", "_paying", "_end_after",
                 "_end_by", "later", "flush_timeout")

    def __init__(self, ctx: Context, fd: int, service_fd: int, service: str, peer: str,
                 protocol: Protocol, transport: Union[Plain, Tls],
                 linger: Callable[["Session", int], None], later: Later,
                 flush_timeout: float) -> None:
        self.ctx = ctx
        self.later = later
        # Seconds an end waits for the close frame to fit the client's queue.
        self.flush_timeout = flush_timeout
        # linger(session, dup_fd): the switch ended (see _end); the daemon
        # watches dup_fd (a dup of the client's socket, or -1 for none) until
        # the client answers our close frame, and cuts a client that does
        # not read what was left for it.
        self.linger = linger
        self.fd = fd
        self.service_fd = service_fd
        self.service = service
        self.peer = peer
        self.protocol = protocol
        self.transport = transport
        # The message being read, its fragments joined as they come: one
        # buffer, bounded by max_message_size (a list of them cost ~50 bytes
        # per fragment, and empty ones counted toward no bound).
        self._parts = bytearray()
        self._text = False                     # ... which is a text message
        self._messages: Deque[bytes] = collections.deque()   # whole, not yet returned
        self._ending: Optional[str] = None     # why the WebSocket is closing
        self._ended = False                    # switch_end was called
        self._service = ServiceReader(service_fd, ctx.max_message_size)
        # Messages toward the service.
        self._credit = Credit(ctx.max_queue_size, ctx.max_message_size)
        self._paused = False                   # the client is not read (_credit over)
        self._not_read = False                 # pause_reading of the client is on
        # Bytes for the client its queue refused (over its bound), in order:
        # queued as soon as they fit (_pay); the client is not read meanwhile.
        self._owed = bytearray()
        self._paying = False                   # a _pay timer is set
        self._end_after: Optional[Tuple[str, bool]] = None   # an _end waiting for _owed
        self._end_by = 0.0                     # ... until then (monotonic)

    # ------------------------------------------------------------ callbacks

    def on_in(self, fd: int) -> Tuple[CBEvent, Optional[bytes]]:
        """The client's socket is readable (or MORE asked to be called).
        Every message is counted toward the service's Credit; a mark is
        scheduled rather than returned; while paused, nothing is returned
        (what was read waits for feed_early)."""
        if not self._paused and not self._owed and not self._messages \
                and self._ending is None:
            self._receive()
        while self._messages and not self._paused:
            payload = self._messages.popleft()
            if self._credit.mark_due(len(payload)):
                if self._schedule(payload):
                    continue
                if self._credit.marks_pending():
                    # No room for it: it waits (feed_early at the next
                    # MESSAGE_TX), and the client is not read meanwhile.
                    # Forwarded unmarked, it would leave bytes queued past
                    # the unmarked room (credit.py) with nothing to report them.
                    self._messages.appendleft(payload)
                    self._set_paused(True)
                    return CBEvent.IGNORE, None
            self._credit.forwarded(len(payload))
            self._pause_if_over()
            more = bool(self._messages) or self._ending is not None
            return (CBEvent.MORE if more else CBEvent.NO_ERROR), payload
        if self._ending is not None and not self._messages:
            self._end(self._ending, error=self.failed())
        return CBEvent.IGNORE, None

    def on_out(self, fd: int, payload: bytes) -> CBEvent:
        """One message of the service: one binary WebSocket message, after
        the replies owed to the client (from on_out nothing is refused)."""
        result = CBEvent.NO_ERROR
        if self.protocol.state is State.OPEN:
            self.protocol.send_binary(payload)
        else:
            # The client is closing: it no longer takes messages (RFC 6455 7.1.2).
            log.debug("%s: %d-byte message for a closing WebSocket dropped",
                      self.peer, len(payload))
            result = CBEvent.IGNORE
        out = bytes(self._owed) + self.transport.send(b"".join(self.protocol.data_to_send()))
        if self._owed:
            self._owed.clear()
            self._apply_reading()
        if out:
            try:
                self.ctx.switch_send(self.fd, out)
            except IPCError as e:          # the fd is already gone
                log.debug("%s: %s", self.peer, e)
        return result

    def on_service_in(self, fd: int) -> Tuple[CBEvent, Optional[bytes]]:
        """The service's socket is readable (or MORE asked to be called):
        its next message goes to on_out; its end closes the WebSocket."""
        service = self._service
        if not service.messages and service.end is None:
            service.read()
        if service.messages:
            payload = service.messages.popleft()
            more = bool(service.messages) or service.end is not None
            return (CBEvent.MORE if more else CBEvent.NO_ERROR), payload
        if service.end is not None:
            self.close(*service.end)
        return CBEvent.IGNORE, None

    # ------------------------------------------------------------ from the daemon

    def take_early_messages(self, rest: bytes) -> None:
        """Whole messages the client sent along with its request (`rest`: the
        bytes after it, parsed now that the protocol is OPEN, so that a close
        or a broken frame among them is acted on): they wait in the session
        and go to the service first (`feed_early`). The replies they call
        for (pongs, a close frame) wait in the protocol until `start()`."""
        if rest:
            self.protocol.receive_data(rest)
        if self.transport.ended:        # TLS ended with the request: start() ends it
            self.protocol.receive_eof()
        self.take_early_frames(self.protocol.events_received())

    def take_early_frames(self, frames: Sequence[object]) -> None:
        """The whole messages of frames parsed along with the handshake (a
        dialled WebSocket's: they came with the remote's 101), as
        take_early_messages."""
        self._parse(frames)

    def start(self) -> None:
        """Right after the switch: hand the service the early messages that
        fit its queue, send the replies early frames called for, and end a
        WebSocket that closed along with its request (its close frame, a
        protocol error or EOF came with it), as no read will come to notice
        it (once its early messages are all handed over)."""
        self._flush()
        self._note_closing()
        self.feed_early()

    def feed_early(self) -> None:
        """Hand the service the messages waiting in the session (the early
        ones, or those read before a pause) while its queue has room, in
        bytes and in messages (_credit): back-pressure, as the core's. The
        daemon calls it again each time a message scheduled is written
        (service_wrote); new messages of the client wait behind them (on_in
        returns these first). Once none is left, a closing WebSocket ends.
        A mark is refused only while another is pending (credit.py's
        unmarked room), so messages never wait here with no MESSAGE_TX to come."""
        while self._messages and not self._ended and not self._credit.over():
            if self._forward_held(self._credit.before_mark()):
                continue
            if not self._schedule(self._messages[0]):
                return                          # the rest at the pending mark's MESSAGE_TX
            self._messages.popleft()
        if self._ending is not None and not self._messages:
            self._end(self._ending, error=self.failed())

    def service_wrote(self) -> None:
        """A message scheduled for the service was written (MESSAGE_TX), and
        all queued before it: the client is read again below the limit, and
        the messages waiting in the session go on."""
        self._credit.written()
        if self._paused and self._credit.may_resume() and not self._ended:
            self._set_paused(False)
        self.feed_early()

    def _forward_held(self, count: int) -> bool:
        """Hand the service up to `count` held messages (none of them a mark)
        framed in one switch_send, as the core frames what on_in returns:
        one call for the run, no MESSAGE_TX each; within the bytes that may
        go unmarked. False when none went (no count, no room before a mark,
        or the service's queue is over its bound: a mark then)."""
        run: list[bytes] = []
        size = 0
        piece = min(max(1, self.ctx.max_queue_size // 2), self._credit.unmarked_left())
        for payload in self._messages:
            if len(run) == count or size + 4 + len(payload) > piece:
                break
            run.append(payload)
            size += 4 + len(payload)
        if not run:
            return False
        try:
            self.ctx.switch_send(self.service_fd,
                                 b"".join(b for p in run for b in (_HEADER.pack(len(p)), p)))
        except IPCError:                        # QueueFullError, or the fd is gone
            return False
        for payload in run:
            self._messages.popleft()
            self._credit.forwarded(len(payload))
        return True

    def _schedule(self, payload: bytes) -> bool:
        """Schedule one message for the service (a mark); False when its
        queue has no room (or is gone)."""
        try:
            self.ctx.schedule(self.service_fd, payload)
        except QueueFullError:
            return False
        except IPCError as e:                   # the service's fd is gone
            log.debug("%s: %s", self.peer, e)
            return False
        self._credit.scheduled()
        self._pause_if_over()
        return True

    def _pause_if_over(self) -> None:
        if not self._paused and self._credit.over():
            self._set_paused(True)

    def _set_paused(self, paused: bool) -> None:
        """Stop (or resume) reading the client's socket for the credit."""
        self._paused = paused
        self._apply_reading()

    def _apply_reading(self) -> None:
        """Read the client unless the credit is over or replies are owed to
        it (then its pings wait in the kernel: at most one read's pongs are
        owed, however many pings it sends without reading)."""
        stop = self._paused or bool(self._owed)
        if stop == self._not_read:
            return
        try:
            self.ctx.pause_reading(self.fd, stop)
        except IPCError as e:                   # the client's fd is gone
            log.debug("%s: %s", self.peer, e)
            return
        self._not_read = stop

    def close(self, code: int, reason: str) -> None:
        """Close the WebSocket with `code` (the service went away, the daemon
        stops), after what is queued for the client; then the service side."""
        if self._ended:
            return
        if self.protocol.state is State.OPEN:
            # A close frame's reason holds 123 bytes of UTF-8 at most.
            self.protocol.send_close(code, cut_utf8(reason.encode(), 120).decode())
            self._flush()
        self._end(f"{code} {reason}", error=code == CloseCode.INTERNAL_ERROR)

    def going_away(self, reason: str) -> None:
        """The daemon stops: queue a close frame (1001); closing the context
        then writes it (within its linger) and closes both sides."""
        if not self._ended and self.protocol.state is State.OPEN:
            self.protocol.send_close(CloseCode.GOING_AWAY, reason)
            self._flush()
            log.info("%s: /%s closed: 1001 %s", self.peer, self.service, reason)

    def release(self) -> None:
        """Both fds are gone: close the dup of the service's socket, and do
        nothing more for them. A _pay timer still set finds the session
        ended: the fd numbers may be another connection's by then (it sent
        the owed bytes there, and ended that connection)."""
        self._ended = True
        self._owed.clear()
        self._end_after = None
        self._service.close()

    # ------------------------------------------------------------ reading

    def _receive(self) -> None:
        try:
            data = os.read(self.fd, READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._ending = f"read failed: {e.strerror}"
            return
        try:
            plain = self.transport.receive(data)
        except TransportClosed as e:
            self._ending = str(e)
            return
        if plain:
            self.protocol.receive_data(plain)
        if not data or self.transport.ended:    # (TLS ended after that plaintext)
            self.protocol.receive_eof()
        self._collect()

    def _collect(self) -> None:
        """Frames parsed -> whole messages; replies owed -> the client."""
        self._parse()
        self._flush()
        self._note_closing()

    def _parse(self, frames: Optional[Sequence[object]] = None) -> None:
        """Data frames -> whole messages (`frames`: those already taken from
        the protocol, else its new ones)."""
        for frame in self.protocol.events_received() if frames is None else frames:
            if isinstance(frame, Frame) and (frame.opcode in _DATA
                                             or frame.opcode is Opcode.CONT):
                if not self._fragment(frame):
                    return      # failed: nothing after it is taken (RFC 6455 7.1.7)

    def _note_closing(self) -> None:
        if self.protocol.state is not State.OPEN and self._ending is None:
            self._ending = self._why_closing()

    def _fragment(self, frame: Frame) -> bool:
        """Take one data frame; False when it failed the WebSocket."""
        if frame.opcode is not Opcode.CONT:
            self._text = frame.opcode is Opcode.TEXT
        if frame.fin and not self._parts:
            message = bytes(frame.data)            # unfragmented: no buffer
        else:
            self._parts += frame.data
            limit = self.ctx.max_message_size
            if len(self._parts) > limit:
                self.protocol.fail(CloseCode.MESSAGE_TOO_BIG,
                                   f"fragmented message over {limit} bytes")
                return False
            if not frame.fin:
                return True
            message, self._parts = bytes(self._parts), bytearray()
        if self._text and not _valid_utf8(message):
            self.protocol.fail(CloseCode.INVALID_DATA, "invalid UTF-8 in a text message")
            return False
        self._messages.append(message)
        return True

    def _why_closing(self) -> str:
        received = self.protocol.close_rcvd
        if received is not None:
            return f"the client closed the WebSocket ({received.code} {received.reason!r})"
        sent = self.protocol.close_sent
        if sent is not None:
            return f"closed with {sent.code} ({sent.reason})"
        return "the client closed the connection"

    # ------------------------------------------------------------ writing

    def _flush(self) -> None:
        """Queue for the client what the protocol (and TLS) has to send. A
        queue over its bound is backpressure, not a dead client: what it
        refuses (pongs, a close frame) is owed, queued as soon as it fits
        (the service's next message, or _pay), never dropped (they were: the
        WebSocket ended with no close frame and the messages queued lost).
        A client that never reads is cut by FLUSH_TIMEOUT or dead-peer
        detection, as without replies."""
        out = self.transport.send(b"".join(self.protocol.data_to_send()))
        if not out or self._ended:
            return
        self._owed += out
        self._queue_owed()
        if self._owed:
            self._apply_reading()
            self._pay_later()

    def _queue_owed(self) -> None:
        """Queue what is owed to the client, in pieces its bound takes, as
        far as its queue has room."""
        bound = self.ctx.max_queue_size
        while self._owed:
            piece = bytes(self._owed[:bound])
            try:
                self.ctx.switch_send(self.fd, piece)
            except QueueFullError:
                return
            except IPCError as e:          # the fd is already gone
                log.debug("%s: %s", self.peer, e)
                self._owed.clear()
                return
            del self._owed[:len(piece)]

    def _pay_later(self) -> None:
        if not self._paying:
            self._paying = True
            self.later(OWED_RETRY, self._pay)

    def _pay(self) -> None:
        """OWED_RETRY later: queue what is still owed; once it is all queued,
        read the client again, or end (an end waits for its close frame).
        An end whose close frame does not fit within flush_timeout ends
        without it."""
        self._paying = False
        if self._ended:
            return
        self._queue_owed()
        if self._owed:
            if self._end_after is None or time.monotonic() < self._end_by:
                self._pay_later()
                return
            log.info("%s: /%s: the client did not read within %g s: closed without "
                     "our close frame", self.peer, self.service, self.flush_timeout)
            self._owed.clear()
        self._apply_reading()
        if self._end_after is not None:
            self._end(*self._end_after)

    def failed(self) -> bool:
        """Whether the WebSocket ends on a failure (not a close handshake):
        an ERROR event says why, and the daemon half-closes the client's
        socket once our close frame is out, then reads it to its end
        (linger_read)."""
        sent = self.protocol.close_sent
        return sent is not None and sent.code not in (CloseCode.NORMAL_CLOSURE,
                                                      CloseCode.GOING_AWAY) \
            and self.protocol.close_rcvd is None

    def _end(self, reason: str, error: bool) -> None:
        """End the switch: what is queued for the client is written, then
        both the client and the service connection are closed. A failure
        (`error`) is also an ERROR event with the reason."""
        if self._ended or self._end_waits(reason, error):
            return
        self._ended = True
        log.info("%s: /%s closed: %s", self.peer, self.service, reason)
        # We sent a close frame and the client has not answered yet: RFC 6455
        # (7.1.1) wants its answer before the TCP close; closing now would
        # make our socket answer it with a reset (browsers then report an
        # unclean close). A dup of the socket keeps it open for the answer
        # while switch_end writes the close frame and releases both sides.
        waits = self.protocol.close_sent is not None and self.protocol.close_rcvd is None \
            and self.protocol.state is not State.CLOSED
        dup = self._dup_for_answer() if waits else -1
        try:
            self.ctx.switch_end(self.fd, reason[:200] if error else None)
        except IPCError as e:
            log.debug("%s: %s", self.peer, e)
        self.linger(self, dup)

    def _end_waits(self, reason: str, error: bool) -> bool:
        """Whether the end waits for what is owed to the client (its close
        frame): switch_end would drop it. The service is not read meanwhile
        (its end would be seen again and again)."""
        if not self._owed:
            self._end_after = None
            return False
        if self._end_after is None:
            self._end_after = (reason, error)
            self._end_by = time.monotonic() + self.flush_timeout
            try:
                self.ctx.pause_reading(self.service_fd, True)
            except IPCError as e:
                log.debug("%s: %s", self.peer, e)
        return True

    def _dup_for_answer(self) -> int:
        """A dup of the client's socket, to wait for its close answer; -1
        when none can be made (out of fds): the close frame is still sent,
        only the TCP close comes without waiting for the answer."""
        try:
            return os.dup(self.fd)
        except OSError as e:
            log.warning("%s: /%s: cannot wait for the client's close answer (%s): "
                        "the connection closes after our close frame", self.peer,
                        self.service, e.strerror)
            return -1

    def linger_read(self, fd: int) -> bool:
        """The dup of the client's socket is readable: read what came; True
        once the close frame answering ours (or the end) arrived."""
        try:
            data = os.read(fd, READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True
        try:
            plain = self.transport.receive(data)
        except TransportClosed:
            return True
        if plain:
            self.protocol.receive_data(plain)
        if not data or self.transport.ended:
            self.protocol.receive_eof()
        self.protocol.events_received()       # data after our close frame is discarded
        # After a failure (1009, 1007...) the protocol discards what comes (no
        # answer can be recognised): read until the client's EOF (or the
        # daemon's CLOSE_TIMEOUT), a lingering close. Closed at the first
        # bytes, the rest of the client's input (an oversize message being
        # sent) stayed unread and the close became a reset, which often
        # reached the client before our close frame was read: no 1009.
        return not data or self.transport.ended or self.protocol.close_rcvd is not None


def _valid_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
