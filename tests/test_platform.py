"""Importing pyipc where it cannot work well: on a system that is not POSIX
(an ImportError that says so), and from a source checkout whose native
library is not built (one WARNING: the pure backend is used)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import pyipc

from conftest import require_backend

#: The package under test (the checkout's, or an installed one).
PACKAGE = Path(pyipc.__file__).resolve().parent
NO_BACKEND_ENV = {k: v for k, v in os.environ.items()
                  if k not in ("PYIPC_BACKEND", "PYIPC_LIBRARY")}
UNBUILT_TEXT = "using the pure-Python backend"


def run(code: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """``python -c code`` from ``cwd`` (its pyipc first on sys.path)."""
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True,
                          text=True, timeout=60, env={**NO_BACKEND_ENV, **env})


def test_import_on_windows_says_posix_is_needed():
    done = run("import os; os.name = 'nt'\nimport pyipc", PACKAGE.parent)
    assert done.returncode != 0
    assert "ImportError: pyipc needs a POSIX system" in done.stderr
    assert "'nt'" in done.stderr


@pytest.fixture
def unbuilt(tmp_path) -> Path:
    """A copy of the checkout's package without its library or header (as
    after a git clone, before ``pip install -e .``), in a checkout without
    zig-out/."""
    shutil.copytree(PACKAGE, tmp_path / "pyipc",
                    ignore=shutil.ignore_patterns("libipc.*", "__pycache__"))
    return tmp_path


def test_an_unbuilt_checkout_warns_once_that_it_uses_pure(unbuilt):
    done = run("import pyipc\n"
               "with pyipc.Context() as ctx: print(ctx.backend)\n"
               "with pyipc.Context() as ctx: print(ctx.backend)\n", unbuilt)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["pure", "pure"]
    warnings = [line for line in done.stderr.splitlines() if UNBUILT_TEXT in line]
    assert len(warnings) == 1, done.stderr
    assert "not built" in warnings[0] and "pip install -e ." in warnings[0]


def test_an_unbuilt_checkout_is_silent_when_pure_is_asked_for(unbuilt):
    done = run("import pyipc\nwith pyipc.Context() as ctx: print(ctx.backend)",
               unbuilt, PYIPC_BACKEND="pure")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["pure"]
    assert done.stderr == ""


def test_a_built_package_is_silent():
    require_backend("native")
    done = run("import pyipc", PACKAGE.parent)
    assert done.returncode == 0, done.stderr
    assert UNBUILT_TEXT not in done.stderr
