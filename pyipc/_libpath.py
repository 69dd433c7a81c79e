"""Where the native backend's library and header are: a module of its own so
that the backend choice (pyipc._backend) can tell whether the library is
built without loading it, and the tests can read the header without it.

The library is looked up in: env PYIPC_LIBRARY, the package directory (where
`pip install` puts it), then `zig-out/lib` of a source checkout
(`python -m ziglang build`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

PACKAGE = Path(__file__).resolve().parent
# ELF: the file named as its SONAME; libipc.so beside it is -lipc's linker script.
LIBRARY = "libipc.dylib" if sys.platform == "darwin" else "libipc.so.0"


def header_path() -> Optional[Path]:
    """libipc.h next to the package, else in the checkout's zig/; None if neither."""
    for header in (PACKAGE / "libipc.h", PACKAGE.parent / "zig" / "libipc.h"):
        if header.exists():
            return header
    return None


def declarations(header: Path) -> str:
    """The header's C declarations between its CFFI markers (the C ABI, for
    cffi's cdef: the one copy of it)."""
    text = header.read_text()
    return text.split("/* CFFI-BEGIN */", 1)[1].split("/* CFFI-END */", 1)[0]


def library_candidates() -> list[Path]:
    """Where the library is looked for, in order."""
    explicit = os.environ.get("PYIPC_LIBRARY")
    if explicit:
        return [Path(explicit)]
    return [PACKAGE / LIBRARY, PACKAGE.parent / "zig-out" / "lib" / LIBRARY]
