"""Typed messages: a Registry of dataclasses (CBOR) and of a to_dict/from_dict
class (JSON), sent and received through a Context; what a type checker knows
of each value. Run as a program; checked by ``mypy --strict``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple

from pyipc import Context, EventType, Registry
from pyipc.typed import CODECS, MAX_TYPE_NUMBER, UnexpectedTypeError

messages = Registry()                 # CBOR bodies


@messages.register(1)
@dataclass
class Ping:
    seq: int
    note: str = ""


@messages.register(2)
@dataclass
class Pong:
    seq: int
    tags: List[str] = field(default_factory=list)


class Point:
    """A message class that is not a dataclass."""

    def __init__(self, x: float, y: float) -> None:
        self.x, self.y = x, y

    def to_dict(self) -> Dict[str, Any]:
        return {"x": self.x, "y": self.y}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> Point:
        return cls(d["x"], d["y"])


points = Registry("json")
points.register(7, Point)


def round_trip(server: Context, client: Context, fd: int, conn: int) -> Pong:
    client.write_typed(fd, Ping(1, "first"), messages, timeout=10)
    ev = server.wait_event(timeout=10)
    while ev.type != EventType.MESSAGE_RX:
        ev = server.wait_event(timeout=10)
    ping: Ping = messages.decode_event(ev, Ping)
    server.schedule_typed(conn, Pong(ping.seq, ["a", "b"]), messages)
    while server.wait_event(timeout=10).type != EventType.MESSAGE_TX:
        pass
    return client.read_typed(fd, messages, timeout=10, cls=Pong)


def main() -> None:
    assert messages.codec in CODECS and points.codec == "json"
    assert len(messages) == 2 and 1 in messages and Pong in messages
    assert [(n, c.__name__) for n, c in messages] == [(1, "Ping"), (2, "Pong")]
    assert messages.type_number(Ping(0)) == 1 and messages.message_class(2) is Pong
    assert MAX_TYPE_NUMBER == 255

    payload: bytes = messages.encode(Ping(7))
    anything = messages.decode(payload)            # the registry's class: Any here
    assert anything == Ping(7)
    ping = messages.decode(payload, Ping)          # Ping, for the checker too
    assert ping.seq + 1 == 8
    try:
        messages.decode(payload, Pong)
    except UnexpectedTypeError as e:
        expected: type = e.expected
        assert (e.number, expected) == (1, Pong)
    else:
        raise AssertionError("a Ping decoded as a Pong")
    point = points.decode(points.encode(Point(1.5, -2.0)), Point)
    where: Tuple[float, float] = (point.x, point.y)
    assert where == (1.5, -2.0)

    with Context() as server, Context() as client:
        server.service_init("typing-messages")
        fd = client.connect("typing-messages")
        conn = server.wait_event(timeout=10).fd
        pong = round_trip(server, client, fd, conn)
        assert pong.tags == ["a", "b"] and pong.seq == 1


if __name__ == "__main__":
    main()
