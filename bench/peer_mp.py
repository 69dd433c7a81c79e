"""multiprocessing.connection over a Unix socket: ``send_bytes``/``recv_bytes``
(its own framing is also a 4-byte big-endian length)."""

from __future__ import annotations

import time
from multiprocessing.connection import Client, Listener
from argparse import Namespace

from . import proto


def serve(args: Namespace) -> None:
    """Echo (rtt) or count and acknowledge (oneway) one client's messages."""
    listener = Listener(proto.socket_path(args), family="AF_UNIX")
    proto.ready()
    conn = listener.accept()
    recv, send = conn.recv_bytes, conn.send_bytes
    count = 0
    try:
        while True:
            m = recv()
            if args.case == "rtt":
                send(m)
            else:
                count += 1
                if count == args.n:
                    send(proto.ACK)
    except (EOFError, ConnectionError):
        pass


def client(args: Namespace) -> None:
    """Time the round trips or the one-way stream; print the result."""
    conn = Client(proto.socket_path(args), family="AF_UNIX")
    send, recv = conn.send_bytes, conn.recv_bytes
    data = proto.payload(args.size)
    if args.case == "rtt":
        for _ in range(proto.WARMUP):
            send(data)
            recv()
        start = time.perf_counter()
        for _ in range(args.n):
            send(data)
            recv()
    else:
        start = time.perf_counter()
        for _ in range(args.n):
            send(data)
        recv()
    proto.result(seconds=time.perf_counter() - start)


def main() -> None:
    """Run the peer the command line asks for."""
    args = proto.parse()
    (serve if args.role == "server" else client)(args)


if __name__ == "__main__":
    main()
