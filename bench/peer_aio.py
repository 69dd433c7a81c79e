"""pyipc.aio (asyncio) peers: a service with a handler task, a client with
`await conn.send()` / `await conn.recv()` (the same framing as every pyipc peer)."""

from __future__ import annotations

import asyncio
import os
from argparse import Namespace

import pyipc.aio

from . import proto


async def serve(args: Namespace) -> None:
    """Echo (rtt) or count and acknowledge (oneway), for one client."""
    done = asyncio.Event()

    async def handler(conn: pyipc.aio.Connection) -> None:
        if args.case == "rtt":
            for _ in range(proto.WARMUP + args.n):
                await conn.send(await conn.recv())
        else:
            for _ in range(args.n):
                await conn.recv()
            await conn.send(proto.ACK)
        await conn.drain()
        done.set()

    async with pyipc.aio.Context(rundir=args.dir, backend=args.backend) as ctx:
        await ctx.serve(proto.SERVICE, handler)
        proto.ready()
        await done.wait()


async def client(args: Namespace) -> None:
    """Time the round trips or the one-way stream; print the result."""
    async with pyipc.aio.Context(rundir=args.dir, backend=args.backend) as ctx:
        conn = await ctx.connect(proto.SERVICE)
        await proto.time_async_client(args, conn.send, conn.recv)
    os._exit(0)


def main() -> None:
    """Run the peer the command line asks for."""
    args = proto.parse()
    asyncio.run((serve if args.role == "server" else client)(args))


if __name__ == "__main__":
    main()
