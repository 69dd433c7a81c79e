"""Argument checks and error texts shared by both backends.

Both backends must refuse the same arguments with the same error class and
the same text (the tests compare them), so each check and each text is
written once, here. This module imports nothing of pyipc but its types.
"""

from __future__ import annotations

import math
import threading
from typing import Callable, Optional, Tuple, Union, overload

from ._types import (MAX_BUSY_POLL, MAX_CONNECTIONS_LIMIT, MAX_MESSAGE_SIZE_LIMIT,
                     MAX_QUEUE_SIZE_LIMIT, MAX_READ_MANY, MAX_SWITCH_END_REASON, MAX_TIMER,
                     CBEvent, ConnectionClosedError, InvalidNameError)

OnIn = Callable[[int], Tuple[CBEvent, Optional[bytes]]]
OnOut = Callable[[int, bytes], CBEvent]
#: A payload as the socket layer takes it (as_payload's result): bytes, or a
#: memoryview of bytes (format "B", one dimension, contiguous).
Bytes = Union[bytes, memoryview]

#: The WARNING of close(), close_all() and leaving `with` for each fd whose
#: scheduled messages could not go out within the linger (args: fd, count).
DISCARD_TEXT = "closing fd %d discards %d scheduled message(s)"


# -- error texts -----------------------------------------------------------------
def closed_by_peer(fd: int) -> ConnectionClosedError:
    """The error of a read or write on a connection whose peer is gone."""
    return ConnectionClosedError(f"connection on fd {fd} is closed by the peer")


def too_large_text(size: int, limit: int) -> str:
    """The message text used for a payload over `max_message_size`."""
    return f"message of {size} bytes exceeds max_message_size ({limit})"


def is_too_large_text(text: str) -> bool:
    """Whether an ERROR's text is too_large_text's (a frame over the limit)."""
    return text.startswith("message of ") and " bytes exceeds max_message_size (" in text


def buffer_too_small_text(size: int, message: int) -> str:
    """read_into()'s MessageTooLargeError text: the message stays queued."""
    return f"buffer of {size} bytes is too small for a message of {message} bytes"


# -- arguments of the calls --------------------------------------------------------
def _require_int(name: str, value: object) -> None:
    """An int, not a bool (TypeError otherwise): the rule of every count and fd."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be int, not {type(value).__name__}")


def check_fd(fd: object) -> None:
    """A fd is an int, not a bool (TypeError otherwise)."""
    _require_int("fd", fd)


def check_name(name: object) -> None:
    """A service name is a str (TypeError otherwise) that can be a file name:
    UTF-8, where a surrogate escape (a file name's undecodable byte, as
    os.fsdecode gives it) stands for its byte; another lone surrogate is an
    InvalidNameError on both backends. The rest of its text is checked by
    the run directory's rules (pyipc._rundir, the core's rundir.zig)."""
    if not isinstance(name, str):
        raise TypeError(f"service name must be str, not {type(name).__name__}")
    try:
        name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise InvalidNameError("invalid service name: a lone surrogate that is not an "
                               "undecodable byte's escape cannot be a file name") from None


def check_callbacks(on_in: object, on_out: object) -> None:
    """set_switch_callbacks()'s callbacks: each callable or None."""
    for name, cb in (("on_in", on_in), ("on_out", on_out)):
        if cb is not None and not callable(cb):
            raise TypeError(f"{name} must be callable or None")


@overload
def check_timeout(timeout: None) -> None: ...
@overload
def check_timeout(timeout: float) -> float: ...
@overload
def check_timeout(timeout: Optional[float]) -> Optional[float]: ...
def check_timeout(timeout: Optional[float]) -> Optional[float]:
    """A blocking call's `timeout=`: None (no limit) or seconds from 0 to
    threading.TIMEOUT_MAX, as Python's own blocking calls take them."""
    if timeout is None:
        return None
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool):
        raise TypeError(f"timeout must be None or a number of seconds, not {type(timeout).__name__}")
    if not timeout >= 0 or timeout == math.inf:   # NaN fails >= 0
        raise ValueError("timeout must be None or a finite number of seconds >= 0")
    if timeout > threading.TIMEOUT_MAX:
        # Python's own bound for blocking calls (Lock.acquire, socket): a
        # larger one overflows the clocks of both backends (int too: 10**400).
        raise ValueError("timeout must be at most threading.TIMEOUT_MAX "
                         f"({threading.TIMEOUT_MAX} s)")
    return float(timeout)


def check_linger(linger: float) -> float:
    """`Context(linger=)`: seconds from 0 to threading.TIMEOUT_MAX that
    closing waits for scheduled messages (the bound of check_timeout)."""
    if not isinstance(linger, (int, float)) or isinstance(linger, bool):
        raise TypeError(f"linger must be a number of seconds, not {type(linger).__name__}")
    if not linger >= 0 or linger == math.inf:   # NaN fails >= 0
        raise ValueError("linger must be a finite number of seconds >= 0")
    if linger > threading.TIMEOUT_MAX:
        # A larger one overflows the core's microseconds (int64_t: 1e13 s
        # raised OverflowError in native, after closing fd with no warning).
        raise ValueError("linger must be at most threading.TIMEOUT_MAX "
                         f"({threading.TIMEOUT_MAX} s)")
    return float(linger)


def check_max_messages(max_messages: int) -> None:
    """read_many()'s bound: an int from 1 to MAX_READ_MANY."""
    _require_int("max_messages", max_messages)
    if not 1 <= max_messages <= MAX_READ_MANY:
        raise ValueError(f"max_messages must be between 1 and {MAX_READ_MANY}")


#: The largest `high_water` of pyipc.aio (bytes): an int64, as max_queue_size.
MAX_HIGH_WATER = MAX_QUEUE_SIZE_LIMIT


def check_high_water(value: object, name: str = "high_water") -> None:
    """pyipc.aio's high-water marks (`Context(high_water=)`,
    `set_write_buffer_limits()`): an int of bytes from 0 to MAX_HIGH_WATER.
    A float would slip past the comparisons that apply it (NaN compares
    false: no back-pressure at all), so it is refused as every count is."""
    _require_int(name, value)
    if not 0 <= value <= MAX_HIGH_WATER:  # type: ignore[operator]
        raise ValueError(f"{name} must be between 0 and {MAX_HIGH_WATER}, not {value!r}")


def check_timer(value: Optional[int]) -> None:
    """The `timer` property: None or milliseconds from 0 to MAX_TIMER."""
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"timer must be None or int, not {type(value).__name__}")
    if value < 0:
        raise ValueError("timer must be None or >= 0 ms")
    if value > MAX_TIMER:
        raise ValueError(f"timer must be at most {MAX_TIMER} ms")


def check_busy_poll(value: int) -> None:
    """The `busy_poll` property: microseconds from 0 to MAX_BUSY_POLL."""
    _require_int("busy_poll", value)
    if not 0 <= value <= MAX_BUSY_POLL:
        raise ValueError(f"busy_poll must be between 0 and {MAX_BUSY_POLL} us")


def check_limits(max_message_size: int, max_queue_size: int, max_connections: int) -> None:
    """Context()'s limits: ints, each in its range."""
    for name, value in (("max_message_size", max_message_size),
                        ("max_queue_size", max_queue_size),
                        ("max_connections", max_connections)):
        _require_int(name, value)
    if not 1 <= max_message_size <= MAX_MESSAGE_SIZE_LIMIT:
        raise ValueError(f"max_message_size must be between 1 and {MAX_MESSAGE_SIZE_LIMIT}")
    if max_queue_size < max_message_size + 4:
        raise ValueError("max_queue_size must be at least max_message_size + 4")
    if max_queue_size > MAX_QUEUE_SIZE_LIMIT:
        raise ValueError(f"max_queue_size must be at most {MAX_QUEUE_SIZE_LIMIT}")
    if not 1 <= max_connections <= MAX_CONNECTIONS_LIMIT:
        raise ValueError(f"max_connections must be between 1 and {MAX_CONNECTIONS_LIMIT}")


# -- the switching extension (switch_send, switch_end, switch_events) ------------------
def check_switch_data(data: object) -> Bytes:
    """switch_send()'s raw bytes: any bytes-like object (not str: raw bytes
    of a foreign protocol have no text encoding to assume)."""
    if isinstance(data, str):
        raise TypeError("data must be bytes-like, not str")
    try:
        view = memoryview(data)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"data must be bytes-like, not {type(data).__name__}") from None
    if not view.c_contiguous:
        return view.tobytes()
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def check_reason(reason: object) -> Optional[bytes]:
    """switch_end()'s reason: None, or a non-empty str of at most
    MAX_SWITCH_END_REASON bytes in UTF-8 (returned encoded; a lone surrogate
    is the ValueError UnicodeEncodeError)."""
    if reason is None:
        return None
    if not isinstance(reason, str):
        raise TypeError(f"reason must be str or None, not {type(reason).__name__}")
    data = reason.encode("utf-8")
    if not data:
        raise ValueError("reason must not be empty (None for no reason)")
    if len(data) > MAX_SWITCH_END_REASON:
        raise ValueError(f"reason must be at most {MAX_SWITCH_END_REASON} bytes in UTF-8")
    return data


def _require_bool(name: str, value: object) -> bool:
    """A bool (TypeError otherwise): a switch given "no" or None must not
    be taken for its truth value."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be bool, not {type(value).__name__}")
    return value


def check_switch_events(value: object) -> bool:
    """The `switch_events` property: a bool."""
    return _require_bool("switch_events", value)


def check_paused(paused: object) -> bool:
    """pause_reading()'s `paused`: a bool, as switch_events."""
    return _require_bool("paused", paused)


# -- payloads and buffers ------------------------------------------------------------
def as_payload(payload: object) -> bytes | memoryview:
    """A payload as something the socket layer takes: str is sent as UTF-8."""
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, str):
        return payload.encode("utf-8")
    try:    # any object: one without the buffer protocol is the TypeError below
        view = memoryview(payload)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"payload must be bytes-like or str, not {type(payload).__name__}") from None
    if not view.c_contiguous:
        return view.tobytes()       # e.g. a strided slice: sent as its bytes, in order
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def as_payload_list(payloads: object) -> list[Bytes]:
    """write_many()'s payloads as a list of bytes-like objects of byte format
    (str as UTF-8), in order; TypeError names the first one that is neither."""
    if isinstance(payloads, (str, bytes, bytearray, memoryview)):
        raise TypeError("payloads must be an iterable of payloads, not one "
                        f"{type(payloads).__name__}")
    try:
        # Not iterable: list() raises the TypeError turned into ours below.
        items = payloads if type(payloads) is list \
            else list(payloads)  # type: ignore[call-overload]
    except TypeError:
        raise TypeError("payloads must be an iterable of payloads, not "
                        f"{type(payloads).__name__}") from None
    # The common case, checked at C speed (list.count compares by identity
    # first: about 15 ns a payload, where a set of the types took 38).
    if list(map(type, items)).count(bytes) == len(items):
        return items
    return [as_payload(p) for p in items]


def writable_view(buffer: object) -> memoryview:
    """read_into()'s buffer as a writable, contiguous memoryview of bytes."""
    try:    # any object: one without the buffer protocol is the TypeError below
        view = memoryview(buffer)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError("buffer must be a writable bytes-like object, not "
                        f"{type(buffer).__name__}") from None
    if view.readonly or not view.c_contiguous:
        raise TypeError("buffer must be a writable, contiguous bytes-like object")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def cut_utf8(data: bytes, size: int) -> bytes:
    """`data` cut to `size` bytes at most, not inside a UTF-8 character (a
    cut one would be shown as U+FFFD): ipcd refusals, as the client keeps
    them and as pyipc's daemons send them (the core's cutUtf8)."""
    if len(data) <= size:
        return data
    end = size
    # Back over the continuation bytes (10xxxxxx) of the character the cut
    # falls in, to its first byte (a character has at most 3 of them).
    while end > size - 3 and data[end] & 0xC0 == 0x80:
        end -= 1
    return data[:end]

