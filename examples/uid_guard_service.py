#!/usr/bin/env python3
"""uid_guard_service: an echo service that only serves the users it is told to.

When a client connects, the service asks the kernel who it is
(``peer_credentials(fd)``: pid, uid, gid of the process on the other end, which
the client cannot forge) and hangs up at once on a uid that is not allowed,
printing ``uid_guard_service: refused uid N pid P``; the client sees the
connection closed (ConnectionClosedError). Allowed clients get every message back
unchanged. Without ``--allow-uid`` only the service's own uid is allowed.

The service prints one ``ready`` line on stdout once it listens, and ends cleanly
(exit 0, socket file removed) on SIGTERM or Ctrl-C.

    python examples/uid_guard_service.py --rundir /tmp/run --allow-uid 1000 &
    python examples/pong_client.py --rundir /tmp/run --name guard hello
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Optional, Sequence, Set

import pyipc
from pyipc import EventType


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description="pyipc echo service that refuses unknown uids")
    p.add_argument("--rundir", help="run directory (default: env RUNDIR, else /tmp/.libipc-run)")
    p.add_argument("--backend", choices=["native", "pure"], help="pyipc backend")
    p.add_argument("--name", default="guard", help="service name (default: guard)")
    p.add_argument("--allow-uid", type=int, action="append", default=[], metavar="UID",
                   help="a uid that may use the service (repeatable; default: our own uid)")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Serve until SIGINT/SIGTERM; return the exit code."""
    args = parse_args(argv)
    allowed: Set[int] = set(args.allow_uid) or {os.getuid()}
    refused = 0
    # SIGINT and SIGTERM raise KeyboardInterrupt in the call that waits, which
    # ends the loop; leaving `with` then sends the replies still scheduled and
    # removes the socket.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.default_int_handler)
    with pyipc.Context(rundir=args.rundir, backend=args.backend) as ctx:
        try:
            ctx.service_init(args.name)
            print(f"uid_guard_service: ready on {os.path.join(ctx.rundir, args.name)} "
                  f"(backend {ctx.backend}, allowed uids {', '.join(map(str, sorted(allowed)))})",
                  flush=True)
            while True:
                # Events come a batch at a time: a refused client's fd is closed by us
                # while its later events (a message it sent at once) may still be in
                # the batch; they are skipped.
                dropped: Set[int] = set()
                for ev in ctx.wait_events():
                    if ev.fd in dropped:
                        continue
                    if ev.type == EventType.CONNECTION:
                        try:
                            pid, uid, _gid = ctx.peer_credentials(ev.fd)
                        except pyipc.ConnectionClosedError:
                            continue            # already gone: its DISCONNECTION follows
                        if uid not in allowed:
                            print(f"uid_guard_service: refused uid {uid} pid {pid}", flush=True)
                            ctx.close(ev.fd)    # the client sees the connection closed
                            dropped.add(ev.fd)
                            refused += 1
                    elif ev.type == EventType.MESSAGE_RX:
                        try:
                            ctx.schedule(ev.fd, ev.message)
                        except pyipc.ConnectionClosedError:
                            pass                # hung up after sending: nobody to answer
                    elif ev.type == EventType.ERROR:
                        print(f"uid_guard_service: fd {ev.fd}: {ev.error}", file=sys.stderr)
        except KeyboardInterrupt:
            pass
    print(f"uid_guard_service: stopped after refusing {refused} client(s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
