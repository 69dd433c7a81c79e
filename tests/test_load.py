"""Load: an echo service in one process, 20 client processes x 500 messages.

Each message carries its client number, a sequence number and a CRC of the
whole; the service checks every message (exactly once, in order, intact, per
client) and echoes it with schedule(); each client checks every echo the same
way. Sizes vary from 0 bytes of body to 4 KB, written with write() and
schedule() alternately.
"""

from __future__ import annotations

import json
import subprocess


CLIENTS = 20
MESSAGES = 500

_SERVICE = r"""
import json, struct, sys, zlib, pyipc
from pyipc import EventType
rundir, backend = sys.argv[1], sys.argv[2]
ctx = pyipc.Context(rundir=rundir, backend=backend)
ctx.service_init("load")
print("ready", flush=True)
seen = {}          # client number -> next expected sequence number
bad = []
conns = 0
report_to = None
while report_to is None:
    for ev in ctx.wait_events():
        if ev.type == EventType.CONNECTION:
            conns += 1
        elif ev.type == EventType.ERROR:
            bad.append(ev.error)
        elif ev.type == EventType.MESSAGE_RX:
            m = ev.message
            if m == b"report":
                report_to = ev.fd
                continue
            cid, seq = struct.unpack_from(">HI", m)
            if zlib.crc32(m[:-4]) != struct.unpack(">I", m[-4:])[0]:
                bad.append(f"crc of {cid}/{seq}")
            if seq != seen.get(cid, 0):
                bad.append(f"client {cid}: got {seq}, expected {seen.get(cid, 0)}")
            seen[cid] = seq + 1
            ctx.schedule(ev.fd, m)
ctx.write(report_to, json.dumps({"seen": seen, "bad": bad, "conns": conns}))
ctx.read(report_to)
"""

_CLIENT = r"""
import struct, sys, zlib, pyipc
rundir, backend, cid, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
def message(seq):
    size = (seq * 7919 + cid * 104729) % 4097 if seq % 10 else 0
    body = struct.pack(">HI", cid, seq) + bytes([(seq + cid) & 0xFF]) * size
    return body + struct.pack(">I", zlib.crc32(body))
with pyipc.Context(rundir=rundir, backend=backend) as ctx:
    fd = ctx.connect_service("load")
    for seq in range(n):
        if seq % 2:
            ctx.write(fd, message(seq))
        else:
            ctx.schedule(fd, message(seq))
    ctx.write(fd, message(n))       # write() first flushes what schedule() queued
    for seq in range(n + 1):
        echo = ctx.read(fd)
        if echo != message(seq):
            print(f"client {cid}: echo {seq} differs ({len(echo)} bytes)", flush=True)
            sys.exit(1)
print("ok", cid, flush=True)
"""


def test_many_clients_exactly_once_in_order(backend, rundir, processes):
    service = processes(_SERVICE, rundir, backend, stdout=subprocess.PIPE, text=True)
    assert service.stdout.readline() == "ready\n"
    clients = [processes(_CLIENT, rundir, backend, str(cid), str(MESSAGES),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for cid in range(CLIENTS)]
    for cid, proc in enumerate(clients):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"client {cid}: {out}{err}"
        assert out == f"ok {cid}\n"
    import pyipc
    with pyipc.Context(rundir=rundir, backend=backend) as ctx:
        fd = ctx.connect_service("load")
        ctx.write(fd, b"report")
        report = json.loads(ctx.read(fd))
        ctx.write(fd, b"bye")
    assert report["bad"] == []
    assert report["conns"] == CLIENTS + 1
    assert report["seen"] == {str(cid): MESSAGES + 1 for cid in range(CLIENTS)}
    service.wait(timeout=30)
