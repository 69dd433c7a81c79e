"""Soak: many client processes, random sizes, write/schedule mixes, reconnects and
vanishing peers; nothing may be lost, duplicated, corrupted or reordered.

tests/soak_service.py checks every message's sequence number and CRC-32 per
connection and echoes it; tests/soak_client.py checks every echo, and tells the
service how many messages it wrote on each connection. Sizes: PYIPC_SOAK_CLIENTS
(default 200) processes x PYIPC_SOAK_MESSAGES (default 5000) messages, for each
backend. PYIPC_SOAK_SEED replays a run.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import pyipc

HERE = Path(__file__).resolve().parent
CLIENTS = int(os.environ.get("PYIPC_SOAK_CLIENTS", "200"))
MESSAGES = int(os.environ.get("PYIPC_SOAK_MESSAGES", "5000"))
SEED = int(os.environ.get("PYIPC_SOAK_SEED", str(random.randrange(1 << 30))))
DEADLINE_S = 480


def _start(args: list[str]) -> subprocess.Popen:
    """A program of its own process group (the client launcher's children
    are killed with it: _kill)."""
    return subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _kill(proc: subprocess.Popen) -> None:
    """Kill proc and what it forked (its process group)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _finish(proc: subprocess.Popen, deadline: float) -> str:
    """The process's stdout once it exits; fails (and kills it) past the deadline."""
    try:
        out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        _kill(proc)
        out, err = proc.communicate()
        pytest.fail(f"soak process {proc.args[1:]} did not finish in time: {err[-2000:]}")
    assert proc.returncode == 0 or out, f"{proc.args[1:]} failed: {err[-2000:]}"
    return out


def test_soak_nothing_lost(backend, rundir, tmp_path):
    deadline = time.monotonic() + DEADLINE_S
    seeds = random.Random(SEED)
    procs: list[subprocess.Popen] = []
    try:
        service = _start([str(HERE / "soak_service.py"), rundir, backend, "soak", str(SEED)])
        procs.append(service)
        assert service.stdout.readline() == "ready\n", service.stderr.read()
        # The client processes are forked by one launcher (see fork_clients).
        clients = _start([str(HERE / "soak_client.py"), "--fork", rundir, backend, "soak",
                          str(MESSAGES), str(tmp_path),
                          *(str(seeds.randrange(1 << 30)) for _ in range(CLIENTS))])
        procs.append(clients)
        _finish(clients, deadline)          # (fails, with their stderr, if one failed)
        summaries = [json.loads((tmp_path / f"{i}.json").read_text()) for i in range(CLIENTS)]
        with pyipc.Context(rundir=rundir, backend=backend) as ctx:
            fd = ctx.connect("soak")
            ctx.write(fd, b"stats")
            stats = json.loads(ctx.read(fd))
        _finish(service, deadline)
    finally:
        for p in procs:
            _kill(p)        # (its group: a launcher's clients may outlive it)
            p.wait()

    where = f"backend {backend}, PYIPC_SOAK_SEED={SEED}"
    faults = [f for s in summaries for f in s["faults"]]
    assert not faults, f"{where}: clients saw {faults[:10]}"
    assert not stats["faults"], f"{where}: service saw {stats['faults']}"
    sent = sum(s["messages"] for s in summaries)
    assert sent == CLIENTS * MESSAGES
    assert stats["messages"] == sent, where
    assert stats["bytes"] == sum(s["bytes"] for s in summaries), where
    # Every connection was accounted for by its client (the service checked
    # each count against what it received; a connection may carry none).
    assert stats["reported"] == sum(s["connections"] for s in summaries), where
    echoed = sum(s["echoed"] for s in summaries)
    vanished = sum(s["vanished"] for s in summaries)
    print(f"\nsoak {backend}: {CLIENTS} clients, {sent} messages, "
          f"{stats['bytes'] / 1e9:.2f} GB, {stats['reported']} connections, "
          f"{vanished} vanished, {echoed} echoes checked, "
          f"{time.monotonic() - deadline + DEADLINE_S:.0f} s, seed {SEED}")
