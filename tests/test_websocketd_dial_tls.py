"""websocketd as the `wss` scheme's daemon: a rule `p wss://HOST:PORT/pong`
makes host A's websocketd dial host B's over TLS, the remote's certificate
and host name verified; mutual TLS when B asks for a client certificate.
Failures are answered with their reason: an untrusted or mismatched
certificate, a remote without TLS, a remote closing in the TLS handshake,
a missing client certificate. Hosts are two run directories on 127.0.0.1
(the ws:// tests' harness)."""

from __future__ import annotations

import os
import socket
import ssl
import threading

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
    with pytest.raises(SystemExit, match="--dial-key needs --dial-cert"):
        dial_ssl_context(None, None, "key.pem")

