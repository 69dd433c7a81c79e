"""Run one case for one system: the server and the client in separate processes."""

from __future__ import annotations

import json
import os
import resource
import select
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

from .cases import Case, System

ROOT = Path(__file__).resolve().parent.parent
#: Seconds a server may take to print READY, and a client to finish.
READY_TIMEOUT = 30
CLIENT_TIMEOUT = 600


class PeerFailed(RuntimeError):
    """A peer did not start, crashed, or printed no result."""


def _env() -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.pop("PYIPC_BACKEND", None)
    env.pop("IPC_NETWORK", None)
    return env


def _wait_ready(server: subprocess.Popen) -> None:
    ready, _, _ = select.select([server.stdout], [], [], READY_TIMEOUT)
    line = server.stdout.readline() if ready else ""
    if line.strip() != "READY":
        raise PeerFailed(f"server did not start: {line.strip() or 'no READY line'}")


def _stop(proc: subprocess.Popen) -> None:
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def cpu_of(pid: int) -> Optional[float]:
    """Seconds on a CPU of process ``pid`` so far (Linux's schedstat, in ns:
    finer than getrusage's ticks), or None where there is none."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return None


def check_fd_limit(case: Case) -> None:
    """A scale case needs idle + some fds in the server and in the client."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if case.idle and hard != resource.RLIM_INFINITY and hard < case.idle + 64:
        raise PeerFailed(f"the hard RLIMIT_NOFILE ({hard}) prevents {case.idle} clients")


#: Where the two peers run (``--placement``): "split" pins the server to one
#: CPU and the client to another; "same" pins both to one CPU; "free" lets the
#: scheduler choose. Pinning takes the scheduler's choice of CPUs (which moves
#: with load and timing) out of the figures: on the 2-CPU development VM a
#: wake-up across CPUs costs 40-50 µs, one on the same CPU a few.
PLACEMENTS = ("split", "same", "free")


def cpus_for(placement: str) -> Tuple[Optional[int], Optional[int]]:
    """The CPU of the server and of the client (None: not pinned)."""
    if placement == "free" or not hasattr(os, "sched_setaffinity"):
        return None, None
    cpus = sorted(os.sched_getaffinity(0))
    if placement == "same" or len(cpus) < 2:
        return cpus[0], cpus[0]
    return cpus[-1], cpus[-2]


def _pinned(cpu: Optional[int]) -> Optional[Callable[[], None]]:
    """A preexec_fn that pins the child to ``cpu``, or None."""
    if cpu is None:
        return None
    return lambda: os.sched_setaffinity(0, {cpu})


def run(system: System, case: Case, n: int, placement: str = "split") -> dict:
    """Measurements of one run (the client's JSON result, plus ``n``)."""
    check_fd_limit(case)
    server_cpu, client_cpu = cpus_for(placement)
    directory = tempfile.mkdtemp(prefix="pyipc-bench-", dir="/tmp")
    os.chmod(directory, 0o700)
    env = _env()
    server = subprocess.Popen(system.command("server", case, directory, n), env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              preexec_fn=_pinned(server_cpu))
    try:
        _wait_ready(server)
        server_cpu_start = cpu_of(server.pid)
        client = subprocess.run(system.command("client", case, directory, n), env=env,
                                capture_output=True, text=True, timeout=CLIENT_TIMEOUT,
                                preexec_fn=_pinned(client_cpu))
        server_cpu_end = cpu_of(server.pid)       # still there: not reaped yet
        lines = client.stdout.strip().splitlines()
        if client.returncode != 0 or not lines:
            raise PeerFailed(f"client failed ({client.returncode}): "
                             f"{client.stderr.strip()[-300:]}")
        values = json.loads(lines[-1])
    except subprocess.TimeoutExpired:
        raise PeerFailed("client timed out") from None
    finally:
        _stop(server)
        shutil.rmtree(directory, ignore_errors=True)
    values["n"] = n
    if server_cpu_start is not None and server_cpu_end is not None:
        values["server_cpu"] = server_cpu_end - server_cpu_start
    return values
