"""64 KiB messages one way through a pair of tlsd (issue 19, item 6), against
a raw Python `ssl` stream over the same link.

    python -m bench.tls [--backend native] [--messages 1000] [--repeats 5]

tlsd path: client (host A's run dir) -> its socket pair end -> tlsd A (dials,
encrypts) -> TCP on 127.0.0.1 -> tlsd B (decrypts) -> service `sink` (host B's
run dir). The sink answers one small message once it has every message of a
run: the time is from the first write to that answer. Raw path: a Python
`ssl` client socket sends the same bytes to a Python `ssl` server process
that answers one byte when it has them all. The daemons, the sink and the raw
server are separate processes, as in use; runs alternate (tlsd, raw, tlsd,
...); prints medians and the ratio (goal: tlsd at least 0.7x raw).
Certificates come from trustme (the test extra).
"""

from __future__ import annotations

import argparse
import array
import os
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from typing import List, Tuple

import pyipc

SIZE = 64 * 1024

SINK = """
import sys, pyipc
rundir, backend, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
with pyipc.Context(rundir=rundir, backend=backend) as ctx:
    ctx.service_init("sink")
    got = {}
    print("ready", flush=True)
    for ev in ctx:
        if ev.type == pyipc.EventType.MESSAGE_RX:
            got[ev.fd] = got.get(ev.fd, 0) + 1
            if got[ev.fd] == count:
                got[ev.fd] = 0
                ctx.write(ev.fd, b"done")
"""

RAW_SERVER = """
import socket, ssl, sys
cert, total = sys.argv[1], int(sys.argv[2])
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert)
with socket.create_server(("127.0.0.1", 0)) as ls:
    print(ls.getsockname()[1], flush=True)
    buf = bytearray(1 << 20)
    while True:
        conn, _ = ls.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with ctx.wrap_socket(conn, server_side=True) as tls:
            left = total
            while left:
                n = tls.recv_into(buf, min(left, len(buf)))
                if not n:
                    break
                left -= n
            tls.sendall(b"k")
"""


def _start(args: List[str], env: dict) -> Tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, text=True,
                            env=env)
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


def _wait_for(path: str) -> None:
    end = time.monotonic() + 20
    while not os.path.exists(path):
        if time.monotonic() > end:
            raise SystemExit(f"{path} did not appear")
        time.sleep(0.05)


def _ask(rundir: str, uri: str) -> int:
    """What ipcd does: ask tlsd for `uri`; the fd it hands over."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(os.path.join(rundir, "tls"))
        s.sendall(struct.pack(">I", len(uri)) + uri.encode())
        msg, anc, _, _ = s.recvmsg(100, socket.CMSG_SPACE(4))
    if msg[4:] != b"ok" or not anc:
        raise SystemExit(f"tlsd answered {msg[4:]!r}")
    return array.array("i", anc[0][2][:4])[0]


def run_tlsd(a: str, backend: str, port: int, count: int) -> float:
    payload = os.urandom(SIZE)
    with pyipc.Context(rundir=a, backend=backend) as client:
        fd = _ask(a, f"tls://127.0.0.1:{port}/sink")
        client.add_connection(fd)
        start = time.perf_counter()
        for _ in range(count):
            client.write(fd, payload)
        if client.read(fd, timeout=120) != b"done":
            raise SystemExit("the sink did not answer done")
        return time.perf_counter() - start


def run_raw(port: int, ca: str, count: int) -> float:
    payload = os.urandom(SIZE)
    ctx = ssl.create_default_context(cafile=ca)
    with socket.create_connection(("127.0.0.1", port)) as raw:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            start = time.perf_counter()
            for _ in range(count):
                tls.sendall(payload)
            if tls.recv(1) != b"k":
                raise SystemExit("the raw server did not answer")
            return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=["native", "pure"], default="native")
    p.add_argument("--messages", type=int, default=1000, help="64 KiB messages per run")
    p.add_argument("--repeats", type=int, default=5, help="runs of each (interleaved)")
    args = p.parse_args()
    import trustme
    procs: List[subprocess.Popen] = []
    with tempfile.TemporaryDirectory() as tmp:
        a, b = os.path.join(tmp, "a"), os.path.join(tmp, "b")
        os.mkdir(a, 0o700)
        os.mkdir(b, 0o700)
        ca = trustme.CA()
        ca_file, cert_file = os.path.join(tmp, "ca.pem"), os.path.join(tmp, "server.pem")
        ca.cert_pem.write_to_path(ca_file)
        ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(cert_file)
        env = dict(os.environ, PYIPC_BACKEND=args.backend)
        try:
            sink, _ = _start(["-c", SINK, b, args.backend, str(args.messages)], env)
            procs.append(sink)
            port = _free_port()
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "pyipc", "--rundir", b, "tlsd", "--listen",
                 f"127.0.0.1:{port}", "--cert", cert_file, "--expose", "sink"], env=env))
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "pyipc", "--rundir", a, "tlsd", "--ca", ca_file],
                env=env))
            raw, raw_port = _start(["-c", RAW_SERVER, cert_file,
                                    str(args.messages * SIZE)], env)
            procs.append(raw)
            _wait_for(os.path.join(a, "tls"))
            _wait_for(os.path.join(b, "tls"))
            _wait_until_listening(port)
            times: dict = {"tlsd": [], "raw": []}
            for _ in range(args.repeats):
                times["tlsd"].append(run_tlsd(a, args.backend, port, args.messages))
                times["raw"].append(run_raw(int(raw_port), ca_file, args.messages))
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(10)
    mib = args.messages * SIZE / (1 << 20)
    t, r = statistics.median(times["tlsd"]), statistics.median(times["raw"])
    print(f"{os.cpu_count()} CPUs, backend {args.backend}, {args.messages} x 64 KiB one "
          f"way over 127.0.0.1, median of {args.repeats} interleaved runs")
    print("| path | MiB/s | ratio to raw ssl |\n|---|---|---|")
    print(f"| pyipc through tlsd A + tlsd B | {mib / t:,.0f} | {r / t:.2f} |")
    print(f"| raw Python ssl stream | {mib / r:,.0f} | 1.00 |")
    print("goal: tlsd at least 0.7x raw ssl")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_until_listening(port: int) -> None:
    end = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.05)


if __name__ == "__main__":
    main()
