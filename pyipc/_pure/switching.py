"""The pure backend's switching (the core's switching.zig): two fds whose
messages are forwarded to each other, through callbacks for a foreign
protocol; and the switching extension: `on_in` returning MORE,
switch_send(), switch_end() and switch_events.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Optional

from .._checks import (OnIn, OnOut, as_payload, check_callbacks, check_fd, check_reason,
                       check_switch_data, closed_by_peer, too_large_text)
from .._types import (MAX_DRAIN_CALLS, MAX_MORE_PER_ROUND, Buffer, CBEvent, Event, EventType,
                      IPCError, MessageTooLargeError, QueueFullError, UnknownFdError)
from .conn_table import CONNECTION, SERVICE, Conn
from .framing import encode

if TYPE_CHECKING:
    from .state import PureState

log = logging.getLogger("pyipc")

_SWITCH_RX = EventType.SWITCH_RX
_SWITCH_TX = EventType.SWITCH_TX
_ERROR = EventType.ERROR
#: What on_in may return with a payload to forward.
_FORWARDED = (CBEvent.NO_ERROR, CBEvent.MORE)


class Switching:
    """PureContext's switched pairs of fds."""

    __slots__ = ()

    def add_switch(self: PureState, fd1: int, fd2: int) -> None:
        check_fd(fd1)           # both are ints before either is looked up (as native)
        check_fd(fd2)
        if fd1 == fd2:
            raise IPCError(f"cannot switch fd {fd1} with itself")
        c1, c2 = self._switchable(fd1), self._switchable(fd2)
        for c in (c1, c2):
            # A side whose switch ended and still writes what is queued for
            # it, or whose write failed: its end would close the new
            # partner, as switch_send refuses it (the core's switching.add).
            if c.closing or c.write_closed:
                raise closed_by_peer(c.fd)
            if c.peer is not None:
                raise IPCError(f"fd {c.fd} is already switched")
        c1.peer, c2.peer = c2, c1
        for c in (c1, c2):
            # Foreign fds are read and written without waiting; our own
            # sockets stay in blocking mode (the loop passes MSG_DONTWAIT).
            if c.kind != CONNECTION:
                os.set_blocking(c.fd, False)
            self._set_interest(c)

    def _switchable(self: PureState, fd: int) -> Conn:
        conn = self._lookup(fd)
        if conn.kind == SERVICE:
            raise UnknownFdError(f"fd {fd} is not a connection")
        return conn

    def set_switch_callbacks(self: PureState, fd: int, on_in: Optional[OnIn],
                             on_out: Optional[OnOut]) -> None:
        check_callbacks(on_in, on_out)      # before the fd, as native
        conn = self._switchable(fd)
        conn.on_in, conn.on_out = on_in, on_out

    # -- the extension's calls ---------------------------------------------------
    def _switch_events_changed(self: PureState, value: bool) -> None:
        pass        # _forward reads self._switch_events

    def switch_send(self: PureState, fd: int, data: Buffer) -> None:
        raw = check_switch_data(data)
        conn = self._switched(fd)
        # From fd's own on_out, the output is forwarding: bounded as forwarded
        # frames are (fd's peer is not read while the queue is over), never refused.
        if fd != self._out_fd:
            self._check_send_room(conn, len(raw))
        if raw:
            self._enqueue(conn, bytes(raw), None)     # raw bytes: no event when written
            if conn.peer is not None:
                self._set_interest(conn.peer)         # back-pressure on what feeds it

    def _check_send_room(self: PureState, conn: Conn, size: int) -> None:
        """switch_send's bound: data alone within max_queue_size, and the
        queue not over it already (the state in which its peer is not read)."""
        if size > self._max_queue_size:
            raise QueueFullError(
                f"switch_send of {size} bytes exceeds max_queue_size ({self._max_queue_size})")
        if conn.queued_bytes > self._max_queue_size:
            raise QueueFullError(
                f"send queue of fd {conn.fd} is full ({conn.queued_bytes} bytes queued, "
                f"max_queue_size {self._max_queue_size})")

    def switch_end(self: PureState, fd: int, reason: Optional[str] = None) -> None:
        text = check_reason(reason)
        conn = self._switched(fd)
        peer = conn.peer
        assert peer is not None
        if text is not None:
            self._pending.append(Event(_ERROR, conn.fd, conn.index, None, text.decode()))
        conn.peer = peer.peer = None
        # Each side stops being read, writes what is queued for it, then closes.
        for c in (conn, peer):
            self._more.pop(c, None)
            self._close_after_flush(c)

    def _switched(self: PureState, fd: int) -> Conn:
        """A switched fd that can still be written (the extension's checks, in order)."""
        conn = self._lookup(fd)
        if conn.closing or conn.write_closed:
            raise closed_by_peer(fd)
        if conn.peer is None:
            raise UnknownFdError(f"fd {fd} is not switched")
        return conn

    # -- the event loop's side -----------------------------------------------------
    def _switch_in(self: PureState, conn: Conn) -> None:
        """A switched fd is readable (or its on_in asked for MORE): read it
        with on_in, at most MAX_MORE_PER_ROUND calls, or with pyipc framing."""
        if conn.on_in is None:
            self._read_conn(conn)
            return
        conn.more_round = self._round_no
        result = CBEvent.IGNORE
        for _ in range(MAX_MORE_PER_ROUND):
            result = self._call_in(conn)
            # A call may have unregistered its on_in (or replaced it: the
            # next call is the new one's).
            if result != CBEvent.MORE or not self._may_read(conn) or conn.on_in is None:
                break
        # MORE after the bound, or paused by back-pressure: called again later.
        if result == CBEvent.MORE and self._still_switched(conn):
            self._more[conn] = None
        else:
            self._more.pop(conn, None)

    def _drain_in(self: PureState, conn: Conn) -> None:
        """A write to conn failed (the other end is gone): its on_in reads
        what is left and meets the end itself (a foreign protocol's end may
        call for words of its own: websocketd's close frame) before conn is
        dropped; called while it hands out messages, MAX_DRAIN_CALLS at most."""
        if conn.draining:                   # not inside itself (its on_in may close)
            return
        conn.draining = True
        try:
            for _ in range(MAX_DRAIN_CALLS):
                if not self._still_switched(conn) or self._call_in(conn) not in _FORWARDED:
                    return
        finally:
            conn.draining = False

    def _call_in(self: PureState, conn: Conn) -> CBEvent:
        """One on_in call and what its result does; the result, or IGNORE
        when the call ended the switch itself (nothing more to forward)."""
        assert conn.on_in is not None
        payload: Optional[bytes] = None
        self._callback_depth += 1
        try:
            result, data = conn.on_in(conn.fd)
            result = CBEvent(result)
            if result in _FORWARDED:
                payload = bytes(as_payload(data))
                if len(payload) > self._max_message_size:
                    raise MessageTooLargeError(
                        too_large_text(len(payload), self._max_message_size))
        except Exception:
            log.exception("switch input callback of fd %d failed", conn.fd)
            result = CBEvent.ERROR
        finally:
            self._callback_depth -= 1
        if not conn.alive or (conn.peer is None and result in _FORWARDED):
            # The callback closed fd or ended the switch itself (switch_end):
            # what it returned has nowhere to go.
            return CBEvent.IGNORE
        self._callback_result(conn, result, payload)
        return result

    def _may_read(self: PureState, conn: Conn) -> bool:
        """conn is still switched, not paused (pause_reading: calling its
        on_in reads it), and its peer's queue is within its bound."""
        return (conn.alive and not conn.closing and not conn.read_paused
                and conn.peer is not None
                and conn.peer.queued_bytes <= self._max_queue_size)

    def _still_switched(self: PureState, conn: Conn) -> bool:
        """conn may still be read with its on_in (a MORE it asked for is due)."""
        return conn.alive and not conn.closing and conn.peer is not None \
            and conn.on_in is not None

    def _more_ready(self: PureState) -> bool:
        """Some fd waits for MORE calls and may be read now: the round must not sleep."""
        return any(self._may_read(c) for c in self._more)

    def _run_more(self: PureState) -> None:
        """A round's last step: the fds whose on_in asked for MORE and were
        not called in this round (not readable, or handled before their
        turn) are called now, unless their peer's queue is over its bound."""
        for conn in list(self._more):
            if conn not in self._more:
                continue                        # ended meanwhile
            if not self._still_switched(conn):
                del self._more[conn]
            elif conn.more_round != self._round_no and self._may_read(conn):
                self._switch_in(conn)

    def _callback_result(self: PureState, conn: Conn, result: CBEvent,
                         payload: Optional[bytes]) -> None:
        if result in _FORWARDED and payload is not None:
            self._forward(conn, payload)
        elif result == CBEvent.FD_CLOSING:
            self._drop(conn, None)
        elif result != CBEvent.IGNORE:          # ERROR, or MORE from on_out
            self._drop(conn, f"switch callback failed on fd {conn.fd}")

    def _forward(self: PureState, origin: Conn, payload: bytes) -> None:
        events = self._switch_events
        if events:
            self._pending.append(Event(_SWITCH_RX, origin.fd, origin.index, payload))
        dest = origin.peer
        assert dest is not None         # alive: a side that ends unpairs both
        if dest.on_out is None:
            self._enqueue(dest, encode(payload), _SWITCH_TX if events else None)
            self._set_interest(origin)       # pause reading if dest is over its bound
            return
        self._out_fd = dest.fd                # (an on_out never runs inside another)
        self._callback_depth += 1
        try:
            result = CBEvent(dest.on_out(dest.fd, payload))
        except Exception:
            log.exception("switch output callback of fd %d failed", dest.fd)
            result = CBEvent.ERROR
        finally:
            self._out_fd = -1
            self._callback_depth -= 1
        if not dest.alive:
            return                          # on_out closed it itself
        if result == CBEvent.NO_ERROR:
            if events:
                self._pending.append(Event(_SWITCH_TX, dest.fd, dest.index))
            if origin.alive:
                self._set_interest(origin)  # on_out may have queued (switch_send)
        else:
            self._callback_result(dest, result, None)

    def _close_after_flush(self: PureState, conn: Conn) -> None:
        """The other side of a switch whose peer ended: closed too, but only once
        what was forwarded to it is written, so the ended side's last messages
        are not lost. Meanwhile it is not read (its input has nowhere to go)."""
        conn.peer = None
        if not conn.queue:
            self._drop(conn, None)
            return
        conn.closing = True
        self._set_interest(conn)
