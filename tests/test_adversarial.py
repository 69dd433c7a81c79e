"""A service keeps serving well-behaved clients while others misbehave.

Good clients (separate processes) send checked messages and verify every echo.
At the same time bad clients on raw sockets send garbage, a truncated frame, an
oversize announcement, a frame one byte at a time, or vanish mid-message. Each
bad client first says who it is in a valid frame, so the service knows its fd.
The bad ones must get ERROR (with the README's text) + DISCONNECTION; the slow
one is served like any other; the good ones lose nothing.
"""

from __future__ import annotations

import os
import random
import socket
import struct
import threading
import time

import pyipc
from pyipc import EventType

from conftest import frame

GOOD_CLIENTS = 3
GOOD_MESSAGES = 300
LIMIT = 1 << 20

_GOOD_CLIENT = r"""
import random, sys, zlib, pyipc
rng = random.Random(int(sys.argv[3]))
with pyipc.Context(rundir=sys.argv[1], backend=sys.argv[2]) as ctx:
    fd = ctx.connect("adv")
    for i in range(int(sys.argv[4])):
        body = rng.randbytes(rng.choice([0, 1, 100, 5000, 70000]))
        msg = b"good %d %d " % (i, zlib.crc32(body)) + body
        ctx.write(fd, msg)
        if ctx.read(fd) != msg:
            print("echo %d differs" % i, flush=True)
            sys.exit(1)
print("ok", flush=True)
"""

#: name -> (what it sends after its hello, the ERROR text it must get or None)
BAD = {
    "garbage": (b"\xff\xfe\xfd\xfc" + bytes(range(256)),
                f"message of {0xfffefdfc} bytes exceeds max_message_size ({LIMIT})"),
    "oversize": (struct.pack(">I", LIMIT + 1) + b"x" * 100,
                 f"message of {LIMIT + 1} bytes exceeds max_message_size ({LIMIT})"),
    "truncated": (struct.pack(">I", 1000) + b"y" * 10,
                  "peer closed the connection in the middle of a message"),
    "half-header": (b"\x00\x00", "peer closed the connection in the middle of a message"),
}


def _misbehave(rundir: str, name: str, payload: bytes, done: threading.Event) -> None:
    """One bad client: hello, then its bytes, then (for a cut frame) vanish."""
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(os.path.join(rundir, "adv"))
    sock.sendall(frame(b"hello " + name.encode()) + payload)
    if name in ("truncated", "half-header"):
        sock.close()                       # vanishes in the middle of a message
    else:
        sock.settimeout(20)
        while sock.recv(4096):             # until the service drops it
            pass
        sock.close()
    done.set()


def _slow(rundir: str, got: list, done: threading.Event) -> None:
    """A frame written one byte at a time, a pause after each."""
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(os.path.join(rundir, "adv"))
    sock.sendall(frame(b"hello slow"))
    for byte in frame(b"slow but valid"):
        sock.send(bytes([byte]))
        time.sleep(0.02)                   # the pace of the attack, not a synchronisation
    sock.settimeout(20)
    data = b""
    while len(data) < 2 * 4 + len(b"hello slow") + len(b"slow but valid"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    got.append(data)
    sock.close()
    done.set()


def test_bad_clients_are_dropped_and_good_ones_lose_nothing(backend, rundir, processes,
                                                            ctx_factory):
    import subprocess
    service = ctx_factory(max_message_size=LIMIT)
    service.service_init("adv")
    goods = [processes(_GOOD_CLIENT, rundir, backend, str(random.randrange(1 << 30)),
                       str(GOOD_MESSAGES), stdout=subprocess.PIPE, text=True)
             for _ in range(GOOD_CLIENTS)]
    finished = {n: threading.Event() for n in [*BAD, "slow"]}
    slow_got: list[bytes] = []
    threads = [threading.Thread(target=_misbehave, args=(rundir, n, p, finished[n]))
               for n, (p, _) in BAD.items()]
    threads.append(threading.Thread(target=_slow, args=(rundir, slow_got, finished["slow"])))
    for t in threads:
        t.start()

    names: dict[int, str] = {}
    outcome: dict[str, list] = {n: [] for n in finished}
    good_echoed = 0
    service.timer = 50
    deadline = time.monotonic() + 120
    def ended(name: str) -> bool:
        return any(isinstance(x, tuple) and x[0] == EventType.DISCONNECTION
                   for x in outcome[name])

    while any(g.poll() is None for g in goods) or not all(map(ended, outcome)):
        assert time.monotonic() < deadline, f"stalled: {outcome}"
        for ev in service.wait_events():
            if ev.type == EventType.MESSAGE_RX:
                if ev.message.startswith(b"hello "):
                    names[ev.fd] = ev.message[6:].decode()
                elif ev.message.startswith(b"good "):
                    good_echoed += 1
                elif names.get(ev.fd) == "slow":
                    outcome["slow"].append(ev.message)
                try:
                    service.schedule(ev.fd, ev.message)
                except pyipc.ConnectionClosedError:
                    pass                   # it ended in this same batch (bad ones do)
            elif ev.type in (EventType.ERROR, EventType.DISCONNECTION) and ev.fd in names:
                outcome[names[ev.fd]].append((ev.type, ev.error))
                if ev.type == EventType.DISCONNECTION:
                    del names[ev.fd]       # the number may come back for another client
    for t in threads:
        t.join(30)

    for g in goods:
        assert g.wait(30) == 0 and g.stdout.read() == "ok\n"
    assert good_echoed == GOOD_CLIENTS * GOOD_MESSAGES
    for name, (_, error) in BAD.items():
        assert outcome[name] == [(EventType.ERROR, error), (EventType.DISCONNECTION, None)], name
    assert outcome["slow"][0] == b"slow but valid"
    assert slow_got == [frame(b"hello slow") + frame(b"slow but valid")]
