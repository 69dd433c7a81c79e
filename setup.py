"""Build hook: compile the Zig core with the ziglang toolchain into the package.

setuptools calls build_py for `pip install .`, wheels and editable installs; this
one first runs `python -m ziglang build` and copies the shared library and the
header next to pyipc/__init__.py, where pyipc._native looks for them.
Set PYIPC_SKIP_NATIVE=1 to install the pure backend only. PYIPC_ZIG_TARGET
(e.g. aarch64-linux-gnu.2.17) cross-compiles, for ci/wheels (a musl target
also needs patchelf: see name_musl_libc).

The library does not use the Python C API, so a wheel serves every Python 3:
its tag is py3-none-PLATFORM. PLATFORM is env PYIPC_WHEEL_PLAT taken as is
(e.g. manylinux_2_17_x86_64.manylinux2014_x86_64, dots separating platform
tags), else `bdist_wheel --plat-name`, else this machine's platform.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

try:  # setuptools >= 70.1 has its own; before that it came with `wheel`
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # pragma: no cover
    try:
        from wheel.bdist_wheel import bdist_wheel
    except ImportError:  # no wheel building here (e.g. an old setuptools, no wheel)
        bdist_wheel = object

ROOT = Path(__file__).resolve().parent
#: ELF systems: the library itself, named as its SONAME (libIPC's, so a program
#: linked against libIPC loads it), and what `-lipc` finds: a one-line linker
#: script naming it (a wheel cannot hold a symlink). macOS: the dylib.
ELF_LIBRARY, LINKER_SCRIPT, MACHO_LIBRARY = "libipc.so.0", "libipc.so", "libipc.dylib"
LIBRARY_NAMES = (ELF_LIBRARY, LINKER_SCRIPT, MACHO_LIBRARY)


def build_native(dest: Path) -> None:
    """Run the Zig build and put the library and header into ``dest``."""
    target = os.environ.get("PYIPC_ZIG_TARGET")
    # One prefix per target, emptied first: a library left by an earlier build
    # for another target must never end up in this wheel.
    prefix = ROOT / "build" / "zig-out" / (target or "native")
    shutil.rmtree(prefix / "lib", ignore_errors=True)
    cmd = [sys.executable, "-m", "ziglang", "build", "-Doptimize=ReleaseFast",
           "--prefix", str(prefix)]
    if target:
        cmd.append(f"-Dtarget={target}")
    print("pyipc: building the native core:", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)
    dest.mkdir(parents=True, exist_ok=True)
    for name in LIBRARY_NAMES:
        (dest / name).unlink(missing_ok=True)
    built = prefix / "lib"
    if (built / MACHO_LIBRARY).exists():
        shutil.copy2(built / MACHO_LIBRARY, dest / MACHO_LIBRARY)
    elif (built / ELF_LIBRARY).exists():
        # zig-out/lib/libipc.so.0 is a symlink: copy2 copies the file it names.
        shutil.copy2(built / ELF_LIBRARY, dest / ELF_LIBRARY)
        (dest / LINKER_SCRIPT).write_text(f"INPUT({ELF_LIBRARY})\n")
    else:
        raise RuntimeError(f"zig build produced no library in {built}")
    shutil.copy2(ROOT / "zig" / "libipc.h", dest / "libipc.h")
    if target and "-linux-musl" in target:
        name_musl_libc(dest / ELF_LIBRARY, target.split("-", 1)[0])


def name_musl_libc(library: Path, arch: str) -> None:
    """Zig links musl's C library as DT_NEEDED ``libc.so``; musllinux wheels (built
    on Alpine) need ``libc.musl-ARCH.so.1``, the name auditwheel's musllinux policy
    allows. musl's loader takes any ``libc.*`` as itself, so both load everywhere;
    the Alpine name makes the wheel what auditwheel and other tools expect.
    Needs patchelf (``pip install patchelf``): only for cross-built musl wheels."""
    patchelf = shutil.which("patchelf") or shutil.which("patchelf", path=str(Path(sys.executable).parent))
    if patchelf is None:
        raise RuntimeError("a musl target needs patchelf to name libc as musllinux "
                           "wheels do: pip install patchelf")
    cmd = [patchelf, "--replace-needed", "libc.so", f"libc.musl-{arch}.so.1", str(library)]
    print("pyipc:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


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


def normalize_platform(plat: str) -> str:
    """A wheel platform tag from a sysconfig-style name (``freebsd-14.0-RELEASE-amd64``
    -> ``freebsd_14_0_release_amd64``); a name without ``-`` is taken to be tags
    already, where dots separate several tags (manylinux_2_17_x86_64.manylinux2014_x86_64)."""
    plat = plat.strip().lower()
    if "-" in plat:
        plat = re.sub(r"[-. ]", "_", plat)
    if not re.fullmatch(r"[a-z0-9_]+(\.[a-z0-9_]+)*", plat):
        raise ValueError(f"not a wheel platform tag: {plat!r}")
    return plat


class BdistWheelPy3(bdist_wheel):
    """py3-none-PLATFORM: one wheel per platform for every Python 3 (the library is
    loaded with cffi's ABI mode and does not depend on the Python ABI)."""

    def finalize_options(self) -> None:
        super().finalize_options()
        if os.environ.get("PYIPC_SKIP_NATIVE") != "1":
            self.root_is_pure = False

    def get_tag(self) -> tuple:
        if os.environ.get("PYIPC_SKIP_NATIVE") == "1":
            return super().get_tag()
        explicit = os.environ.get("PYIPC_WHEEL_PLAT")
        if explicit:
            plat = normalize_platform(explicit)
        elif self.plat_name_supplied and self.plat_name:
            plat = normalize_platform(self.plat_name)
        else:
            plat = super().get_tag()[2]
        return "py3", "none", plat


COMMANDS = {"build_py": BuildPyWithZig}
if bdist_wheel is not object:
    COMMANDS["bdist_wheel"] = BdistWheelPy3
setup(cmdclass=COMMANDS, distclass=BinaryDistribution)
