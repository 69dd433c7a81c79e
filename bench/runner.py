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
from typing import Dict

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


def check_fd_limit(case: Case) -> None:
    """A scale case needs idle + some fds in the server and in the client."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if case.idle and hard != resource.RLIM_INFINITY and hard < case.idle + 64:
        raise PeerFailed(f"the hard RLIMIT_NOFILE ({hard}) prevents {case.idle} clients")


def run(system: System, case: Case, n: int) -> dict:
    """Measurements of one run (the client's JSON result, plus ``n``)."""
    check_fd_limit(case)
    directory = tempfile.mkdtemp(prefix="pyipc-bench-", dir="/tmp")
    os.chmod(directory, 0o700)
    env = _env()
    server = subprocess.Popen(system.command("server", case, directory, n), env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_ready(server)
        client = subprocess.run(system.command("client", case, directory, n), env=env,
                                capture_output=True, text=True, timeout=CLIENT_TIMEOUT)
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
    return values
