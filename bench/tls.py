"""64 KiB messages one way through ipcd + tlsd (issue 19, item 6), against a
raw Python `ssl` stream over the same link.

Two network namespaces joined by a veth link (tests/netns.py; needs root),
or with --loopback two run directories on 127.0.0.1. Host B runs a pyipc
service `sink`, a tlsd exposing it, and a raw Python ssl server; host A runs
ipcd and a tlsd that dials. From host A, alternately:

- tlsd: a pyipc client reaches `sink` by name (IPC_NETWORK
  `sink tls://B:9443/sink`) and writes N messages of 64 KiB; its fd is a
  socket pair end to tlsd A, which encrypts, tlsd B decrypts and relays to
  the service. The sink answers one small message once it has all N: the time
  is from the first write to that answer.
- raw: a Python ssl client sends the same N x 64 KiB to a Python ssl server
  (one recv_into loop) that answers one byte once it has them all.

Both use TLS 1.3 with the same certificate (from trustme, the test extra).

    sudo python -m bench.tls [--backend native] [--messages 1000] [--repeats 5] [--loopback]

Prints each system's median throughput and the ratio tlsd / raw (goal: at
least 0.7).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import netns  # noqa: E402  (tests/netns.py: the namespaces)

SIZE = 64 * 1024
PORT = 9443
RAW_PORT = 9543
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(
    p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))


# ------------------------------------------------------------ the peers (subcommands)

def sink(rundir: str, backend: str, count: int) -> None:
    """The pyipc service `sink`: answers b"done" after `count` messages."""
    import pyipc
    with pyipc.Context(rundir=rundir, backend=backend) as ctx:
        ctx.service_init("sink")
        got: Dict[int, int] = {}
        print("READY", flush=True)
        for ev in ctx:
            if ev.type == pyipc.EventType.MESSAGE_RX:
                got[ev.fd] = got.get(ev.fd, 0) + 1
                if got[ev.fd] == count:
                    got[ev.fd] = 0
                    ctx.write(ev.fd, b"done")


def raw_server(host: str, port: int, cert: str, total: int) -> None:
    """A Python ssl server: reads `total` bytes per connection, answers b"k"."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert)
    buf = bytearray(1 << 20)
    with socket.create_server((host, port)) as listener:
        print("READY", flush=True)
        while True:
            conn, _ = listener.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with ctx.wrap_socket(conn, server_side=True) as tls:
                left = total
                while left:
                    n = tls.recv_into(buf, min(left, len(buf)))
                    if not n:
                        break
                    left -= n
                tls.sendall(b"k")


def client(system: str, target: str, count: int, backend: str, ca: str) -> None:
    """One timed run from host A; prints {"seconds": ...}."""
    payload = os.urandom(SIZE)
    if system == "tlsd":
        import pyipc
        with pyipc.Context(backend=backend) as ctx:       # RUNDIR, IPC_NETWORK: env
            fd = ctx.connect(target, timeout=30)
            start, cpu = time.perf_counter(), time.process_time()
            for _ in range(count):
                ctx.write(fd, payload)
            if ctx.read(fd, timeout=300) != b"done":
                raise SystemExit("the sink did not answer done")
            seconds = time.perf_counter() - start
    else:
        host, port = target.rsplit(":", 1)
        context = ssl.create_default_context(cafile=ca)
        with socket.create_connection((host, int(port))) as raw:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with context.wrap_socket(raw, server_hostname=host) as tls:
                start, cpu = time.perf_counter(), time.process_time()
                for _ in range(count):
                    tls.sendall(payload)
                if tls.recv(1) != b"k":
                    raise SystemExit("the raw server did not answer")
                seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "cpu": time.process_time() - cpu}))


# ------------------------------------------------------------ the driver

class _Loopback(netns.Host):
    """A "host" that is only a run directory on this machine (--loopback)."""

    def run(self, argv: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(list(argv), **kwargs)

    def spawn(self, argv: Sequence[str], env: Dict[str, str], **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen(list(argv), env=env, **kwargs)
        self.procs.append(proc)
        return proc


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _peer(host: netns.Host, args: List[str], env: Dict[str, str]) -> subprocess.Popen:
    proc = host.spawn([sys.executable, "-m", "bench.tls", *args], env,
                      stdout=subprocess.PIPE, text=True, cwd=str(ROOT))
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "READY":
        raise RuntimeError(f"{args[0]} did not start: {line!r}")
    return proc


def _timed(host: netns.Host, system: str, target: str, args: argparse.Namespace,
           env: Dict[str, str], ca: str) -> Dict[str, float]:
    out = host.run([sys.executable, "-m", "bench.tls", "client", system, target,
                    str(args.messages), args.backend, ca], env=env, cwd=str(ROOT),
                   capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"{system} client failed: {out.stderr}")
    return {k: float(v) for k, v in json.loads(out.stdout).items()}


def _hosts(args: argparse.Namespace, tmp: str) -> "tuple[List[netns.Host], object]":
    if not args.loopback:
        why = netns.available()
        if why:
            sys.exit(f"bench.tls: {why} (or use --loopback)")
        net = netns.Network(hosts=2)
        return net.hosts, net
    hosts: List[netns.Host] = []
    for letter in "ab":
        rundir = os.path.join(tmp, letter)
        os.mkdir(rundir, 0o770)
        hosts.append(_Loopback("", "127.0.0.1", "lo", rundir))
    return hosts, None


def drive(args: argparse.Namespace) -> None:
    import trustme
    with tempfile.TemporaryDirectory() as tmp:
        (a, b), net = _hosts(args, tmp)
        try:
            ca = trustme.CA()
            ca_file, cert = os.path.join(tmp, "ca.pem"), os.path.join(tmp, "b.pem")
            ca.cert_pem.write_to_path(ca_file)
            ca.issue_cert(b.address).private_key_and_cert_chain_pem.write_to_path(cert)
            env = dict(ENV, PYIPC_BACKEND=args.backend)
            sink_proc = _peer(b, ["sink", b.rundir, args.backend, str(args.messages)], env)
            raw_proc = _peer(b, ["raw-server", b.address, str(RAW_PORT), cert,
                      str(args.messages * SIZE)], env)
            tlsd_b = b.daemon(["tlsd", "--listen", f"{b.address}:{PORT}", "--cert", cert,
                      "--expose", "sink"], env, args.backend)
            tlsd_a = a.daemon(["tlsd", "--ca", ca_file], env, args.backend)
            watched = {"tlsd": {"tlsd A": tlsd_a.pid, "tlsd B": tlsd_b.pid,
                                "service": sink_proc.pid},
                       "raw": {"raw server": raw_proc.pid}}
            cpu: Dict[str, Dict[str, List[float]]] = {s: {} for s in watched}
            a.daemon(["ipcd"], env, args.backend)
            client_env = dict(env, RUNDIR=a.rundir,
                              IPC_NETWORK=f"sink tls://{b.address}:{PORT}/sink")
            targets = {"raw": f"{b.address}:{RAW_PORT}", "tlsd": "sink"}
            results: Dict[str, List[float]] = {s: [] for s in targets}
            mib = args.messages * SIZE / (1 << 20)
            for rep in range(args.repeats):                 # interleaved: raw, tlsd, ...
                for system, target in targets.items():
                    before = {k: _cpu_seconds(pid) for k, pid in watched[system].items()}
                    run = _timed(a, system, target, args, client_env, ca_file)
                    results[system].append(mib / run["seconds"])
                    for k, pid in watched[system].items():
                        cpu[system].setdefault(k, []).append(_cpu_seconds(pid) - before[k])
                    cpu[system].setdefault("client", []).append(run["cpu"])
                print(f"round {rep + 1}/{args.repeats}: " + ", ".join(
                    f"{s} {v[-1]:.0f} MiB/s" for s, v in results.items()), file=sys.stderr)
        finally:
            for host in (a, b):
                host.stop_all()
            if net is not None:
                net.close()                                 # type: ignore[attr-defined]
    raw, tlsd = (statistics.median(results[s]) for s in ("raw", "tlsd"))
    link = "127.0.0.1" if args.loopback else "a veth link between two namespaces"
    print(f"64 KiB one-way over {link}, backend {args.backend}, {os.cpu_count()} CPUs, "
          f"{args.messages} messages a run, medians of {args.repeats} interleaved runs")
    print(f"{'':28}{'MiB/s':>10}")
    print(f"{'raw Python ssl stream':28}{raw:10.0f}")
    print(f"{'pyipc through ipcd + tlsd':28}{tlsd:10.0f}")
    print(f"ratio tlsd / raw: {tlsd / raw:.2f} (goal: at least 0.70)")
    for system, used in cpu.items():
        print(f"CPU per message, {system} (medians; /proc's 10 ms ticks: rough): " + ", ".join(
            f"{k} {statistics.median(v) / args.messages * 1e6:.0f} us" for k, v in used.items()))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "sink":
        return sink(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    if len(sys.argv) > 1 and sys.argv[1] == "raw-server":
        return raw_server(sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]))
    if len(sys.argv) > 1 and sys.argv[1] == "client":
        return client(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], sys.argv[6])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="native", choices=["native", "pure"])
    p.add_argument("--messages", type=int, default=1000, help="64 KiB messages a run")
    p.add_argument("--repeats", type=int, default=5, help="runs of each (interleaved)")
    p.add_argument("--loopback", action="store_true",
                   help="two run directories on 127.0.0.1 instead of two namespaces")
    drive(p.parse_args())


if __name__ == "__main__":
    main()
