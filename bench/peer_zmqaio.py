"""zmq.asyncio peers: one PAIR socket over ipc://, awaited sends and receives."""

from __future__ import annotations

import asyncio
import os
from argparse import Namespace

import zmq
import zmq.asyncio

from . import proto


def _socket(args: Namespace, server: bool) -> zmq.asyncio.Socket:
    endpoint = "ipc://" + os.path.join(args.dir, proto.SERVICE) + ".zmq"
    s = zmq.asyncio.Context().socket(zmq.PAIR)
    s.bind(endpoint) if server else s.connect(endpoint)
    return s


async def serve(args: Namespace) -> None:
    """Echo (rtt) or count and acknowledge (oneway)."""
    s = _socket(args, server=True)
    proto.ready()
    if args.case == "rtt":
        for _ in range(proto.WARMUP + args.n):
            await s.send(await s.recv(copy=False), copy=False)
    else:
        for _ in range(args.n):
            await s.recv()
        await s.send(proto.ACK)
    await asyncio.sleep(0.2)    # let the last message leave before the context goes


async def client(args: Namespace) -> None:
    """Time the round trips or the one-way stream; print the result."""
    s = _socket(args, server=False)
    await proto.time_async_client(args, s.send, s.recv)
    os._exit(0)                 # skip zmq's linger at exit


def main() -> None:
    """Run the peer the command line asks for."""
    args = proto.parse()
    asyncio.run((serve if args.role == "server" else client)(args))


if __name__ == "__main__":
    main()
