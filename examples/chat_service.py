#!/usr/bin/env python3
"""chat_service: broadcasts each member's messages to every other member.

A client first sends ``Join(name)`` and gets ``Welcome(members)`` (or
``Refused(reason)`` and is hung up on, when the name is taken); then each
``Say(text)`` it sends reaches every other member as ``Said(name, text)``, in
the order it was sent; members are told when someone joins or leaves. Typed
messages with JSON bodies (chat_messages.py). Prints one ``ready`` line on
stdout once it listens; ends cleanly (exit 0, socket removed) on SIGTERM or
Ctrl-C.

    python examples/chat_service.py --rundir /tmp/run &
    python examples/chat_client.py --rundir /tmp/run --name alice
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Dict, List, Optional, Sequence, Set

import pyipc
from pyipc import EventType, TypedMessageError

from chat_messages import Join, Joined, Left, Refused, Said, Say, Welcome, registry


class Chat:
    """The members (fd -> name) and what the service does with each message.

    Events are handled a batch (``wait_events()``) at a time. A member that
    hung up may still be in ``members`` while the events before its
    DISCONNECTION are handled: sending to it raises ConnectionClosedError (its
    fd number stays reserved until the next round, so nothing can reach a new
    client), which is ignored; its DISCONNECTION then tells the others.
    ``dropped`` holds the fds this service closed during the batch: their
    remaining events are skipped.
    """

    def __init__(self, ctx: pyipc.Context) -> None:
        self.ctx = ctx
        self.members: Dict[int, str] = {}
        self.dropped: Set[int] = set()

    def handle(self, events: List[pyipc.Event]) -> None:
        """Handle one batch of events, in order."""
        self.dropped = set()
        for ev in events:
            if ev.fd in self.dropped:
                continue
            if ev.type == EventType.MESSAGE_RX:
                try:
                    message = registry.decode_event(ev)
                except TypedMessageError as e:
                    self.refuse(ev.fd, f"bad message: {e}")
                    continue
                self.receive(ev.fd, message)
            elif ev.type == EventType.DISCONNECTION:
                self.leave(ev.fd)
            elif ev.type == EventType.ERROR:
                print(f"chat_service: fd {ev.fd}: {ev.error}", file=sys.stderr)

    def send(self, fd: int, obj: object) -> None:
        """Queue obj for fd; a member that stopped reading is dropped."""
        try:
            self.ctx.schedule_typed(fd, obj, registry)
        except pyipc.ConnectionClosedError:
            pass        # it hung up; its DISCONNECTION (later in the batch) tells the others
        except pyipc.QueueFullError:
            print(f"chat_service: fd {fd} does not read, dropping it", file=sys.stderr)
            self.leave(fd, close=True)

    def broadcast(self, sender_fd: int, obj: object) -> None:
        """Queue obj for every member except sender_fd."""
        for fd in list(self.members):
            if fd != sender_fd and fd in self.members:
                self.send(fd, obj)

    def leave(self, fd: int, close: bool = False) -> None:
        """fd is gone (or is dropped): tell the others."""
        name = self.members.pop(fd, None)
        if close:
            self.ctx.close(fd)      # also releases the fd of a member that already hung up
            self.dropped.add(fd)
        if name is not None:
            self.broadcast(fd, Left(name))

    def receive(self, fd: int, message: object) -> None:
        """Handle one decoded message from fd."""
        if isinstance(message, Join) and fd not in self.members:
            if message.name in self.members.values() or not message.name:
                self.refuse(fd, f"the name {message.name!r} is taken or empty")
                return
            self.members[fd] = message.name
            self.send(fd, Welcome(sorted(self.members.values())))
            self.broadcast(fd, Joined(message.name))
        elif isinstance(message, Say) and fd in self.members:
            self.broadcast(fd, Said(self.members[fd], message.text))
        else:
            self.refuse(fd, f"unexpected {type(message).__name__} (Join first, then Say)")

    def refuse(self, fd: int, reason: str) -> None:
        """Tell fd why, then hang up (write() so the reason is sent before close)."""
        try:
            self.ctx.write_typed(fd, Refused(reason), registry)
        except pyipc.ConnectionClosedError:
            pass                    # already gone: nobody to tell
        self.leave(fd, close=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Serve until SIGINT/SIGTERM; return the exit code."""
    p = argparse.ArgumentParser(description="pyipc chat service")
    p.add_argument("--rundir", help="run directory (default: env RUNDIR, else /tmp/.libipc-run)")
    p.add_argument("--backend", choices=["native", "pure"], help="pyipc backend")
    p.add_argument("--name", default="chat", help="service name (default: chat)")
    args = p.parse_args(argv)
    # SIGINT and SIGTERM raise KeyboardInterrupt in the call that waits, which
    # ends the loop; leaving `with` then sends the replies still scheduled and
    # removes the socket.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.default_int_handler)
    with pyipc.Context(rundir=args.rundir, backend=args.backend) as ctx:
        try:
            ctx.service_init(args.name)
            print(f"chat_service: ready on {os.path.join(ctx.rundir, args.name)} "
                  f"(backend {ctx.backend})", flush=True)
            chat = Chat(ctx)
            while True:
                chat.handle(ctx.wait_events())
        except KeyboardInterrupt:
            pass
    print("chat_service: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
