"""The pure backend's switching (the core's switching.zig): two fds whose
messages are forwarded to each other, through callbacks for a foreign
protocol.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Optional

from .._checks import OnIn, OnOut, as_payload, check_callbacks, too_large_text
from .._types import CBEvent, Event, EventType, IPCError, MessageTooLargeError, UnknownFdError
from .conn_table import CONNECTION, SERVICE, Conn
from .framing import encode

if TYPE_CHECKING:
    from .state import PureState

log = logging.getLogger("pyipc")

_SWITCH_RX = EventType.SWITCH_RX
_SWITCH_TX = EventType.SWITCH_TX


class Switching:
    """PureContext's switched pairs of fds."""

    __slots__ = ()

    def add_switch(self: PureState, fd1: int, fd2: int) -> None:
        if fd1 == fd2:
            raise IPCError(f"cannot switch fd {fd1} with itself")
        c1, c2 = self._switchable(fd1), self._switchable(fd2)
        for c in (c1, c2):
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
        conn = self._switchable(fd)
        check_callbacks(on_in, on_out)
        conn.on_in, conn.on_out = on_in, on_out

    def _switch_in(self: PureState, conn: Conn) -> None:
        if conn.on_in is None:
            self._read_conn(conn)
            return
        try:
            result, payload = conn.on_in(conn.fd)
            result = CBEvent(result)
            if result == CBEvent.NO_ERROR:
                payload = bytes(as_payload(payload))
                if len(payload) > self.max_message_size:
                    raise MessageTooLargeError(
                        too_large_text(len(payload), self.max_message_size))
        except Exception:
            log.exception("switch input callback of fd %d failed", conn.fd)
            result = CBEvent.ERROR
        self._callback_result(conn, result, payload if result == CBEvent.NO_ERROR else None)

    def _callback_result(self: PureState, conn: Conn, result: CBEvent,
                         payload: Optional[bytes]) -> None:
        if result == CBEvent.NO_ERROR and payload is not None:
            self._forward(conn, payload)
        elif result == CBEvent.FD_CLOSING:
            self._drop(conn, None)
        elif result == CBEvent.ERROR:
            self._drop(conn, f"switch callback failed on fd {conn.fd}")

    def _forward(self: PureState, origin: Conn, payload: bytes) -> None:
        self._pending.append(Event(_SWITCH_RX, origin.fd, origin.index, payload))
        dest = origin.peer
        assert dest is not None and dest.alive
        if dest.on_out is None:
            self._enqueue(dest, encode(payload), _SWITCH_TX)
            self._set_interest(origin)       # pause reading if dest is over its bound
            return
        try:
            result = CBEvent(dest.on_out(dest.fd, payload))
        except Exception:
            log.exception("switch output callback of fd %d failed", dest.fd)
            result = CBEvent.ERROR
        if result == CBEvent.NO_ERROR:
            self._pending.append(Event(_SWITCH_TX, dest.fd, dest.index))
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
