"""Raw Python sockets with pyipc's framing (4-byte big-endian length, then payload).

The baseline of what plain Python does: ``sendall(header + payload)`` per message,
``recv_into`` a buffer and split the frames. Its scale server uses ``selectors``.
With ``--mode epoll`` the one-client server waits in ``select.epoll`` before
each recv, as an event loop does (the system "raw client, epoll server").
"""

from __future__ import annotations

import select
import selectors
import socket
import struct
import time
from typing import Callable, List, Optional
from argparse import Namespace

from . import proto
from .scale_ctl import ScaleServer, run_client

HEADER = struct.Struct(">I")
BUFSIZE = 1 << 20
#: One receive buffer for every connection of the process (as pyipc's scratch).
SCRATCH = memoryview(bytearray(BUFSIZE))


class Reader:
    """Split a socket's byte stream into payloads."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def messages(self) -> List[bytes]:
        """Every whole message of the next recv (blocking); [] at EOF."""
        got = self.sock.recv_into(SCRATCH)
        if not got:
            raise EOFError
        self.buf += SCRATCH[:got]
        out, buf, off = [], self.buf, 0
        while len(buf) - off >= 4:
            (size,) = HEADER.unpack_from(buf, off)
            if len(buf) - off - 4 < size:
                break
            out.append(bytes(buf[off + 4:off + 4 + size]))
            off += 4 + size
        del buf[:off]
        return out

    def one(self) -> bytes:
        """The next message (blocking); assumes one at a time (round trips)."""
        while True:
            msgs = self.messages()
            if msgs:
                return msgs[0]


def send(sock: socket.socket, data: bytes) -> None:
    """One frame with one sendall()."""
    sock.sendall(HEADER.pack(len(data)) + data)


def serve(args: Namespace) -> None:
    """Echo (rtt) or count and acknowledge (oneway) one client's messages."""
    path = proto.socket_path(args)
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(path)
    lsock.listen(socket.SOMAXCONN)
    proto.ready()
    if args.case == "scale":
        return serve_scale(lsock)
    conn, _ = lsock.accept()
    reader, count = Reader(conn), 0
    wait = _readiness_wait(conn) if args.mode == "epoll" else None
    try:
        while True:
            if wait is not None:
                wait()
            for m in reader.messages():
                if args.case == "rtt":
                    send(conn, m)
                else:
                    count += 1
                    if count == args.n:
                        send(conn, proto.ACK)
    except (EOFError, ConnectionError):
        pass


def _readiness_wait(conn: socket.socket) -> Callable[[], object]:
    """A wait in epoll until ``conn`` is readable (the socket stays blocking:
    the recv after it returns at once)."""
    ep = select.epoll()
    ep.register(conn.fileno(), select.EPOLLIN)
    return ep.poll


def serve_scale(lsock: socket.socket) -> None:
    """Accept everyone; answer the active client (the one that talks)."""
    sel = selectors.DefaultSelector()
    lsock.setblocking(False)
    sel.register(lsock, selectors.EVENT_READ)
    ctl, readers, active = ScaleServer(), {}, None
    while True:
        for key, _ in sel.select():
            if key.fileobj is lsock:
                while True:
                    try:
                        c, _ = lsock.accept()
                    except BlockingIOError:
                        break
                    readers[c] = Reader(c)
                    sel.register(c, selectors.EVENT_READ)
                if active is not None:
                    _answer(active, ctl.on_connections(len(readers) - 1))
                continue
            c = key.fileobj
            try:
                msgs = readers[c].messages()
            except (EOFError, ConnectionError):
                sel.unregister(c)
                del readers[c]
                c.close()
                if c is active:
                    return
                continue
            active = c
            for m in msgs:
                _answer(c, ctl.on_message(m, len(readers) - 1))


def _answer(sock: socket.socket, reply: Optional[bytes]) -> None:
    """Send the scale server's answer, if there is one now."""
    if reply is not None:
        send(sock, reply)


def client(args: Namespace) -> None:
    """Time the round trips, the one-way stream or the scale case; print the result."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(proto.socket_path(args))
    reader, data = Reader(sock), proto.payload(args.size)
    if args.case == "scale":
        def roundtrip(m: bytes) -> bytes:
            send(sock, m)
            return reader.one()
        proto.raise_nofile(args.idle + 64)
        proto.result(**run_client(roundtrip, proto.socket_path(args), args.idle, args.n,
                                  args.size))
        return
    if args.case == "rtt":
        for _ in range(proto.WARMUP):
            send(sock, data)
            reader.one()
        start, cpu = time.perf_counter(), proto.cpu_seconds()
        for _ in range(args.n):
            send(sock, data)
            reader.one()
        proto.result(seconds=time.perf_counter() - start, cpu=proto.cpu_seconds() - cpu)
        return
    else:
        start, cpu = time.perf_counter(), proto.cpu_seconds()
        for _ in range(args.n):
            send(sock, data)
        reader.one()
    proto.result(seconds=time.perf_counter() - start, cpu=proto.cpu_seconds() - cpu)


def main() -> None:
    """Run the peer the command line asks for."""
    proto.run_scale_capable_peer(serve, client)


if __name__ == "__main__":
    main()
