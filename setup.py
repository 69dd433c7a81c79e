"""Build hook: compile the Zig core with the ziglang toolchain into the package.

setuptools calls build_py for `pip install .`, wheels and editable installs; this
one first runs `python -m ziglang build` and copies the shared library and the
header next to pyipc/__init__.py, where pyipc._native looks for them.
Set PYIPC_SKIP_NATIVE=1 to install the pure backend only. PYIPC_ZIG_TARGET
(e.g. aarch64-linux-gnu.2.17) cross-compiles, for ci/wheels.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

ROOT = Path(__file__).resolve().parent
LIBRARY_NAMES = ("libipc.so", "libipc.dylib")


def build_native(dest: Path) -> None:
    """Run the Zig build and put the library and header into ``dest``."""
    prefix = ROOT / "build" / "zig-out"
    cmd = [sys.executable, "-m", "ziglang", "build", "-Doptimize=ReleaseFast",
           "--prefix", str(prefix)]
    target = os.environ.get("PYIPC_ZIG_TARGET")
    if target:
        cmd.append(f"-Dtarget={target}")
    print("pyipc: building the native core:", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)
    dest.mkdir(parents=True, exist_ok=True)
    for name in LIBRARY_NAMES:
        built = prefix / "lib" / name
        if built.exists():
            shutil.copy2(built, dest / name)
            break
    else:
        raise RuntimeError(f"zig build produced no library in {prefix / 'lib'}")
    shutil.copy2(ROOT / "zig" / "libipc.h", dest / "libipc.h")


class BuildPyWithZig(build_py):
    """build_py that also builds the Zig core (unless PYIPC_SKIP_NATIVE=1)."""

    def run(self) -> None:
        super().run()
        if os.environ.get("PYIPC_SKIP_NATIVE") == "1":
            return
        editable = getattr(self, "editable_mode", False)
        build_native(ROOT / "pyipc" if editable else Path(self.build_lib) / "pyipc")


class BinaryDistribution(Distribution):
    """The wheel carries a native library, so it is platform specific."""

    def has_ext_modules(self) -> bool:
        return os.environ.get("PYIPC_SKIP_NATIVE") != "1"


setup(cmdclass={"build_py": BuildPyWithZig}, distclass=BinaryDistribution)
