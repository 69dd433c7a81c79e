"""tlsd on one host (issue 19, item 4): a dialing tlsd and a listening tlsd,
each with its own run directory, joined over 127.0.0.1; ipcd's request is
made by the test (tlsd_harness.ask). Every case on both backends."""

from __future__ import annotations

import os
import socket
import ssl
import tempfile

import pytest

import pyipc

from tlsd_harness import (Certs, Echo, ask, connect_through, dialer, frame, listener, port_of,
                          read_all, running)

trustme = pytest.importorskip("trustme")


@pytest.fixture
def certs(tmp_path):
    return Certs(str(tmp_path), trustme)


@pytest.fixture
def hosts():
    """Two run directories: host A (the client's) and host B (pong's)."""
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        yield a, b


@pytest.fixture
def remote(hosts, backend, certs):
    """Host B: pong and a listening tlsd exposing it. Yields the tlsd."""
    _, b = hosts
    with running(Echo(rundir=b, backend=backend)), \
            running(listener(b, backend, certs)) as tlsd:
        yield tlsd


# ------------------------------------------------------------ refusals answered

def test_unexposed_service_is_refused_with_a_reason(hosts, backend, certs, remote):
    a, _ = hosts
    with running(dialer(a, backend, certs)):
        answer, fd = ask(a, f"tls://127.0.0.1:{port_of(remote)}/secret")
    assert fd is None
    assert answer.startswith(b"ne refused ") and b"not exposed" in answer


def test_missing_service_is_noservice(hosts, backend, certs):
    a, b = hosts
    with running(listener(b, backend, certs, expose=frozenset({"pong"}))) as tlsd, \
            running(dialer(a, backend, certs)):
        answer, fd = ask(a, f"tls://127.0.0.1:{port_of(tlsd)}/pong")
    assert fd is None and answer.startswith(b"ne noservice ")


def test_server_certificate_from_another_ca_is_ne_tls(hosts, backend, certs, remote, tmp_path):
    a, _ = hosts
    os.makedirs(tmp_path / "other")
    other = Certs(str(tmp_path / "other"), trustme)
    with running(dialer(a, backend, other)):
        answer, fd = ask(a, f"tls://127.0.0.1:{port_of(remote)}/pong")
    assert fd is None
    assert answer.startswith(b"ne tls ") and b"certificate verify failed" in answer


def test_expired_server_certificate_is_ne_tls(hosts, backend, certs, tmp_path):
    a, b = hosts
    expired = certs.expired_server(str(tmp_path))
    with running(Echo(rundir=b, backend=backend)), \
            running(listener(b, backend, certs, cert=expired)) as tlsd, \
            running(dialer(a, backend, certs)):
        answer, fd = ask(a, f"tls://127.0.0.1:{port_of(tlsd)}/pong")
    assert fd is None
    assert answer.startswith(b"ne tls ") and b"expired" in answer


def test_host_name_is_verified_not_only_the_ca(hosts, backend, certs, tmp_path):
    a, b = hosts
    elsewhere = certs._issue(str(tmp_path), "elsewhere.pem", "elsewhere.example")
    with running(Echo(rundir=b, backend=backend)), \
            running(listener(b, backend, certs, cert=elsewhere)) as tlsd, \
            running(dialer(a, backend, certs)):
        answer, fd = ask(a, f"tls://127.0.0.1:{port_of(tlsd)}/pong")
    assert fd is None
    assert answer.startswith(b"ne tls ") and b"mismatch" in answer


def test_mutual_tls_without_a_client_certificate_is_refused(hosts, backend, certs):
    a, b = hosts
    with running(Echo(rundir=b, backend=backend)), \
            running(listener(b, backend, certs, client_ca=certs.ca)) as tlsd, \
            running(dialer(a, backend, certs)):
        answer, fd = ask(a, f"tls://127.0.0.1:{port_of(tlsd)}/pong")
    assert fd is None
    assert answer.startswith(b"ne tls ")


def test_remote_port_closed_is_unreachable(hosts, backend, certs):
    a, _ = hosts
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]      # bound, not listening: connection refused
        with running(dialer(a, backend, certs)):
            answer, fd = ask(a, f"tls://127.0.0.1:{port}/pong")
    assert fd is None and answer.startswith(b"ne unreachable 127.0.0.1:")


def test_remote_that_never_answers_is_a_timeout(hosts, backend, certs):
    a, _ = hosts
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)                # accepts (in the kernel), never speaks TLS
        with running(dialer(a, backend, certs, timeout=0.5)):
            answer, fd = ask(a, f"tls://127.0.0.1:{silent.getsockname()[1]}/pong")
    assert fd is None and answer.startswith(b"ne timeout ")


@pytest.mark.parametrize("uri", ["tls://127.0.0.1:9443/", "tls:///pong", "tcp://h:1/pong",
                                 "tls://h:99999/pong", "tls://h:1/a/b"])
def test_malformed_uri_is_answered(hosts, backend, certs, uri):
    a, _ = hosts
    with running(dialer(a, backend, certs)):
        answer, fd = ask(a, uri)
    assert fd is None and answer.startswith(b"ne norule ")


def test_plaintext_client_is_refused_and_the_daemon_keeps_serving(hosts, backend, certs,
                                                                   remote):
    a, _ = hosts
    with socket.create_connection(("127.0.0.1", port_of(remote)), timeout=10) as plain:
        plain.sendall(b"pong\n")                    # libIPC's tcpd handshake, no TLS
        assert plain.recv(100) == b""               # closed, nothing relayed
    with running(dialer(a, backend, certs)):
        answer, _ = ask(a, f"tls://127.0.0.1:{port_of(remote)}/secret")
    assert answer.startswith(b"ne refused ")        # still serving TLS peers


def test_silent_peer_is_dropped_after_the_timeout(hosts, backend, certs):
    _, b = hosts
    with running(listener(b, backend, certs, timeout=0.3)) as tlsd:
        with socket.create_connection(("127.0.0.1", port_of(tlsd)), timeout=10) as idle:
            assert idle.recv(100) == b""            # closed by tlsd, not by us


def test_too_many_pending_handshakes_are_closed_at_once(hosts, backend, certs):
    _, b = hosts
    with running(listener(b, backend, certs, max_pending=1)) as tlsd:
        with socket.create_connection(("127.0.0.1", port_of(tlsd)), timeout=10) as first, \
                socket.create_connection(("127.0.0.1", port_of(tlsd)), timeout=10) as second:
            assert second.recv(100) == b""
            first.sendall(b"x")                     # the first one is still held
            first.settimeout(0.2)
            with pytest.raises(socket.timeout):
                first.recv(100)


# ------------------------------------------------------------ relaying

def test_echo_through_a_pair_of_tlsd(hosts, backend, certs, remote):
    a, _ = hosts
    with running(dialer(a, backend, certs)), \
            pyipc.Context(rundir=a, backend=backend) as client:
        fd = connect_through(a, f"tls://127.0.0.1:{port_of(remote)}/pong", client)
        client.write(fd, b"hello over TLS")
        assert client.read(fd, timeout=20) == b"hello over TLS"
        client.write(fd, b"")                       # an empty message is a message
        assert client.read(fd, timeout=20) == b""


def test_one_mebibyte_message(hosts, backend, certs, remote):
    a, _ = hosts
    big = os.urandom(1 << 20)
    with running(dialer(a, backend, certs)), \
            pyipc.Context(rundir=a, backend=backend) as client:
        fd = connect_through(a, f"tls://localhost:{port_of(remote)}/pong", client)
        client.write(fd, big)
        assert client.read(fd, timeout=30) == big


def test_a_thousand_messages_arrive_whole_and_in_order(hosts, backend, certs, remote):
    a, _ = hosts
    sent = [b"%d:" % i + os.urandom(i % 300) for i in range(1000)]
    with running(dialer(a, backend, certs)), \
            pyipc.Context(rundir=a, backend=backend) as client:
        fd = connect_through(a, f"tls://127.0.0.1:{port_of(remote)}/pong", client)
        for payload in sent:
            client.write(fd, payload)               # all sent before any is read
        assert read_all(client, fd, len(sent)) == sent


def test_mutual_tls_with_a_client_certificate_connects(hosts, backend, certs):
    a, b = hosts
    with running(Echo(rundir=b, backend=backend)), \
            running(listener(b, backend, certs, client_ca=certs.ca)) as tlsd, \
            running(dialer(a, backend, certs, cert=certs.client)), \
            pyipc.Context(rundir=a, backend=backend) as client:
        fd = connect_through(a, f"tls://127.0.0.1:{port_of(tlsd)}/pong", client)
        client.write(fd, b"with a client certificate")
        assert client.read(fd, timeout=20) == b"with a client certificate"


def test_ipv6_loopback(hosts, backend, certs):
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this Python")
    a, b = hosts
    try:
        tlsd = listener(b, backend, certs, listen="[::1]:0")
    except OSError as e:
        pytest.skip(f"no IPv6 loopback here: {e}")
    with running(Echo(rundir=b, backend=backend)), running(tlsd), \
            running(dialer(a, backend, certs)), \
            pyipc.Context(rundir=a, backend=backend) as client:
        fd = connect_through(a, f"tls://[::1]:{port_of(tlsd)}/pong", client)
        client.write(fd, b"six")
        assert client.read(fd, timeout=20) == b"six"


def test_first_messages_sent_with_the_name_are_not_lost(hosts, backend, certs, remote):
    """A remote that sends its name and its first frames in one TLS record."""
    ctx = ssl.create_default_context(cafile=certs.ca)
    with socket.create_connection(("127.0.0.1", port_of(remote)), timeout=20) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(b"pong\n" + frame(b"one") + frame(b"two"))
        got = b""
        while len(got) < 2 + 2 * 7:
            chunk = tls.recv(100)
            assert chunk, got
            got += chunk
    assert got == b"ok" + frame(b"one") + frame(b"two")


def test_remote_closing_ends_the_client_connection(hosts, backend, certs, remote):
    a, b = hosts
    with running(dialer(a, backend, certs)), \
            pyipc.Context(rundir=a, backend=backend) as client:
        fd = connect_through(a, f"tls://127.0.0.1:{port_of(remote)}/pong", client)
        client.write(fd, b"x")
        assert client.read(fd, timeout=20) == b"x"
        remote.stop()                               # host B's tlsd goes away
        with pytest.raises(pyipc.ConnectionClosedError):
            client.read(fd, timeout=20)
