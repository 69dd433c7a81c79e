"""The messages of the key-value example, shared by kv_service and kv_client.

Typed messages (one type byte, then a CBOR body), so values may be any CBOR
value: str, bytes, ints of any size, floats, lists, maps, timezone-aware
datetimes...
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from pyipc import Registry

#: Both ends use this registry: same numbers, same classes, same codec.
registry = Registry("cbor")


@registry.register(1)
@dataclass
class Get:
    """Ask for the value of ``key``."""
    key: str


@registry.register(2)
@dataclass
class Put:
    """Set ``key`` to ``value``."""
    key: str
    value: Any


@registry.register(3)
@dataclass
class Delete:
    """Remove ``key``."""
    key: str


@registry.register(4)
@dataclass
class Dump:
    """Ask for every key that starts with ``prefix``, with its value."""
    prefix: str = ""


@registry.register(10)
@dataclass
class Reply:
    """The answer to each request, in order: ``ok``, then the value or the error.

    Get: the value; Put: None; Delete: None; Dump: a dict of keys and values.
    """
    ok: bool
    value: Any = None
    error: Optional[str] = None
