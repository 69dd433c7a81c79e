#!/usr/bin/env python3
"""pong_service: a pyipc echo service (libIPC's classic example).

Every message a client sends comes back to it unchanged. The service prints one
``ready`` line on stdout once it listens, and ends cleanly (exit 0, socket file
removed) on SIGTERM or Ctrl-C.

    python examples/pong_service.py --rundir /tmp/run &
    python examples/pong_client.py --rundir /tmp/run hello world
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Optional, Sequence

import pyipc
from pyipc import EventType


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description="pyipc echo service")
    p.add_argument("--rundir", help="run directory (default: env RUNDIR, else /tmp/.libipc-run)")
    p.add_argument("--backend", choices=["native", "pure"], help="pyipc backend")
    p.add_argument("--name", default="pong", help="service name (default: pong)")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Serve until SIGINT/SIGTERM; return the exit code."""
    args = parse_args(argv)
    echoed = 0
    # SIGINT and SIGTERM raise KeyboardInterrupt in the call that waits, which
    # ends the loop; leaving `with` then sends the replies still scheduled and
    # removes the socket.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.default_int_handler)
    with pyipc.Context(rundir=args.rundir, backend=args.backend) as ctx:
        try:
            ctx.service_init(args.name)
            print(f"pong_service: ready on {os.path.join(ctx.rundir, args.name)} "
                  f"(backend {ctx.backend})", flush=True)
            while True:
                # One event at a time: close() below also drops the events still
                # pending for that fd, so none of them reaches this loop afterwards.
                ev = ctx.wait_event()
                if ev.type == EventType.MESSAGE_RX:
                    try:
                        ctx.schedule(ev.fd, ev.message)  # queued: a slow client never blocks us
                        echoed += 1
                    except pyipc.ConnectionClosedError:
                        # The client sent this and hung up at once: its connection
                        # has ended (its DISCONNECTION follows), and its fd number
                        # stays reserved until the next round, so nothing can reach
                        # another client. Nobody to answer.
                        pass
                    except pyipc.QueueFullError:
                        # It sends and never reads: its queue reached max_queue_size.
                        # Drop it rather than keep its echoes without end.
                        print(f"pong_service: fd {ev.fd}: never reads, dropped",
                              file=sys.stderr)
                        ctx.close(ev.fd, linger=0)
                elif ev.type == EventType.ERROR:
                    print(f"pong_service: fd {ev.fd}: {ev.error}", file=sys.stderr)
        except KeyboardInterrupt:
            pass
    print(f"pong_service: stopped after {echoed} echo(es)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
