"""websocketd as the `wss` scheme's daemon: a rule `p wss://HOST:PORT/pong`
makes host A's websocketd dial host B's over TLS, the remote's certificate
and host name verified; mutual TLS when B asks for a client certificate.
Failures are answered with their reason: an untrusted or mismatched
certificate, a remote without TLS, a remote closing in the TLS handshake,
a missing client certificate. Hosts are two run directories on 127.0.0.1
(the ws:// tests' harness)."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import socket
import ssl
import threading
from typing import Callable, Iterator

import pytest
import trustme  # a test dependency (pyproject's test extra): missing, the run fails

import pyipc
from pyipc.daemons.websocketd.command import dial_ssl_context, ssl_context

from test_websocketd_dial import ask_ws, host_a, host_b, hosts, port_of  # noqa: F401

BIG = 1 << 20


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def server_side(ca: trustme.CA, *names: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*(names or ("127.0.0.1",))).configure_cert(context)
    return context


def client_side(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def connect_through(a: str, backend: str, remote_port: int, monkeypatch) -> tuple:
    monkeypatch.setenv("IPC_NETWORK", f"p wss://127.0.0.1:{remote_port}/pong")
    ctx = pyipc.Context(rundir=a, backend=backend)
    return ctx, ctx.connect("p", timeout=10)


def test_a_client_reaches_a_service_over_wss(hosts, backend, monkeypatch, ca, tmp_path):
    """Every message whole, in order, once, over TLS; the dialling side's
    context is the CLI's (--dial-ca), the remote's the CLI's (--cert)."""
    a, b = hosts
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(
        str(tmp_path / "server.pem"))
    remote_tls = ssl_context(str(tmp_path / "server.pem"), None)
    with host_b(b, backend, ssl_context=remote_tls) as remote, \
            host_a(a, backend, dial_ssl_context=dial_ssl_context(
                str(tmp_path / "ca.pem"), None, None)):
        ctx, fd = connect_through(a, backend, port_of(remote), monkeypatch)
        with ctx:
            messages = [b"", b"ping", os.urandom(BIG)] + [i.to_bytes(4, "big")
                                                          for i in range(1000)]
            ctx.write_many(fd, messages)
            assert [ctx.read(fd, timeout=10) for _ in messages] == messages


@pytest.mark.parametrize("case, text", [
    ("untrusted", "certificate verify failed: unable to get local issuer certificate"),
    ("other name", "certificate verify failed: IP address mismatch"),
])
def test_a_certificate_that_does_not_verify_is_said(hosts, backend, monkeypatch, ca, case,
                                                     text):
    a, b = hosts
    trusted = client_side(trustme.CA() if case == "untrusted" else ca)
    names = ("localhost",) if case == "other name" else ()
    with host_b(b, backend, ssl_context=server_side(ca, *names)) as remote, \
            host_a(a, backend, dial_ssl_context=trusted):
        port = port_of(remote)
        assert ask_ws(a, f"wss://127.0.0.1:{port}/pong", "wss").decode().startswith(
            f"ne tls 127.0.0.1:{port}: {text}")


def test_mutual_tls_without_and_with_a_client_certificate(hosts, backend, monkeypatch, ca):
    """B asks for a client certificate from its CA (--client-ca): a dial
    without one is refused with TLS's reason; with one it is served."""
    a, b = hosts
    remote_tls = server_side(ca)
    remote_tls.verify_mode = ssl.CERT_REQUIRED
    ca.configure_trust(remote_tls)
    with host_b(b, backend, ssl_context=remote_tls) as remote:
        with host_a(a, backend, dial_ssl_context=client_side(ca)):
            monkeypatch.setenv("IPC_NETWORK", f"p wss://127.0.0.1:{port_of(remote)}/pong")
            with pyipc.Context(rundir=a, backend=backend) as ctx:
                with pytest.raises(pyipc.NetworkError,
                                   match=r"\(tls\): 127\.0\.0\.1:\d+: .*CERTIFICATE"):
                    ctx.connect("p", timeout=10)
        mine = client_side(ca)
        ca.issue_cert("host-a").configure_cert(mine)
        with host_a(a, backend, dial_ssl_context=mine):
            ctx, fd = connect_through(a, backend, port_of(remote), monkeypatch)
            with ctx:
                ctx.write(fd, b"mutual")
                assert ctx.read(fd, timeout=10) == b"mutual"


def test_a_remote_without_tls_is_a_tls_failure(hosts, backend, ca):
    """B serves ws:// only: its answer to the ClientHello is not TLS."""
    a, b = hosts
    with host_b(b, backend) as remote, host_a(a, backend, dial_ssl_context=client_side(ca)):
        port = port_of(remote)
        assert ask_ws(a, f"wss://127.0.0.1:{port}/pong", "wss").startswith(
            f"ne tls 127.0.0.1:{port}: ".encode())


def test_a_remote_closing_in_the_tls_handshake_is_unreachable(hosts, backend, ca):
    """A remote at its bounds closes new connections at once: said as such,
    not as a certificate problem."""
    a, _ = hosts
    with socket.create_server(("127.0.0.1", 0)) as server, \
            host_a(a, backend, dial_ssl_context=client_side(ca)):
        def close_after_hello() -> None:
            conn, _ = server.accept()
            with conn:
                conn.recv(4096)                         # the ClientHello
        closer = threading.Thread(target=close_after_hello)
        closer.start()
        port = server.getsockname()[1]
        answer = ask_ws(a, f"wss://127.0.0.1:{port}/pong", "wss")
        closer.join(10)
    assert answer == (f"ne unreachable 127.0.0.1:{port} closed the connection during the "
                      f"TLS handshake (at its bounds, or no wss:// there?)").encode()


def test_the_cli_refuses_a_dial_key_without_its_certificate():
    with pytest.raises(ValueError, match="^--dial-key needs --dial-cert$"):
        dial_ssl_context(None, None, "key.pem")



# ------------------------------------------------------------ faults found by review

def _accept_key(request: bytes) -> bytes:
    key = [line.split(b":", 1)[1].strip() for line in request.split(b"\r\n")
           if line.lower().startswith(b"sec-websocket-key")][0]
    return base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11")
                            .digest())


def _switching(request: bytes) -> bytes:
    return (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + _accept_key(request) +
            b"\r\n\r\n")


MESSAGE_THEN_CLOSE = b"\x82\x0blast-words!" + b"\x88\x02\x03\xe8"   # binary, Close 1000


@contextlib.contextmanager
def closing_remote(ca: trustme.CA, answers: Callable[[bytes], list],
                   proceed: threading.Event) -> Iterator[int]:
    """A wss:// remote on 127.0.0.1 (its port) that reads the WebSocket
    request and writes each of answers(request) (TLS plaintext, one TCP
    segment each; before each after the first it waits for `proceed`), the
    last one together with close_notify (as nginx and most servers close);
    the TCP connection stays open until the block ends."""
    context = server_side(ca)
    server = socket.create_server(("127.0.0.1", 0))
    done = threading.Event()

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            tls = context.wrap_bio(incoming, outgoing, server_side=True)

            def more() -> None:
                conn.sendall(outgoing.read())
                incoming.write(conn.recv(65536))
            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    more()
            request = b""
            while b"\r\n\r\n" not in request:
                try:
                    request += tls.read(65536)
                except ssl.SSLWantReadError:
                    more()
            parts = answers(request)
            for i, part in enumerate(parts):
                if i:
                    proceed.wait(10)
                tls.write(part)
                if i == len(parts) - 1:
                    with contextlib.suppress(ssl.SSLWantReadError):
                        tls.unwrap()                    # close_notify, with the last part
                conn.sendall(outgoing.read())
            done.wait(20)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        done.set()
        proceed.set()
        thread.join(10)
        server.close()


def test_a_refusal_that_comes_with_close_notify_is_said(hosts, backend, ca):
    """The remote's 404 and its TLS end in one read: the 404's text is the
    refusal (it was 'closed the connection without answering')."""
    a, _ = hosts
    body = b"no such thing here"
    refusal = b"HTTP/1.1 404 Not Found\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    with closing_remote(ca, lambda request: [refusal], threading.Event()) as port, \
            host_a(a, backend, dial_ssl_context=client_side(ca)):
        assert ask_ws(a, f"wss://127.0.0.1:{port}/pong", "wss") == \
            b"ne refused no such thing here"


@pytest.mark.parametrize("when", ["with the 101", "after the 101"])
def test_a_last_message_that_comes_with_close_notify_is_delivered(hosts, backend, ca,
                                                                   monkeypatch, when):
    """The remote's last message, its Close and its TLS end in one read:
    the client gets the message, then the end (the message was lost)."""
    a, _ = hosts
    connected = threading.Event()           # the rest comes to the open WebSocket

    def answers(request: bytes) -> list:
        if when == "with the 101":
            return [_switching(request) + MESSAGE_THEN_CLOSE]
        return [_switching(request), MESSAGE_THEN_CLOSE]
    with closing_remote(ca, answers, connected) as port, \
            host_a(a, backend, dial_ssl_context=client_side(ca)):
        ctx, fd = connect_through(a, backend, port, monkeypatch)
        connected.set()
        with ctx:
            assert ctx.read(fd, timeout=10) == b"last-words!"
            with pytest.raises(pyipc.ConnectionClosedError):
                ctx.read(fd, timeout=10)
