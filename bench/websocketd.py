"""websocketd against the `websockets` library's own asyncio echo server
(issue 20): a `websockets` asyncio client measures

* rtt: one 16-byte message sent, its echo awaited, again and again;
* 1 KiB msg/s: 1 KiB messages sent in windows of WINDOW, every echo
  awaited before the next window (the client never has more in flight).

through `pyipc websocketd` to a pyipc echo service (`pyipc pongd`), and
against `websockets.asyncio.server.serve` echoing in one process, the way its
documentation writes an echo server. Each server runs in its own process;
no compression on either (websocketd does not negotiate permessage-deflate).

    python -m bench.websocketd [--backend native] [--seconds 1.0] [--repeats 5]

Runs alternate (websocketd, then websockets, repeated); prints the median of
each and the ratios websocketd / websockets. Goals: rtt at most 1.2x,
throughput at least 1x. The machine is shared: figures move with its load.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, Tuple

from websockets.asyncio.client import connect

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(
    p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p))
WINDOW = 64
SMALL = b"x" * 16
KIB = b"k" * 1024

ECHO_SERVER = """
import asyncio, sys
from websockets.asyncio.server import serve

async def echo(ws):
    async for message in ws:
        await ws.send(message)

async def main():
    async with serve(echo, "127.0.0.1", int(sys.argv[1]), compression=None,
                     max_size=None) as server:
        print("ready", flush=True)
        await server.serve_forever()

asyncio.run(main())
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(args: List[str], ready: str, **kwargs: object) -> subprocess.Popen:
    """A child whose stdout or stderr says `ready` once it serves."""
    proc = subprocess.Popen(args, env=ENV, text=True, **kwargs)  # type: ignore[call-overload]
    stream = proc.stdout if kwargs.get("stdout") else proc.stderr
    for line in stream:
        if ready in line:
            return proc
    raise RuntimeError(f"{args[:4]} did not start")


async def rtt(url: str, seconds: float) -> float:
    """Median round trip of a 16-byte message, in microseconds."""
    async with connect(url, compression=None) as ws:
        times = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            await ws.send(SMALL)
            await ws.recv()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e6


async def throughput(url: str, seconds: float) -> float:
    """1 KiB messages echoed per second, WINDOW in flight at most."""
    async with connect(url, compression=None) as ws:
        done = 0
        t0 = time.perf_counter()
        end = t0 + seconds
        while time.perf_counter() < end:
            for _ in range(WINDOW):
                await ws.send(KIB)
            for _ in range(WINDOW):
                await ws.recv()
            done += WINDOW
        return done / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="native", choices=["native", "pure"])
    p.add_argument("--seconds", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    rundir = tempfile.mkdtemp(prefix="pyipc-bench-", dir="/tmp")
    wsd_port, ws_port = free_port(), free_port()
    py = sys.executable
    children = [
        start([py, "-m", "pyipc", "--rundir", rundir, "--backend", args.backend, "pongd",
               "echo"], "serving", stdout=subprocess.PIPE),
        start([py, "-m", "pyipc", "-v", "--rundir", rundir, "--backend", args.backend,
               "websocketd", "--port", str(wsd_port), "--expose", "echo"], "ready in",
              stderr=subprocess.PIPE),
        start([py, "-c", ECHO_SERVER, str(ws_port)], "ready", stdout=subprocess.PIPE),
    ]
    systems: Dict[str, str] = {"websocketd": f"ws://127.0.0.1:{wsd_port}/echo",
                               "websockets": f"ws://127.0.0.1:{ws_port}/"}
    results: Dict[Tuple[str, str], List[float]] = {}
    measures: Dict[str, Callable[[str, float], object]] = {"rtt_us": rtt,
                                                           "kib_msg_s": throughput}
    try:
        for _ in range(args.repeats):
            for measure, fn in measures.items():
                for system, url in systems.items():
                    value = asyncio.run(fn(url, args.seconds))  # type: ignore[arg-type]
                    results.setdefault((system, measure), []).append(float(value))
    finally:
        for child in children:
            child.terminate()
            child.wait(10)
    report(results, args)


def report(results: Dict[Tuple[str, str], List[float]], args: argparse.Namespace) -> None:
    print(f"websocketd ({args.backend}) vs websockets' asyncio echo server; "
          f"{args.repeats} interleaved runs of {args.seconds:g} s, medians "
          f"({os.cpu_count()} CPUs, shared)")
    med = {k: statistics.median(v) for k, v in results.items()}
    for measure, unit in (("rtt_us", "us"), ("kib_msg_s", "msg/s")):
        a, b = med[("websocketd", measure)], med[("websockets", measure)]
        goal = "goal <= 1.2" if measure == "rtt_us" else "goal >= 1"
        print(f"  {measure:10} websocketd {a:10.1f} {unit:5}  websockets {b:10.1f} {unit:5}"
              f"  ratio {a / b:5.2f}  ({goal})")


if __name__ == "__main__":
    main()
