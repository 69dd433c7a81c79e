"""A soak client (run as a program by tests/test_soak.py).

Sends MESSAGES messages of random sizes (mostly small, some up to 1 MiB) in
bursts, each by write() or schedule() at random, and checks that every echo
comes back whole and in order. Between bursts it sometimes reconnects, and
sometimes vanishes: closes the connection as soon as its messages are written,
without waiting for the echoes. At the end it tells the service how many
messages it wrote on each connection, and prints a JSON summary line.

    python tests/soak_client.py RUNDIR BACKEND NAME CLIENT_ID MESSAGES SEED
    python tests/soak_client.py --fork RUNDIR BACKEND NAME MESSAGES OUTDIR SEED...
"""

from __future__ import annotations

import collections
import json
import os
import random
import struct
import sys
import zlib

import pyipc
from pyipc import EventType

HEAD = struct.Struct(">IIII")
MAX_BODY = 1 << 20
#: Bytes of one burst (beyond its first message): echoes of a burst must fit in
#: the socket buffers, since the service may echo with a blocking write().
BURST_BYTES = 96 * 1024
P_RECONNECT = 0.01
P_VANISH = 0.004
STALL_MS = 60_000


def body_size(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.90:
        return rng.randrange(0, 257)
    if r < 0.99:
        return rng.randrange(0, 65537)
    return rng.randrange(0, MAX_BODY + 1)


class SoakClient:
    """One client process: its connection, what it expects back, what went wrong."""

    def __init__(self, ctx: pyipc.Context, name: str, client_id: int, seed: int) -> None:
        self.ctx = ctx
        self.name = name
        self.id = client_id
        self.rng = random.Random(seed)
        self.block = self.rng.randbytes(MAX_BODY * 2)
        self.fd = -1
        self.conn = -1
        self.sent_on: dict[int, int] = {}
        self.expect: collections.deque[bytes] = collections.deque()
        self.unsent = 0          # scheduled, MESSAGE_TX not yet seen
        self.stats = {"client": client_id, "messages": 0, "echoed": 0, "bytes": 0,
                      "connections": 0, "vanished": 0, "faults": []}

    def fault(self, text: str) -> None:
        self.stats["faults"].append(text)
        raise SystemExit(json.dumps(self.stats))

    def connect(self) -> None:
        self.conn += 1
        self.fd = self.ctx.connect(self.name)
        self.sent_on[self.conn] = 0
        self.stats["connections"] += 1

    def message(self) -> bytes:
        size = body_size(self.rng)
        off = self.rng.randrange(0, len(self.block) - size + 1)
        body = self.block[off:off + size]
        return HEAD.pack(self.id, self.conn, self.sent_on[self.conn], zlib.crc32(body)) + body

    def send_burst(self, left: int) -> int:
        """Send 1..8 messages (fewer if they grow past BURST_BYTES); return how many."""
        count, size = 0, 0
        for _ in range(min(left, self.rng.randint(1, 8))):
            payload = self.message()
            if count and size + len(payload) > BURST_BYTES:
                break
            if self.rng.random() < 0.5:
                self.ctx.write(self.fd, payload)
            else:
                self.ctx.schedule(self.fd, payload)
                self.unsent += 1
            self.expect.append(payload)
            self.sent_on[self.conn] += 1
            count += 1
            size += len(payload)
        self.stats["messages"] += count
        self.stats["bytes"] += size
        return count

    def pump(self, until_echoed: bool) -> None:
        """Run the loop until scheduled messages are written (and echoes are back)."""
        while self.unsent or (until_echoed and self.expect):
            for ev in self.ctx.wait_events():
                self.handle(ev)

    def handle(self, ev: pyipc.Event) -> None:
        if ev.type == EventType.MESSAGE_TX:
            self.unsent -= 1
        elif ev.type == EventType.MESSAGE_RX:
            if not self.expect or ev.message != self.expect.popleft():
                self.fault(f"conn {self.conn}: echo {self.stats['echoed']} does not match")
            self.stats["echoed"] += 1
        elif ev.type == EventType.TIMER:
            self.fault(f"conn {self.conn}: nothing for {STALL_MS} ms "
                       f"({self.unsent} unsent, {len(self.expect)} echoes due)")
        else:
            self.fault(f"conn {self.conn}: unexpected {ev!r}")

    def run(self, messages: int) -> None:
        self.ctx.timer = STALL_MS
        self.connect()
        while self.stats["messages"] < messages:
            self.send_burst(messages - self.stats["messages"])
            if self.rng.random() < P_VANISH:
                self.pump(until_echoed=False)
                self.ctx.close(self.fd)       # the echoes still due go nowhere
                self.expect.clear()
                self.stats["vanished"] += 1
                self.connect()
                continue
            self.pump(until_echoed=True)
            if self.rng.random() < P_RECONNECT:
                self.ctx.close(self.fd)
                self.connect()
        report = {"client": self.id, "sent": self.sent_on}
        self.ctx.write(self.fd, b"report " + json.dumps(report).encode())
        self.ctx.close(self.fd)


def run_client(rundir: str, backend: str, name: str, client_id: int, messages: int,
               seed: int) -> dict:
    """One client's whole run; its summary (the stats)."""
    with pyipc.Context(rundir=rundir, backend=backend) as ctx:
        client = SoakClient(ctx, name, client_id, seed)
        client.run(messages)
    return client.stats


def fork_clients(rundir: str, backend: str, name: str, messages: int, outdir: str,
                 seeds: list[int]) -> int:
    """One client process per seed, forked from this one (pyipc imported
    once, not once a client: 200 interpreters cost the soak seconds of CPU);
    client i writes its summary to OUTDIR/i.json. 0 when every one exited 0."""
    children = []
    for client_id, seed in enumerate(seeds):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                stats = run_client(rundir, backend, name, client_id, messages, seed)
                with open(os.path.join(outdir, f"{client_id}.json"), "w") as out:
                    json.dump(stats, out)
                code = 0
            finally:
                os._exit(code)          # (a traceback, if any, went to stderr)
        children.append(pid)
    failed = 0
    for pid in children:
        _, status = os.waitpid(pid, 0)
        failed += status != 0
    return 1 if failed else 0


def main() -> None:
    """`RUNDIR BACKEND NAME CLIENT_ID MESSAGES SEED`: one client, its summary
    printed; `--fork RUNDIR BACKEND NAME MESSAGES OUTDIR SEED...`: a client per
    seed (fork_clients)."""
    if sys.argv[1] == "--fork":
        rundir, backend, name, messages, outdir, *seeds = sys.argv[2:]
        sys.exit(fork_clients(rundir, backend, name, int(messages), outdir,
                              [int(s) for s in seeds]))
    rundir, backend, name, client_id, messages, seed = sys.argv[1:7]
    stats = run_client(rundir, backend, name, int(client_id), int(messages), int(seed))
    print(json.dumps(stats), flush=True)


if __name__ == "__main__":
    main()
