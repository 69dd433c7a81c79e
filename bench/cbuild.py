"""Compile the C benchmark programs with the Zig toolchain's C compiler."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
SOURCES = Path(__file__).resolve().parent / "c"
OUT = ROOT / "zig-out" / "bench"


def _newer(target: Path, *sources: Path) -> bool:
    return target.exists() and all(target.stat().st_mtime >= s.stat().st_mtime for s in sources)


def _cc(args: list) -> Optional[str]:
    """Run ``python -m ziglang cc ARGS``; None on success, else the reason."""
    proc = subprocess.run([sys.executable, "-m", "ziglang", "cc", *args],
                          capture_output=True, text=True)
    return None if proc.returncode == 0 else (proc.stderr.strip() or "cc failed")[-400:]


def build_floor() -> Path:
    """The unbatched C floor program (raises RuntimeError when it does not build)."""
    src, exe = SOURCES / "floor.c", OUT / "floor"
    if not _newer(exe, src):
        OUT.mkdir(parents=True, exist_ok=True)
        err = _cc(["-O2", "-o", str(exe), str(src)])
        if err:
            raise RuntimeError(err)
    return exe


def build_core() -> Path:
    """The C program that drives the Zig core through libipc.h (linked to the
    library the native backend loads)."""
    from pyipc import _native
    src, exe = SOURCES / "core.c", OUT / "core"
    lib = Path(_native.LIBRARY_PATH).resolve()
    # The program finds the library by its directory (rpath): it is rebuilt
    # when the backend loads another one (PYIPC_LIBRARY), not only a newer one.
    linked = OUT / "core.library"
    if not (_newer(exe, src, lib) and linked.exists() and linked.read_text() == str(lib)):
        OUT.mkdir(parents=True, exist_ok=True)
        err = _cc(["-O2", f"-I{Path(_native.HEADER_PATH).parent}", "-o", str(exe), str(src),
                   str(lib), f"-Wl,-rpath,{lib.parent}"])
        if err:
            raise RuntimeError(err)
        linked.write_text(str(lib))
    return exe
