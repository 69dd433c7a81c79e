"""The peers of bench/network.py: one framed protocol, two implementations.

Each message is a 4-byte big-endian length and a payload whose first byte
says what the server does with it: E (echo it back), S (swallow it), F
(answer F: the end of a one-way run). The raw system is Python's own sockets
over TCP; the pyipc system is a pyipc service on host B reached from host A
by name through ipcd + tcpd (`IPC_NETWORK`), which hand the client the TCP
socket: tcpd on B relays (switching, no Python per message) to the service.

    python -m bench.network_peers server raw PORT
    python -m bench.network_peers server pyipc RUNDIR BACKEND
    python -m bench.network_peers client raw|pyipc ADDRESS_OR_NAME CASE N SIZE [BACKEND]

A server prints READY once it serves; a client prints one JSON line.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import time
from typing import Callable, List, Tuple

HEADER = struct.Struct(">I")
#: Round trips not timed at the start.
WARMUP = 200


def _frames(buf: bytearray) -> Tuple[List[bytes], bytearray]:
    """The whole frames at the start of buf, and what is left."""
    out: List[bytes] = []
    at = 0
    while len(buf) - at >= 4:
        (size,) = HEADER.unpack_from(buf, at)
        if len(buf) - at - 4 < size:
            break
        out.append(bytes(buf[at + 4:at + 4 + size]))
        at += 4 + size
    return out, buf[at:]


def raw_server(port: int) -> None:
    listener = socket.create_server(("0.0.0.0", port), reuse_port=True)
    print("READY", flush=True)
    while True:
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = bytearray()
        with conn:
            while True:
                data = conn.recv(1 << 20)
                if not data:
                    break
                buf += data
                msgs, buf = _frames(buf)
                for m in msgs:
                    if m[:1] == b"E":
                        conn.sendall(HEADER.pack(len(m)) + m)
                    elif m[:1] == b"F":
                        conn.sendall(HEADER.pack(1) + b"F")


def pyipc_server(rundir: str, backend: str) -> None:
    import pyipc
    with pyipc.Context(rundir=rundir, backend=backend) as ctx:
        ctx.service_init("bench")
        print("READY", flush=True)
        while True:
            for ev in ctx.wait_events():
                if ev.type == pyipc.EventType.MESSAGE_RX and ev.message is not None:
                    kind = ev.message[:1]
                    if kind == b"E":
                        ctx.schedule(ev.fd, ev.message)
                    elif kind == b"F":
                        ctx.schedule(ev.fd, b"F")


def _time(case: str, n: int, size: int, send: Callable[[bytes], None],
          recv: Callable[[], bytes]) -> dict:
    if case == "rtt":
        msg = b"E" + b"x" * (size - 1)
        for _ in range(WARMUP):
            send(msg)
            recv()
        start = time.perf_counter()
        for _ in range(n):
            send(msg)
            recv()
        took = time.perf_counter() - start
        return {"rtt_us": took / n * 1e6}
    msg = b"S" + b"x" * (size - 1)
    send(b"F")
    recv()
    start = time.perf_counter()
    for _ in range(n):
        send(msg)
    send(b"F")
    assert recv() == b"F"
    took = time.perf_counter() - start
    return {"mib_s": n * size / took / (1 << 20)}


def raw_client(address: str, case: str, n: int, size: int) -> dict:
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    state = {"buf": bytearray(), "msgs": []}

    def send(m: bytes) -> None:
        sock.sendall(HEADER.pack(len(m)) + m)

    def recv() -> bytes:
        while not state["msgs"]:
            data = sock.recv(1 << 20)
            if not data:
                raise EOFError
            state["buf"] += data
            state["msgs"], state["buf"] = _frames(state["buf"])
        return state["msgs"].pop(0)
    try:
        return _time(case, n, size, send, recv)
    finally:
        sock.close()


def pyipc_client(name: str, case: str, n: int, size: int, backend: str) -> dict:
    import pyipc
    with pyipc.Context(backend=backend) as ctx:
        fd = ctx.connect(name, timeout=30)
        return _time(case, n, size, lambda m: ctx.write(fd, m), lambda: ctx.read(fd))


def main(argv: List[str]) -> None:
    role, system = argv[0], argv[1]
    if role == "server":
        if system == "raw":
            raw_server(int(argv[2]))
        else:
            pyipc_server(argv[2], argv[3])
        return
    target, case, n, size = argv[2], argv[3], int(argv[4]), int(argv[5])
    if system == "raw":
        out = raw_client(target, case, n, size)
    else:
        out = pyipc_client(target, case, n, size, argv[6])
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
