"""The benchmark cases and the systems compared, and how to start each peer."""

from __future__ import annotations

import importlib.util
import select
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

from . import cbuild


@dataclass(frozen=True)
class Case:
    """One measurement: what the client does and which metrics come out of it."""

    key: str
    title: str
    kind: str            # events | rtt | oneway | scale
    size: int
    n_full: int
    n_quick: int
    idle: int = 0

    def n(self, quick: bool) -> int:
        return self.n_quick if quick else self.n_full


CASES: List[Case] = [
    # Issue 21's headline: the per-message event API (schedule() per message,
    # MESSAGE_TX/MESSAGE_RX counted from wait_events()); peers without events
    # run their one-way program (one send per message).
    Case("ev64", "per-message events, 64 B", "events", 64, 1_000_000, 100_000),
    Case("ev64k", "per-message events, 64 KiB", "events", 64 << 10, 30_000, 1_500),
    Case("rtt", "round trip, 64 B", "rtt", 64, 20_000, 2_000),
    Case("tp64", "one-way 64 B", "oneway", 64, 2_000_000, 200_000),
    Case("tp64k", "one-way 64 KiB", "oneway", 64 << 10, 30_000, 1_500),
    Case("tp1m", "one-way 1 MiB", "oneway", 1 << 20, 2_000, 100),
    Case("scale1k", "1,000 idle clients", "scale", 64, 5_000, 500, idle=1_000),
    Case("scale10k", "10,000 idle clients", "scale", 64, 5_000, 500, idle=10_000),
]


#: The busy_poll of the "native_busy" system's peers, in microseconds: about
#: twice the client's share of a round trip, so that the server's spin still
#: runs when the next request comes.
BUSY_POLL_US = 50


@dataclass
class System:
    """A way to do the same IPC: a name and the command line of its peers."""

    key: str
    title: str
    command: Callable[[str, Case, str, int], List[str]]   # (role, case, dir, n) -> argv
    kinds: tuple = ("rtt", "oneway")
    why_not: Optional[str] = None          # set when it cannot run here
    extra: Dict[str, str] = field(default_factory=dict)


def _python(module: str, *extra: str) -> Callable[[str, Case, str, int], List[str]]:
    def command(role: str, case: Case, directory: str, n: int) -> List[str]:
        return [sys.executable, "-m", f"bench.{module}", role, case.kind, "--dir", directory,
                "--n", str(n), "--size", str(case.size), "--idle", str(case.idle), *extra]
    return command


def _mixed(server: Callable[[str, Case, str, int], List[str]],
           client: Callable[[str, Case, str, int], List[str]]
           ) -> Callable[[str, Case, str, int], List[str]]:
    """The server of one system with the client of another (the same framing
    and socket file): which side of a round trip costs what."""
    def command(role: str, case: Case, directory: str, n: int) -> List[str]:
        return (server if role == "server" else client)(role, case, directory, n)
    return command


def _program(exe_of: Callable[[], object], socket_file: bool, *extra: str
             ) -> Callable[[str, Case, str, int], List[str]]:
    """A C peer: it takes the socket file (floor) or the run dir (core)."""
    def command(role: str, case: Case, directory: str, n: int) -> List[str]:
        target = directory + "/bench" if socket_file else directory
        return [str(exe_of()), role, case.kind, target, str(n), str(case.size), *extra]
    return command


def _native_reason() -> Optional[str]:
    try:
        from pyipc import _native  # noqa: F401
    except Exception as e:       # BackendError, or cffi missing
        return str(e)
    return None


def _build_reason(build: Callable[[], object]) -> Optional[str]:
    try:
        build()
    except Exception as e:
        return f"does not build: {e}"
    return None


def systems() -> List[System]:
    """Every system, each with ``why_not`` set when it is not available here."""
    native = _native_reason()
    zmq = (None if importlib.util.find_spec("zmq")
           else "not installed (pip install pyipc-zig[bench])")
    return [
        System("native", "pyipc native", _python("peer_pyipc", "--backend", "native"),
               ("events", "rtt", "oneway", "scale"), native),
        System("pure", "pyipc pure", _python("peer_pyipc", "--backend", "pure"),
               ("events", "rtt", "oneway", "scale")),
        System("raw", "raw socket", _python("peer_raw"), ("events", "rtt", "oneway", "scale")),
        System("native_busy", f"pyipc native, busy_poll {BUSY_POLL_US} µs",
               _python("peer_pyipc", "--backend", "native", "--busy-poll", str(BUSY_POLL_US)),
               ("rtt",), native),
        System("native_raw", "native client, raw server",
               _mixed(_python("peer_raw"), _python("peer_pyipc", "--backend", "native")),
               ("rtt",), native),
        System("raw_native", "raw client, native server",
               _mixed(_python("peer_pyipc", "--backend", "native"), _python("peer_raw")),
               ("rtt",), native),
        System("raw_epoll", "raw client, epoll server",
               _mixed(_python("peer_raw", "--mode", "epoll"), _python("peer_raw")), ("rtt",),
               None if hasattr(select, "epoll") else "no select.epoll here (Linux only)"),
        System("mp", "mp.connection", _python("peer_mp")),
        System("zmq_pair", "zmq PAIR", _python("peer_zmq", "--mode", "pair"), why_not=zmq),
        System("zmq_push", "zmq PUSH/PULL", _python("peer_zmq", "--mode", "pushpull"),
               ("events", "rtt", "oneway"), why_not=zmq),
        # Async (issue 18): pyipc.aio against asyncio's Unix streams and zmq.asyncio.
        System("aio", "pyipc.aio native", _python("peer_aio", "--backend", "native"),
               why_not=native),
        System("aio_streams", "asyncio Unix streams", _python("peer_aiostreams")),
        System("zmq_asyncio", "zmq.asyncio PAIR", _python("peer_zmqaio"), why_not=zmq),
        System("c_floor", "C floor", _program(cbuild.build_floor, True),
               ("events", "rtt", "oneway"), why_not=_build_reason(cbuild.build_floor)),
        # Both C peers spin on non-blocking reads: the floor of a busy-polled
        # round trip on this machine (issue 21's goal 4 for native_busy).
        System("c_busy", "C floor, busy-polling", _program(cbuild.build_floor, True, "busy"),
               ("rtt",), why_not=_build_reason(cbuild.build_floor)),
        System("c_core", "C + Zig core", _program(cbuild.build_core, False),
               why_not=native or _build_reason(cbuild.build_core)),
    ]
