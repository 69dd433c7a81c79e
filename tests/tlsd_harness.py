"""What tlsd's tests share: certificates from trustme, daemons run on threads
(each host its own run directory), an echo service, and a fake ipcd request
(the framed URI ipcd sends to the local service `tls`, and its answer)."""

from __future__ import annotations

import array
import contextlib
import datetime
import os
import socket
import ssl
import struct
import threading
from typing import Iterator, List, Optional, Tuple

import pyipc
from pyipc.daemons import Daemon
from pyipc.daemons._tls_options import TlsdConfig
from pyipc.daemons.tlsd import Tlsd
from conftest import frame


class Certs:
    """A CA and PEM files under `path`: ca.pem, server.pem (cert + key for
    localhost and 127.0.0.1), client.pem (a client certificate)."""

    def __init__(self, path: str, trustme: object) -> None:
        self.ca_obj = trustme.CA()                          # type: ignore[attr-defined]
        self.ca = os.path.join(path, "ca.pem")
        self.ca_obj.cert_pem.write_to_path(self.ca)
        self.server = self._issue(path, "server.pem", "localhost", "127.0.0.1", "::1")
        self.client = self._issue(path, "client.pem", "client.example")

    def _issue(self, path: str, name: str, *identities: str, expired: bool = False) -> str:
        kw = {}
        if expired:
            past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=1)
            kw = dict(not_before=past - datetime.timedelta(days=30), not_after=past)
        cert = self.ca_obj.issue_cert(*identities, **kw)
        file = os.path.join(path, name)
        cert.private_key_and_cert_chain_pem.write_to_path(file)
        return file

    def expired_server(self, path: str) -> str:
        return self._issue(path, "expired.pem", "localhost", "127.0.0.1", expired=True)


class Echo(Daemon):
    """The service `pong`: every message comes back to its sender."""

    name = "echo"
    service = "pong"

    def setup(self) -> None:
        self.ctx.service_init(self.service)

    def on_event(self, ev: pyipc.Event) -> None:
        if ev.type == pyipc.EventType.MESSAGE_RX:
            self.ctx.schedule(ev.fd, ev.message)


@contextlib.contextmanager
def running(daemon: Daemon) -> Iterator[Daemon]:
    """The daemon serving on a thread until the block ends, then stopped."""
    runner = threading.Thread(target=daemon.run, kwargs={"handle_signals": False})
    runner.start()
    try:
        if not daemon.ready.wait(10):
            raise AssertionError(f"{daemon.name} did not become ready")
        yield daemon
    finally:
        daemon.stop()
        runner.join(10)
        assert not runner.is_alive(), f"{daemon.name} did not stop"


def listener(rundir: str, backend: str, certs: Certs, **kw: object) -> Tlsd:
    """A tlsd on 127.0.0.1 (a free port) exposing `pong` unless told otherwise."""
    options = dict(listen=("127.0.0.1:0",), cert=certs.server, expose=frozenset({"pong"}))
    options.update(kw)
    return Tlsd(TlsdConfig(**options), rundir=rundir, backend=backend)  # type: ignore[arg-type]


def dialer(rundir: str, backend: str, certs: Certs, **kw: object) -> Tlsd:
    """A tlsd that only dials, trusting the test CA unless told otherwise."""
    options: dict = dict(ca=certs.ca)
    options.update(kw)
    return Tlsd(TlsdConfig(**options), rundir=rundir, backend=backend)


def port_of(daemon: Tlsd) -> int:
    return int(daemon.addresses[0][1])


@contextlib.contextmanager
def tls_client(port: int, certs: Certs, timeout: float = 20,
               source: str = "127.0.0.1") -> Iterator[ssl.SSLSocket]:
    """A TLS client of a listening tlsd on 127.0.0.1:`port` from address
    `source`, verifying its certificate (CN localhost) against the test CA."""
    ctx = ssl.create_default_context(cafile=certs.ca)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                  source_address=(source, 0)) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        yield tls


def recv_exactly(tls: ssl.SSLSocket, n: int) -> bytes:
    """The next `n` bytes from `tls`; fails if it ends before."""
    got = b""
    while len(got) < n:
        more = tls.recv(n - len(got))
        assert more, f"tlsd closed; got {got!r}"
        got += more
    return got


def tls_by_hand(port: int, certs: Certs) -> Tuple[socket.socket, ssl.SSLObject,
                                                  ssl.MemoryBIO, ssl.MemoryBIO, bytes]:
    """A TLS client of a listening tlsd done by hand (MemoryBIO), so that a
    test chooses what goes out in one write: the handshake up to its last
    flight, which is returned unsent: (socket, session, incoming BIO,
    outgoing BIO, the flight)."""
    ctx = ssl.create_default_context(cafile=certs.ca)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    while True:
        try:
            tls.do_handshake()
            return sock, tls, incoming, outgoing, outgoing.read()
        except ssl.SSLWantReadError:
            sock.sendall(outgoing.read())
            incoming.write(sock.recv(65536))


def ask(rundir: str, uri: str, timeout: float = 20.0) -> Tuple[bytes, Optional[int]]:
    """Do what ipcd does: send tlsd the framed URI; return its framed answer's
    payload and the fd that came with it (None if none)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(os.path.join(rundir, "tls"))
        s.sendall(frame(uri.encode()))
        data, fds = b"", []
        while len(data) < 4 or len(data) < 4 + struct.unpack(">I", data[:4])[0]:
            chunk, ancdata, _, _ = s.recvmsg(4096, socket.CMSG_SPACE(4 * 4))
            for level, kind, body in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.extend(array.array("i", body[:len(body) - len(body) % 4]))
            if not chunk:
                break
            data += chunk
        for extra in fds[1:]:
            os.close(extra)
        return data[4:], (fds[0] if fds else None)


def connect_through(rundir: str, uri: str, client: pyipc.Context) -> int:
    """A client connection made of tlsd's answer (what ipcd hands a client)."""
    answer, fd = ask(rundir, uri)
    assert answer == b"ok" and fd is not None, answer
    client.add_connection(fd)
    return fd


def read_all(ctx: pyipc.Context, fd: int, count: int) -> List[bytes]:
    return [ctx.read(fd, timeout=20) for _ in range(count)]
