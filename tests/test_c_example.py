"""A C program written against zig/libipc.h talks to a Python pyipc service.

examples/c/pong.c uses only libIPC's original functions; it is compiled here with
the ziglang toolchain against the library the native backend loads, and run
against `pyipc pongd` on each backend.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import pyipc

SOURCE = Path(__file__).resolve().parent.parent / "examples" / "c" / "pong.c"
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
