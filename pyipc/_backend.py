"""Backend choice and dispatch: the argument, else env PYIPC_BACKEND, else
native if it loads. `plug_in()` makes `pyipc.Context(...)` return an
instance of the chosen backend's subclass (the base class imports no backend).
"""

from __future__ import annotations

import logging
import os
from typing import Optional

from . import _context, _libpath
from ._types import BackendError

log = logging.getLogger("pyipc")

BACKENDS = ("native", "pure")


def load(name: str) -> type:
    """The Context subclass of backend `name`; BackendError if it cannot load."""
    if name == "pure":
        from ._pure.context import PureContext
        return PureContext
    if name == "native":
        from ._native import NativeContext   # raises BackendError with the reason
        return NativeContext
    raise BackendError(f"unknown backend {name!r} (expected 'native' or 'pure')")


def select(name: Optional[str]) -> type:
    """Resolve `backend=` (None means env PYIPC_BACKEND, else automatic).

    Only None means "choose": "" or another name is unknown (BackendError),
    and a non-str (0, False) is a TypeError, not taken for None."""
    if name is None:
        name = os.environ.get("PYIPC_BACKEND") or None
    elif not isinstance(name, str):
        raise TypeError(f"backend must be str or None, not {type(name).__name__}")
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


def warn_if_unbuilt() -> None:
    """At import: a source checkout whose native library is not built runs on
    the pure backend, several times slower; say so once (a WARNING), unless a
    backend was asked for (PYIPC_BACKEND) or a library named (PYIPC_LIBRARY)."""
    if os.environ.get("PYIPC_BACKEND") or os.environ.get("PYIPC_LIBRARY"):
        return
    if any(path.exists() for path in _libpath.library_candidates()):
        return
    log.warning("pyipc: the native library %s is not built (not in %s): using the "
                "pure-Python backend; build it with: pip install -e .",
                _libpath.LIBRARY, _libpath.PACKAGE)


def plug_in() -> None:
    """Make pyipc.Context(...) choose its backend with select()."""
    _context.set_chooser(select)
