"""pyzmq over ``ipc://``: ``--mode pair`` (one PAIR socket each way) or
``--mode pushpull`` (PUSH/PULL, a second pair of sockets carries answers back)."""

from __future__ import annotations

import os
import time
from argparse import Namespace

import zmq

from . import proto


def _endpoints(args: Namespace) -> tuple:
    """The ipc:// endpoints: client to server, and back."""
    base = "ipc://" + os.path.join(args.dir, proto.SERVICE)
    return base + ".zmq", base + ".back.zmq"


def _sockets(args: Namespace, server: bool) -> tuple:
    """(send socket, receive socket) of this side."""
    ctx = zmq.Context()
    there, back = _endpoints(args)
    if args.mode == "pair":
        s = ctx.socket(zmq.PAIR)
        s.bind(there) if server else s.connect(there)
        return s, s
    if server:
        rx, tx = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
        rx.bind(there)
        tx.bind(back)
        return tx, rx
    tx, rx = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    tx.connect(there)
    rx.connect(back)
    return tx, rx


def serve(args: Namespace) -> None:
    """Echo (rtt) or count and acknowledge (oneway)."""
    tx, rx = _sockets(args, server=True)
    proto.ready()
    recv, send = rx.recv, tx.send
    if args.case == "rtt":
        for _ in range(proto.WARMUP + args.n):
            send(recv(copy=False), copy=False)
    else:
        for _ in range(args.n):
            recv()
        send(proto.ACK)
    time.sleep(0.2)            # let the last message leave before the context goes


def client(args: Namespace) -> None:
    """Time the round trips or the one-way stream; print the result."""
    tx, rx = _sockets(args, server=False)
    send, recv = tx.send, rx.recv
    data = proto.payload(args.size)
    if args.case == "rtt":
        for _ in range(proto.WARMUP):
            send(data)
            recv()
        start, cpu = time.perf_counter(), proto.cpu_seconds()
        for _ in range(args.n):
            send(data)
            recv()
        proto.result(seconds=time.perf_counter() - start, cpu=proto.cpu_seconds() - cpu)
        os._exit(0)            # skip zmq's linger at exit
    else:
        start, cpu = time.perf_counter(), proto.cpu_seconds()
        for _ in range(args.n):
            send(data, copy=len(data) < 65536)
        recv()
    proto.result(seconds=time.perf_counter() - start, cpu=proto.cpu_seconds() - cpu)
    os._exit(0)                # skip zmq's linger at exit


def main() -> None:
    """Run the peer the command line asks for."""
    args = proto.parse()
    (serve if args.role == "server" else client)(args)


if __name__ == "__main__":
    main()
