"""The soak test's service (run as a program by tests/test_soak.py).

Every message of a soak client is `client id, connection number, sequence
number, CRC-32 of the body` (4 x u32, big-endian), then the body. The service
checks each one (checksum, and sequence = the connection's count so far, so a
lost, duplicated or reordered message is caught) and echoes it back, by write()
or schedule() at random. A client that reconnects later reports how many
messages it wrote on each of its earlier connections (a `report` message); the
service compares those counts with what it received. The test's control
connection asks for `stats` once every client process has exited; the answer
(JSON) waits until every soak connection is gone, so nothing is still unread.

    python tests/soak_service.py RUNDIR BACKEND NAME SEED
"""

from __future__ import annotations

import json
import random
import struct
import sys
import zlib

import pyipc
from pyipc import EventType

HEAD = struct.Struct(">IIII")


class Checker:
    """The service's bookkeeping: per connection what came, per client what was said."""

    def __init__(self) -> None:
        self.conn_of_fd: dict[int, tuple[int, int]] = {}
        self.received: dict[tuple[int, int], int] = {}
        self.reported: dict[tuple[int, int], int] = {}
        self.faults: list[str] = []
        self.messages = 0
        self.bytes = 0
        self.errors = 0

    def message(self, fd: int, payload: bytes) -> None:
        """Check one soak message from fd."""
        client, conn, seq, crc = HEAD.unpack_from(payload)
        key = (client, conn)
        known = self.conn_of_fd.setdefault(fd, key)
        if known != key:
            self.fault(f"fd {fd}: message of {key} on the connection of {known}")
        expected = self.received.get(key, 0)
        if seq != expected:
            self.fault(f"{key}: sequence {seq}, expected {expected}")
        if zlib.crc32(payload[HEAD.size:]) != crc:
            self.fault(f"{key}: message {seq} corrupted ({len(payload)} bytes)")
        self.received[key] = expected + 1
        self.messages += 1
        self.bytes += len(payload)

    def report(self, payload: bytes) -> None:
        """A client's account of what it wrote on its earlier connections."""
        body = json.loads(payload[len(b"report "):])
        for conn, count in body["sent"].items():
            self.reported[(body["client"], int(conn))] = count

    def fault(self, text: str) -> None:
        if len(self.faults) < 20:
            self.faults.append(text)

    def stats(self) -> dict:
        """Totals, and every connection whose reported count was not received."""
        for key, count in self.reported.items():
            got = self.received.get(key, 0)
            if got != count:
                self.fault(f"{key}: client wrote {count} messages, service received {got}")
        return {"messages": self.messages, "bytes": self.bytes, "errors": self.errors,
                "connections": len(self.received), "reported": len(self.reported),
                "faults": self.faults}


def echo(ctx: pyipc.Context, rng: random.Random, fd: int, payload: bytes) -> None:
    """Echo by write() or schedule(); a client that vanished is not an error here."""
    try:
        if rng.random() < 0.5:
            ctx.write(fd, payload)
        else:
            ctx.schedule(fd, payload)
    except pyipc.ConnectionClosedError:
        pass


def serve(rundir: str, backend: str, name: str, seed: int) -> None:
    rng = random.Random(seed)
    checker = Checker()
    soak_fds: set[int] = set()
    control: list[int] = []
    with pyipc.Context(rundir=rundir, backend=backend, max_connections=1024) as ctx:
        ctx.service_init(name)
        print("ready", flush=True)
        while True:
            for ev in ctx.wait_events():
                if ev.type == EventType.MESSAGE_RX:
                    if ev.message == b"stats":
                        soak_fds.discard(ev.fd)
                        control.append(ev.fd)
                    elif ev.message.startswith(b"report "):
                        checker.report(ev.message)
                    else:
                        checker.message(ev.fd, ev.message)
                        echo(ctx, rng, ev.fd, ev.message)
                elif ev.type == EventType.CONNECTION:
                    soak_fds.add(ev.fd)
                elif ev.type == EventType.DISCONNECTION:
                    soak_fds.discard(ev.fd)
                    checker.conn_of_fd.pop(ev.fd, None)
                elif ev.type == EventType.ERROR:
                    checker.errors += 1
            if control and not soak_fds:
                ctx.write(control[0], json.dumps(checker.stats()))
                return


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
