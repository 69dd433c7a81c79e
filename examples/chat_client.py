#!/usr/bin/env python3
"""chat_client: join chat_service as NAME; each stdin line is said to the others.

Prints ``joined as NAME; members: ...`` once the service welcomed it, then one
line per event: ``SENDER: TEXT`` for a message of another member, ``* NAME
joined`` / ``* NAME left``. Ends at the end of stdin (Ctrl-D) -- with
``--expect N``, only once N messages of others have also arrived -- or when the
service goes away. The event loop watches stdin itself (``add_external``), so
typing and receiving never block each other.

    python examples/chat_client.py --rundir /tmp/run --name alice
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import pyipc
from pyipc import EventType

from chat_messages import Join, Joined, Left, Refused, Said, Say, Welcome, registry

STDIN = 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Join, then relay stdin and print what others say; return the exit code."""
    p = argparse.ArgumentParser(description="client of the pyipc chat service")
    p.add_argument("--rundir", help="run directory (default: env RUNDIR, else /tmp/.libipc-run)")
    p.add_argument("--backend", choices=["native", "pure"], help="pyipc backend")
    p.add_argument("--service", default="chat", help="service name (default: chat)")
    p.add_argument("--name", required=True, help="your name in the chat")
    p.add_argument("--expect", type=int, default=0, metavar="N",
                   help="after the end of stdin, wait until N messages of others arrived")
    args = p.parse_args(argv)
    try:
        with pyipc.Context(rundir=args.rundir, backend=args.backend) as ctx:
            fd = ctx.connect(args.service)
            ctx.write_typed(fd, Join(args.name), registry)
            answer = ctx.read_typed(fd, registry)
            if not isinstance(answer, Welcome):
                reason = answer.reason if isinstance(answer, Refused) else repr(answer)
                print(f"chat_client: refused: {reason}", file=sys.stderr)
                return 1
            print(f"joined as {args.name}; members: {', '.join(answer.members)}", flush=True)
            return chat(ctx, fd, args.expect)
    except (pyipc.IPCError, pyipc.TypedMessageError) as e:
        print(f"chat_client: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def chat(ctx: pyipc.Context, fd: int, expect: int) -> int:
    """The event loop: stdin lines out, messages of others in."""
    ctx.add_external(STDIN)
    stdin_open, received, pending = True, 0, b""
    while stdin_open or received < expect:
        ev = ctx.wait_event()
        if ev.type == EventType.EXTERNAL and ev.fd == STDIN:
            chunk = os.read(STDIN, 65536)
            if not chunk:                       # end of input: stop watching it
                stdin_open = False
                ctx.close(STDIN)
                lines, pending = ([pending] if pending else []), b""
            else:
                *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                text = line.decode("utf-8", "replace").rstrip("\r")
                if text:
                    ctx.write_typed(fd, Say(text), registry)
        elif ev.type == EventType.MESSAGE_RX and ev.fd == fd:
            message = registry.decode_event(ev)
            if isinstance(message, Said):
                received += 1
                print(f"{message.sender}: {message.text}", flush=True)
            elif isinstance(message, Joined):
                print(f"* {message.name} joined", flush=True)
            elif isinstance(message, Left):
                print(f"* {message.name} left", flush=True)
            elif isinstance(message, Refused):
                print(f"chat_client: refused: {message.reason}", file=sys.stderr)
                return 1
        elif ev.type == EventType.DISCONNECTION and ev.fd == fd:
            print("* the service closed the connection", flush=True)
            return 0 if received >= expect else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
