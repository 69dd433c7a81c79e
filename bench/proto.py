"""What every benchmark peer shares: its command line, the ready line, the result line.

A peer is run as ``python -m bench.peer_X ROLE CASE --dir D --n N --size S``.
The server prints ``READY`` on stdout once it listens; the client prints one JSON
object on stdout with its measurements, then both exit.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from argparse import Namespace
from typing import Any, Awaitable, Callable, Optional, Sequence

#: Name of the benchmark service (pyipc) or socket file (the others) in --dir.
SERVICE = "bench"
#: Payload of the one message that ends a one-way run (receiver to sender).
ACK = b"k"
#: Round trips not timed at the start of a latency run.
WARMUP = 200


def parse(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The peers' common arguments."""
    p = argparse.ArgumentParser()
    p.add_argument("role", choices=["server", "client"])
    # events: pyipc peers run the per-message event workload; the others
    # take it as oneway (their one send per message).
    p.add_argument("case", choices=["events", "rtt", "oneway", "scale"])
    p.add_argument("--dir", required=True, help="directory of the socket")
    p.add_argument("--n", type=int, default=1000, help="messages (or round trips)")
    p.add_argument("--size", type=int, default=64, help="payload bytes")
    p.add_argument("--idle", type=int, default=0, help="idle connections (scale)")
    p.add_argument("--backend", default="native", help="pyipc backend")
    p.add_argument("--busy-poll", type=int, default=0,
                   help="pyipc: the context's busy_poll, in microseconds")
    p.add_argument("--mode", default="pair", help="variant (zmq: pair or pushpull)")
    return p.parse_args(argv)


def socket_path(args: argparse.Namespace) -> str:
    """The socket file of the non-pyipc systems: the one a pyipc service
    ``SERVICE`` has in run dir ``args.dir``, so a pyipc peer and a raw-socket
    peer can be paired (the mixed systems)."""
    return os.path.join(args.dir, SERVICE)


def ready() -> None:
    """Tell the runner the server listens."""
    sys.stdout.write("READY\n")
    sys.stdout.flush()


def cpu_seconds() -> float:
    """CPU time (user + system) this process has used so far: the clients
    report it for the timed part of a round-trip run."""
    return time.process_time()


def result(**values: Any) -> None:
    """Print the client's measurements (one JSON line) for the runner."""
    sys.stdout.write(json.dumps(values) + "\n")
    sys.stdout.flush()


def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def raise_nofile(needed: int) -> int:
    """Raise the soft RLIMIT_NOFILE towards the hard one; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, needed)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def run_scale_capable_peer(serve: Callable[[Namespace], None],
                           client: Callable[[Namespace], None]) -> None:
    """main() of a peer that also runs the scale cases: parse the command
    line; a server first raises its fd limit for the idle clients."""
    args = parse()
    if args.role == "server":
        raise_nofile(args.idle + 64)
    (serve if args.role == "server" else client)(args)


def payload(size: int) -> bytes:
    """A payload of ``size`` bytes (not all zero)."""
    return bytes(i & 0xFF for i in range(min(size, 256))) * (size // 256) + \
        bytes(i & 0xFF for i in range(size % 256))


async def time_async_client(args: Namespace, send: Callable[[bytes], Awaitable[Any]],
                            recv: Callable[[], Awaitable[Any]]) -> None:
    """The client side of every asyncio peer: WARMUP round trips then `n`
    timed ones (rtt), or `n` messages then the server's acknowledgement
    (oneway); prints the result."""
    data = payload(args.size)
    if args.case == "rtt":
        for _ in range(WARMUP):
            await send(data)
            await recv()
        start = time.perf_counter()
        for _ in range(args.n):
            await send(data)
            await recv()
    else:
        start = time.perf_counter()
        for _ in range(args.n):
            await send(data)
        await recv()
    result(seconds=time.perf_counter() - start)
