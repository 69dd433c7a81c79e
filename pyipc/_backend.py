"""Backend choice: the argument, else env PYIPC_BACKEND, else native if it loads."""

from __future__ import annotations

import logging
import os
from typing import Optional

from ._types import BackendError

log = logging.getLogger("pyipc")

BACKENDS = ("native", "pure")


def load(name: str) -> type:
    """The Context subclass of backend ``name``; BackendError if it cannot load."""
    if name == "pure":
        from ._pure import PureContext
        return PureContext
    if name == "native":
        from ._native import NativeContext   # raises BackendError with the reason
        return NativeContext
    raise BackendError(f"unknown backend {name!r} (expected 'native' or 'pure')")


def select(name: Optional[str]) -> type:
    """Resolve ``backend=`` (None means env PYIPC_BACKEND, else automatic)."""
    name = name or os.environ.get("PYIPC_BACKEND") or None
    if name is not None:
        return load(name)
    try:
        return load("native")
    except BackendError as e:
        log.debug("native backend unavailable, using pure: %s", e)
        return load("pure")


def available() -> dict[str, Optional[str]]:
    """Each backend's name, with None when it loads, else why it does not."""
    result: dict[str, Optional[str]] = {}
    for name in BACKENDS:
        try:
            load(name)
            result[name] = None
        except BackendError as e:
            result[name] = str(e)
    return result
