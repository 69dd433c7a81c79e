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
