"""Typed messages (pyipc.typed): round trips, every error with its message, and
typed messages sent between two contexts on both backends."""

from __future__ import annotations

import array
import dataclasses
import datetime as dt
import math
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pyipc
from pyipc import EventType
from pyipc.typed import (CorruptMessageError, DuplicateClassError, DuplicateTypeError,
                         FieldMismatchError, InvalidTypeNumberError, NotAMessageClassError,
                         Registry, TypedMessageError, UnencodableValueError, UnknownTypeError,
                         UnregisteredClassError)

# The `backend` fixture ("pure", "native"; native skipped when it cannot load,
# failed instead when PYIPC_REQUIRE_NATIVE=1) comes from tests/conftest.py.

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


# -- message classes -----------------------------------------------------------------
@dataclass
class Holder:
    """One field of any value: the unit of the round-trip properties."""
    value: Any


@dataclass
class Ping:
    seq: int
    note: str = ""
    tags: list = field(default_factory=list)


@dataclass
class Point:
    x: float
    y: float


@dataclass
class Derived:
    a: int
    total: int = field(init=False)

    def __post_init__(self) -> None:
        self.total = self.a * 2


@dataclass
class Positive:
    n: int

    def __post_init__(self) -> None:
        if self.n <= 0:
            raise ValueError("n must be positive")


class Money:
    """A to_dict/from_dict message class (not a dataclass)."""

    def __init__(self, cents: int, currency: str) -> None:
        self.cents, self.currency = cents, currency

    def to_dict(self) -> dict:
        return {"amount": self.cents, "cur": self.currency}

    @classmethod
    def from_dict(cls, d: dict) -> "Money":
        return cls(d["amount"], d["cur"])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Money) and (self.cents, self.currency) == (
            other.cents, other.currency)


def make_registry(codec: str) -> Registry:
    reg = Registry(codec)
    reg.register(0, Holder)
    reg.register(1, Ping)
    reg.register(2, Point)
    reg.register(3, Derived)
    reg.register(4, Positive)
    reg.register(255, Money)
    return reg


CBOR = make_registry("cbor")
JSON = make_registry("json")


# -- strict comparison ---------------------------------------------------------------
def same(a: object, b: object) -> bool:
    """Equal values of the same types: nan equals nan, -0.0 differs from 0.0,
    True differs from 1, datetimes keep their UTC offset."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        if math.isnan(a):
            return math.isnan(b)
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    if isinstance(a, dt.datetime):
        return a == b and a.utcoffset() == b.utcoffset()
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


# -- strategies ----------------------------------------------------------------------
EDGE_INTS = [0, 1, -1, 23, 24, 255, 256, -24, -25, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63,
             2**64 - 1, 2**64, 2**64 + 1, -2**63, -2**64, -2**64 - 1, 2**100, -2**100,
             10**100, -(10**300), 2**1000]
ints = st.one_of(st.integers(), st.integers(-2**130, 2**130), st.sampled_from(EDGE_INTS))
offsets = st.one_of(st.just(dt.timezone.utc), st.integers(-(23 * 60 + 59), 23 * 60 + 59).map(
    lambda m: dt.timezone(dt.timedelta(minutes=m))))
aware = st.datetimes(timezones=offsets)
text = st.text()

json_scalars = st.one_of(st.none(), st.booleans(), ints,
                         st.floats(allow_nan=False, allow_infinity=False), text)
cbor_scalars = st.one_of(json_scalars, st.floats(), st.sampled_from(
    [math.inf, -math.inf, math.nan, -0.0]), st.binary(), aware)


def nested(scalars: st.SearchStrategy, keys: st.SearchStrategy) -> st.SearchStrategy:
    return st.recursive(scalars, lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(keys, inner, max_size=5)), max_leaves=20)


cbor_values = nested(cbor_scalars, st.one_of(text, st.integers()))
json_values = nested(json_scalars, text)


# -- round trips ---------------------------------------------------------------------
@SETTINGS
@given(cbor_values)
def test_cbor_round_trip(value: Any) -> None:
    payload = CBOR.encode(Holder(value))
    assert payload[0] == 0
    back = CBOR.decode(payload)
    assert type(back) is Holder
    assert same(back.value, value), (back.value, value)


@SETTINGS
@given(json_values)
def test_json_round_trip(value: Any) -> None:
    payload = JSON.encode(Holder(value))
    assert payload[0] == 0
    payload[1:].decode("utf-8")                      # UTF-8 JSON text
    back = JSON.decode(payload)
    assert same(back.value, value), (back.value, value)


@pytest.mark.parametrize("value", EDGE_INTS, ids=lambda v: f"int{v.bit_length()}b")
@pytest.mark.parametrize("reg", [CBOR, JSON], ids=["cbor", "json"])
def test_ints_of_every_size(reg: Registry, value: int) -> None:
    assert same(reg.decode(reg.encode(Holder(value))).value, value)


def test_cbor_special_floats_and_negative_zero() -> None:
    back = CBOR.decode(CBOR.encode(Holder([math.inf, -math.inf, math.nan, -0.0, 1e308, 5e-324])))
    assert back.value[:2] == [math.inf, -math.inf]
    assert math.isnan(back.value[2])
    assert same(back.value[3], -0.0)
    assert back.value[4:] == [1e308, 5e-324]


def test_json_floats_round_trip_exactly() -> None:
    values = [0.1, -0.0, 1e308, 5e-324, 1.0, 2.5e-7]
    assert same(JSON.decode(JSON.encode(Holder(values))).value, values)


@pytest.mark.parametrize("offset", [0, 330, -480, 23 * 60 + 59])
def test_cbor_datetimes_keep_instant_and_offset(offset: int) -> None:
    tz = dt.timezone(dt.timedelta(minutes=offset))
    when = dt.datetime(2026, 11, 25, 17, 30, 5, 123456, tzinfo=tz)
    back = CBOR.decode(CBOR.encode(Holder(when))).value
    assert back == when and back.utcoffset() == when.utcoffset()
    assert back.microsecond == 123456


class _ParisInSummer(dt.tzinfo):
    """A zone that is not a fixed-offset `timezone` (as a ZoneInfo is not),
    with no need of the system's time zone database."""

    def utcoffset(self, when: object) -> dt.timedelta:
        return dt.timedelta(hours=2)

    def dst(self, when: object) -> dt.timedelta:
        return dt.timedelta(hours=1)

    def tzname(self, when: object) -> str:
        return "CEST"


def test_cbor_zoneinfo_datetime_becomes_fixed_offset() -> None:
    when = dt.datetime(2026, 7, 1, 12, 0, tzinfo=_ParisInSummer())
    back = CBOR.decode(CBOR.encode(Holder(when))).value
    assert back == when and back.utcoffset() == dt.timedelta(hours=2)
    assert isinstance(back.tzinfo, dt.timezone)


def test_tuples_come_back_as_lists() -> None:
    for reg in (CBOR, JSON):
        assert reg.decode(reg.encode(Holder((1, (2, "x"))))).value == [1, [2, "x"]]


def test_body_is_a_map_of_the_fields() -> None:
    assert cbor2.loads(CBOR.encode(Ping(7, "hi"))[1:]) == {"seq": 7, "note": "hi", "tags": []}
    assert JSON.encode(Ping(7, "hé")) == b'\x01{"seq":7,"note":"h\xc3\xa9","tags":[]}'


def test_fields_with_defaults_may_be_absent() -> None:
    assert CBOR.decode(b"\x01" + cbor2.dumps({"seq": 3})) == Ping(3)
    assert JSON.decode(b'\x01{"seq":3,"tags":["a"]}') == Ping(3, "", ["a"])


def test_init_false_fields_are_not_sent_and_are_rebuilt() -> None:
    payload = CBOR.encode(Derived(4))
    assert cbor2.loads(payload[1:]) == {"a": 4}
    assert CBOR.decode(payload).total == 8


def test_to_dict_from_dict_class() -> None:
    for reg in (CBOR, JSON):
        payload = reg.encode(Money(1999, "EUR"))
        assert payload[0] == 255
        assert reg.decode(payload) == Money(1999, "EUR")
    assert cbor2.loads(CBOR.encode(Money(1, "X"))[1:]) == {"amount": 1, "cur": "X"}


def test_protocol_is_preferred_over_dataclass_fields() -> None:
    reg = Registry()

    @reg.register(9)
    @dataclass
    class Both:
        a: int

        def to_dict(self) -> dict:
            return {"A": self.a}

        @classmethod
        def from_dict(cls, d: dict) -> "Both":
            return cls(d["A"])

    assert cbor2.loads(reg.encode(Both(5))[1:]) == {"A": 5}
    assert reg.decode(reg.encode(Both(5))) == Both(5)


def test_decorator_returns_the_class_and_registry_lookups() -> None:
    reg = Registry("json")

    @reg.register(10)
    @dataclass
    class A:
        x: int

    assert dataclasses.is_dataclass(A) and A(1).x == 1
    assert reg.register(11, Point) is Point
    assert reg.codec == "json"
    assert len(reg) == 2 and 10 in reg and A in reg and 12 not in reg and Ping not in reg
    assert list(reg) == [(10, A), (11, Point)]
    assert reg.type_number(A) == 10 and reg.type_number(Point(1, 2)) == 11
    assert reg.message_class(11) is Point
    assert "codec=json" in repr(reg) and "11: Point" in repr(reg)


def test_registries_are_independent() -> None:
    a, b = Registry(), Registry()
    a.register(1, Point)
    b.register(2, Point)
    assert a.encode(Point(1, 2))[0] == 1 and b.encode(Point(1, 2))[0] == 2
    with pytest.raises(UnknownTypeError):
        b.decode(a.encode(Point(1, 2)))


def test_payload_may_be_any_bytes_like() -> None:
    payload = CBOR.encode(Ping(1))
    assert CBOR.decode(bytearray(payload)) == Ping(1)
    assert CBOR.decode(memoryview(payload)) == Ping(1)
    with pytest.raises(TypeError, match="payload must be bytes-like, not str"):
        CBOR.decode("\x01")  # type: ignore[arg-type]


# -- errors: registration ------------------------------------------------------------
def test_all_errors_are_typed_message_errors_and_value_errors() -> None:
    for cls in (InvalidTypeNumberError, DuplicateTypeError, DuplicateClassError,
                NotAMessageClassError, UnregisteredClassError, UnencodableValueError,
                UnknownTypeError, CorruptMessageError, FieldMismatchError):
        assert issubclass(cls, TypedMessageError) and issubclass(cls, ValueError)
        assert getattr(pyipc, cls.__name__) is cls
    assert pyipc.Registry is Registry and pyipc.TypedMessageError is TypedMessageError


def test_unknown_codec() -> None:
    with pytest.raises(ValueError, match=r"codec must be 'cbor' or 'json', not 'xml'"):
        Registry("xml")


@pytest.mark.parametrize("number, message", [
    (256, r"^message type number 256 is out of range \(0 to 255\)$"),
    (-1, r"^message type number -1 is out of range \(0 to 255\)$"),
    ("1", r"^message type number must be an int from 0 to 255, not str$"),
    (1.0, r"^message type number must be an int from 0 to 255, not float$"),
    (True, r"^message type number must be an int from 0 to 255, not bool$"),
    (None, r"^message type number must be an int from 0 to 255, not NoneType$"),
])
def test_invalid_type_number(number: object, message: str) -> None:
    reg = Registry()
    with pytest.raises(InvalidTypeNumberError, match=message):
        reg.register(number)(Point)     # type: ignore[arg-type]
    with pytest.raises(InvalidTypeNumberError, match=message):
        reg.register(number, Point)     # type: ignore[arg-type]
    assert len(reg) == 0


def test_type_numbers_0_and_255_are_valid() -> None:
    reg = Registry()
    reg.register(0, Point)
    reg.register(255, Ping)
    assert reg.decode(reg.encode(Point(1, 2)))  == Point(1, 2)
    assert reg.decode(reg.encode(Ping(1)))  == Ping(1)


def test_duplicate_number() -> None:
    reg = Registry()
    reg.register(5, Point)
    with pytest.raises(DuplicateTypeError, match=r"^message type 5 is already registered to "
                                                  r"Point$"):
        reg.register(5, Ping)
    assert Ping not in reg and reg.message_class(5) is Point


def test_duplicate_class() -> None:
    reg = Registry()
    reg.register(5, Point)
    with pytest.raises(DuplicateClassError, match=r"^class Point is already registered as "
                                                   r"message type 5$"):
        reg.register(6, Point)
    with pytest.raises(DuplicateClassError):
        reg.register(6)(Point)
    assert 6 not in reg


def test_not_a_message_class() -> None:
    reg = Registry()
    with pytest.raises(NotAMessageClassError, match=r"^register\(\) needs a class, not Point$"):
        reg.register(1, Point(1, 2))    # type: ignore[arg-type]
    with pytest.raises(NotAMessageClassError, match=r"^int is neither a dataclass nor a class "
                                                     r"with a to_dict\(\) method and a "
                                                     r"from_dict\(cls, d\) classmethod$"):
        reg.register(1, int)

    class Annotated:
        x: int

    with pytest.raises(NotAMessageClassError, match=r"put @registry.register\(N\) above "
                                                     r"@dataclass"):
        reg.register(1, Annotated)

    @dataclass
    class WithInitVar:
        a: int
        secret: dataclasses.InitVar[str]

    with pytest.raises(NotAMessageClassError, match=r"constructor needs 'secret', which is not "
                                                     r"a field \(an InitVar\?\)"):
        reg.register(1, WithInitVar)
    assert len(reg) == 0


# -- errors: encoding ----------------------------------------------------------------
def test_unregistered_class() -> None:
    with pytest.raises(UnregisteredClassError, match=r"^cannot encode dict: its class is not "
                                                      r"registered in this registry$"):
        CBOR.encode({"seq": 1})
    with pytest.raises(UnregisteredClassError, match=r"class int is not registered"):
        CBOR.type_number(3)


def test_subclass_of_registered_class_is_not_registered() -> None:
    @dataclass
    class SubPoint(Point):
        pass

    with pytest.raises(UnregisteredClassError, match=r"cannot encode .*SubPoint: its class is "
                                                      r"not registered"):
        CBOR.encode(SubPoint(1, 2))


def _ids(value: object) -> str:
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**50 else "huge-int"
    return text[:40]


@pytest.mark.parametrize("value, message", [
    (b"\x00", r"field value: bytes cannot be carried by JSON; use CBOR"),
    (bytearray(b"x"), r"field value: bytes cannot be carried by JSON"),
    ([1, {"k": b"x"}], r"field value\[1\]\['k'\]: bytes cannot be carried by JSON"),
    (dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc),
     r"field value: datetime cannot be carried by JSON unambiguously; use CBOR"),
    (dt.date(2026, 1, 1), r"field value: date cannot be carried by JSON unambiguously"),
    (math.nan, r"field value: nan is not a JSON number; use CBOR"),
    ([math.inf], r"field value\[0\]: inf is not a JSON number"),
    ({"a": -math.inf}, r"field value\['a'\]: -inf is not a JSON number"),
    ({1: "one"}, r"field value: dict key 1 is not str \(JSON object keys are strings\)"),
    ({None: 1}, r"field value: dict key None is not str"),
    (10**5000, r"field value: int of more than 4300 digits"),
    ({1, 2}, r"field value: set cannot be carried by JSON"),
    (object(), r"field value: object cannot be carried by JSON"),
    ("\ud800", r"a str holds a lone surrogate \(not valid UTF-8\)"),
], ids=_ids)
def test_json_refuses_what_it_cannot_round_trip(value: object, message: str) -> None:
    with pytest.raises(UnencodableValueError,
                       match=r"^cannot encode Holder \(message type 0\) as JSON: " + message):
        JSON.encode(Holder(value))


def test_json_refuses_cycles() -> None:
    loop: list = [1]
    loop.append(loop)
    with pytest.raises(UnencodableValueError, match=r"as JSON: field value\[1\]: cyclic data "
                                                     r"structure"):
        JSON.encode(Holder(loop))


@pytest.mark.parametrize("value, message", [
    (dt.datetime(2026, 1, 1), r"field value: naive datetime \(no tzinfo\): give it a timezone"),
    ([dt.datetime(2026, 1, 1, tzinfo=dt.timezone(dt.timedelta(seconds=30)))],
     r"field value\[0\]: datetime with a UTC offset of 0:00:30 that is not a whole number of "
     r"minutes"),
    ({"k": [1, object()]}, r"field value\['k'\]\[1\]: cannot encode type <class 'object'>"),
    ("\ud800", r"field value: .*surrogates not allowed"),
])
def test_cbor_refuses_what_it_cannot_encode(value: object, message: str) -> None:
    with pytest.raises(UnencodableValueError,
                       match=r"^cannot encode Holder \(message type 0\) as CBOR: " + message):
        CBOR.encode(Holder(value))


def test_cbor_refuses_cycles() -> None:
    loop: list = [1]
    loop.append(loop)
    with pytest.raises(UnencodableValueError, match=r"as CBOR: field value: cyclic"):
        CBOR.encode(Holder(loop))


def _nested(levels: int, leaf: object = 0, wrap: Any = lambda inner: [inner]) -> object:
    """`leaf` inside `levels` containers made by `wrap` (built iteratively)."""
    value = leaf
    for _ in range(levels):
        value = wrap(value)
    return value


@pytest.mark.parametrize("value, levels", [
    (_nested(399), 400),                                  # the body's map is level 1
    (_nested(397, Fraction(1, 3)), 400),                  # a Fraction is a tag and an array
    (_nested(397, {1}), 400),                             # a set is tag 258 and an array
    (_nested(399, wrap=lambda inner: {"k": inner}), 400),
    (_nested(399, wrap=lambda inner: cbor2.CBORTag(4000, inner)), 400),
])
def test_cbor_nesting_up_to_the_receivers_limit_travels(value: object, levels: int) -> None:
    assert levels == pyipc.typed.MAX_CBOR_DEPTH
    assert CBOR.decode(CBOR.encode(Holder(value))) == Holder(value)


@pytest.mark.parametrize("value", [
    _nested(400),
    _nested(398, Fraction(1, 3)),                         # only its leaf is past the limit
    _nested(398, {1}),
    _nested(400, wrap=lambda inner: {"k": inner}),
    _nested(400, wrap=lambda inner: (inner,)),
    _nested(400, wrap=lambda inner: cbor2.CBORTag(4000, inner)),
    _nested(1500, dt.datetime(2026, 1, 1)),               # unencodable leaf: was a RecursionError
    _nested(1500, object()),
    _nested(100_000),                                     # cbor2's encoder crashed the process
])
def test_cbor_nesting_past_the_receivers_limit_is_refused(value: object) -> None:
    """decode() refuses bodies nested deeper than 400 levels: encode() does
    not make them (cbor2 crashed from ~10,000 levels; the error path raised a
    bare RecursionError past ~1,000)."""
    with pytest.raises(UnencodableValueError,
                       match=r"^cannot encode Holder \(message type 0\) as CBOR: field value: "
                             r"nested too deeply \(more than 400 levels, the receiver's limit\)$"):
        CBOR.encode(Holder(value))


@pytest.mark.parametrize("empty", [[], {}, (), set()], ids=["list", "dict", "tuple", "set"])
def test_cbor_decode_counts_an_empty_innermost_container_as_encode_does(empty: Any) -> None:
    """Decoded directly (raw bodies, not encode()'s): 400 levels with an
    empty container innermost decode; 401 are refused, as encode() refuses
    them (cbor2 counts only levels that hold an item: it took them). A set
    is two levels (tag 258, an array)."""
    levels = 2 if isinstance(empty, set) else 1
    at_limit = {"value": _nested(399 - levels, empty)}           # 1 + 399 levels
    past = {"value": _nested(400 - levels, empty)}               # 1 + 400 levels
    body = cbor2.dumps(at_limit)
    assert CBOR.decode(b"\x00" + body) == Holder(cbor2.loads(body)["value"])  # () comes as []
    with pytest.raises(CorruptMessageError, match=r"^body of message type 0 \(Holder\) is not "
                       r"valid CBOR: maximum container nesting depth \(400\) exceeded$"):
        CBOR.decode(b"\x00" + cbor2.dumps(past))
    with pytest.raises(UnencodableValueError, match=r"nested too deeply \(more than 400 levels"):
        CBOR.encode(Holder(_nested(400 - levels, empty)))


@pytest.mark.parametrize("body", [
    b"\xbf\x65value" + b"\x9f" * 399 + b"\xff" * 399 + b"\xff",   # indefinite: 400 levels
    cbor2.dumps({"value": [b"x" * 70_000, "y" * 300, 2 ** 70, 1.5,
                           _nested(396, cbor2.CBORTag(4000, []))]}),
], ids=["indefinite", "mixed"])
def test_cbor_decode_takes_400_levels_of_every_kind(body: bytes) -> None:
    CBOR.decode(b"\x00" + body)
    deeper = body.replace(b"\x9f", b"\x9f\x9f", 1).replace(b"\xff", b"\xff\xff", 1) \
        if body.startswith(b"\xbf") else cbor2.dumps({"value": [cbor2.loads(body)["value"]]})
    with pytest.raises(CorruptMessageError, match=r"nesting depth \(400\) exceeded$"):
        CBOR.decode(b"\x00" + deeper)


@pytest.mark.parametrize("value, message", [
    (re.compile("(a+)+$"), r"field value: CBOR tag 35 is not taken in a typed message"),
    ([cbor2.CBORTag(28, 1)], r"field value\[0\]: CBOR tag 28 is not taken in a typed message"),
    ({"k": cbor2.CBORTag(256, "x")}, r"field value\['k'\]: CBOR tag 256 is not taken"),
    (2 ** (8 * 1786), r"field value: a bignum of more than 1786 bytes \(MAX_CBOR_BIGNUM_BYTES\)"),
    ([-2 ** 70] * 1025, r"field value: more than 1024 bignums \(MAX_CBOR_BIGNUMS\)"),
    ({(n, n): 0 for n in range(342)},                          # 1026 items
     r"field value: more than 1024 items in map keys or set elements .*COMPOSITE_KEY_ITEMS"),
], ids=["regex", "tag28", "tag256", "bignum-size", "bignum-count", "composite-keys"])
def test_cbor_encode_refuses_what_decode_refuses(value: object, message: str) -> None:
    """cbor2 encodes these, but every receiver's decode() refuses them: the
    sender gets the error instead, with the same bounds."""
    with pytest.raises(UnencodableValueError,
                       match=r"^cannot encode Holder \(message type 0\) as CBOR: " + message
                             + r".* \(decode\(\) would refuse it\)$"):
        CBOR.encode(Holder(value))


def test_cbor_encode_refuses_bounds_added_up_over_fields() -> None:
    """No field alone breaks the bound: the error names none."""
    with pytest.raises(UnencodableValueError, match=r"^cannot encode Ping \(message type 1\) "
                                                    r"as CBOR: more than 1024 bignums"):
        CBOR.encode(Ping(2 ** 70, "", [2 ** 70] * 1024))
    ok = Ping(1, "", [2 ** 70] * 1024)
    assert CBOR.decode(CBOR.encode(ok)) == ok


@pytest.mark.parametrize("value", [
    2 ** (8 * 1786) - 1, -2 ** (8 * 1786), [2 ** 64] * 1024, 2 ** 64 - 1, -2 ** 64,
    {(n, n): 0 for n in range(341)}, {Fraction(n, 3) for n in range(256)},
    [re.escape("x")], cbor2.CBORTag(4000, "x"),
], ids=["biggest-bignum", "biggest-negative-bignum", "1024-bignums", "uint64", "negint64",
        "1023-key-items", "1024-key-items", "str", "unknown-tag"])
def test_cbor_encode_takes_values_at_the_bounds(value: object) -> None:
    assert CBOR.decode(CBOR.encode(Holder(value))) == Holder(value)


def test_json_refuses_deep_nesting_too() -> None:
    with pytest.raises(UnencodableValueError, match=r"as JSON: nested too deeply$"):
        JSON.encode(Holder(_nested(100_000)))


def test_cbor_deep_cycle_is_a_cycle() -> None:
    loop: list = [1]
    loop.append(loop)
    with pytest.raises(UnencodableValueError,
                       match=r"as CBOR: field value: cyclic data structure$"):
        CBOR.encode(Holder(_nested(20_000, loop)))


def test_to_dict_must_return_a_dict_with_str_keys() -> None:
    class Bad:
        def __init__(self, d: object) -> None:
            self.d = d

        def to_dict(self) -> object:
            return self.d

        @classmethod
        def from_dict(cls, d: dict) -> "Bad":
            return cls(d)

    reg = Registry()
    reg.register(1, Bad)
    with pytest.raises(UnencodableValueError, match=r"^cannot encode .*Bad: to_dict\(\) "
                                                     r"returned list, not dict$"):
        reg.encode(Bad([1]))
    with pytest.raises(UnencodableValueError, match=r"to_dict\(\) returned a key that is not "
                                                     r"str: 3"):
        reg.encode(Bad({3: 1}))


# -- errors: decoding ----------------------------------------------------------------
@pytest.mark.parametrize("reg", [CBOR, JSON], ids=["cbor", "json"])
def test_empty_payload(reg: Registry) -> None:
    with pytest.raises(CorruptMessageError, match=r"^empty payload: a typed message needs at "
                                                   r"least its type byte$"):
        reg.decode(b"")


@pytest.mark.parametrize("reg", [CBOR, JSON], ids=["cbor", "json"])
def test_unknown_type(reg: Registry) -> None:
    with pytest.raises(UnknownTypeError, match=r"^unknown message type 7 \(registered: 0, 1, "
                                                r"2, 3, 4, 255\)$") as info:
        reg.decode(b"\x07" + reg.encode(Ping(1))[1:])
    assert info.value.number == 7
    with pytest.raises(UnknownTypeError, match=r"registered: none"):
        Registry(reg.codec).decode(b"\x01")
    with pytest.raises(UnknownTypeError):
        reg.message_class(9)


@pytest.mark.parametrize("number, text", [
    ("x", "message type number must be an int from 0 to 255, not str"),
    (True, "message type number must be an int from 0 to 255, not bool"),
    (256, "message type number 256 is out of range (0 to 255)"),
])
def test_message_class_of_a_number_that_cannot_be_one(number: object, text: str) -> None:
    """message_class('x') is a wrong argument, said as register() says it,
    not 'unknown message type x (registered: ...)'."""
    with pytest.raises(InvalidTypeNumberError, match=f"^{re.escape(text)}$"):
        CBOR.message_class(number)                                 # type: ignore[arg-type]


@pytest.mark.parametrize("body, message", [
    (b"", r"^body of message type 1 \(Ping\) is empty \(not valid CBOR\)"),
    (b"\xff", r"body of message type 1 \(Ping\) is not valid CBOR: "),
    (b"\xa1", r"is not valid CBOR: "),                                  # truncated map
    (b"\x62\xff\xfe", r"is not valid CBOR: "),                           # bad UTF-8
    (cbor2.dumps({"seq": 1}) + b"\x00",
     r"body of message type 1 \(Ping\) has 1 trailing byte\(s\) after its CBOR value"),
    (b"\xa2cseq\x01cseq\x02", r"is not valid CBOR: .*[Dd]uplicate"),
    (cbor2.dumps([1, 2]), r"body of message type 1 \(Ping\) must be a map with str keys, "
                          r"not list"),
    (cbor2.dumps(5), r"must be a map with str keys, not int"),
    (cbor2.dumps({1: 2}), r"must be a map with str keys, not a map with the key 1"),
    (b"\x81" * 1000, r"is not valid CBOR: .*depth"),
])
def test_corrupt_cbor_body(body: bytes, message: str) -> None:
    with pytest.raises(CorruptMessageError, match=message):
        CBOR.decode(b"\x01" + body)


def test_cbor_self_described_body_is_taken() -> None:
    """A peer's encoder may put the self-describe tag 55799 (d9d9f7) before
    the body (RFC 8949 3.4.6): it is skipped, and what it wraps is a body."""
    body = cbor2.dumps({"seq": 1, "tags": [1, {"k": [2]}]})
    assert CBOR.decode(b"\x01\xd9\xd9\xf7" + body) == Ping(1, tags=[1, {"k": [2]}])
    with pytest.raises(CorruptMessageError, match=r"is empty \(not valid CBOR\)"):
        CBOR.decode(b"\x01\xd9\xd9\xf7")


def _shared_tower(depth: int) -> bytes:
    """CBOR whose every level holds the level below twice, as a shared value
    (tags 28/29): a few bytes a level, 2**depth parts once built."""
    body = b"\x01"
    for _ in range(depth):
        body = b"\x82\xd8\x1c" + body + b"\xd8\x1d\x00"     # [shareable(x), sharedref]
    return body


@pytest.mark.parametrize("body, message", [
    (b"\xa1\x61k" + _shared_tower(50), r"is refused: CBOR tag 28 is not taken"),
    (cbor2.dumps({"k": cbor2.CBORTag(35, "(a+)+$")}), r"CBOR tag 35 is not taken"),
    (cbor2.dumps({"k": 2 ** (8 * 1786)}), r"a bignum of more than 1786 bytes"),
    (cbor2.dumps({"k": [n * (2 ** 61 - 1) for n in range(1, 1100)]}),
     r"more than 1024 bignums \(MAX_CBOR_BIGNUMS\)"),
    (cbor2.dumps({"k": {n * (2 ** 61 - 1): 0 for n in range(1, 1000)}}),
     r"more than 1024 items in map keys or set elements that are arrays, maps or tagged "
     r"values \(MAX_CBOR_COMPOSITE_KEY_ITEMS\)"),
])
def test_cbor_bodies_whose_cost_has_no_bound_are_refused(body: bytes, message: str) -> None:
    """A few hundred bytes of shared values (2**50 parts), a regex built from
    a peer's text, a bignum whose conversions cost time quadratic in its size,
    too many bignums, a map of colliding bignum keys: refused before cbor2
    builds anything."""
    with pytest.raises(CorruptMessageError, match=message):
        CBOR.decode(b"\x01" + body)


def test_cbor_bignums_at_their_bounds_are_taken() -> None:
    tags = [2 ** (8 * 1786) - 1] + [2 ** 70] * 1023           # 1024 bignums, one at 1786 B
    assert CBOR.decode(b"\x01" + cbor2.dumps({"seq": 1, "tags": tags})) == Ping(1, tags=tags)


def test_a_huge_non_str_key_is_described_briefly() -> None:
    with pytest.raises(CorruptMessageError, match=r"not a map with the key \(0, 1, 2, 3, 4, 5, \.\.\.\)$"):
        CBOR.decode(b"\x01" + cbor2.dumps({tuple(range(1000)): 1}))


_HASH_MODULUS = 2 ** 61 - 1      # CPython's hash of a rational number is taken modulo this


def _colliding_fractions(count: int) -> bytes:
    """CBOR of a map of `count` Fraction keys (tag 30) that all have one hash:
    a/b with a = h*b mod the hash modulus. Built by hand (a dict of them would
    take as long to build here as the peer's decode)."""
    body = bytearray(b"\xa1\x65value\xba" + count.to_bytes(4, "big"))
    for b in range(2 ** 40, 2 ** 40 + count):
        body += b"\xd8\x1e\x82" + cbor2.dumps(123456789 * b % _HASH_MODULUS) + cbor2.dumps(b)
        body += b"\x00"
    return bytes(body)


@pytest.mark.parametrize("body", [
    _colliding_fractions(2000),                     # unchecked, cbor2 takes ~1 s on it
    _colliding_fractions(16000),                    # ~66 s
    b"\xa1\x65value\xd9\x01\x02\x99\x04\x00" + b"\x82\x01\x02" * 1024,   # a set of pairs
    b"\xa1\x65value\xbf" + b"".join(b"\x9f\x01" + cbor2.dumps(n) + b"\xff\x00"
                                 for n in range(400)) + b"\xff",       # indefinite ones
    cbor2.dumps({"value": [{(1, (n, 2)): 0} for n in range(300)]}),   # in many maps: summed
    cbor2.dumps({"value": {frozenset({n}): 0 for n in range(600)}}),   # frozensets (tag 258)
    cbor2.dumps({"value": {Fraction(n, 7): 0 for n in range(257)}}),   # 1028 items: one past
])
def test_cbor_many_composite_keys_are_refused(body: bytes) -> None:
    """Map keys and set elements whose hash the peer chooses (arrays, maps,
    tagged values: only str and bytes hashes are randomized) could make
    building the map quadratic: past MAX_CBOR_COMPOSITE_KEY_ITEMS items they
    are refused, before cbor2 builds anything."""
    with pytest.raises(CorruptMessageError, match=r"is refused: more than 1024 items in map "
                                                  r"keys or set elements .*COMPOSITE_KEY_ITEMS"):
        CBOR.decode(b"\x00" + body)


def test_cbor_composite_keys_up_to_the_bound_and_plain_keys_are_taken() -> None:
    fractions = {Fraction(n, 7): n for n in range(256)}      # tag, array, 2 ints: 1024 items
    pairs = {(n, n): 0 for n in range(341)}                  # 341 * 3 = 1023 items
    plain = {n: {str(n), n, float(n) + 0.5, bytes([n % 256]), None, True} for n in range(3000)}
    values = [[[n, n]] for n in range(3000)]                  # arrays that are not keys
    for value in (fractions, pairs, plain, values):
        assert CBOR.decode(CBOR.encode(Holder(value))) == Holder(value)
    epochs = b"\xa1\x65value\x99\x0b\xb8" + b"\xc1\x05" * 3000   # tagged values, not keys
    assert len(CBOR.decode(b"\x00" + epochs).value) == 3000
    empties = b"\xa1\x65value\x82\x99\x0b\xb8" + b"\x80" * 3000 + b"\xa1\x80\x00"
    assert CBOR.decode(b"\x00" + empties).value == [[[]] * 3000, {(): 0}]
    assert pyipc.typed.MAX_CBOR_COMPOSITE_KEY_ITEMS == 1024


@pytest.mark.parametrize("body, message", [
    (b"", r"body of message type 1 \(Ping\) is not valid JSON: Expecting value"),
    (b"{", r"is not valid JSON: "),
    (b'{"seq": 1} x', r"is not valid JSON: Extra data"),
    (b"\xff", r"is not valid JSON: 'utf-8' codec can't decode"),
    (b'{"seq": NaN}', r"is not valid JSON: NaN is not valid JSON"),
    (b'{"seq": -Infinity}', r"is not valid JSON: -Infinity is not valid JSON"),
    (b'{"seq": 1e999}', r"is not valid JSON: number 1e999 is out of the range of a float"),
    (b'{"seq": 1, "seq": 2}', r"is not valid JSON: duplicate key 'seq'"),
    (b"[1]", r"body of message type 1 \(Ping\) must be a map with str keys, not list"),
    (b"null", r"must be a map with str keys, not NoneType"),
    (b"[" * 100000, r"is not valid JSON: nested too deeply"),
])
def test_corrupt_json_body(body: bytes, message: str) -> None:
    with pytest.raises(CorruptMessageError, match=message):
        JSON.decode(b"\x01" + body)


@pytest.mark.parametrize("body", [
    rb'{"seq": 1, "note": "\ud800"}',                 # a lone high surrogate
    rb'{"seq": 1, "note": "a\uDFFFb"}',               # a lone low one, upper-case hex
    rb'{"seq": 1, "tags": [{"\uDbff": 1}]}',          # in a nested key
    rb'{"seq": 1, "note": "\ude00\ud83d"}',           # a pair in the wrong order
])
def test_json_refuses_a_lone_surrogate_as_cbor_does(body: bytes) -> None:
    """json.loads keeps an escaped lone surrogate, a str that encode() then
    refuses: decoding refuses it as CBOR decoding does (it returned it)."""
    with pytest.raises(CorruptMessageError, match=r"^body of message type 1 \(Ping\) is "
                                                  r"refused: a str holds a lone surrogate"):
        JSON.decode(b"\x01" + body)


def test_json_takes_an_escaped_surrogate_pair() -> None:
    assert JSON.decode(b"\x01" + rb'{"seq": 1, "note": "\ud83d\uDE00 \\ud800"}') == \
        Ping(1, note="\U0001f600 \\ud800")


@pytest.mark.parametrize("reg", [CBOR, JSON], ids=["cbor", "json"])
def test_field_mismatch(reg: Registry) -> None:
    inner = (cbor2.dumps({"note": "x", "bogus": 1, "zzz": 2}) if reg.codec == "cbor"
             else b'{"note":"x","bogus":1,"zzz":2}')
    with pytest.raises(FieldMismatchError, match=r"^message type 1 \(Ping\): missing field\(s\) "
                                                  r"'seq'; unexpected field\(s\) 'bogus', "
                                                  r"'zzz'$") as info:
        reg.decode(b"\x01" + inner)
    assert info.value.missing == ("seq",) and info.value.extra == ("bogus", "zzz")
    only_missing = cbor2.dumps({}) if reg.codec == "cbor" else b"{}"
    with pytest.raises(FieldMismatchError, match=r"^message type 2 \(Point\): missing field\(s\) "
                                                  r"'x', 'y'$"):
        reg.decode(b"\x02" + only_missing)
    only_extra = (cbor2.dumps({"x": 1.0, "y": 2.0, "z": 3.0}) if reg.codec == "cbor"
                  else b'{"x":1.0,"y":2.0,"z":3.0}')
    with pytest.raises(FieldMismatchError, match=r"^message type 2 \(Point\): unexpected "
                                                  r"field\(s\) 'z'$"):
        reg.decode(b"\x02" + only_extra)
    init_false = cbor2.dumps({"a": 1, "total": 2}) if reg.codec == "cbor" else \
        b'{"a":1,"total":2}'
    with pytest.raises(FieldMismatchError, match=r"unexpected field\(s\) 'total'$"):
        reg.decode(b"\x03" + init_false)


def test_from_dict_key_error_is_a_field_mismatch() -> None:
    with pytest.raises(FieldMismatchError, match=r"^message type 255 \(Money\): missing "
                                                  r"field\(s\) 'cur'$") as info:
        CBOR.decode(b"\xff" + cbor2.dumps({"amount": 5}))
    assert info.value.missing == ("cur",)


def test_class_refusing_the_values_is_a_corrupt_message() -> None:
    with pytest.raises(CorruptMessageError, match=r"^message type 4 \(Positive\): Positive "
                                                   r"refused the values: ValueError: n must be "
                                                   r"positive$"):
        CBOR.decode(b"\x04" + cbor2.dumps({"n": -3}))
    with pytest.raises(CorruptMessageError, match=r"Strict.from_dict refused the body: "
                                                   r"AttributeError"):
        class Strict(Money):
            @classmethod
            def from_dict(cls, d: dict) -> "Money":
                return cls(d["amount"].bad, d["cur"])
        reg = Registry()
        reg.register(1, Strict)
        reg.decode(b"\x01" + cbor2.dumps({"amount": 1, "cur": "X"}))


@pytest.mark.parametrize("codec", ["cbor", "json"])
def test_from_dict_must_return_an_instance_of_the_class(codec: str) -> None:
    """decode(payload, Put) promises a Put: a from_dict that returns anything
    else (a bug in the class) is refused, with or without the expected class."""
    class Put:
        def __init__(self, k: str) -> None:
            self.k = k

        def to_dict(self) -> dict:
            return {"k": self.k}

        @classmethod
        def from_dict(cls, d: dict) -> Any:
            return d.get("k")                      # not a Put

    class SubPut(Put):
        pass

    reg = Registry(codec)
    reg.register(1, Put)
    payload = reg.encode(Put("v"))
    message = r"^message type 1 \(.*Put\): .*Put.from_dict returned str, not .*Put$"
    with pytest.raises(CorruptMessageError, match=message):
        reg.decode(payload)
    with pytest.raises(CorruptMessageError, match=message):
        reg.decode(payload, Put)
    Put.from_dict = classmethod(lambda cls, d: SubPut(d["k"]))  # type: ignore[assignment]
    assert type(reg.decode(reg.encode(Put("v")), Put)) is SubPut   # a subclass is a Put


@SETTINGS
@given(st.binary(max_size=64))
def test_random_payloads_raise_only_typed_errors(data: bytes) -> None:
    for reg in (CBOR, JSON):
        try:
            reg.decode(data)
        except TypedMessageError:
            pass


@SETTINGS
@given(st.binary(max_size=40))
def test_random_cbor_bodies_raise_only_typed_errors(body: bytes) -> None:
    for number in (0, 1, 2, 255):
        try:
            CBOR.decode(bytes([number]) + body)
        except TypedMessageError:
            pass


def test_decode_event_needs_a_message() -> None:
    ev = pyipc.Event(EventType.MESSAGE_RX, 5, 1, CBOR.encode(Ping(2)))
    assert CBOR.decode_event(ev) == Ping(2)
    sw = pyipc.Event(EventType.SWITCH_RX, 5, 1, CBOR.encode(Ping(3)))
    assert CBOR.decode_event(sw) == Ping(3)
    with pytest.raises(ValueError, match=r"^event TIMER on fd -1 carries no message$"):
        CBOR.decode_event(pyipc.Event(EventType.TIMER))
    with pytest.raises(ValueError, match=r"^event MESSAGE_TX on fd 4 carries no message$"):
        CBOR.decode_event(pyipc.Event(EventType.MESSAGE_TX, 4, 1))
    with pytest.raises(TypeError, match=r"decode_event needs an Event, not bytes"):
        CBOR.decode_event(b"\x01")  # type: ignore[arg-type]


# -- between two contexts, on both backends ------------------------------------------
@pytest.fixture
def rundir():
    path = tempfile.mkdtemp(prefix="pyipc-typed-", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def next_event(ctx: pyipc.Context, timeout: float = 10.0) -> pyipc.Event:
    """The next event of ctx that is not TIMER (fails after ``timeout`` s)."""
    deadline = time.monotonic() + timeout
    ctx.timer = 50
    while time.monotonic() < deadline:
        ev = ctx.wait_event()
        if ev.type != EventType.TIMER:
            return ev
    pytest.fail(f"no event within {timeout} s on {ctx.backend}")


@pytest.fixture
def connected(backend: str, rundir: str):
    """(server, server-side fd, client, client fd) on the test's backend."""
    server = pyipc.Context(rundir=rundir, backend=backend)
    client = pyipc.Context(rundir=rundir, backend=backend)
    try:
        server.service_init("typed")
        cfd = client.connect_service("typed")
        ev = next_event(server)
        assert ev.type == EventType.CONNECTION
        yield server, ev.fd, client, cfd
    finally:
        client.close_all()
        server.close_all()


SAMPLES = [Ping(1, "hello", ["a", "b"]), Point(1.5, -2.25), Money(250, "GBP"),
           Holder({"nested": [1, 2**80, None, True, "x"], "f": 0.5}), Derived(21)]


@pytest.mark.parametrize("content, reason", [
    (b"\x61a", "a bignum (tag 2) whose content is not a byte string"),
    (b"\x5f\x41\x01\xff", "a bignum (tag 2) of indefinite length"),
])
def test_a_malformed_bignum_is_refused_for_what_it_is(content: bytes, reason: str) -> None:
    """A tag-2 bignum holding a text string (or a byte string of indefinite
    length) is refused as such, not as 'a bignum of more than 1786 bytes'."""
    payload = b"\x00" + b"\xa1\x65value\xc2" + content        # Holder(value=tag 2 ...)
    with pytest.raises(CorruptMessageError, match=re.escape(reason)):
        CBOR.decode(payload)


def test_a_memoryview_of_bytes_is_cbor_bytes_and_another_format_is_refused() -> None:
    """docs/typed.md: bytes travel by CBOR; a memoryview of bytes is bytes
    (it was silently an array of ints, a list once decoded), one of ints is
    refused with the field named."""
    back = CBOR.decode(CBOR.encode(Holder([memoryview(b"ab"), {"k": memoryview(bytearray(b"xy"))}])))
    assert back == Holder([b"ab", {"k": b"xy"}])
    assert type(back.value[0]) is bytes
    with pytest.raises(UnencodableValueError, match=re.escape(
            "field value[0]: memoryview of format 'i' is not bytes")):
        CBOR.encode(Holder([memoryview(array.array("i", [1, 2]))]))


@pytest.mark.parametrize("codec", ["cbor", "json"])
def test_write_typed_read_typed(connected, codec: str) -> None:
    server, sfd, client, cfd = connected
    reg = make_registry(codec)
    for obj in SAMPLES:
        client.write_typed(cfd, obj, reg)
    for obj in SAMPLES:
        assert server.read_typed(sfd, reg) == obj
    for obj in reversed(SAMPLES):                    # and back
        server.write_typed(sfd, obj, reg)
    assert [client.read_typed(cfd, reg) for _ in SAMPLES] == list(reversed(SAMPLES))


def test_cbor_only_values_travel(connected) -> None:
    server, sfd, client, cfd = connected
    when = dt.datetime(2026, 11, 25, 18, 0, tzinfo=dt.timezone(dt.timedelta(hours=-5)))
    obj = Holder({"raw": bytes(range(256)), "when": when, "big": -(2**200), "inf": math.inf})
    client.write_typed(cfd, obj, CBOR)
    back = server.read_typed(sfd, CBOR)
    assert same(back.value, obj.value)


@pytest.mark.parametrize("codec", ["cbor", "json"])
def test_schedule_typed_then_wait_event_and_decode(connected, codec: str) -> None:
    server, sfd, client, cfd = connected
    reg = make_registry(codec)
    for obj in SAMPLES:
        client.schedule_typed(cfd, obj, reg)
    sent = [next_event(client) for _ in SAMPLES]
    assert [(ev.type, ev.fd) for ev in sent] == [(EventType.MESSAGE_TX, cfd)] * len(SAMPLES)
    received = []
    while len(received) < len(SAMPLES):
        ev = next_event(server)
        assert ev.type == EventType.MESSAGE_RX and ev.fd == sfd
        received.append(reg.decode_event(ev))
    assert received == SAMPLES


def test_a_message_that_does_not_decode_leaves_the_connection_usable(connected) -> None:
    server, sfd, client, cfd = connected
    client.write(cfd, b"\x01\xff")                   # type 1 with a broken body
    client.write(cfd, b"\x63")                       # unknown type
    client.write(cfd, b"")                           # empty payload
    client.write_typed(cfd, Ping(9), CBOR)
    with pytest.raises(CorruptMessageError, match="not valid CBOR"):
        server.read_typed(sfd, CBOR)
    with pytest.raises(UnknownTypeError, match="unknown message type 99"):
        server.read_typed(sfd, CBOR)
    with pytest.raises(CorruptMessageError, match="empty payload"):
        server.read_typed(sfd, CBOR)
    assert server.read_typed(sfd, CBOR) == Ping(9)


def test_encode_errors_send_nothing(connected) -> None:
    server, sfd, client, cfd = connected
    with pytest.raises(UnregisteredClassError):
        client.write_typed(cfd, object(), CBOR)
    with pytest.raises(UnencodableValueError):
        client.schedule_typed(cfd, Holder(b"x"), JSON)
    with pytest.raises(UnencodableValueError, match="nested too deeply"):
        client.write_typed(cfd, Holder(_nested(1000)), CBOR)
    with pytest.raises(UnencodableValueError, match="tag 35 is not taken"):
        client.write_typed(cfd, Holder(re.compile("a")), CBOR)
    client.write_typed(cfd, Ping(1), JSON)
    assert server.read_typed(sfd, JSON) == Ping(1)


def test_a_wrong_argument_is_refused_before_the_message_is_read(connected) -> None:
    """read_typed with a registry that is not one, or a cls that is not a
    class, raises TypeError and leaves the message queued (it used to read it
    first and lose it); write_typed/schedule_typed with no registry raise
    TypeError (not AttributeError) and send nothing."""
    server, sfd, client, cfd = connected
    client.write_typed(cfd, Ping(7), CBOR)
    with pytest.raises(TypeError, match="^registry must be a pyipc.typed.Registry, not NoneType$"):
        server.read_typed(sfd, None)                               # type: ignore[arg-type]
    with pytest.raises(TypeError, match="^cls must be a class, not str$"):
        server.read_typed(sfd, CBOR, cls="Ping")                   # type: ignore[call-overload]
    assert server.read_typed(sfd, CBOR, timeout=5) == Ping(7)      # still there
    with pytest.raises(TypeError, match="^registry must be a pyipc.typed.Registry, not NoneType$"):
        client.write_typed(cfd, Ping(8), None)                     # type: ignore[arg-type]
    with pytest.raises(TypeError, match="^registry must be a pyipc.typed.Registry, not dict$"):
        client.schedule_typed(cfd, Ping(8), {})                    # type: ignore[arg-type]
    client.write_typed(cfd, Ping(9), CBOR)
    assert server.read_typed(sfd, CBOR, timeout=5) == Ping(9)      # nothing else was sent


def test_typed_and_plain_messages_mix(connected) -> None:
    server, sfd, client, cfd = connected
    client.write(cfd, b"plain")
    client.write_typed(cfd, Point(0.0, 1.0), CBOR)
    assert server.read(sfd) == b"plain"
    assert CBOR.decode(server.read(sfd)) == Point(0.0, 1.0)


def test_read_typed_on_a_closed_peer(connected) -> None:
    server, sfd, client, cfd = connected
    client.write_typed(cfd, Ping(5), CBOR)
    client.close(cfd)
    assert server.read_typed(sfd, CBOR) == Ping(5)
    with pytest.raises(pyipc.ConnectionClosedError):
        server.read_typed(sfd, CBOR)
