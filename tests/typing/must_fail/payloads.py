"""Mistakes a type checker must catch: ``mypy --strict`` reports exactly the
errors marked ``# error: [code]``, on their lines (tests/typing/test_typing.py).
Never run: the calls would raise TypeError (or worse) at run time.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyipc import Context, Registry

messages = Registry()


@messages.register(1)
@dataclass
class Ping:
    seq: int


@messages.register(2)
@dataclass
class Pong:
    seq: int


def mistakes(ctx: Context, fd: int) -> None:
    ctx.write(fd, 123)  # error: [arg-type]
    ctx.schedule(fd, 1.5)  # error: [arg-type]
    ctx.write_many(fd, [b"ok", None])  # error: [list-item]
    ctx.read_into(fd, [0] * 16)  # error: [arg-type]
    text: str = ctx.read(fd)  # error: [assignment]
    pong: Pong = ctx.read_typed(fd, messages, cls=Ping)  # error: [assignment]
    also: Pong = messages.decode(b"\x01\xa1cseq\x01", Ping)  # error: [assignment]
    print(text, pong, also)
