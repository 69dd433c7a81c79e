"""pyipc across a network link against raw Python TCP over the same link.

Two network namespaces joined by a veth link (tests/netns.py; needs root):
host A runs ipcd and tcpd, host B runs tcpd (exposing `bench`), a pyipc
service `bench`, and a raw Python TCP server speaking the same framing. From
host A, a client measures, alternately on each system:

- rtt: round trips of a 64-byte message (after a warm-up);
- 64 KiB one-way: N messages of 64 KiB, then one round trip that ends the run.

pyipc's client reaches `bench` by name (IPC_NETWORK), and its fd is the TCP
socket tcpd dialled; tcpd on B relays between that socket and the service by
switching (with switch_events off, no Python per message on native). The
raw system is one Python process on each side with sendall/recv.

    sudo python -m bench.network [--backend native] [--repeats 7] [--rtt-n 10000] [--oneway-n 4000]

Prints each system's median, pyipc's ratio to raw (rtt: pyipc's time / raw's;
throughput: pyipc / raw), and the median of each round's own ratio ("paired",
steadier when other work on the machine comes and goes).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import netns  # noqa: E402  (tests/netns.py: the namespaces)

PORT = 9000
RAW_PORT = 9100
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(
    p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))


def _server(host: netns.Host, args: List[str]) -> None:
    proc = host.spawn([sys.executable, "-m", "bench.network_peers", "server", *args], ENV,
                      stdout=subprocess.PIPE, text=True, cwd=str(ROOT))
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "READY":
        raise RuntimeError(f"server {args} did not start: {line!r}")


def _client(host: netns.Host, system: str, target: str, case: str, n: int, size: int,
            backend: str, rundir: str, network: str) -> float:
    env = dict(ENV, RUNDIR=rundir, IPC_NETWORK=network)
    out = host.run([sys.executable, "-m", "bench.network_peers", "client", system, target,
                    case, str(n), str(size), backend], env=env, cwd=str(ROOT),
                   capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"{system} {case} client failed: {out.stderr}")
    values = json.loads(out.stdout)
    return float(values.get("rtt_us", values.get("mib_s")))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="native", choices=["native", "pure"])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--rtt-n", type=int, default=10000)
    p.add_argument("--oneway-n", type=int, default=4000)
    args = p.parse_args()
    why = netns.available()
    if why:
        sys.exit(f"bench.network: {why}")
    net = netns.Network(hosts=2)
    try:
        a, b = net.hosts
        env = dict(ENV, PYIPC_BACKEND=args.backend)
        _server(b, ["raw", str(RAW_PORT)])
        _server(b, ["pyipc", b.rundir, args.backend])
        b.daemon(["tcpd", "--listen", f"{b.address}:{PORT}", "--expose", "bench"], env,
                 args.backend)
        a.daemon(["tcpd"], env, args.backend)
        a.daemon(["ipcd"], env, args.backend)
        network = f"bench tcp://{b.address}:{PORT}/bench"
        targets = {"raw": f"{b.address}:{RAW_PORT}", "pyipc": "bench"}
        cases = {"rtt": (args.rtt_n, 64), "oneway": (args.oneway_n, 64 << 10)}
        results: Dict[str, Dict[str, List[float]]] = {
            c: {s: [] for s in targets} for c in cases}
        for rep in range(args.repeats):                 # interleaved: raw, pyipc, raw, ...
            for case, (n, size) in cases.items():
                for system, target in targets.items():
                    value = _client(a, system, target, case, n, size, args.backend,
                                    a.rundir, network)
                    results[case][system].append(value)
            print(f"round {rep + 1}/{args.repeats}: " + "; ".join(
                f"{c} " + ", ".join(f"{s} {v[-1]:.1f}" for s, v in results[c].items())
                for c in cases), file=sys.stderr)
        _report(results, args)
    finally:
        net.close()


def _report(results: Dict[str, Dict[str, List[float]]], args: argparse.Namespace) -> None:
    print(f"pyipc {args.backend} through ipcd + tcpd vs raw Python TCP, over a veth link "
          f"(medians of {args.repeats} interleaved runs; load average now "
          f"{os.getloadavg()[0]:.2f})")
    print(f"{'':24}{'raw':>12}{'pyipc':>12}{'ratio':>10}{'paired':>10}")
    for case, title in (("rtt", "rtt, 64 B (us)"), ("oneway", "64 KiB one-way (MiB/s)")):
        raw, ours = results[case]["raw"], results[case]["pyipc"]
        # paired: the median of each round's own ratio, steadier when the
        # machine's load drifts between rounds.
        paired = statistics.median(o / r for o, r in zip(ours, raw))
        print(f"{title:24}{statistics.median(raw):12.1f}{statistics.median(ours):12.1f}"
              f"{statistics.median(ours) / statistics.median(raw):9.2f}x{paired:9.2f}x")
    print("(rtt ratio: pyipc's time / raw's, lower is better; throughput ratio: pyipc / raw)")


if __name__ == "__main__":
    main()
