"""Packaging: the distribution's metadata (name, version, SPDX license, URLs),
and what a wheel and an sdist built from this checkout carry.

The wheel and sdist are built once per module, without build isolation and
without the Zig core (PYIPC_SKIP_NATIVE=1: a few seconds, no toolchain run),
from a copy of the checkout so that no build/ or egg-info lands in it.
"""

from __future__ import annotations

import email.message
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import pyipc
from pyipc import _version

from conftest import ROOT

DIST = "pyipc-zig"
URLS = {"Homepage", "Source", "Issues", "Documentation", "Changelog"}
#: Not copied for the build: environments, build output, the Zig cache.
NOT_SOURCES = shutil.ignore_patterns(".git", ".venv*", "zig-out", ".zig-cache", "build", "dist",
                                     "*.egg-info", "__pycache__", ".hypothesis", "*.so", "*.dylib")
#: Builds both with setuptools' PEP 517 hooks (what pip and build call); the
#: hooks print their log on stdout, so the file names go to a file.
BUILD = """
import sys
from pathlib import Path
from setuptools import build_meta
out = Path(sys.argv[1])
names = [build_meta.build_wheel(str(out)), build_meta.build_sdist(str(out))]
(out / "built.txt").write_text("\\n".join(names))
"""


def _check_metadata(md: email.message.Message) -> None:
    """The fields every build of pyipc-zig must carry."""
    assert md["Name"] == DIST
    assert md["Version"] == _version.__version__
    assert md["License-Expression"] == "ISC"
    assert md.get_all("License-File") == ["LICENSE"]
    assert md["License"] is None                 # the old table form is gone
    assert not [c for c in md.get_all("Classifier") or [] if c.startswith("License ::")]
    urls = dict(u.split(", ", 1) for u in md.get_all("Project-URL") or [])
    assert set(urls) == URLS
    assert all(u.startswith("https://github.com/pyipc/pyipc-zig") for u in urls.values())
    requires = md.get_all("Requires-Dist") or []
    assert 'typing_extensions>=4.6; python_version < "3.12"' in requires, requires


def test_installed_distribution_metadata():
    md = importlib.metadata.metadata(DIST)
    _check_metadata(md)  # type: ignore[arg-type]
    assert importlib.metadata.version(DIST) == pyipc.__version__ == _version.__version__
    scripts = importlib.metadata.distribution(DIST).entry_points.select(group="console_scripts")
    assert [(ep.name, ep.value) for ep in scripts] == [("pyipc", "pyipc.cli:main")]


def test_license_file_is_isc():
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("ISC License\n\nCopyright (c) 2026 the pyipc authors\n")
    assert "Permission to use, copy, modify, and/or distribute this software" in text


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    """(wheel, sdist) built from a copy of the checkout, pure (no Zig build)."""
    tmp = tmp_path_factory.mktemp("packaging")
    src, out = tmp / "src", tmp / "out"
    shutil.copytree(ROOT, src, ignore=NOT_SOURCES)
    env = {**os.environ, "PYIPC_SKIP_NATIVE": "1"}
    done = subprocess.run([sys.executable, "-c", BUILD, str(out)], cwd=src, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    wheel, sdist = (out / "built.txt").read_text().split("\n")
    return out / wheel, out / sdist


def test_wheel_carries_the_package_its_types_and_license(built):
    wheel, _ = built
    assert wheel.name.startswith(f"pyipc_zig-{_version.__version__}-")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        info = f"pyipc_zig-{_version.__version__}.dist-info"
        md = email.message_from_bytes(zf.read(f"{info}/METADATA"))
        assert zf.read(f"{info}/licenses/LICENSE") == (ROOT / "LICENSE").read_bytes()
    _check_metadata(md)
    assert "pyipc/py.typed" in names
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "pyipc").rglob("*.py")}
    assert sources <= names, sources - names            # subpackages too
    assert not [n for n in names if n.split("/")[0] in ("bench", "tests", "examples")]


def test_sdist_carries_license_changelog_and_typing_programs(built):
    _, sdist = built
    with tarfile.open(sdist) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    for needed in ("LICENSE", "CHANGELOG.md", "pyipc/py.typed", "pyipc/_version.py",
                   "build.zig", "zig/libipc.h", "tests/typing/messages.py"):
        assert needed in names, needed
