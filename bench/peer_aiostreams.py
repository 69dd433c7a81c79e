"""asyncio's own Unix streams (asyncio.open_unix_connection /
start_unix_server) with pyipc's framing: a 4-byte big-endian length, then
the payload. What pyipc.aio is compared with."""

from __future__ import annotations

import asyncio
import os
import struct
from argparse import Namespace

from . import proto

_HEADER = struct.Struct(">I")


async def _read(reader: asyncio.StreamReader) -> bytes:
    (size,) = _HEADER.unpack(await reader.readexactly(4))
    return await reader.readexactly(size)


async def _write(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(_HEADER.pack(len(data)) + data)
    await writer.drain()


async def serve(args: Namespace) -> None:
    """Echo (rtt) or count and acknowledge (oneway), for one client."""
    done = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if args.case == "rtt":
            for _ in range(proto.WARMUP + args.n):
                await _write(writer, await _read(reader))
        else:
            for _ in range(args.n):
                await _read(reader)
            await _write(writer, proto.ACK)
        done.set()

    path = proto.socket_path(args)
    server = await asyncio.start_unix_server(handler, path)
    async with server:
        proto.ready()
        await done.wait()


async def client(args: Namespace) -> None:
    """Time the round trips or the one-way stream; print the result."""
    reader, writer = await asyncio.open_unix_connection(proto.socket_path(args))
    await proto.time_async_client(args, lambda data: _write(writer, data),
                                  lambda: _read(reader))
    os._exit(0)


def main() -> None:
    """Run the peer the command line asks for."""
    args = proto.parse()
    asyncio.run((serve if args.role == "server" else client)(args))


if __name__ == "__main__":
    main()
