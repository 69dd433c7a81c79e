#!/usr/bin/env python3
"""kv_service: a key-value store served with typed messages (see kv_messages.py).

Each request (Get, Put, Delete, Dump) gets one Reply, in order. A message that
does not decode (unknown type, broken body, wrong fields) gets ``Reply(ok=False,
error=...)`` and the connection stays open. Prints one ``ready`` line on stdout
once it listens; ends cleanly (exit 0, socket removed) on SIGTERM or Ctrl-C.

    python examples/kv_service.py --rundir /tmp/run &
    python examples/kv_client.py --rundir /tmp/run put colour blue get colour
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Any, Dict, Optional, Sequence

import pyipc
from pyipc import EventType, TypedMessageError

from kv_messages import Delete, Dump, Get, Put, Reply, registry


def handle(store: Dict[str, Any], request: object) -> Reply:
    """The reply to one decoded request (store is changed in place)."""
    if isinstance(request, Get):
        if request.key in store:
            return Reply(True, store[request.key])
        return Reply(False, error=f"no key {request.key!r}")
    if isinstance(request, Put):
        store[request.key] = request.value
        return Reply(True)
    if isinstance(request, Delete):
        if request.key not in store:
            return Reply(False, error=f"no key {request.key!r}")
        del store[request.key]
        return Reply(True)
    if isinstance(request, Dump):
        return Reply(True, {k: v for k, v in sorted(store.items())
                            if k.startswith(request.prefix)})
    return Reply(False, error=f"{type(request).__name__} is not a request")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Serve until SIGINT/SIGTERM; return the exit code."""
    p = argparse.ArgumentParser(description="pyipc typed key-value service")
    p.add_argument("--rundir", help="run directory (default: env RUNDIR, else /tmp/.libipc-run)")
    p.add_argument("--backend", choices=["native", "pure"], help="pyipc backend")
    p.add_argument("--name", default="kv", help="service name (default: kv)")
    args = p.parse_args(argv)
    store: Dict[str, Any] = {}
    # SIGINT and SIGTERM raise KeyboardInterrupt in the call that waits, which
    # ends the loop; leaving `with` then sends the replies still scheduled and
    # removes the socket.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.default_int_handler)
    with pyipc.Context(rundir=args.rundir, backend=args.backend) as ctx:
        try:
            ctx.service_init(args.name)
            print(f"kv_service: ready on {os.path.join(ctx.rundir, args.name)} "
                  f"(backend {ctx.backend})", flush=True)
            while True:
                events = ctx.wait_events()
                dropped = set()          # closed by us during this batch: skip their events
                for ev in events:
                    if ev.fd in dropped:
                        continue
                    if ev.type == EventType.MESSAGE_RX:
                        try:
                            reply = handle(store, registry.decode_event(ev))
                        except TypedMessageError as e:
                            reply = Reply(False, error=f"bad request: {e}")
                        try:
                            ctx.schedule_typed(ev.fd, reply, registry)
                        except pyipc.ConnectionClosedError:
                            # The client hung up after sending: the request counts, but
                            # nobody is there for the reply (its DISCONNECTION follows;
                            # its fd number is not reused before the next round).
                            pass
                        except pyipc.QueueFullError:    # a client that never reads
                            print(f"kv_service: fd {ev.fd} does not read its replies, closing it",
                                  file=sys.stderr)
                            ctx.close(ev.fd)
                            dropped.add(ev.fd)
                    elif ev.type == EventType.ERROR:
                        print(f"kv_service: fd {ev.fd}: {ev.error}", file=sys.stderr)
        except KeyboardInterrupt:
            pass
    print(f"kv_service: stopped with {len(store)} key(s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
