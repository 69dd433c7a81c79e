"""`pyipc bench` from the checkout: every system's peers agree and finish.

Not a timed test: it checks that each benchmark program runs (server and client
in separate processes, as `pyipc bench` runs them) and reports a figure, so a
change that breaks a peer fails here instead of in the next benchmark run. The
figures themselves are not checked. pyzmq is not a test dependency, so its two
systems are left out (they run wherever it is installed: `pip install .[bench]`).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import ROOT, require_backend

#: Every system that needs nothing beyond the test dependencies.
SYSTEMS = ["native", "pure", "raw", "native_busy", "native_raw", "raw_native", "raw_epoll", "mp",
           "c_floor", "c_busy", "c_core", "aio", "aio_streams"]
#: Column titles of the systems that only take part in the round trip.
ROUND_TRIP_ONLY = {"native client, raw server", "raw client, native server",
                   "raw client, epoll server", "C floor, busy-polling"}
#: Column titles of the systems that run the per-message event workload.
EVENTS = {"pyipc native", "pyipc pure", "raw socket", "C floor"}
#: Column titles of the systems whose round trip reports the CPU of both peers
#: (the Python clients that measure their own).
CPU = {"pyipc native", "pyipc pure", "raw socket", "native client, raw server",
       "raw client, native server", "raw client, epoll server", "C floor",
       "C floor, busy-polling"}
#: ...and the start of the busy_poll system's title (which names its value).
ROUND_TRIP_ONLY_PREFIX = "pyipc native, busy_poll "
NUMBER = re.compile(r"^[0-9][0-9,]*(\.[0-9]+)?$")


def _table_rows(stdout: str) -> list[list[str]]:
    """The cells of the results table (header first), as printed."""
    lines = [line for line in stdout.splitlines() if line.startswith("| ")]
    end = next(i for i, line in enumerate(lines) if line.startswith("| target "))
    return [[cell.strip() for cell in line.strip("|").split("|")]
            for line in lines[:end] if not line.startswith("|---")]


def test_quick_bench_runs_every_system():
    require_backend("native")
    # The checkout's bench drives the checkout's pyipc; its library is the one
    # the tested pyipc loads (a clean checkout has no library of its own).
    from pyipc import _native
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYIPC_LIBRARY": str(_native.LIBRARY_PATH)}
    done = subprocess.run(
        [sys.executable, "-m", "pyipc", "bench", "--quick", "--cases", "ev64", "ev64k", "rtt",
         "tp64", "tp64k", "--systems", *SYSTEMS], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=480)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    header, *rows = _table_rows(done.stdout)
    systems = header[2:]
    assert len(systems) == len(SYSTEMS), header
    cpu_rows = [": sender's CPU per message", ": receiver's CPU per message"]
    assert [row[0] for row in rows] == [
        "per-message events, 64 B", *("per-message events, 64 B" + r for r in cpu_rows),
        "per-message events, 64 KiB", *("per-message events, 64 KiB" + r for r in cpu_rows),
        "round trip, 64 B",
        "round trip, 64 B: CPU of both peers", "one-way 64 B", "one-way 64 KiB"]
    for row in rows:
        for system, cell in zip(systems, row[2:]):
            assert bool(NUMBER.match(cell)) == _expected_figure(row[0], system), \
                (row[0], system, cell)


def _expected_figure(row: str, system: str) -> bool:
    """Whether ``system`` has a figure in the table's ``row``."""
    if row.startswith("per-message events"):
        return system in EVENTS
    if row.endswith("CPU of both peers"):
        return system in CPU or system.startswith(ROUND_TRIP_ONLY_PREFIX)
    if row.startswith("round trip"):
        return True
    return not (system in ROUND_TRIP_ONLY or system.startswith(ROUND_TRIP_ONLY_PREFIX))


def test_a_target_not_measured_in_the_run_says_so():
    """A run of some cases leaves other targets without a figure: "not
    measured", not "no" (which read as a goal missed)."""
    sys.path.insert(0, str(ROOT))
    from bench.report import targets_markdown
    table = targets_markdown({("rtt", "native", "rtt_us"): [100.0],
                              ("rtt", "raw", "rtt_us"): [80.0, 90.0, 95.0]})
    assert "| native round trip / raw socket | 1.11 | <= 1.15 | yes |" in table
    assert "| native one-way 64 B (msg/s) | – | >= 1,500,000 | not measured |" in table
    assert "| no |" not in table


def test_idle_cpu_reports_both_windows():
    """bench/idle_cpu.py runs (short windows, few clients) and fills its table."""
    require_backend("native")
    from pyipc import _native
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYIPC_LIBRARY": str(_native.LIBRARY_PATH)}
    done = subprocess.run(
        [sys.executable, "-m", "bench.idle_cpu", "--seconds", "0.2", "--clients", "20"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| native")
            or line.startswith("| pure")]
    assert len(rows) == 2, done.stdout
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")][1:]
        assert all(re.match(r"^[0-9]+\.[0-9]{3}%$", c) for c in cells), row
