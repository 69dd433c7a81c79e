"""A C program written against zig/libipc.h talks to a Python pyipc service.

examples/c/pong.c uses only libIPC's original functions; it is compiled here with
the ziglang toolchain against the library the native backend loads (`-lipc`), and
run against `pyipc pongd` on each backend. On Linux it is also linked against a
stand-in for the original libIPC (DT_NEEDED libipc.so.0) and run with only
LD_LIBRARY_PATH pointing at pyipc's directory: the library answers to libIPC's
SONAME, with no symlink.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import pyipc

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "examples" / "c" / "pong.c"
_NATIVE_MISSING = pyipc.available_backends()["native"]

pytestmark = pytest.mark.skipif(
    _NATIVE_MISSING is not None and os.environ.get("PYIPC_REQUIRE_NATIVE") != "1",
    reason=f"native library not loadable: {_NATIVE_MISSING}")


@pytest.fixture(scope="module")
def pong_binary(tmp_path_factory):
    from pyipc import _native
    out = tmp_path_factory.mktemp("c") / "pong"
    subprocess.run([sys.executable, "-m", "ziglang", "cc", "-std=c99", "-Wall", "-Werror",
                    "-I", str(_native.HEADER_PATH.parent), str(SOURCE),
                    "-L", str(_native.LIBRARY_PATH.parent), "-lipc", "-o", str(out)],
                   check=True)
    return out, _native.LIBRARY_PATH.parent


@pytest.fixture
def pongd(request):
    """A `pyipc pongd` process on the backend given by the test's parameter."""
    rundir = tempfile.mkdtemp(prefix="pyipc-c-", dir="/tmp")
    proc = subprocess.Popen([sys.executable, "-m", "pyipc", "--rundir", rundir,
                             "--backend", request.param, "pongd", "cpong"],
                            stdout=subprocess.PIPE, text=True)
    try:
        ready = proc.stdout.readline()
        assert ready.startswith("pongd: serving cpong"), ready
        yield rundir
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        shutil.rmtree(rundir, ignore_errors=True)
    assert proc.returncode == 0, out


@pytest.mark.parametrize("pongd", ["pure", "native"], indirect=True)
def test_c_client_gets_its_echoes(pong_binary, pongd):
    binary, libdir = pong_binary
    messages = ["hello", "", "x" * 70_000, "from C"]
    env = dict(os.environ, RUNDIR=pongd, LD_LIBRARY_PATH=str(libdir))
    result = subprocess.run([str(binary), "cpong", *messages], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    for message in ("hello", "from C"):
        assert message in result.stdout


@pytest.mark.parametrize("pongd", ["pure"], indirect=True)
def test_c_client_reports_a_missing_service(pong_binary, pongd):
    binary, libdir = pong_binary
    env = dict(os.environ, RUNDIR=pongd, LD_LIBRARY_PATH=str(libdir))
    result = subprocess.run([str(binary), "no-such-service", "hello"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0


@functools.cache
def _check_wheel():
    """ci/check_wheel.py as a module: its ELF reader and header parser."""
    spec = importlib.util.spec_from_file_location("check_wheel", ROOT / "ci" / "check_wheel.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_wheel"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _zig_cc(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "ziglang", "cc", *args], check=True)


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="SONAME libipc.so.0: ELF systems, tested on Linux")


@linux_only
def test_library_answers_to_libipc_soname_and_exports_the_header():
    from pyipc import _native
    cw = _check_wheel()
    library = cw.parse_elf(_native.LIBRARY_PATH.read_bytes())
    assert _native.LIBRARY_PATH.name == "libipc.so.0"
    assert library.soname == "libipc.so.0"
    declared = cw.declared_functions(_native.HEADER_PATH.read_text())
    assert len(declared) > 30
    assert [f for f in declared if f not in library.exports] == []


@linux_only
@pytest.mark.parametrize("pongd", ["native"], indirect=True)
def test_a_program_linked_against_libipc_so_0_loads_pyipc(tmp_path, pongd):
    """A program built against "the original libIPC" (a stand-in with libIPC's
    SONAME and no code) runs on pyipc's library, found by LD_LIBRARY_PATH alone."""
    from pyipc import _native
    cw = _check_wheel()
    original = tmp_path / "original"
    original.mkdir()
    stubs = tmp_path / "stubs.c"
    stubs.write_text("".join(f"void {f}(void) {{}}\n"
                             for f in cw.declared_functions(_native.HEADER_PATH.read_text())))
    _zig_cc("-shared", "-Wl,-soname,libipc.so.0", str(stubs), "-o", str(original / "libipc.so"))
    binary = tmp_path / "pong"
    _zig_cc("-std=c99", "-fPIE", "-pie", "-I", str(_native.HEADER_PATH.parent), str(SOURCE),
            "-L", str(original), "-lipc", "-o", str(binary))
    assert "libipc.so.0" in cw.parse_elf(binary.read_bytes()).needed
    env = dict(os.environ, RUNDIR=pongd, LD_LIBRARY_PATH=str(_native.LIBRARY_PATH.parent))
    result = subprocess.run([str(binary), "cpong", "hello", "from libIPC's SONAME"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "from libIPC's SONAME" in result.stdout
