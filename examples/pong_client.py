#!/usr/bin/env python3
"""pong_client: send messages to pong_service and check that each comes back.

    python examples/pong_client.py --rundir /tmp/run hello world

Prints one line per echo; exits 0 when every echo matched, 1 otherwise (or when
the service is not running).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import pyipc


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Send each message, read its echo; return the exit code."""
    p = argparse.ArgumentParser(description="client of the pyipc echo service")
    p.add_argument("--rundir", help="run directory (default: env RUNDIR, else /tmp/.libipc-run)")
    p.add_argument("--backend", choices=["native", "pure"], help="pyipc backend")
    p.add_argument("--name", default="pong", help="service name (default: pong)")
    p.add_argument("messages", nargs="*", default=["hello"], help="messages to send")
    args = p.parse_args(argv)
    try:
        with pyipc.Context(rundir=args.rundir, backend=args.backend) as ctx:
            fd = ctx.connect(args.name)
            ok = True
            for text in args.messages:
                ctx.write(fd, text)
                echo = ctx.read(fd).decode("utf-8", "replace")
                ok &= echo == text
                print(f"sent {text!r}, received {echo!r}{'' if echo == text else '  MISMATCH'}",
                      flush=True)
    except pyipc.IPCError as e:
        print(f"pong_client: {e}", file=sys.stderr)
        return 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
