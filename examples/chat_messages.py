"""The messages of the chat example, shared by chat_service and chat_client.

Typed messages with JSON bodies (``Registry("json")``): everything here is text,
and JSON bodies can be read by any language's JSON parser.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from pyipc import Registry

#: Both ends use this registry: same numbers, same classes, same codec.
registry = Registry("json")


@registry.register(1)
@dataclass
class Join:
    """client -> service, first: take part as ``name``."""
    name: str


@registry.register(2)
@dataclass
class Welcome:
    """service -> client: joined; ``members`` are everyone's names, sorted."""
    members: List[str] = field(default_factory=list)


@registry.register(3)
@dataclass
class Refused:
    """service -> client: the Join was refused (name taken, ...); the service hangs up."""
    reason: str


@registry.register(4)
@dataclass
class Say:
    """client -> service: a message for every other member."""
    text: str


@registry.register(5)
@dataclass
class Said:
    """service -> every member but the sender: ``sender`` said ``text``."""
    sender: str
    text: str


@registry.register(6)
@dataclass
class Joined:
    """service -> every other member: ``name`` joined."""
    name: str


@registry.register(7)
@dataclass
class Left:
    """service -> every other member: ``name`` left."""
    name: str
