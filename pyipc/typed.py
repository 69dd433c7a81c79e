"""Typed messages: libIPC's convention of one type byte, then the body.

A typed message is an ordinary pyipc payload: its first byte is the message
type (0..255), the rest is the body. A `Registry` maps type numbers to
Python classes and encodes each object's fields as a map, with CBOR (`cbor2`,
the default) or JSON (the standard library), chosen per registry:

    from dataclasses import dataclass
    from pyipc.typed import Registry

    messages = Registry()                 # Registry("json") for JSON bodies

    @messages.register(1)
    @dataclass
    class Ping:
        seq: int
        note: str = ""

    payload = messages.encode(Ping(7))    # b"\\x01" + CBOR {"seq": 7, "note": ""}
    assert messages.decode(payload) == Ping(7)

A message class is a dataclass (its `init` fields are the body; fields with a
default may be absent from a received body) or any class with a `to_dict()`
method and a `from_dict(cls, d)` classmethod (used in preference when a class
has both). Encoding looks the class up exactly: a subclass of a registered class
must be registered itself.

What a field may hold:

* CBOR: everything `cbor2` encodes: None, bools, ints of any size (bignums),
  floats including inf, -inf and nan, bytes, str, lists (tuples come back as
  lists), dicts, sets, dates, Decimal, UUID, ... Datetimes must be timezone-aware
  with an offset of whole minutes (RFC 3339, CBOR tag 0); they come back with a
  fixed offset (a `ZoneInfo` zone becomes its offset at that instant, the same
  instant). Naive datetimes are refused: they would mean different instants to
  the two ends. A received body is refused past the bounds that keep its
  decoding linear (MAX_CBOR_DEPTH, REFUSED_CBOR_TAGS, MAX_CBOR_BIGNUM_BYTES,
  MAX_CBOR_BIGNUMS, MAX_CBOR_COMPOSITE_KEY_ITEMS), and encode() refuses a
  value whose body would break them.
* JSON: strict RFC 8259 JSON, so any JSON parser can read the bodies: None,
  bools, ints (exact between Python peers; other parsers may round those beyond
  2**53; at most `sys.get_int_max_str_digits()` digits, 4300 by default),
  finite floats, str, lists (tuples come back as lists) and dicts with str keys.
  Refused, with the path of the value in the message: bytes, datetimes (plain
  JSON cannot tell an ISO-8601 string from a datetime, so neither round trip
  would be unambiguous), inf and nan, non-str dict keys (`json` would silently
  turn them into strings), and any other type. Use CBOR for those, or convert
  them in `to_dict`/`from_dict`.

Every error is a `TypedMessageError` (a `ValueError`); see each class.
Values are not checked against the class's annotations.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import datetime
import inspect
import io
import itertools
import json
import math
import re
import reprlib
import sys
from typing import (Any, Callable, Dict, FrozenSet, Iterable, Iterator, List, Mapping, Optional,
                    Set, Tuple, Type, TypeVar, Union, overload)

import cbor2

from ._types import Event

__all__ = [
    "Registry", "TypedMessageError", "InvalidTypeNumberError", "DuplicateTypeError",
    "DuplicateClassError", "NotAMessageClassError", "UnregisteredClassError",
    "UnencodableValueError", "UnknownTypeError", "UnexpectedTypeError", "CorruptMessageError",
    "FieldMismatchError", "CODECS", "MAX_TYPE_NUMBER",
]

#: The codecs a `Registry` can use.
CODECS = ("cbor", "json")
#: Highest message type number (the type is one byte).
MAX_TYPE_NUMBER = 255

#: A message class being registered (register() returns it unchanged).
T = TypeVar("T", bound=type)
#: The message class a caller expects from decode(payload, cls).
M = TypeVar("M")
BytesLike = Union[bytes, bytearray, memoryview]


# -- errors ----------------------------------------------------------------------
class TypedMessageError(ValueError):
    """Base class of every typed-message error (a `ValueError`)."""


class InvalidTypeNumberError(TypedMessageError):
    """register() got a type number that is not an int from 0 to 255."""


class DuplicateTypeError(TypedMessageError):
    """register() got a type number that the registry already maps to a class."""


class DuplicateClassError(TypedMessageError):
    """register() got a class that the registry already maps to a type number."""


class NotAMessageClassError(TypedMessageError):
    """register() got something that is not a dataclass nor a to_dict/from_dict class."""


class UnregisteredClassError(TypedMessageError):
    """encode() got an object whose exact class is not registered."""


class UnencodableValueError(TypedMessageError):
    """encode() met a field value that the registry's codec cannot represent."""


class UnknownTypeError(TypedMessageError):
    """decode() met a type number that is not registered; `number` holds it."""

    def __init__(self, message: str, number: int) -> None:
        super().__init__(message)
        self.number = number


class UnexpectedTypeError(TypedMessageError):
    """decode(payload, cls) got a message whose class is not `cls` (nor a
    subclass of it); `number` is its type number, `expected` is `cls`."""

    def __init__(self, message: str, number: int, expected: type) -> None:
        super().__init__(message)
        self.number = number
        self.expected = expected


class CorruptMessageError(TypedMessageError):
    """decode() got an empty payload, a body that is not valid CBOR/JSON, has
    trailing bytes, is not a map with str keys, or from which the class refuses
    to be built (its constructor or `from_dict` raised, or `from_dict`
    returned something that is not an instance of the class)."""


class FieldMismatchError(TypedMessageError):
    """decode() got a body whose fields do not match the class.

    `missing` holds the required fields that are absent, `extra` the ones the
    class does not have (both sorted tuples of names, also in the message).
    """

    def __init__(self, message: str, missing: Tuple[str, ...] = (),
                 extra: Tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.missing = missing
        self.extra = extra


# -- the registry ----------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Entry:
    number: int
    cls: type
    protocol: bool                  # to_dict/from_dict, else dataclass
    fields: Tuple[str, ...]         # dataclass init fields, in order
    required: FrozenSet[str]        # dataclass init fields without a default


class Registry:
    """Maps message type numbers (0..255) to classes, and encodes/decodes them.

    `Registry(codec="cbor")`: `codec` is "cbor" (`cbor2`) or "json" (the
    standard library, strict RFC 8259). Both ends of a connection must use
    registries with the same numbers, classes' fields and codec.
    """

    __slots__ = ("_codec", "_by_number", "_by_class")

    def __init__(self, codec: str = "cbor") -> None:
        if codec not in CODECS:
            raise ValueError(f"codec must be 'cbor' or 'json', not {codec!r}")
        self._codec = codec
        self._by_number: Dict[int, _Entry] = {}
        self._by_class: Dict[type, _Entry] = {}

    @property
    def codec(self) -> str:
        """The codec of the bodies: "cbor" or "json"."""
        return self._codec

    def __repr__(self) -> str:
        types = ", ".join(f"{n}: {e.cls.__name__}" for n, e in sorted(self._by_number.items()))
        return f"<pyipc.typed.Registry codec={self._codec} {{{types}}}>"

    def __len__(self) -> int:
        """How many message types are registered."""
        return len(self._by_number)

    def __contains__(self, item: object) -> bool:
        """Whether a type number, or a class, is registered."""
        if isinstance(item, type):
            return item in self._by_class
        return item in self._by_number

    def __iter__(self) -> Iterator[Tuple[int, type]]:
        """(number, class) of every registered type, by number."""
        return iter([(n, e.cls) for n, e in sorted(self._by_number.items())])

    # -- registration -------------------------------------------------------------
    @overload
    def register(self, number: int) -> Callable[[T], T]: ...

    @overload
    def register(self, number: int, cls: T) -> T: ...

    def register(self, number: int, cls: Optional[T] = None) -> Union[T, Callable[[T], T]]:
        """Register `cls` as message type `number`.

        Used as a decorator (`@registry.register(3)` above the class, which is
        returned unchanged) or called directly (`registry.register(3, Ping)`).
        Raises `InvalidTypeNumberError`, `NotAMessageClassError`,
        `DuplicateTypeError` or `DuplicateClassError`; nothing is
        registered then.
        """
        _check_number(number)
        if cls is None:
            def decorator(c: T) -> T:
                self._add(number, c)
                return c
            return decorator
        self._add(number, cls)
        return cls

    def _add(self, number: int, cls: object) -> None:
        entry = _entry(number, cls)
        if number in self._by_number:
            raise DuplicateTypeError(
                f"message type {number} is already registered to "
                f"{_name(self._by_number[number].cls)}")
        if entry.cls in self._by_class:
            raise DuplicateClassError(
                f"class {_name(entry.cls)} is already registered as message type "
                f"{self._by_class[entry.cls].number}")
        self._by_number[number] = entry
        self._by_class[entry.cls] = entry

    def type_number(self, obj_or_cls: object) -> int:
        """The type number of a registered class (or of an instance of it)."""
        cls = obj_or_cls if isinstance(obj_or_cls, type) else type(obj_or_cls)
        entry = self._by_class.get(cls)
        if entry is None:
            raise UnregisteredClassError(
                f"class {_name(cls)} is not registered in this registry")
        return entry.number

    def message_class(self, number: int) -> type:
        """The class registered as type `number`: InvalidTypeNumberError for
        a number that cannot be one (not an int from 0 to 255), as register()
        says; UnknownTypeError for one not registered."""
        _check_number(number)
        return self._entry_of(number).cls

    def _entry_of(self, number: int) -> _Entry:
        entry = self._by_number.get(number)
        if entry is None:
            known = ", ".join(str(n) for n in sorted(self._by_number)) or "none"
            raise UnknownTypeError(
                f"unknown message type {number} (registered: {known})", number)
        return entry

    # -- encoding -----------------------------------------------------------------
    def encode(self, obj: object) -> bytes:
        """The payload of `obj`: its type byte, then its fields as a map.

        Raises `UnregisteredClassError` when `type(obj)` is not
        registered, `UnencodableValueError` when a value cannot be
        encoded with this codec (the message names the field and the reason).
        """
        entry = self._by_class.get(type(obj))
        if entry is None:
            raise UnregisteredClassError(
                f"cannot encode {_name(type(obj))}: its class is not registered in "
                f"this registry")
        if entry.protocol:
            body = obj.to_dict()  # type: ignore[attr-defined]
            if not isinstance(body, dict):
                raise UnencodableValueError(
                    f"cannot encode {_name(entry.cls)}: to_dict() returned "
                    f"{type(body).__name__}, not dict")
            bad = [k for k in body if not isinstance(k, str)]
            if bad:
                raise UnencodableValueError(
                    f"cannot encode {_name(entry.cls)}: to_dict() returned a key that is "
                    f"not str: {bad[0]!r}")
        else:
            body = {name: getattr(obj, name) for name in entry.fields}
        what = f"{_name(entry.cls)} (message type {entry.number})"
        if self._codec == "json":
            return bytes((entry.number,)) + _json_encode(body, what)
        return bytes((entry.number,)) + _cbor_encode(body, what)

    # -- decoding -----------------------------------------------------------------
    @overload
    def decode(self, payload: BytesLike) -> Any: ...

    @overload
    def decode(self, payload: BytesLike, cls: Type[M]) -> M: ...

    def decode(self, payload: BytesLike, cls: Optional[Type[M]] = None) -> Any:
        """The object a payload carries (an instance of the registered class).

        With `cls`, the message must be of that class (or a subclass of it),
        else `UnexpectedTypeError`: a type checker then knows what
        comes back. Raises `CorruptMessageError` (empty payload, a body
        that is not valid CBOR/JSON or not a map with str keys, a class that
        refuses the values), `UnknownTypeError`, `FieldMismatchError`.
        """
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise TypeError(f"payload must be bytes-like, not {type(payload).__name__}")
        if cls is not None and not isinstance(cls, type):
            raise TypeError(f"cls must be a class, not {type(cls).__name__}")
        data = bytes(payload)
        if not data:
            raise CorruptMessageError("empty payload: a typed message needs at least its "
                                      "type byte")
        entry = self._entry_of(data[0])
        what = f"message type {entry.number} ({_name(entry.cls)})"
        if cls is not None:
            _check_expected(entry, cls, what)
        if self._codec == "json":
            body = _json_decode(data[1:], what)
        else:
            body = _cbor_decode(data[1:], what)
        if not isinstance(body, dict) or not all(isinstance(k, str) for k in body):
            raise CorruptMessageError(
                f"body of {what} must be a map with str keys, not "
                f"{_describe_body(body)}")
        if entry.protocol:
            return _build_protocol(entry, body, what)
        return _build_dataclass(entry, body, what)

    @overload
    def decode_event(self, event: Event) -> Any: ...

    @overload
    def decode_event(self, event: Event, cls: Type[M]) -> M: ...

    def decode_event(self, event: Event, cls: Optional[Type[M]] = None) -> Any:
        """The object carried by a MESSAGE_RX (or SWITCH_RX) event; `cls` as
        for `decode`.

        An event without a message (any other type) raises `ValueError`.
        """
        if not isinstance(event, Event):
            raise TypeError(f"decode_event needs an Event, not {type(event).__name__}")
        if event.message is None:
            raise ValueError(f"event {event.type.name} on fd {event.fd} carries no message")
        return self.decode(event.message) if cls is None else self.decode(event.message, cls)


# -- registration helpers ----------------------------------------------------------
def check_typed_arguments(registry: object, cls: object = None) -> None:
    """TypeError unless `registry` is a Registry and `cls` None or a class:
    what read_typed()/recv_typed() check before reading, so that a wrong
    argument never costs the peer's message (and write_typed() before encoding)."""
    if not isinstance(registry, Registry):
        raise TypeError(f"registry must be a pyipc.typed.Registry, not {type(registry).__name__}")
    if cls is not None and not isinstance(cls, type):
        raise TypeError(f"cls must be a class, not {type(cls).__name__}")


def _name(cls: type) -> str:
    name = getattr(cls, "__qualname__", None) or getattr(cls, "__name__", None)
    return name if isinstance(name, str) else repr(cls)


def _check_expected(entry: _Entry, cls: type, what: str) -> None:
    if not issubclass(entry.cls, cls):
        raise UnexpectedTypeError(f"{what} is not the expected {_name(cls)}", entry.number, cls)


def _check_number(number: object) -> None:
    if not isinstance(number, int) or isinstance(number, bool):
        raise InvalidTypeNumberError(
            f"message type number must be an int from 0 to {MAX_TYPE_NUMBER}, not "
            f"{type(number).__name__}")
    if not 0 <= number <= MAX_TYPE_NUMBER:
        raise InvalidTypeNumberError(
            f"message type number {number} is out of range (0 to {MAX_TYPE_NUMBER})")


def _entry(number: int, cls: object) -> _Entry:
    if not isinstance(cls, type):
        raise NotAMessageClassError(f"register() needs a class, not {type(cls).__name__}")
    to_dict = getattr(cls, "to_dict", None)
    from_dict = inspect.getattr_static(cls, "from_dict", None)
    if callable(to_dict) and isinstance(from_dict, (classmethod, staticmethod)):
        return _Entry(number, cls, True, (), frozenset())
    if dataclasses.is_dataclass(cls):
        fields = tuple(f.name for f in dataclasses.fields(cls) if f.init)
        required = frozenset(
            f.name for f in dataclasses.fields(cls) if f.init
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING)
        params: Mapping[str, inspect.Parameter]
        try:
            params = inspect.signature(cls).parameters
        except (TypeError, ValueError):   # pragma: no cover - builtins only
            params = {}
        hidden = [name for name, p in params.items() if name not in fields
                  and p.default is inspect.Parameter.empty
                  and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if hidden:
            raise NotAMessageClassError(
                f"{_name(cls)} cannot be a message class: its constructor needs "
                f"{', '.join(map(repr, hidden))}, which is not a field (an InitVar?)")
        return _Entry(number, cls, False, fields, required)
    hint = (" (put @registry.register(N) above @dataclass)"
            if getattr(cls, "__annotations__", None) else "")
    raise NotAMessageClassError(
        f"{_name(cls)} is neither a dataclass nor a class with a to_dict() method and a "
        f"from_dict(cls, d) classmethod{hint}")


def _build_dataclass(entry: _Entry, body: Dict[str, Any], what: str) -> Any:
    missing = tuple(sorted(entry.required - body.keys()))
    extra = tuple(sorted(body.keys() - set(entry.fields)))
    if missing or extra:
        parts = []
        if missing:
            parts.append("missing field(s) " + ", ".join(map(repr, missing)))
        if extra:
            parts.append("unexpected field(s) " + ", ".join(map(repr, extra)))
        raise FieldMismatchError(f"{what}: {'; '.join(parts)}", missing, extra)
    try:
        return entry.cls(**body)
    except Exception as e:
        raise CorruptMessageError(
            f"{what}: {_name(entry.cls)} refused the values: {type(e).__name__}: {e}") from e


def _build_protocol(entry: _Entry, body: Dict[str, Any], what: str) -> Any:
    try:
        obj = entry.cls.from_dict(body)  # type: ignore[attr-defined]
    except KeyError as e:
        name = str(e.args[0]) if e.args else "?"
        raise FieldMismatchError(f"{what}: missing field(s) {name!r}", (name,), ()) from e
    except Exception as e:
        raise CorruptMessageError(
            f"{what}: {_name(entry.cls)}.from_dict refused the body: "
            f"{type(e).__name__}: {e}") from e
    # decode(payload, cls) promises a cls (a type checker takes it at its word):
    # a from_dict that returns something else must not get through.
    if not isinstance(obj, entry.cls):
        raise CorruptMessageError(
            f"{what}: {_name(entry.cls)}.from_dict returned {type(obj).__name__}, not "
            f"{_name(entry.cls)}")
    return obj


def _describe_body(body: object) -> str:
    if isinstance(body, dict):
        key = next(k for k in body if not isinstance(k, str))
        return f"a map with the key {_short_repr(key)}"
    return type(body).__name__


def _short_repr(value: object) -> str:
    """A peer's value in an error text: its repr cut to 60 characters, or its
    type when even that fails (a peer's value may be huge or odd)."""
    try:
        return reprlib.repr(value)
    except Exception:
        return f"<{type(value).__name__}>"


# -- CBOR --------------------------------------------------------------------------
class _DatetimeRefused(Exception):
    """Raised inside cbor2 by _cbor_datetime; turned into UnencodableValueError."""


def _datetime_problem(value: datetime.datetime) -> Optional[str]:
    offset = value.utcoffset()
    if offset is None:
        return "naive datetime (no tzinfo): give it a timezone"
    if offset % datetime.timedelta(minutes=1):
        return (f"datetime with a UTC offset of {offset} that is not a whole number of "
                f"minutes (RFC 3339 cannot carry it)")
    return None


def _cbor_datetime(encoder: Any, value: datetime.datetime) -> None:
    problem = _datetime_problem(value)
    if problem:
        raise _DatetimeRefused(problem)
    text = value.isoformat()
    if text.endswith("+00:00"):
        text = text[:-6] + "Z"
    encoder.encode(cbor2.CBORTag(0, text))


def _cbor_memoryview(encoder: Any, value: memoryview) -> None:
    """A memoryview of bytes is bytes, as bytearray is (cbor2 took it for a
    sequence: an array of ints, a list once decoded). Another format (ints,
    floats) is refused: its bytes depend on the machine."""
    if value.format not in ("B", "b", "c"):
        raise ValueError(f"memoryview of format {value.format!r} is not bytes: "
                         "give its bytes (or a list) yourself")
    encoder.encode(value.tobytes())


_CBOR_ENCODERS: Dict[type, Callable[[Any, Any], None]] = {datetime.datetime: _cbor_datetime,
                                                          memoryview: _cbor_memoryview}


def _cbor_dumps(value: object) -> bytes:
    return cbor2.dumps(value, encoders=_CBOR_ENCODERS)


def _cbor_encode(body: Dict[str, Any], what: str) -> bytes:
    if _small_and_plain(body):
        # Nowhere near MAX_CBOR_DEPTH, no cycle: the nesting walk (which cost
        # more than cbor2 itself on such bodies) is not needed, and the
        # receiver's check runs only when a scan of the bytes says it may
        # refuse them. A failure is said by the full path below.
        try:
            data = _cbor_dumps(body)
        except (cbor2.CBORError, ValueError, TypeError):
            pass
        else:
            if _may_be_refused(data):
                _check_as_receiver(body, data, what)
            return data
    seen = _Seen()
    near = _cbor_check_nesting(body, what, seen)
    try:
        data = _cbor_dumps(body)
    except (cbor2.CBORError, _DatetimeRefused, ValueError, TypeError, RecursionError) as e:
        try:
            path, reason = _locate(body, "", _cbor_problem)
        except RecursionError:   # the caller's own stack was already deep
            path, reason = "", _reason(e)
        raise UnencodableValueError(
            f"cannot encode {what} as CBOR: field {path}: {reason}"
            if path else f"cannot encode {what} as CBOR: {_reason(e)}") from None
    for name in near:       # what its leaves add may take it past (rare: tried)
        if _too_deep_to_decode(_cbor_dumps({name: body[name]})):
            raise UnencodableValueError(f"cannot encode {what} as CBOR: field {name}: {_TOO_DEEP}")
    if seen.bignum or not seen.classes <= _PLAIN_VALUES or not seen.keys <= _PLAIN_KEYS:
        _check_as_receiver(body, data, what)    # it may break a bound of decode()'s check
    return data


#: The scalars: the map keys that are not composite.
_PLAIN_KEYS = frozenset({int, float, str, bytes, bool, type(None)})
#: Values that never make a body the receiver's _cbor_check refuses (no tag:
#: but an int past 64 bits, a bignum).
_PLAIN_VALUES = _PLAIN_KEYS | {list, tuple, dict}
#: cbor2 encodes an int as a bignum (tag 2 or 3) outside [-2**64, 2**64).
_BIGNUM = 2 ** 64


#: What encode()'s quick path takes (see _small_and_plain): scalars, and at
#: most _QUICK_ITEMS values in all, in the plain containers cbor2 writes as
#: arrays and maps (and sets, as tag 258).
_QUICK_LEAVES = _PLAIN_KEYS
_QUICK_CONTAINERS = frozenset({list, tuple, dict, set, frozenset})
_QUICK_ITEMS = 256


def _small_and_plain(body: Dict[str, Any]) -> bool:
    """Whether `body` holds only scalars (ints within 64 bits: past them
    cbor2 writes a bignum) and plain containers, at most _QUICK_ITEMS values
    and keys in all: then it nests at most that deep (far below
    MAX_CBOR_DEPTH) and has no cycle (one would count without end)."""
    stack = list(body.values())
    seen = 0
    while stack:
        seen += 1
        if seen > _QUICK_ITEMS:
            return False
        value = stack.pop()
        kind = type(value)
        if kind in _QUICK_LEAVES:
            if kind is int and not -_BIGNUM <= value < _BIGNUM:
                return False
        elif kind is dict:
            stack.extend(value.keys())
            stack.extend(value.values())
        elif kind in _QUICK_CONTAINERS:
            stack.extend(value)
        else:
            return False
    return True


class _Seen:
    """What encode()'s nesting walk met: the classes of the values and of
    the map keys, and whether an int needs a bignum."""

    __slots__ = ("classes", "keys", "bignum")

    def __init__(self) -> None:
        self.classes: Set[type] = set()
        self.keys: Set[type] = set()
        self.bignum = False

    def add(self, items: List[Any], classes: Set[type]) -> None:
        """Items of one level, and their classes."""
        self.classes |= classes
        if int in classes and not self.bignum:
            ints = items if classes <= {int, bool} else [x for x in items if type(x) is int]
            self.bignum = bool(ints) and (max(ints) >= _BIGNUM or min(ints) < -_BIGNUM)


def _check_as_receiver(body: Dict[str, Any], data: bytes, what: str) -> None:
    """UnencodableValueError when decode() would refuse the encoded body
    (REFUSED_CBOR_TAGS: a re.Pattern is tag 35, an email message tag 36;
    MAX_CBOR_BIGNUM_BYTES, MAX_CBOR_BIGNUMS, MAX_CBOR_COMPOSITE_KEY_ITEMS),
    naming the field when one alone breaks the bound."""
    try:
        _cbor_check(data)
    except ValueError as e:
        path, reason = _locate(body, "", _receiver_problem)
        where = f"field {path}: " if path else ""
        raise UnencodableValueError(f"cannot encode {what} as CBOR: {where}{reason or e} "
                                    f"(decode() would refuse it)") from None


def _receiver_problem(value: object) -> Optional[str]:
    """Why the receiver's check refuses `value` encoded alone, else None."""
    try:
        _cbor_check(_cbor_dumps(value))
    except ValueError as e:
        return str(e)
    return None


#: The deepest nesting of a CBOR body: the body's map is level 1, and every
#: array, map and tag in it adds one. decode() refuses deeper bodies (cbor2's
#: max_depth), so encode() refuses deeper values before cbor2 sees them: every
#: receiver would refuse them, and from ~10,000 levels cbor2's encoder
#: overflows the C stack (the process dies).
MAX_CBOR_DEPTH = 400
#: The most levels a value that is not a container adds below itself: a
#: Fraction or Decimal of bignums is a tag, an array, then a bignum's tag.
_LEAF_LEVELS = 3
_TOO_DEEP = f"nested too deeply (more than {MAX_CBOR_DEPTH} levels, the receiver's limit)"


def _cbor_check_nesting(body: Dict[str, Any], what: str, seen: _Seen) -> List[str]:
    """UnencodableValueError naming the field whose containers nest past
    MAX_CBOR_DEPTH (`body` is level 1), or that holds itself (a cycle nests
    without end); else the fields that nest so near it that their leaves may
    take them past. Records what it meets in `seen`."""
    near = []
    values = list(body.values())
    seen.add(values, set(map(type, values)))
    for name, value in body.items():
        levels = _type_levels[type(value)]
        deepest = _cbor_nesting(value, 1 + levels, seen) if levels else 1
        if deepest > MAX_CBOR_DEPTH:
            reason = "cyclic data structure" if _has_cycle(value) else _TOO_DEEP
            raise UnencodableValueError(f"cannot encode {what} as CBOR: field {name}: {reason}")
        if deepest + _LEAF_LEVELS > MAX_CBOR_DEPTH:
            near.append(name)
    return near


class _TypeLevels(Dict[type, int]):
    """The CBOR levels a value of a class opens as cbor2 encodes it, by class:
    a mapping, a sequence (not str, bytes, bytearray, memoryview) or a CBORTag 1, a set 2
    (tag 258, then an array); anything else 0 (at most _LEAF_LEVELS below it).
    A dict, so that map(_type_levels.__getitem__, ...) runs at C speed."""

    def __missing__(self, cls: type) -> int:
        if issubclass(cls, (str, bytes, bytearray, memoryview)):
            levels = 0
        elif issubclass(cls, (collections.abc.Mapping, collections.abc.Sequence, cbor2.CBORTag)):
            levels = 1
        else:
            levels = 2 if issubclass(cls, collections.abc.Set) else 0
        if len(self) < 1024:        # classes made on the fly must not grow it for ever
            self[cls] = levels
        return levels


_type_levels = _TypeLevels()


def _cbor_children(container: Any) -> Iterable[Any]:
    """What cbor2 encodes inside a container (a mapping's keys and values)."""
    if isinstance(container, collections.abc.Mapping):
        return itertools.chain(container.keys(), container.values())
    if isinstance(container, cbor2.CBORTag):
        return (container.value,)
    return container          # type: ignore[no-any-return]


def _cbor_nesting(container: Any, level: int, seen: _Seen) -> int:
    """The deepest container level in `container`, itself at `level`:
    iterative, a level at a time, each level's items sorted at C speed (most
    are not containers), a container met twice in one level walked once.
    Stops past MAX_CBOR_DEPTH (a cycle gets there too). Records what it
    meets in `seen`."""
    deepest = _small_nesting(container, level, seen)
    if deepest is not None:
        return deepest
    pending: Dict[int, List[Any]] = {level: [container]}
    deepest = level
    while pending and deepest <= MAX_CBOR_DEPTH:
        deepest = min(pending)
        containers = pending.pop(deepest)
        if len(containers) > 1:
            containers = list(dict(zip(map(id, containers), containers)).values())
        kinds = set(map(type, containers))
        items = list(_items_of(containers, kinds))
        found = set(map(type, items))
        seen.add(items, found)
        if not kinds <= _PLAIN_SEQUENCES:
            seen.keys |= _key_classes(containers, kinds)
        if not any(map(_type_levels.__getitem__, found)):
            continue                       # no container in this level's items
        levels = list(map(_type_levels.__getitem__, map(type, items)))
        for step in (1, 2):
            inner = list(itertools.compress(items, map(step.__eq__, levels)))
            if inner:
                pending.setdefault(deepest + step, []).extend(inner)
    return deepest


#: How many items _small_nesting walks one by one before it leaves a value
#: to _cbor_nesting's level-at-a-time walk (whose fixed cost is higher).
_SMALL_NESTING_ITEMS = 64


def _small_nesting(container: Any, level: int, seen: _Seen) -> Optional[int]:
    """_cbor_nesting for a small value, item by item; None when it holds more
    than _SMALL_NESTING_ITEMS items (what it recorded in `seen` holds)."""
    stack = [(container, level)]
    deepest, budget = level, _SMALL_NESTING_ITEMS
    while stack:
        value, depth = stack.pop()
        deepest = max(deepest, depth)
        if isinstance(value, dict):
            seen.keys.update(map(type, value))
            items: Any = (*value, *value.values())
        elif isinstance(value, collections.abc.Mapping):
            seen.keys.update(map(type, value))
            items = tuple(_cbor_children(value))
        else:
            items = value if type(value) in _PLAIN_SEQUENCES else tuple(_cbor_children(value))
        budget -= len(items)
        if budget < 0:
            return None
        found = set(map(type, items))
        seen.add(list(items), found)
        for item in items:
            levels = _type_levels[type(item)]
            if levels:
                stack.append((item, depth + levels))
    return deepest


def _items_of(containers: List[Any], classes: Set[type]) -> Iterator[Any]:
    """What cbor2 encodes inside each of `containers` (of `classes`): at C
    speed when they are all lists, tuples, sets (or all dicts), as they mostly are."""
    if classes <= _PLAIN_SEQUENCES:
        return itertools.chain.from_iterable(containers)
    if classes == _DICT:
        return itertools.chain(itertools.chain.from_iterable(containers),
                               itertools.chain.from_iterable(map(dict.values, containers)))
    return itertools.chain.from_iterable(map(_cbor_children, containers))


_PLAIN_SEQUENCES = frozenset({list, tuple, set, frozenset})
_DICT = frozenset({dict})


def _key_classes(containers: List[Any], classes: Set[type]) -> Set[type]:
    """The classes of the keys of the mappings among `containers` (of `classes`)."""
    if classes != _DICT:
        containers = [c for c in containers if isinstance(c, collections.abc.Mapping)]
    return set(map(type, itertools.chain.from_iterable(containers)))


def _has_cycle(container: Any) -> bool:
    """Whether a container holds itself, at any depth (iterative; error path)."""
    done: Set[int] = set()
    path = {id(container)}
    stack: List[Tuple[Any, Iterator[Any]]] = [(container, iter(_cbor_children(container)))]
    while stack:
        node, items = stack[-1]
        for item in items:
            if _type_levels[type(item)] and id(item) not in done:
                if id(item) in path:
                    return True
                path.add(id(item))
                stack.append((item, iter(_cbor_children(item))))
                break
        else:
            stack.pop()
            path.discard(id(node))
            done.add(id(node))
    return False


def _too_deep_to_decode(data: bytes) -> bool:
    """Whether a body that nests near MAX_CBOR_DEPTH (counting what its
    leaves add: Fractions, Decimals, ...) would be refused for its depth."""
    try:
        cbor2.loads(data, max_depth=MAX_CBOR_DEPTH)
    except Exception:             # cbor2's errors, and those of its tag decoders
        try:
            cbor2.loads(data, max_depth=MAX_CBOR_DEPTH + _LEAF_LEVELS)
        except Exception:
            return False          # not its depth: left to the receiver's checks
        return True
    return False


def _cbor_problem(value: object) -> Optional[str]:
    try:
        _cbor_dumps(value)
    except (cbor2.CBORError, _DatetimeRefused, ValueError, TypeError, RecursionError) as e:
        return _reason(e)
    return None


def _reason(e: BaseException) -> str:
    if isinstance(e, RecursionError):
        return "nested too deeply"
    text = str(e)
    if isinstance(e, cbor2.CBORError) and "cannot encode type" in text:
        return f"{text} (cbor2 has no encoding for it)"
    return text or type(e).__name__


def _locate(value: object, path: str, problem: Callable[[object], Optional[str]],
            active: Optional[Set[int]] = None) -> Tuple[str, str]:
    """The path and reason of the innermost value that fails (error path only)."""
    active = set() if active is None else active
    if id(value) in active:
        return path, problem(value) or "cannot be encoded"
    active.add(id(value))
    if isinstance(value, dict):
        children = [(f"{path}[{k!r}]" if path else str(k), v) for k, v in value.items()]
    elif isinstance(value, (list, tuple)):
        children = [(f"{path}[{i}]", v) for i, v in enumerate(value)]
    else:
        children = []
    for child_path, child in children:
        if id(child) in active:       # a cycle: the container itself is the problem
            break
        reason = problem(child)
        if reason is not None:
            return _locate(child, child_path, problem, active)
    return path, problem(value) or "cannot be encoded"


#: CBOR tags refused in a received body: string references (25, 256) and
#: shared values (28, 29) let a few hundred bytes stand for a structure of
#: 2**depth parts (hashing or printing it never ends); regular expressions
#: (35) and MIME messages (36) would be objects built from a peer's text.
#: None of them is what encode() makes.
REFUSED_CBOR_TAGS = frozenset({25, 256, 28, 29, 35, 36})
#: The largest CBOR bignum (tags 2 and 3) a received body may hold, in
#: bytes: 4300 decimal digits, the int limit of the JSON bodies (Python's
#: sys.get_int_max_str_digits() default): a larger one would cost time
#: quadratic in its size wherever it became a Decimal, a Fraction or text.
MAX_CBOR_BIGNUM_BYTES = 1786
#: The most bignums a received body may hold: Python does not randomize
#: the hashes of ints, so a map or set of many chosen bignum keys costs time
#: quadratic in their number (1 MB would take a minute).
MAX_CBOR_BIGNUMS = 1024


#: The most CBOR items a received body may spend on map keys and set
#: elements (tag 258) that are not a plain int, float, str, bytes, bool or
#: None: arrays, maps and tagged values (Fraction, Decimal, UUID, ...), each
#: counted with the items it holds. Python randomizes only the hashes of str
#: and bytes, so a peer can choose thousands of such keys with one hash, and
#: building the map then costs time quadratic in their number (a 350 KB body
#: took a minute). At this bound the worst case (all with one hash) takes ~20 ms.
MAX_CBOR_COMPOSITE_KEY_ITEMS = 1024

# The kinds of an open level in _cbor_check: its items are hashed when they
# are map keys (even places of a map), set elements, or inside such a key.
_ARRAY, _MAP, _SET, _KEY = 0, 1, 2, 3
#: One-byte items that are never a composite key: small ints, empty strings,
#: simple values (false, true, null, ...). Runs of them are skipped at C speed;
#: in a level where nothing is a key (an array) or everything counts (a key),
#: empty arrays and maps too, up to the level's end (_ANY_ONE_BYTE_ITEMS).
_ONE_BYTE_ITEMS = re.compile(rb"[\x00-\x17\x20-\x37\x40\x60\xe0-\xf7]+")
_ANY_ONE_BYTE_ITEMS = re.compile(rb"[\x00-\x17\x20-\x37\x40\x60\x80\xa0\xe0-\xf7]+")
#: Per head byte: 1 a one-byte item, 2 an empty array or map, else 0.
_IS_ONE_BYTE_ITEM = bytes(
    1 if _ONE_BYTE_ITEMS.fullmatch(bytes((b,))) else 2 if b in (0x80, 0xA0) else 0
    for b in range(256))
#: A byte that could be the head of a tag; of an array, a map or a tag.
_TAG_HEAD = re.compile(rb"[\xc0-\xdb]")
_COMPOSITE_HEAD = re.compile(rb"[\x80-\xdb]")


def _cbor_check(data: bytes) -> None:
    """Walk the items of a CBOR body, making no object, and refuse what
    would make cbor2's decoding (or any later use of its result) cost out of
    all proportion to the body's size: REFUSED_CBOR_TAGS, bignums past
    MAX_CBOR_BIGNUM_BYTES or MAX_CBOR_BIGNUMS, and composite map keys or set
    elements past MAX_CBOR_COMPOSITE_KEY_ITEMS. ValueError says which. A
    body cut short is left to cbor2 to report."""
    if not _may_be_refused(data):
        return
    pos, end, bignums, keyed = 0, len(data), 0, 0
    levels: List[List[Any]] = [[1, _ARRAY, 0]]   # [items left or None (until a break), kind, read]
    after_tag = set_next = False
    while levels and pos < end:
        head = data[pos]
        one_byte = _IS_ONE_BYTE_ITEM[head]
        level = levels[-1]
        if one_byte == 1 or one_byte and (level[1] == _ARRAY or level[1] == _KEY):
            count = _one_byte_run(data, pos, level, one_byte)
            if after_tag and (level[1] == _SET or level[1] == _MAP and not level[2] & 1):
                keyed += 1                 # a key's tag counted: its content counts too
            keyed += _take(levels, count)
            pos, after_tag, set_next = pos + count, False, False
            if keyed > MAX_CBOR_COMPOSITE_KEY_ITEMS:
                raise ValueError(_COMPOSITE_KEYS_REFUSED)
            continue
        pos += 1
        info = head & 0x1F
        if info < 24:
            arg = info
        elif info < 28:
            arg = int.from_bytes(data[pos:pos + (1 << (info - 24))], "big")
            pos += 1 << (info - 24)
        elif head == 0xFF:                 # a break ends an indefinite item
            levels.pop()
            continue
        elif info == 31:                   # an indefinite string, array or map
            arg = 0
        else:
            return                         # not CBOR: cbor2 says so
        major = head >> 5
        kind = level[1]
        hashed = kind >= _SET or kind == _MAP and not level[2] & 1   # _SET or _KEY, or a key
        if hashed and (kind == _KEY or after_tag or 4 <= major <= 6):
            keyed += 1
            if keyed > MAX_CBOR_COMPOSITE_KEY_ITEMS:
                raise ValueError(_COMPOSITE_KEYS_REFUSED)
        if major == 6:                     # a tag: the next item is its content
            bignums += _check_tag(data, pos, arg, bignums)
            after_tag, set_next = True, arg == 258
            continue
        after_tag = False
        left = level[0]                    # this item is read (_take(levels, 1), inline)
        level[2] += 1
        if left == 1:
            levels.pop()
        elif left is not None:
            level[0] = left - 1
        if major == 2 or major == 3:
            if info == 31:                 # chunks until a break
                levels.append([None, _KEY if kind == _KEY else _ARRAY, 0])
            else:
                pos += arg
        elif (major == 4 or major == 5) and (info == 31 or arg):
            inner = _KEY if hashed else _MAP if major == 5 else _SET if set_next else _ARRAY
            levels.append([None if info == 31 else arg * (2 if major == 5 else 1), inner, 0])
        set_next = False


def _one_byte_run(data: bytes, pos: int, level: List[Any], one_byte: int) -> int:
    """How many one-byte items from `pos` the walk may take at once: a run of
    _ONE_BYTE_ITEMS (never composite, wherever they fall), or in an array or a
    key level, of _ANY_ONE_BYTE_ITEMS up to the level's end (an empty array
    or map is composite where a key or set element begins)."""
    if one_byte == 1 and not (level[1] == _ARRAY or level[1] == _KEY):
        run = _ONE_BYTE_ITEMS.match(data, pos)
        assert run is not None
        return run.end() - pos
    run = _ANY_ONE_BYTE_ITEMS.match(data, pos)
    assert run is not None
    count = run.end() - pos
    return count if level[0] is None or level[0] >= count else int(level[0])


def _may_be_refused(data: bytes) -> bool:
    """Whether _cbor_check must walk `data`, told by one scan at C speed: a
    body may be refused only for a tag, or for the composite-key bound, which
    needs more items (so bytes) than the bound and an array or map besides
    the body's own map."""
    if len(data) <= MAX_CBOR_COMPOSITE_KEY_ITEMS:
        return _TAG_HEAD.search(data) is not None
    first = 1 if 0xA0 <= data[0] <= 0xBF else 0      # the body's own map
    return _COMPOSITE_HEAD.search(data, first) is not None


_COMPOSITE_KEYS_REFUSED = (
    f"more than {MAX_CBOR_COMPOSITE_KEY_ITEMS} items in map keys or set elements that are "
    f"arrays, maps or tagged values (MAX_CBOR_COMPOSITE_KEY_ITEMS)")


def _check_tag(data: bytes, pos: int, tag: int, bignums: int) -> int:
    """Refuse a tag of REFUSED_CBOR_TAGS, or a bignum past the bounds (its
    content starts at `pos`, `bignums` were met before it). Returns how many
    bignums the tag adds (0 or 1)."""
    if tag in REFUSED_CBOR_TAGS:
        raise ValueError(f"CBOR tag {tag} is not taken in a typed message")
    if tag not in (2, 3):
        return 0
    if bignums >= MAX_CBOR_BIGNUMS:
        raise ValueError(f"more than {MAX_CBOR_BIGNUMS} bignums (MAX_CBOR_BIGNUMS)")
    if pos < len(data):
        if data[pos] >> 5 != 2:
            raise ValueError(f"a bignum (tag {tag}) whose content is not a byte string")
        if data[pos] & 0x1F == 31:
            raise ValueError(f"a bignum (tag {tag}) of indefinite length")
        if _head_arg(data, pos) > MAX_CBOR_BIGNUM_BYTES:
            raise ValueError(f"a bignum of more than {MAX_CBOR_BIGNUM_BYTES} "
                             "bytes (MAX_CBOR_BIGNUM_BYTES)")
    return 1


def _head_arg(data: bytes, pos: int) -> int:
    """The argument (a length) of the CBOR item head at `pos`."""
    info = data[pos] & 0x1F
    if info < 24:
        return info
    return int.from_bytes(data[pos + 1:pos + 1 + (1 << (info - 24))], "big") \
        if info < 28 else 0


def _take(levels: List[List[Any]], count: int) -> int:
    """`count` items are read, the innermost open levels' first: a definite
    level whose last item is read is closed (an indefinite one closes at its
    break). Returns how many of them were inside a composite key (_KEY)."""
    keyed = 0
    while count and levels:
        level = levels[-1]
        left = level[0]
        took = count if left is None or left > count else left
        level[2] += took
        if level[1] == _KEY:
            keyed += took
        count -= took
        if left is not None:
            if left == took:
                levels.pop()
            else:
                level[0] = left - took
    return keyed


#: The self-describe tag 55799 (RFC 8949 3.4.6) that some CBOR encoders put
#: before a document: it says "CBOR" and nothing else.
_SELF_DESCRIBED = b"\xd9\xd9\xf7"


def _cbor_decode(data: bytes, what: str) -> Any:
    if data.startswith(_SELF_DESCRIBED):
        # Skipped: cbor2 would decode what it wraps as immutable (a frozendict
        # body, tuples), which is not a body of fields.
        data = data[len(_SELF_DESCRIBED):]
    if not data:
        raise CorruptMessageError(f"body of {what} is empty (not valid CBOR)")
    try:
        _cbor_check(data)
    except ValueError as e:
        raise CorruptMessageError(f"body of {what} is refused: {e}") from None
    try:
        # One level short first: cbor2 counts the levels that hold an item,
        # so an empty array or map (or an empty set's array) one level past
        # its max_depth passes it. A body that nests to the limit is decoded
        # again with the limit and walked for such an empty container.
        body, stream = _cbor_load(data, MAX_CBOR_DEPTH - 1)
    except Exception as e:   # cbor2's own errors, and those of its tag decoders
        if _DEPTH_EXCEEDED not in str(e):
            raise CorruptMessageError(f"body of {what} is not valid CBOR: {_reason(e)}") from e
        body, stream = _cbor_deepest(data, what)
    left = len(data) - stream.tell()
    if left:
        raise CorruptMessageError(
            f"body of {what} has {left} trailing byte(s) after its CBOR value")
    return body


#: cbor2's text for a body past max_depth (its own count: see _cbor_decode).
_DEPTH_EXCEEDED = "maximum container nesting depth"


def _cbor_load(data: bytes, max_depth: int) -> Tuple[Any, io.BytesIO]:
    """cbor2's decoding of `data` with `max_depth`; the value and the stream."""
    stream = io.BytesIO(data)
    return cbor2.CBORDecoder(stream, allow_duplicate_keys=False,
                             max_depth=max_depth).decode(), stream


def _cbor_deepest(data: bytes, what: str) -> Tuple[Any, io.BytesIO]:
    """_cbor_decode of a body cbor2 found MAX_CBOR_DEPTH levels deep by its
    count: decoded with the limit, then refused as cbor2 refuses a deeper
    body if an empty container nests past the limit (encode() refuses it)."""
    try:
        decoded = _cbor_load(data, MAX_CBOR_DEPTH)
    except Exception as e:
        raise CorruptMessageError(f"body of {what} is not valid CBOR: {_reason(e)}") from e
    if _cbor_levels_past(data, MAX_CBOR_DEPTH):
        raise CorruptMessageError(f"body of {what} is not valid CBOR: {_DEPTH_EXCEEDED} "
                                  f"({MAX_CBOR_DEPTH}) exceeded")
    return decoded


def _cbor_levels_past(data: bytes, limit: int) -> bool:
    """Whether the CBOR item `data` starts with nests past `limit` levels,
    every array, map and tag counted, empty ones too (docs/typed.md's
    count). Only for a body cbor2 decoded (well formed); a walk in Python,
    made for bodies that nest to the limit only."""
    # Per open level: [items left, or None until a break; whether it counts
    # (arrays, maps, tags do; an indefinite string's chunks do not)].
    stack: List[List[Any]] = []
    levels, pos = 0, 0
    while pos < len(data):
        head = data[pos]
        major, info = head >> 5, head & 0x1F
        arg = _head_arg(data, pos)
        pos += 1 + _ARG_BYTES[info]
        if head == 0xFF:                          # a break: its indefinite level ends
            levels -= stack.pop()[1]
        elif major >= 4 and major != 7 or info == 31:
            counts = major >= 4                   # (else an indefinite string)
            items = None if info == 31 else 1 if major == 6 else arg << (major == 5)
            levels += counts
            if levels > limit:
                return True
            if items != 0:
                stack.append([items, counts])
                continue
            levels -= counts                      # empty: ended as soon as opened
        elif major == 2 or major == 3:
            pos += arg                            # a string's bytes
        # An item ended, and with it each level it was the last item of.
        while stack and stack[-1][0] is not None:
            stack[-1][0] -= 1
            if stack[-1][0]:
                break
            levels -= stack.pop()[1]
        if not stack:
            return False
    return False


#: Bytes of an item head's argument after its first byte, by its low 5 bits.
_ARG_BYTES = [0] * 24 + [1, 2, 4, 8, 0, 0, 0, 0]


# -- JSON --------------------------------------------------------------------------
_digit_bounds: Dict[int, int] = {}


def _json_problem(value: object, path: str, active: Set[int]) -> Optional[Tuple[str, str]]:
    """(path, reason) of the first value JSON cannot round-trip, else None."""
    if value is None or isinstance(value, (bool, str)):
        return None
    if isinstance(value, int):
        limit = sys.get_int_max_str_digits() if hasattr(sys, "get_int_max_str_digits") else 0
        if limit:
            bound = _digit_bounds.get(limit)
            if bound is None:
                bound = _digit_bounds.setdefault(limit, 10 ** limit)
            if abs(value) >= bound:
                return path, (f"int of more than {limit} digits (Python's int/str limit, "
                              f"sys.get_int_max_str_digits()); use CBOR")
        return None
    if isinstance(value, float):
        if math.isfinite(value):
            return None
        return path, f"{value!r} is not a JSON number; use CBOR"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return path, "bytes cannot be carried by JSON; use CBOR, or encode them in to_dict()"
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return path, (f"{type(value).__name__} cannot be carried by JSON unambiguously; "
                      f"use CBOR, or convert it in to_dict()/from_dict()")
    if isinstance(value, (list, tuple, dict)):
        if id(value) in active:
            return path, "cyclic data structure"
        active.add(id(value))
        try:
            if isinstance(value, dict):
                for k, v in value.items():
                    if not isinstance(k, str):
                        return (path, f"dict key {k!r} is not str (JSON object keys "
                                f"are strings); use CBOR")
                    found = _json_problem(v, f"{path}[{k!r}]" if path else str(k), active)
                    if found:
                        return found
            else:
                for i, v in enumerate(value):
                    found = _json_problem(v, f"{path}[{i}]", active)
                    if found:
                        return found
        finally:
            active.discard(id(value))
        return None
    return path, f"{type(value).__name__} cannot be carried by JSON"


def _json_encode(body: Dict[str, Any], what: str) -> bytes:
    try:
        found = _json_problem(body, "", set())
    except RecursionError:
        found = ("", "nested too deeply")
    if found:
        path, reason = found
        where = f"field {path}: " if path else ""
        raise UnencodableValueError(f"cannot encode {what} as JSON: {where}{reason}")
    try:
        text = json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise UnencodableValueError(
            f"cannot encode {what} as JSON: a str holds a lone surrogate (not valid "
            f"UTF-8)") from None
    except (ValueError, TypeError, RecursionError) as e:
        raise UnencodableValueError(f"cannot encode {what} as JSON: {_reason(e)}") from None


def _json_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _json_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} is out of the range of a float")
    return value


def _json_object(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: Set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise ValueError(f"duplicate key {k!r}")
            seen.add(k)
    return result


def _json_decode(data: bytes, what: str) -> Any:
    try:
        text = data.decode("utf-8")
        value = json.loads(text, parse_constant=_json_constant, parse_float=_json_float,
                           object_pairs_hook=_json_object)
    except (ValueError, RecursionError) as e:   # JSONDecodeError, UnicodeDecodeError
        raise CorruptMessageError(f"body of {what} is not valid JSON: {_reason(e)}") from e
    # The body is valid UTF-8, so a lone surrogate can only come from a \uD800-\uDFFF
    # escape: walk the value only when the body holds one (most bodies do not).
    if _SURROGATE_ESCAPE.search(data) and _has_lone_surrogate(value):
        raise CorruptMessageError(
            f"body of {what} is refused: a str holds a lone surrogate (not valid UTF-8; "
            f"encode() refuses it too)")
    return value


#: What precedes every escaped surrogate in a JSON body (the hex digits' case is free).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD]")


def _has_lone_surrogate(value: object) -> bool:
    """Whether a str in the decoded JSON value (dict keys included) is not
    valid UTF-8: json.loads pairs escaped surrogates where it can and keeps
    lone ones, which encode() (and CBOR's decode) refuse. Iterative: the
    value may be nested as deep as json.loads allowed."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False
