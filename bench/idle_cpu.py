"""CPU used by an idle pyipc service (issue 21, goal 3): with no client, then
with 1,000 idle clients, each over ``--seconds`` (default 10 s).

    python -m bench.idle_cpu [--seconds 10] [--clients 1000] [--backends native pure]

The service is a process looping on ``wait_event()`` with the default timer
(none); the clients are one other process holding ``--clients`` connections
on one context, itself waiting in ``wait_event()``. Each process's CPU time
comes from Linux's /proc/PID/schedstat (nanoseconds) at the start and the end
of the window; the markdown table gives it as a percentage of one CPU.
"""

from __future__ import annotations

import argparse
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

import pyipc

from .proto import SERVICE, raise_nofile, ready
from .runner import READY_TIMEOUT, _env, cpu_of

#: The goal: under this share of one CPU, in percent.
GOAL_PERCENT = 0.5


def serve(rundir: str, backend: str, expect: int) -> None:
    """The idle service: print READY, then ACCEPTED once ``expect`` clients
    are connected (never when 0), and wait for events forever."""
    raise_nofile(expect + 64)
    ctx = pyipc.Context(rundir=rundir, backend=backend, max_connections=expect + 64)
    ctx.service_init(SERVICE)
    ready()
    connected = 0
    for ev in ctx:
        if ev.type is pyipc.EventType.CONNECTION:
            connected += 1
            if connected == expect:
                print("ACCEPTED", flush=True)


def clients(rundir: str, backend: str, count: int) -> None:
    """``count`` connections on one context, then an idle event loop."""
    raise_nofile(count + 64)
    ctx = pyipc.Context(rundir=rundir, backend=backend, max_connections=count + 64)
    for _ in range(count):
        ctx.connect_service(SERVICE)
    ready()
    for _ in ctx:
        pass


def _start(role: str, rundir: str, backend: str, count: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "bench.idle_cpu", role, "--dir", rundir,
                             "--backend", backend, "--clients", str(count)],
                            env=_env(), stdout=subprocess.PIPE, text=True)
    _expect(proc, "READY")
    return proc


def _expect(proc: subprocess.Popen, line: str) -> None:
    ready_, _, _ = select.select([proc.stdout], [], [], READY_TIMEOUT)
    got = proc.stdout.readline().strip() if ready_ else ""
    if got != line:
        raise RuntimeError(f"expected {line} from {proc.args[3]}, got {got or 'nothing'}")


def _percent(pids: List[int], seconds: float) -> List[Optional[float]]:
    """Each process's CPU over the next ``seconds``, in percent of one CPU."""
    start = [cpu_of(p) for p in pids]
    t0 = time.monotonic()
    time.sleep(seconds)                     # the window itself: nothing to wait for
    elapsed = time.monotonic() - t0
    end = [cpu_of(p) for p in pids]
    return [None if a is None or b is None else (b - a) / elapsed * 100
            for a, b in zip(start, end)]


def measure(backend: str, seconds: float, count: int) -> Dict[str, Optional[float]]:
    """Service CPU % alone; service and clients CPU % with ``count`` clients."""
    rundir = tempfile.mkdtemp(prefix="pyipc-idle-", dir="/tmp")
    os.chmod(rundir, 0o700)
    procs: List[subprocess.Popen] = []
    try:
        service = _start("serve", rundir, backend, count)
        procs.append(service)
        (alone,) = _percent([service.pid], seconds)
        procs.append(_start("clients", rundir, backend, count))
        _expect(service, "ACCEPTED")
        among, idle_clients = _percent([service.pid, procs[1].pid], seconds)
        return {"alone": alone, "among": among, "clients": idle_clients}
    finally:
        for p in procs:
            p.terminate()
            p.wait()
        shutil.rmtree(rundir, ignore_errors=True)


def _fmt(v: Optional[float]) -> str:
    return "–" if v is None else f"{v:.3f}%"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="bench.idle_cpu", description=__doc__.split("\n\n")[0])
    p.add_argument("role", nargs="?", default="measure", choices=["measure", "serve", "clients"])
    p.add_argument("--dir", help="run dir (serve, clients)")
    p.add_argument("--backend", default="native")
    p.add_argument("--backends", nargs="+", default=["native", "pure"])
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--seconds", type=float, default=10.0)
    args = p.parse_args(argv)
    if args.role == "serve":
        serve(args.dir, args.backend, args.clients)
        return 0
    if args.role == "clients":
        clients(args.dir, args.backend, args.clients)
        return 0
    print(f"idle CPU over {args.seconds:g} s per window, percent of one CPU "
          f"(goal: under {GOAL_PERCENT}% for the service)\n")
    print(f"| backend | idle service, no client | idle service, {args.clients:,} idle clients "
          f"| the {args.clients:,} idle clients' process |")
    print("|---|---|---|---|")
    worst = 0.0
    for backend in args.backends:
        r = measure(backend, args.seconds, args.clients)
        worst = max(worst, r["alone"] or 0.0, r["among"] or 0.0)
        print(f"| {backend} | {_fmt(r['alone'])} | {_fmt(r['among'])} | {_fmt(r['clients'])} |")
    print(f"\nservice goal (< {GOAL_PERCENT}%): {'met' if worst < GOAL_PERCENT else 'missed'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
