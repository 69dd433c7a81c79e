"""The pure backend's ABI numbers equal libipc.h's (the contract).

The header is read through cffi's cdef alone, without loading the library,
so this runs even where the native backend is not built. The native backend
takes its numbers from the same cdef (pyipc/_native.py), so a header that
changes a number and a Python enum left behind fail here.
"""

from __future__ import annotations

from pathlib import Path

import cffi
import pytest

import pyipc
from pyipc import CBEvent, EventType
from pyipc._libpath import declarations
from pyipc._types import ERRORS_BY_CODE, ERRORS_BY_NAME

ROOT = Path(__file__).resolve().parent.parent
#: The header of the checkout, and the copy installed next to the package (the
#: one the native backend reads: in CI the installed package, not the checkout's).
INSTALLED = Path(pyipc.__file__).resolve().parent / "libipc.h"
HEADERS = [p for p in (ROOT / "zig" / "libipc.h", INSTALLED) if p.exists()]


def header_id(header: Path) -> str:
    """A test id that says which copy of the header it reads."""
    return "checkout" if header.parent.name == "zig" else "installed"


#: Codes the native backend handles itself (never raised as such).
INTERNAL_CODES = {"IPC_OK", "IPC_E_BUFFER_TOO_SMALL", "IPC_E_NO_MEMORY"}


def enum_of(header: Path, name: str) -> dict[str, int]:
    """The constants of C enum ``name`` in the header: {C name: number}."""
    ffi = cffi.FFI()
    ffi.cdef(declarations(header))
    return {c_name: value for value, c_name in ffi.typeof(f"enum {name}").elements.items()}


def test_the_checkout_has_its_header():
    assert ROOT.joinpath("zig", "libipc.h") in HEADERS


def test_a_package_with_the_native_backend_has_its_header():
    if pyipc.available_backends()["native"] is None:
        assert INSTALLED in HEADERS


@pytest.mark.parametrize("header", HEADERS, ids=header_id)
def test_event_types_are_the_headers(header):
    assert enum_of(header, "event_types") == {t.name: t.value for t in EventType}


@pytest.mark.parametrize("header", HEADERS, ids=header_id)
def test_callback_results_are_the_headers(header):
    assert enum_of(header, "cb_event_types") == {f"CB_{r.name}": r.value for r in CBEvent}


@pytest.mark.parametrize("header", HEADERS, ids=header_id)
def test_error_codes_are_the_headers(header):
    codes = enum_of(header, "ipc_error_codes")
    assert set(ERRORS_BY_NAME) == set(codes) - INTERNAL_CODES
    assert ERRORS_BY_CODE == {codes[name]: cls for name, cls in ERRORS_BY_NAME.items()}


def test_a_drifted_header_is_caught(tmp_path):
    """The comparison sees a changed number (the test is not vacuous)."""
    text = (ROOT / "zig" / "libipc.h").read_text().replace("MESSAGE_TX = 4", "MESSAGE_TX = 40")
    drifted = tmp_path / "libipc.h"
    drifted.write_text(text)
    assert enum_of(drifted, "event_types") != {t.name: t.value for t in EventType}
