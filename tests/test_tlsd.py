"""tlsd on one host (issue 19, item 4): a dialing tlsd and a listening tlsd,
each with its own run directory, joined over 127.0.0.1; ipcd's request is
made by the test (tlsd_harness.ask). Every case on both backends."""

from __future__ import annotations

import os
import socket
import time
import ssl
import struct
import subprocess
import sys
import tempfile
import threading

import pytest

import pyipc
from pyipc.daemons import _netwire as wire
from pyipc.daemons._sockets import MAX_DEAD_PEER_TIMEOUT
from pyipc.daemons._timers import MAX_TIMEOUT
from pyipc.daemons._tls_options import TlsdConfig

from conftest import require_openssl, spin_until, unavailable
from daemon_harness import (Burst, fail_first_offload, frames_of, hung_lookups, reap,
                            send_while_slow_to_read, stops_cleanly, stuck_service)
from tlsd_harness import (Certs, Echo, ask, connect_through, dialer, frame, listener, port_of,
                          read_all, recv_exactly, running, tls_by_hand, tls_client)

import trustme  # a test dependency (pyproject's test extra): missing, the run fails


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


def test_a_service_with_a_full_backlog_is_busy_and_the_others_are_served(backend, rundir,
                                                                        certs):
    """tlsd connects to the local service without blocking: a service that
    accepts nobody and whose backlog is full is refused `busy` at once, and
    the loop goes on serving (a blocking connect held every session)."""
    exposed = frozenset({"stuck", "pong"})
    with stuck_service(rundir, "stuck"), running(Echo(rundir=rundir, backend=backend)), \
            running(listener(rundir, backend, certs, expose=exposed)) as tlsd:
        assert _tls_to(port_of(tlsd), certs, b"stuck\n") == \
            b"ne busy service stuck has a full backlog"
        with tls_client(port_of(tlsd), certs) as tls:
            tls.sendall(b"pong\n" + frame(b"still served"))
            want = b"ok" + frame(b"still served")
            assert recv_exactly(tls, len(want)) == want


def test_a_remote_gone_before_its_ok_leaves_no_connection_to_the_service(backend, rundir,
                                                                          certs, monkeypatch):
    """The `ok` cannot be written (the remote reset after its name): the
    connection tlsd made to the service for it is closed, not kept."""
    from pyipc.daemons._tls_handshake import HandshakeFailed
    from pyipc.daemons._tls_relay import TlsRelay

    oks = []                                # the records carrying `ok`
    real_encrypt = TlsRelay.encrypt_raw

    def encrypt_raw(relay, data):
        out = real_encrypt(relay, data)
        if data == b"ok":
            oks.append(out)
        return out

    monkeypatch.setattr(TlsRelay, "encrypt_raw", encrypt_raw)
    daemon = listener(rundir, backend, certs)
    real_send = daemon._send

    def reset_at_ok(hs, data):
        if oks and data is oks[-1]:
            raise HandshakeFailed("unreachable", f"{hs.peer}: connection reset by peer")
        real_send(hs, data)

    daemon._send = reset_at_ok
    with pyipc.Context(rundir=rundir, backend=backend) as service, running(daemon):
        service.service_init("pong")
        assert _tls_to(port_of(daemon), certs, b"pong\n") == b""
        local = _wait_for(service, pyipc.EventType.CONNECTION).fd
        assert _wait_for(service, pyipc.EventType.DISCONNECTION).fd == local


def test_a_session_broken_at_the_ok_closes_the_service_connection(backend, rundir,
                                                                   certs, monkeypatch):
    """Encrypting the `ok` fails (an SSLError: the session broke, as after
    a ragged EOF without OP_IGNORE_UNEXPECTED_EOF): the connection tlsd made
    to the service for it is closed, not kept, and the failure is a
    refusal, not an exception out of the event."""
    from pyipc.daemons._tls_relay import TlsRelay

    real_encrypt = TlsRelay.encrypt_raw

    def encrypt_raw(relay, data):
        if data == b"ok":
            broken = ssl.SSLEOFError(8, "EOF occurred in violation of protocol")
            broken.reason = "UNEXPECTED_EOF_WHILE_READING"    # (as ssl sets it)
            raise broken
        return real_encrypt(relay, data)

    monkeypatch.setattr(TlsRelay, "encrypt_raw", encrypt_raw)
    with pyipc.Context(rundir=rundir, backend=backend) as service, \
            running(listener(rundir, backend, certs)) as tlsd:
        service.service_init("pong")
        got = _tls_to(port_of(tlsd), certs, b"pong\n")
        assert got.startswith(b"ne tls 127.0.0.1:"), got
        assert got.endswith(b": UNEXPECTED_EOF_WHILE_READING"), got
        local = _wait_for(service, pyipc.EventType.CONNECTION).fd
        assert _wait_for(service, pyipc.EventType.DISCONNECTION).fd == local
        spin_until(lambda: not tlsd._handshakes and not tlsd._relays)


def test_send_now_raises_where_a_write_would_kill_with_sigpipe():
    """What tlsd and websocketd write to a peer goes with MSG_NOSIGNAL: to a
    peer that reset, in a program that restored SIGPIPE's default action,
    the write fails with EPIPE instead of killing the program."""
    code = ("import signal, socket\n"
            "from pyipc.daemons._netwire import send_now\n"
            "signal.signal(signal.SIGPIPE, signal.SIG_DFL)\n"
            "a, b = socket.socketpair()\n"
            "b.close()\n"
            "try:\n"
            "    send_now(a.fileno(), b'x')\n"
            "except BrokenPipeError:\n"
            "    print('EPIPE')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert (out.returncode, out.stdout) == (0, "EPIPE\n"), out.stderr


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
        with running(dialer(a, backend, certs, connect_timeout=0.5)):
            answer, fd = ask(a, f"tls://127.0.0.1:{silent.getsockname()[1]}/pong")
    assert fd is None and answer.startswith(b"ne timeout ")


def test_hung_name_lookups_of_one_host_leave_workers_for_others(hosts, backend, certs,
                                                                 remote, monkeypatch):
    """As tcpd's: lookups of one host hang, each holding its worker past its
    request's answer; past --max-pending-per-host of those, requests for
    that host are refused `busy` at once, and a dial to another host still
    finds a worker (4 workers here)."""
    a, _ = hosts
    daemon = dialer(a, backend, certs, connect_timeout=1, max_pending_per_host=2)
    daemon._offloader.max_workers = 4
    with hung_lookups(monkeypatch, "hung.example"), running(daemon):
        answers = [ask(a, "tls://hung.example:9000/pong") for _ in range(4)]
        assert answers[:2] == [(b"ne timeout tls://hung.example:9000/pong: no answer "
                                b"within 1 s", None)] * 2
        assert answers[2:] == [(b"ne busy tlsd has 2 dials to hung.example in progress "
                                b"(--max-pending-per-host)", None)] * 2
        answer, fd = ask(a, f"tls://127.0.0.1:{port_of(remote)}/pong")
        assert fd is not None
        os.close(fd)
        assert answer == b"ok"


def test_a_hosts_share_comes_back_when_no_worker_can_be_started(hosts, backend, certs):
    """As tcpd's: the first request's worker thread cannot start; it is
    answered, and the host's share of dials is given back (not 'busy')."""
    a, _ = hosts
    daemon = dialer(a, backend, certs, connect_timeout=1, max_pending_per_host=1)
    fail_first_offload(daemon)
    with socket.socket() as closed, running(daemon):
        closed.bind(("127.0.0.1", 0))                 # bound, not listening: refused
        uri = f"tls://127.0.0.1:{closed.getsockname()[1]}/pong"
        first, _ = ask(a, uri)
        second, _ = ask(a, uri)
    assert first == b"ne refused tlsd failed serving this request (see its log)"
    assert second.startswith(b"ne unreachable "), second


def test_a_dial_that_ends_after_its_request_was_answered_is_dropped(hosts, backend, certs):
    """Requests are known by ipcd's fd number, which the next request may get
    once one is answered: a dial that ends after its own request was answered
    (timed out, ipcd gone) must not take the new request's place (it started
    TLS on its own socket with the other request's host and service)."""
    a, _ = hosts
    daemon = dialer(a, backend, certs)
    try:
        stale, current = ("127.0.0.1", 1, "old"), ("127.0.0.1", 2, "new")
        daemon._connecting[7] = current          # fd 7: now another request's
        daemon._dialling_to.add("127.0.0.1")     # the stale dial's worker, still out
        left, right = socket.socketpair()
        with right:
            daemon._connected(7, stale, left, None)
            assert left.fileno() == -1            # the stale dial's socket closed
        assert daemon._connecting[7] is current and not daemon._handshakes
        assert len(daemon._dialling_to) == 0     # its worker counted back
    finally:
        daemon.stop()                            # a run that ends at once frees it all
        daemon.run(handle_signals=False)


@pytest.mark.parametrize("uri", ["tls://127.0.0.1:9443/", "tls:///pong", "tcp://h:1/pong",
                                 "tls://h:99999/pong", "tls://h:1/a/b", "tls://h:0/pong",
                                 "tls://user:pw@h:1/pong", "tls://h:1/pong?x=1",
                                 "tls://h:1/po%0Ang"])
def test_malformed_uri_is_answered(hosts, backend, certs, uri):
    a, _ = hosts
    with running(dialer(a, backend, certs)):
        answer, fd = ask(a, uri)
    assert fd is None and answer.startswith(b"ne norule bad URI: ")


def test_a_uri_past_max_uri_is_refused_as_ipcd_refuses_it(hosts, backend, certs):
    base = "tls://127.0.0.1:1/"
    a, _ = hosts
    with running(dialer(a, backend, certs)):
        at, _ = ask(a, base + "x" * (wire.MAX_URI - len(base)))
        past, _ = ask(a, base + "x" * (wire.MAX_URI + 1 - len(base)))
    assert at == b"ne norule bad URI: " + wire.NAME_TOO_LONG.encode()
    assert past == b"ne badrequest a URI of %d bytes; tlsd takes at most %d" % (
        wire.MAX_URI + 1, wire.MAX_URI)


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
    with running(listener(b, backend, certs, handshake_timeout=0.3)) as tlsd:
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


def test_a_remote_at_its_bounds_is_unreachable_not_a_tls_failure(hosts, backend, certs):
    """The remote tlsd holds max_pending handshakes and closes the dial's
    connection at once: that is said as such (it was `ne tls ...
    UNEXPECTED_EOF_WHILE_READING`, as if a certificate were wrong)."""
    a, b = hosts
    with running(listener(b, backend, certs, max_pending=1)) as remote, \
            running(dialer(a, backend, certs)):
        port = port_of(remote)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as holder:
            holder.sendall(b"\x16")                # its slot, held (half a record)
            answer, fd = ask(a, f"tls://127.0.0.1:{port}/pong")
    assert fd is None
    # Closed with our ClientHello unread, the remote's kernel may reset the
    # connection instead: unreachable too, said as the reset.
    assert answer in ((f"ne unreachable 127.0.0.1:{port} closed the connection during "
                       f"the TLS handshake (at its bounds, or not a tlsd?)").encode(),
                      f"ne unreachable 127.0.0.1:{port}: Connection reset by peer".encode())


def test_a_services_last_messages_reach_a_peer_that_is_still_sending(backend, rundir,
                                                                     certs):
    """As tcpd's: the service writes 40 MiB and closes while the remote
    peer is still sending and slow to read: every message, then
    close_notify (tlsd closed its TCP socket with the peer's records unread:
    a reset, and the peer lost its last messages, 36 of 40 came)."""
    burst = Burst(rundir=rundir, backend=backend)
    with running(burst), \
            running(listener(rundir, backend, certs, expose=frozenset({"burst"}))) as tlsd:
        ctx = ssl.create_default_context(cafile=certs.ca)
        with socket.create_connection(("127.0.0.1", port_of(tlsd)), timeout=30) as raw, \
                ctx.wrap_socket(raw, server_hostname="localhost",
                                suppress_ragged_eofs=False) as tls:
            tls.sendall(b"burst\n")
            assert recv_exactly(tls, 2) == b"ok"
            send_while_slow_to_read(tls.sendall)
            data = bytearray()
            while True:
                chunk = tls.recv(1 << 20)       # b"" at close_notify; a ragged end raises
                if not chunk:
                    break
                data += chunk
    assert frames_of(bytes(data)) == burst.messages


def test_the_share_per_host_follows_max_pending_unless_given():
    from pyipc.daemons._tls_options import TlsdConfig
    import dataclasses
    assert TlsdConfig(max_pending=64).pending_per_host == 32
    assert dataclasses.replace(TlsdConfig(), max_pending=200).pending_per_host == 100
    assert TlsdConfig(max_pending=64, max_pending_per_host=5).pending_per_host == 5


def test_max_pending_per_host_at_and_past_the_edge(hosts, backend, certs):
    """One address cannot take every handshake slot: past its share its next
    connection is closed at once, while another address is still served."""
    _, b = hosts
    with running(Echo(rundir=b, backend=backend)), \
            running(listener(b, backend, certs, max_pending=10,
                             max_pending_per_host=1)) as tlsd:
        port = port_of(tlsd)
        with socket.create_connection(("127.0.0.1", port), timeout=10,
                                      source_address=("127.0.0.2", 0)):      # at the edge
            with socket.create_connection(("127.0.0.1", port), timeout=10,
                                          source_address=("127.0.0.2", 0)) as past:
                assert past.recv(100) == b""                                 # closed at once
            with tls_client(port, certs, source="127.0.0.3") as other:      # another host
                other.sendall(b"pong\n" + frame(b"served"))
                assert recv_exactly(other, 2 + 10) == b"ok" + frame(b"served")


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


def test_options_at_their_bounds_relay(hosts, backend, certs):
    """--dead-peer-timeout at MAX_DEAD_PEER_TIMEOUT (past it every connection
    failed: setsockopt EINVAL), the timeouts at MAX_TIMEOUT, on both tlsds."""
    a, b = hosts
    bounds = dict(dead_peer_timeout=MAX_DEAD_PEER_TIMEOUT, connect_timeout=MAX_TIMEOUT,
                  handshake_timeout=MAX_TIMEOUT)
    with running(Echo(rundir=b, backend=backend)), \
            running(listener(b, backend, certs, **bounds)) as remote, \
            running(dialer(a, backend, certs, **bounds)), \
            pyipc.Context(rundir=a, backend=backend) as client:
        fd = connect_through(a, f"tls://127.0.0.1:{port_of(remote)}/pong", client)
        client.write(fd, b"at the bounds")
        assert client.read(fd, timeout=20) == b"at the bounds"


@pytest.mark.parametrize("option, value", [
    ("dead_peer_timeout", MAX_DEAD_PEER_TIMEOUT + 1), ("dead_peer_timeout", float("inf")),
    ("dead_peer_timeout", float("nan")), ("connect_timeout", MAX_TIMEOUT + 1),
    ("connect_timeout", float("inf")), ("handshake_timeout", 1e10),
    ("handshake_timeout", float("nan"))])
def test_options_past_their_bounds_are_refused(option, value):
    bound = MAX_DEAD_PEER_TIMEOUT if option == "dead_peer_timeout" else int(MAX_TIMEOUT)
    with pytest.raises(ValueError, match=f"^{option} must be .* at most {bound} seconds"):
        TlsdConfig(**{option: value})


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
        unavailable("no IPv6 in this Python", "PYIPC_REQUIRE_NETWORK")
    a, b = hosts
    try:
        tlsd = listener(b, backend, certs, listen=("[::1]:0",))
    except OSError as e:
        unavailable(f"no IPv6 loopback here: {e}", "PYIPC_REQUIRE_NETWORK")
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


def _name_and_end_in_one_write(port: int, certs: Certs, stream: bytes) -> bytes:
    """A remote that sends the last handshake flight, `stream` (its name and
    frames) and close_notify in one write, then waits with TCP open for the
    answer and tlsd's close_notify (as SSLSocket.unwrap() does): what it got,
    ending in b"<close_notify>" or b"<EOF>"."""
    sock, tls, incoming, outgoing, flight = tls_by_hand(port, certs)
    with sock:
        tls.write(stream)
        try:
            tls.unwrap()
        except ssl.SSLWantReadError:
            pass                                # the answer is not awaited here
        sock.sendall(flight + outgoing.read())
        return _answer_by_hand(sock, tls, incoming)


def _answer_by_hand(sock: socket.socket, tls: ssl.SSLObject, incoming: ssl.MemoryBIO) -> bytes:
    """What tlsd sends back on a session made by hand (tls_by_hand), to
    its end: ending in b"<close_notify>" or b"<EOF>" (TCP closed without it)."""
    sock.settimeout(20)
    got = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return got + b"<EOF>"
        incoming.write(chunk)
        try:
            while True:
                more = tls.read(65536)
                if not more:                # (the session's end, as ssl sees it)
                    return got + b"<close_notify>"
                got += more
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            return got + b"<close_notify>"


def test_frames_and_close_notify_sent_with_the_name_reach_the_service_then_end(
        backend, rundir, certs):
    """The session's end came with the name: the frames still reach the
    service, then both sides end (no later read of the TCP side would have
    said so), and the remote gets its close_notify."""
    with running(listener(rundir, backend, certs)) as tlsd, \
            pyipc.Context(rundir=rundir, backend=backend) as service:
        service.service_init("pong")
        got = _name_and_end_in_one_write(port_of(tlsd), certs, b"pong\n" + frame(b"hi"))
        assert got == b"ok<close_notify>"
        ev = _wait_for(service, pyipc.EventType.MESSAGE_RX)
        assert ev.message == b"hi"
        assert _wait_for(service, pyipc.EventType.DISCONNECTION).fd == ev.fd
        spin_until(lambda: not tlsd._relays)


def test_a_frame_cut_by_an_end_sent_with_the_name_never_reaches_the_service(
        backend, rundir, certs):
    with running(listener(rundir, backend, certs)) as tlsd, \
            pyipc.Context(rundir=rundir, backend=backend) as service:
        service.service_init("pong")
        got = _name_and_end_in_one_write(port_of(tlsd), certs,
                                         b"pong\n" + frame(b"whole") + frame(b"cut")[:5])
        assert got == b"ok<EOF>"                # a broken stream: no close_notify
        local = _wait_for(service, pyipc.EventType.CONNECTION).fd
        ev = _wait_for(service, pyipc.EventType.DISCONNECTION)
        assert ev.fd == local                   # nothing of the stream reached it
        assert not tlsd._relays


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


# ------------------------------------------------------------ the local side ends: close_notify

def _end_seen_by(tls: ssl.SSLSocket) -> str:
    """How the remote sees the session end: "close_notify" (recv gives b""),
    or "ragged EOF" (TCP closed without close_notify). `tls` must be wrapped
    with suppress_ragged_eofs=False, so that the two differ."""
    try:
        while tls.recv(1000):
            pass
    except ssl.SSLEOFError:
        return "ragged EOF"
    return "close_notify"


def _wait_for(ctx: pyipc.Context, kind: pyipc.EventType) -> pyipc.Event:
    """The next event of `kind` on ctx (others skipped); fails after 20 s."""
    ctx.timer = 20000
    while True:
        ev = ctx.wait_event()
        assert ev.type != pyipc.EventType.TIMER, f"no {kind.name} within 20 s"
        if ev.type == kind:
            return ev


def test_local_service_closing_sends_close_notify_to_the_remote(backend, rundir, certs):
    """Listening side: the exposed service closes its end; the remote peer gets
    close_notify before the TCP close."""
    with running(listener(rundir, backend, certs)) as tlsd, \
            pyipc.Context(rundir=rundir, backend=backend) as service:
        service.service_init("pong")
        ctx = ssl.create_default_context(cafile=certs.ca)
        with socket.create_connection(("127.0.0.1", port_of(tlsd)), timeout=20) as raw, \
                ctx.wrap_socket(raw, server_hostname="localhost",
                                suppress_ragged_eofs=False) as tls:
            tls.sendall(b"pong\n")
            local = _wait_for(service, pyipc.EventType.CONNECTION).fd
            assert tls.recv(2) == b"ok"
            service.write(local, b"last words")
            service.close(local)
            got = b""
            while len(got) < len(frame(b"last words")):
                got += tls.recv(100)
            assert got == frame(b"last words")          # the data first, then the end
            assert _end_seen_by(tls) == "close_notify"


def test_tlsd_stopping_sends_close_notify_to_the_remote(backend, rundir, certs):
    with pyipc.Context(rundir=rundir, backend=backend) as service:
        service.service_init("pong")
        with running(listener(rundir, backend, certs)) as tlsd:
            ctx = ssl.create_default_context(cafile=certs.ca)
            with socket.create_connection(("127.0.0.1", port_of(tlsd)), timeout=20) as raw, \
                    ctx.wrap_socket(raw, server_hostname="localhost",
                                    suppress_ragged_eofs=False) as tls:
                tls.sendall(b"pong\n")
                _wait_for(service, pyipc.EventType.CONNECTION)
                assert tls.recv(2) == b"ok"
                tlsd.stop()
                assert _end_seen_by(tls) == "close_notify"


class FakeRemote:
    """A remote tlsd stand-in on a thread: takes one TLS connection, reads the
    name line, answers `ok`, then records how the session ended (`end`)."""

    def __init__(self, certs: Certs) -> None:
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(certs.server)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(20)
        self.port = self.sock.getsockname()[1]
        self.end = ""
        self.thread = threading.Thread(target=self._serve)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        conn.settimeout(20)
        with self.context.wrap_socket(conn, server_side=True,
                                      suppress_ragged_eofs=False) as tls:
            line = b""
            while not line.endswith(b"\n"):
                line += tls.recv(1)
            tls.sendall(b"ok")
            self.end = self._after_ok(tls)

    def _after_ok(self, tls: ssl.SSLSocket) -> str:
        """What the remote does once it answered `ok`; how the session ended."""
        return _end_seen_by(tls)

    def close(self) -> str:
        """Wait for the connection to end; how it ended."""
        self.thread.join(20)
        self.sock.close()
        assert not self.thread.is_alive()
        return self.end


def test_local_client_closing_sends_close_notify_to_the_remote(backend, rundir, certs):
    """Dialing side: the local client closes the connection tlsd handed it;
    the remote gets close_notify before the TCP close."""
    remote = FakeRemote(certs)
    try:
        with running(dialer(rundir, backend, certs)), \
                pyipc.Context(rundir=rundir, backend=backend) as client:
            fd = connect_through(rundir, f"tls://127.0.0.1:{remote.port}/pong", client)
            client.close(fd)
            assert remote.close() == "close_notify"     # while tlsd still runs
    finally:
        remote.close()


class RecordingRemote(FakeRemote):
    """A FakeRemote that also records the plaintext sent after `ok`."""

    def __init__(self, certs: Certs) -> None:
        self.got = b""
        super().__init__(certs)

    def _after_ok(self, tls: ssl.SSLSocket) -> str:
        try:
            while True:
                more = tls.recv(65536)
                if not more:
                    return "close_notify"
                self.got += more
        except ssl.SSLEOFError:
            return "ragged EOF"


def _dial_raw(rundir: str, port: int) -> socket.socket:
    """The local end tlsd hands ipcd for tls://127.0.0.1:PORT/pong, as a
    plain socket (the test writes the pyipc stream itself)."""
    answer, fd = ask(rundir, f"tls://127.0.0.1:{port}/pong")
    assert answer == b"ok" and fd is not None, answer
    return socket.socket(fileno=fd)


def test_a_local_frame_cut_by_the_end_of_the_stream_never_reaches_the_remote(
        backend, rundir, certs, caplog):
    """The local side's frames go to the remote whole: the start of one that
    its writer never finished is not sent (as the core's framing drops it)."""
    remote = RecordingRemote(certs)
    big = os.urandom(100_000)
    try:
        with running(dialer(rundir, backend, certs)):
            with _dial_raw(rundir, remote.port) as local:
                local.sendall(frame(b"one") + frame(big) + frame(b"cut" * 1000)[:1500])
            assert remote.close() == "close_notify"
    finally:
        remote.close()
    assert remote.got == frame(b"one") + frame(big)
    assert "in the middle of a message" in caplog.text


def test_a_local_frame_over_the_limit_never_reaches_the_remote(backend, rundir, certs,
                                                                 caplog):
    """A frame announced over max_message_size by the local side ends the
    relay with the core's reason; the whole frames before it go out first."""
    remote = RecordingRemote(certs)
    try:
        with running(dialer(rundir, backend, certs)) as tlsd:
            limit = tlsd.ctx.max_message_size
            with _dial_raw(rundir, remote.port) as local:
                local.sendall(frame(b"before") + struct.pack(">I", limit + 1) + b"x" * 5000)
                assert remote.close() == "close_notify"
                local.settimeout(20)
                assert local.recv(100) == b""           # the local side is closed too
    finally:
        remote.close()
    assert remote.got == frame(b"before")
    assert f"message of {limit + 1} bytes exceeds max_message_size ({limit})" in caplog.text


def test_a_remote_frame_over_the_limit_ends_the_stream_at_its_header(backend, rundir, certs):
    """A remote announcing a frame over the limit is cut off as soon as the
    header is read, after the whole frames before it reached the service:
    tlsd does not wait for (and buffer) the announced bytes."""
    with running(listener(rundir, backend, certs)) as tlsd, \
            pyipc.Context(rundir=rundir, backend=backend) as service:
        service.service_init("pong")
        limit = tlsd.ctx.max_message_size
        ctx = ssl.create_default_context(cafile=certs.ca)
        with socket.create_connection(("127.0.0.1", port_of(tlsd)), timeout=20) as raw, \
                ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"pong\n")
            local = _wait_for(service, pyipc.EventType.CONNECTION).fd
            assert tls.recv(2) == b"ok"
            tls.sendall(frame(b"first") + struct.pack(">I", limit + 1) + b"x" * 5000)
            ev = _wait_for(service, pyipc.EventType.MESSAGE_RX)
            assert (ev.fd, ev.message) == (local, b"first")
            assert _wait_for(service, pyipc.EventType.DISCONNECTION).fd == local
            try:
                assert tls.recv(100) == b""         # socket.timeout (20 s) fails the test
            except (ssl.SSLEOFError, ConnectionError):
                pass


def test_whole_remote_frames_before_a_cut_one_and_the_end_still_reach_the_service(
        backend, rundir, certs):
    """One TCP write holds a whole frame, the start of another, and
    close_notify: the whole frame reaches the service, the cut one does not,
    and the connection ends."""
    with running(listener(rundir, backend, certs)) as tlsd, \
            pyipc.Context(rundir=rundir, backend=backend) as service:
        service.service_init("pong")
        raw, tls, _, outgoing, flight = tls_by_hand(port_of(tlsd), certs)
        with raw:
            tls.write(b"pong\n")
            raw.sendall(flight + outgoing.read())
            local = _wait_for(service, pyipc.EventType.CONNECTION).fd
            tls.write(frame(b"whole"))
            tls.write(frame(b"cut" * 100)[:20])
            with pytest.raises(ssl.SSLWantReadError):
                tls.unwrap()                        # close_notify, into the BIO
            raw.sendall(outgoing.read())            # all three in one write
            ev = _wait_for(service, pyipc.EventType.MESSAGE_RX)
            assert (ev.fd, ev.message) == (local, b"whole")
            assert _wait_for(service, pyipc.EventType.DISCONNECTION).fd == local


# ------------------------------------------------------------ the TCP side's backlog

class RefusingContext:
    """Stands in for the daemon's context: switch_send refuses `refusals`
    times (QueueFullError, as the core does over max_queue_size), then takes."""

    def __init__(self, refusals: int, max_queue_size: int = 64 << 20) -> None:
        self.refusals = refusals
        self.max_queue_size = max_queue_size
        self.sent: list = []

    def switch_send(self, fd: int, data: bytes) -> None:
        if self.refusals:
            self.refusals -= 1
            raise pyipc.QueueFullError("send queue of fd 7 is full")
        self.sent.append(bytes(data))       # the core copies what it queues


def test_records_refused_for_now_go_out_later_in_order(backend, rundir, certs, monkeypatch):
    from pyipc.daemons import tlsd as tlsd_module
    monkeypatch.setattr(tlsd_module, "BACKLOG_RETRY_S", 0.0)
    daemon = dialer(rundir, backend, certs)
    real = daemon.ctx
    try:
        fake = RefusingContext(refusals=3)     # r1, then r1 again with r2, then a retry
        daemon.ctx = fake
        daemon._relays[7] = object()                # fd 7 is a switched TCP fd
        daemon._send_tcp(7, b"r1")                  # refused: kept, a retry is due
        daemon._send_tcp(7, b"r2")                  # refused again (queued behind r1)
        assert fake.sent == [] and list(daemon._backlog[7]) == [b"r1", b"r2"]
        daemon._timers.run_due()                    # refused a third time
        assert fake.sent == []
        daemon._timers.run_due()                    # room now: both, in order
        assert fake.sent == [b"r1", b"r2"] and 7 not in daemon._backlog
        daemon._send_tcp(7, b"r3")
        assert fake.sent == [b"r1", b"r2", b"r3"]
    finally:
        daemon.ctx = real
        real.close_all()


def test_bytes_over_half_the_queue_bound_go_in_pieces_in_order(backend, rundir, certs,
                                                                monkeypatch):
    """More than half of max_queue_size at once goes in pieces (the core
    would refuse the whole for good); a refused view is kept as a copy."""
    from pyipc.daemons import tlsd as tlsd_module
    monkeypatch.setattr(tlsd_module, "BACKLOG_RETRY_S", 0.0)
    daemon = dialer(rundir, backend, certs)
    real = daemon.ctx
    try:
        fake = RefusingContext(refusals=1, max_queue_size=10)
        daemon.ctx = fake
        daemon._relays[7] = object()
        data = bytearray(b"abcdefghijklmnop")
        daemon._send_tcp(7, memoryview(data))      # pieces of 5; the first refused
        data[:] = b"x" * len(data)                  # the caller's buffer is reused
        daemon._timers.run_due()
        assert fake.sent == [b"abcde", b"fghij", b"klmno", b"p"]
        assert 7 not in daemon._backlog
    finally:
        daemon.ctx = real
        real.close_all()


# ------------------------------------------------------------ through ipcd (the client's connect)

def test_connect_by_name_through_ipcd_and_tlsd(hosts, backend, certs, remote, monkeypatch):
    from pyipc.daemons.ipcd import Ipcd
    a, _ = hosts
    monkeypatch.setenv("IPC_NETWORK", f"pong tls://127.0.0.1:{port_of(remote)}/pong;"
                                      f"secret tls://127.0.0.1:{port_of(remote)}/secret")
    with running(Ipcd(rundir=a, backend=backend)), running(dialer(a, backend, certs)), \
            pyipc.Context(rundir=a, backend=backend) as client:
        fd = client.connect("pong", timeout=20)
        client.write(fd, b"by name")
        assert client.read(fd, timeout=20) == b"by name"
        with pytest.raises(pyipc.NetworkError, match="refused.*not exposed"):
            client.connect("secret", timeout=20)


def test_tls_failure_reaches_the_client_as_network_error(hosts, backend, certs, remote,
                                                         monkeypatch, tmp_path):
    from pyipc.daemons.ipcd import Ipcd
    a, _ = hosts
    os.makedirs(tmp_path / "other")
    stranger = Certs(str(tmp_path / "other"), trustme)     # trusts another CA
    monkeypatch.setenv("IPC_NETWORK", f"pong tls://127.0.0.1:{port_of(remote)}/pong")
    with running(Ipcd(rundir=a, backend=backend)), running(dialer(a, backend, stranger)), \
            pyipc.Context(rundir=a, backend=backend) as client:
        with pytest.raises(pyipc.NetworkError, match="certificate verify failed"):
            client.connect("pong", timeout=20)


# ------------------------------------------------------------ systemd

ACTIVATE = """
import os, sys
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="2", LISTEN_FDNAMES="tls:tls")
os.dup2(int(sys.argv[1]), 3)
os.dup2(int(sys.argv[2]), 4)
os.execv(sys.executable, [sys.executable, "-m", "pyipc", *sys.argv[3:]])
"""


def test_socket_activation_and_readiness(hosts, backend, certs, tmp_path, monkeypatch):
    """systemd passes a TCP listener (the port B's peers reach) and the Unix
    socket `tls` (ipcd's way in); READY=1 once both serve, STOPPING=1 at
    SIGTERM, exit 0. Host A's ipcd dials through the activated tlsd to host
    B's (a plain one), so both passed sockets are used."""
    from pyipc.daemons.ipcd import Ipcd
    import subprocess
    from conftest import CHILD_ENV
    a, b = hosts
    tcp = socket.create_server(("127.0.0.1", 0))
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(os.path.join(a, "tls"))
    unix.listen(8)
    notify_path = str(tmp_path / "notify")
    with tcp, unix, socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify, \
            running(Echo(rundir=a, backend=backend)), \
            running(Echo(rundir=b, backend=backend)), \
            running(listener(b, backend, certs)) as remote:
        notify.bind(notify_path)
        notify.settimeout(20)
        proc = subprocess.Popen(
            [sys.executable, "-c", ACTIVATE, str(tcp.fileno()), str(unix.fileno()),
             "--rundir", a, "--backend", backend, "tlsd", "--cert", certs.server,
             "--ca", certs.ca, "--expose", "pong"], pass_fds=[tcp.fileno(), unix.fileno()],
            env=dict(CHILD_ENV, NOTIFY_SOCKET=notify_path), stderr=subprocess.PIPE)
        try:
            assert notify.recv(100) == b"READY=1"
            # A TLS peer on the passed TCP socket reaches A's pong...
            ctx = ssl.create_default_context(cafile=certs.ca)
            with socket.create_connection(tcp.getsockname(), timeout=20) as raw, \
                    ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.sendall(b"pong\n" + frame(b"activated"))
                got = b""
                while len(got) < 2 + 4 + 9:
                    more = tls.recv(100)
                    assert more, got
                    got += more
                assert got == b"ok" + frame(b"activated")
            # ...and ipcd's request comes in on the passed Unix socket.
            monkeypatch.setenv("IPC_NETWORK", f"far tls://127.0.0.1:{port_of(remote)}/pong")
            with running(Ipcd(rundir=a, backend=backend)), \
                    pyipc.Context(rundir=a, backend=backend) as client:
                fd = client.connect("far", timeout=20)
                client.write(fd, b"via ipcd")
                assert client.read(fd, timeout=20) == b"via ipcd"
            stops_cleanly(proc, notify)
        finally:
            reap(proc)


# ------------------------------------------------------------ the remote's name line, at its bounds

def _tls_to(port: int, certs: Certs, data: bytes) -> bytes:
    """What a listening tlsd answers a raw TLS client sending `data`, up to its close."""
    ctx = ssl.create_default_context(cafile=certs.ca)
    with socket.create_connection(("127.0.0.1", port), timeout=20) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(data)
        got = b""
        try:
            while True:
                more = tls.recv(1000)
                if not more:
                    return got
                got += more
        except (ssl.SSLError, ConnectionError):
            return got


def test_name_at_the_bound_is_read_past_it_refused(backend, rundir, certs):
    from pyipc.daemons._netwire import MAX_NAME, NAME_TOO_LONG
    with running(listener(rundir, backend, certs)) as tlsd:
        at = _tls_to(port_of(tlsd), certs, b"n" * MAX_NAME + b"\n")
        past = _tls_to(port_of(tlsd), certs, b"n" * (MAX_NAME + 1))
    assert at == b"ne refused service %s is not exposed" % (b"n" * MAX_NAME)
    assert past == b"ne refused " + NAME_TOO_LONG.encode()


def test_bare_name_without_newline_is_served_after_the_grace(backend, rundir, certs):
    with running(Echo(rundir=rundir, backend=backend)), \
            running(listener(rundir, backend, certs)) as tlsd, \
            tls_client(port_of(tlsd), certs) as tls:
        tls.sendall(b"pong")                    # libIPC's way: no newline
        assert tls.recv(2) == b"ok"
        tls.sendall(frame(b"after the grace"))
        want = frame(b"after the grace")
        assert recv_exactly(tls, len(want)) == want


def _bare_name_then_fin(port: int, certs: Certs, name: bytes) -> bytes:
    """A remote that sends the last handshake flight and `name` without a
    newline in one write, then ends its sending side with a FIN and no
    close_notify: what it got, ending in b"<close_notify>" or b"<EOF>"."""
    sock, tls, incoming, outgoing, flight = tls_by_hand(port, certs)
    with sock:
        tls.write(name)
        sock.sendall(flight + outgoing.read())
        sock.shutdown(socket.SHUT_WR)
        return _answer_by_hand(sock, tls, incoming)


def test_a_bare_name_then_the_peers_end_is_served_at_once(backend, rundir, certs):
    """A name without a newline and then the end of the peer's sending side
    (close_notify, or a FIN without it) is the whole name, served at once as
    tcpd serves it: not refused as "closed before sending a service name",
    nor answered with a decode_error alert (OpenSSL 3's unexpected EOF)."""
    service = pyipc.Context(rundir=rundir, backend=backend)
    try:
        service.service_init("pong")
        with running(listener(rundir, backend, certs)) as tlsd:
            port = port_of(tlsd)
            for send in (lambda name: _name_and_end_in_one_write(port, certs, name),
                         lambda name: _bare_name_then_fin(port, certs, name)):
                got = send(b"pong")
                assert got in (b"ok<close_notify>", b"ok<EOF>"), got
                assert _wait_for(service, pyipc.EventType.CONNECTION)
                assert _wait_for(service, pyipc.EventType.DISCONNECTION)
                got = send(b"nope")
                assert got.startswith(b"ne refused service nope is not exposed"), got
            spin_until(lambda: not tlsd._handshakes and not tlsd._relays)
    finally:
        service.close_all()


def test_a_name_sent_a_byte_at_a_time_is_not_cut_short(backend, rundir, certs):
    """The grace for a bare name runs from the last bytes (as tcpd's)."""
    from pyipc.daemons._netwire import NAME_GRACE
    with running(Echo(rundir=rundir, backend=backend)), \
            running(listener(rundir, backend, certs)) as tlsd, \
            tls_client(port_of(tlsd), certs) as tls:
        for byte in b"pong":
            tls.sendall(bytes([byte]))
            time.sleep(NAME_GRACE / 2)      # the stimulus' pace, not a synchronisation
        tls.sendall(b"\n" + frame(b"whole"))
        want = b"ok" + frame(b"whole")
        assert recv_exactly(tls, len(want)) == want


def test_a_typed_line_with_cr_lf_is_served(backend, rundir, certs):
    """`NAME\\r\\n` names NAME, as tcpd takes it; what follows is the stream."""
    with running(Echo(rundir=rundir, backend=backend)), \
            running(listener(rundir, backend, certs)) as tlsd, \
            tls_client(port_of(tlsd), certs) as tls:
        tls.sendall(b"pong\r\n" + frame(b"x"))
        want = b"ok" + frame(b"x")
        assert recv_exactly(tls, len(want)) == want


def test_name_with_cr_lf_at_the_bound_is_read_past_it_refused(backend, rundir, certs):
    """The "\\r" of a typed line does not count in the name's bound (as tcpd)."""
    from pyipc.daemons._netwire import MAX_NAME, NAME_TOO_LONG
    too_long = b"ne refused " + NAME_TOO_LONG.encode()
    with running(listener(rundir, backend, certs)) as tlsd:
        at = _tls_to(port_of(tlsd), certs, b"n" * MAX_NAME + b"\r\n")
        past = [_tls_to(port_of(tlsd), certs, line) for line in
                (b"n" * (MAX_NAME + 1) + b"\r\n", b"n" * MAX_NAME + b"\r\r\n")]
    assert at == b"ne refused service %s is not exposed" % (b"n" * MAX_NAME)
    assert past == [too_long, too_long]


def test_dials_past_max_pending_are_busy(hosts, backend, certs):
    a, _ = hosts
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)                            # accepts, never answers: stays pending
        uri = f"tls://127.0.0.1:{silent.getsockname()[1]}/pong"
        with running(dialer(a, backend, certs, max_pending=1, connect_timeout=5)):
            first = socket.socket(socket.AF_UNIX)
            first.connect(os.path.join(a, "tls"))
            first.sendall(frame(uri.encode()))      # the one pending dial...
            silent.settimeout(20)
            held, _ = silent.accept()               # ...has connected: it is pending
            try:
                answer, fd = ask(a, uri)
            finally:
                first.close()
                held.close()
    assert fd is None and answer.startswith(b"ne busy ")


# ------------------------------------------------------------ the command line

@pytest.mark.parametrize("args, status, text", [
    (["--listen", "127.0.0.1:0"], 2, "listening for TLS needs --cert"),
    (["--listen", "127.0.0.1:0", "--cert", "/nonexistent.pem"], 2,
     "--cert/--key /nonexistent.pem: No such file or directory"),
    (["--ca", "/nonexistent.pem"], 2, "--ca /nonexistent.pem: No such file or directory"),
    (["--connect-timeout", "0"], 2,
     "connect_timeout must be > 0 and at most 86400 seconds (a day), not 0.0"),
    (["--connect-timeout", "inf"], 2,
     "connect_timeout must be > 0 and at most 86400 seconds (a day), not inf"),
    (["--handshake-timeout", "1e10"], 2,
     "handshake_timeout must be > 0 and at most 86400 seconds (a day), not 10000000000.0"),
    (["--dead-peer-timeout", "86400"], 2, "dead_peer_timeout must be >= 0 and at most 32767 "
     "seconds (Linux's longest TCP keepalive idle time), not 86400.0"),
    (["--max-pending", "0"], 2, "max_pending must be at least 1"),
    (["--max-pending-per-host", "0"], 2, "max_pending_per_host must be at least 1"),
])
def test_bad_options_are_refused_before_anything_runs(rundir, args, status, text):
    import subprocess
    from conftest import CHILD_ENV
    out = subprocess.run([sys.executable, "-m", "pyipc", "--rundir", rundir, "tlsd", *args],
                         env=CHILD_ENV, capture_output=True, text=True, timeout=60)
    assert out.returncode == status, out.stderr
    assert out.stderr.strip() == f"pyipc tlsd: {text}" or text in out.stderr, out.stderr
    assert not os.path.exists(os.path.join(rundir, "tls"))


def test_a_taken_port_is_a_clear_error(rundir, certs):
    import subprocess
    from conftest import CHILD_ENV
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "pyipc", "--rundir", rundir, "tlsd",
                              "--listen", f"127.0.0.1:{port}", "--cert", certs.server],
                             env=CHILD_ENV, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    # The address is named, as tcpd names it (it was a bare '[Errno 98] ...').
    assert out.stderr == (f"pyipc tlsd: tlsd cannot listen on 127.0.0.1:{port}: "
                          "Address already in use\n")


def test_ipcd_leaving_mid_dial_is_forgotten_and_tlsd_keeps_serving(hosts, backend, certs,
                                                                   remote):
    a, _ = hosts
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        # A share per host of 2: the abandoned dial's worker may not be back
        # yet (it counts against the share until it is), and both dials go
        # to 127.0.0.1.
        with running(dialer(a, backend, certs, max_pending=1, max_pending_per_host=2)):
            gone = socket.socket(socket.AF_UNIX)
            gone.connect(os.path.join(a, "tls"))
            gone.sendall(frame(f"tls://127.0.0.1:{silent.getsockname()[1]}/pong".encode()))
            silent.settimeout(20)
            held, _ = silent.accept()               # the dial is in its handshake...
            gone.close()                            # ...when ipcd gives up
            try:
                # The abandoned dial no longer counts against --max-pending 1.
                answer, fd = ask(a, f"tls://127.0.0.1:{port_of(remote)}/pong")
            finally:
                held.close()
            assert answer == b"ok" and fd is not None
            os.close(fd)


def test_ipcd_unable_to_take_ok_ends_the_session_with_close_notify(hosts, backend, certs):
    """The remote answered `ok` but ipcd cannot take tlsd's (it stopped
    reading): the switch ends, the remote gets close_notify, and the request
    is forgotten at once (not at its deadline)."""
    a, _ = hosts
    remote = FakeRemote(certs)
    try:
        with running(dialer(a, backend, certs, connect_timeout=30)) as tlsd, \
                socket.socket(socket.AF_UNIX) as ipcd:
            ipcd.connect(os.path.join(a, "tls"))
            ipcd.sendall(frame(f"tls://127.0.0.1:{remote.port}/pong".encode()))
            ipcd.shutdown(socket.SHUT_RD)       # tlsd's answer cannot be written
            assert remote.close() == "close_notify"
            spin_until(lambda: not tlsd._requests and not tlsd._relays)
    finally:
        remote.close()


def test_the_backlog_past_its_bound_ends_the_connection(backend, rundir, certs, monkeypatch):
    """Records for a remote that never reads, made while tlsd reads it (TLS
    1.3 key update answers), are held back up to MAX_BACKLOG bytes; past it
    the connection ends (QueueFullError, the relay marked failed: no
    close_notify after missing records) rather than tlsd's memory growing."""
    from pyipc.daemons import tlsd as tlsd_module
    monkeypatch.setattr(tlsd_module, "MAX_BACKLOG", 10)
    daemon = dialer(rundir, backend, certs)
    real = daemon.ctx
    try:
        daemon.ctx = RefusingContext(refusals=1000)
        relay = daemon._relays[7] = tlsd_module.TlsRelay(real_client_context(certs),
                                                         server_side=False)
        daemon._send_tcp(7, b"0123")            # refused: held back
        daemon._send_tcp(7, b"456789")          # 10 bytes held: at the bound
        assert daemon._backlog[7].size == 10 and not relay.failed
        with pytest.raises(pyipc.QueueFullError) as info:
            daemon._send_tcp(7, b"a")
        # No fd in the text: the log line around it names the fd ("fd 7: fd 7: ...").
        assert str(info.value) == ("its peer does not read; tlsd holds back at most 10 "
                                   "bytes for it (MAX_BACKLOG)")
        assert relay.failed and relay.goodbye() == b""
        assert list(daemon._backlog[7]) == [b"0123", b"456789"]
    finally:
        daemon.ctx = real
        real.close_all()


def real_client_context(certs: Certs) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=certs.ca)


class RefusingRemote(FakeRemote):
    """A remote tlsd stand-in that answers the name with `answer` and closes."""

    def __init__(self, certs: Certs, answer: bytes) -> None:
        self.answer = answer
        super().__init__(certs)

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        conn.settimeout(20)
        with self.context.wrap_socket(conn, server_side=True) as tls:
            line = b""
            while not line.endswith(b"\n"):
                line += tls.recv(1)
            tls.sendall(self.answer)
            try:
                tls.unwrap()
            except (ssl.SSLError, OSError):
                pass                            # tlsd closes without waiting for it


@pytest.mark.parametrize("answer, relayed", [
    (b"ne busy too many", b"ne busy 127.0.0.1:{port}: too many"),
    (b"ne \x1b[31m\nevil code", b"ne refused 127.0.0.1:{port}:  [31m"),
    (b"ne word\nthe rest", b"ne word 127.0.0.1:{port}: refused"),     # one line
])
def test_a_remote_refusal_is_relayed_with_a_code_that_is_one_word(hosts, backend, certs,
                                                                  answer, relayed):
    a, _ = hosts
    remote = RefusingRemote(certs, answer)
    try:
        with running(dialer(a, backend, certs)):
            got, fd = ask(a, f"tls://127.0.0.1:{remote.port}/pong")
        assert fd is None and got == relayed.replace(b"{port}", str(remote.port).encode())
    finally:
        remote.close()


@pytest.mark.parametrize("pad", [b"", b"x"])
def test_a_long_remote_refusal_is_cut_on_a_character_boundary(hosts, backend, certs, pad):
    """The relayed text is cut to MAX_REFUSAL bytes (the "HOST:PORT: " prefix
    included), never inside a UTF-8 character (one of the two pads puts the
    cut inside one, whatever the port's length)."""
    a, _ = hosts
    remote = RefusingRemote(certs, b"ne busy " + pad + "é".encode() * 700)
    try:
        with running(dialer(a, backend, certs)):
            got, fd = ask(a, f"tls://127.0.0.1:{remote.port}/pong")
        whole = f"ne busy 127.0.0.1:{remote.port}: ".encode() + pad + "é".encode() * 700
        assert fd is None
        assert wire.MAX_REFUSAL + 2 <= len(got) <= wire.MAX_REFUSAL + 3 and whole.startswith(got)
        assert got.decode("utf-8").endswith("é")
    finally:
        remote.close()


def test_refusal_texts_are_cut_on_character_boundaries():
    for char in ("é", "€", "😀"):               # 2, 3 and 4 bytes
        for pad in range(4):
            got = wire.refusal("busy", "x" * pad + char * 500)
            assert len(got) > wire.MAX_REFUSAL + 3 - len(char.encode())
            assert ("ne busy " + "x" * pad + char * 500).encode().startswith(got)
            assert got.decode("utf-8").endswith(char)
            assert wire.cut_answer(got) == got
    assert wire.cut_answer(b"ne " + b"a" * 500) == b"ne " + b"a" * wire.MAX_REFUSAL


# ------------------------------------------------------------ back-pressure, end to end

class SlowSink(Echo):
    """`pong` that takes its time over each message (a slow service), checks
    that messages come whole and in order, and answers one summary at the end."""

    count = 160

    def setup(self) -> None:
        super().setup()
        self.seen = 0
        self.bad = 0

    def on_event(self, ev: pyipc.Event) -> None:
        if ev.type == pyipc.EventType.MESSAGE_RX and ev.message is not None:
            import time
            time.sleep(0.02)                    # 50 MiB/s at most: throttling, not sync
            if ev.message != _slow_payload(self.seen):
                self.bad += 1
            self.seen += 1
            if self.seen == self.count:
                self.ctx.write(ev.fd, b"%d %d" % (self.seen, self.bad))


def _slow_payload(i: int) -> bytes:
    return (b"%08d" % i) * (1 << 17)            # 1 MiB, numbered


def test_a_slow_service_holds_the_remote_sender_back_and_nothing_is_lost(
        hosts, backend, certs):
    """160 MiB to a service that reads slowly: more than both tlsd's queue
    bounds (64 MiB each) and the sockets hold, so back-pressure must reach the
    client through both daemons; every message arrives whole and in order."""
    a, b = hosts
    with running(SlowSink(rundir=b, backend=backend)), \
            running(listener(b, backend, certs)) as tlsd, \
            running(dialer(a, backend, certs)), \
            pyipc.Context(rundir=a, backend=backend) as client:
        fd = connect_through(a, f"tls://127.0.0.1:{port_of(tlsd)}/pong", client)
        for i in range(SlowSink.count):
            client.write(fd, _slow_payload(i), timeout=120)
        assert client.read(fd, timeout=120) == b"%d 0" % SlowSink.count


def test_listen_given_as_one_string_is_refused():
    """TlsdConfig.listen is a tuple of addresses: a str would be bound letter
    by letter ("1", "2", "7", ...), an obscure EADDRNOTAVAIL at start."""
    from pyipc.daemons._tls_options import TlsdConfig
    with pytest.raises(TypeError, match="listen must be a tuple of addresses, not str"):
        TlsdConfig(listen="127.0.0.1:0", cert="server.pem")  # type: ignore[arg-type]


# ------------------------------------------------------------ the local side's frames, by the read

def _cut(reads, limit=100):
    """What _whole_frames makes of successive reads of one local side: the
    bytes relayed after each read, and the over-limit size met (-1: none).
    Every read lands in one reused buffer, as tlsd's do, and the buffer is
    scribbled over after each: what _whole_frames keeps must be a copy."""
    from pyipc.daemons.tlsd import _whole_frames
    partials: dict = {}
    out = []
    buffer = bytearray(max((len(r) for r in reads), default=0))
    for data in reads:
        buffer[:len(data)] = data
        frames, too_large = _whole_frames(partials, 5, memoryview(buffer)[:len(data)], limit)
        out.append((b"".join(bytes(f) for f in frames), too_large))
        buffer[:] = b"\xee" * len(buffer)
    return out, partials.get(5)


def test_whole_frames_are_relayed_as_read_and_a_split_one_once_whole():
    stream = frame(b"a") + frame(b"") + frame(b"bb" * 20) + frame(b"c" * 30)
    for cut in range(len(stream) + 1):      # every split, headers included
        out, left = _cut([stream[:cut], stream[cut:]])
        assert b"".join(o for o, _ in out) == stream and left is None, cut
        assert all(t == -1 for _, t in out)
        # Never a byte of an unfinished frame: each relay ends on a frame's end.
        first = out[0][0]
        assert stream.startswith(first)
        at = 0
        while at < len(first):
            at += 4 + struct.unpack(">I", first[at:at + 4])[0]
        assert at == len(first), cut


def test_a_frame_split_over_many_reads_is_held_until_whole():
    stream = frame(b"x" * 90)
    out, left = _cut([stream[i:i + 7] for i in range(0, len(stream), 7)])
    assert [o for o, _ in out][:-1] == [b""] * (len(out) - 1)
    assert out[-1] == (stream, -1) and left is None


def test_a_frame_over_the_limit_stops_the_cut_after_the_whole_frames_before_it():
    big = struct.pack(">I", 101)
    assert _cut([frame(b"ok") + big + b"zz"])[0] == [(frame(b"ok"), 101)]
    assert _cut([frame(b"ok") + big[:2], big[2:]])[0] == [(frame(b"ok"), -1), (b"", 101)]
    assert _cut([frame(b"y" * 100)])[0] == [(frame(b"y" * 100), -1)]     # at the limit


def test_a_local_client_that_sends_no_uri_is_answered_and_closed(rundir, backend, certs):
    """A client of the `tls` service that connects and says nothing is
    answered `ne badrequest` at --connect-timeout and closed (it held its
    connection, and a slot of max_connections, for good)."""
    with running(dialer(rundir, backend, certs, connect_timeout=0.3)) as tlsd, \
            socket.socket(socket.AF_UNIX) as silent:
        silent.settimeout(20)
        silent.connect(os.path.join(rundir, "tls"))
        got = b""
        while chunk := silent.recv(1000):
            got += chunk
        assert got == frame(b"ne badrequest no URI received within 0.3 s")
        spin_until(lambda: not tlsd._requests)


def test_a_dial_in_progress_when_tlsd_stops_is_told_why(rundir, backend, certs):
    """tlsd stopping (SIGTERM's path) answers ipcd's requests still in
    progress (`ne nodaemon tlsd is stopping`), not a bare EOF."""
    with socket.create_server(("127.0.0.1", 0)) as silent_remote, \
            socket.socket(socket.AF_UNIX) as ipcd:
        port = silent_remote.getsockname()[1]
        with running(dialer(rundir, backend, certs, connect_timeout=30)) as tlsd:
            ipcd.connect(os.path.join(rundir, "tls"))
            ipcd.sendall(frame(f"tls://127.0.0.1:{port}/pong".encode()))
            conn, _ = silent_remote.accept()            # dialled: its handshake waits
            spin_until(lambda: bool(tlsd._requests))
        with conn:
            ipcd.settimeout(20)
            got = b""
            while chunk := ipcd.recv(1000):
                got += chunk
            assert got == frame(b"ne nodaemon tlsd is stopping")


def _read_until(stream, marker: bytes, timeout: float = 10) -> bytes:
    """What `stream` (a pipe) gives until `marker` is in it."""
    import select
    got, end = b"", time.monotonic() + timeout
    while marker not in got:
        left = end - time.monotonic()
        assert left > 0, f"{marker!r} not seen; got {got[-300:]!r}"
        if select.select([stream], [], [], left)[0]:
            chunk = os.read(stream.fileno(), 65536)
            assert chunk, f"{marker!r} not seen before the end; got {got[-300:]!r}"
            got += chunk
    return got


def test_a_remote_that_renegotiates_is_refused(rundir, backend, certs):
    """TLS 1.2 renegotiation is refused both ways (OP_NO_RENEGOTIATION): a
    remote server asking for it (openssl s_server's `r` command) is answered
    with the no_renegotiation alert, and the session ends cleanly (s_server
    makes that alert fatal). Accepted, a renegotiation made ssl's write ask
    to read while the relay wrote, and the session died at random."""
    require_openssl()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        ["openssl", "s_server", "-tls1_2", "-accept", f"127.0.0.1:{port}", "-cert",
         certs.server, "-naccept", "1"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        _read_until(server.stdout, b"ACCEPT")
        with running(dialer(rundir, backend, certs, connect_timeout=10)), \
                socket.socket(socket.AF_UNIX) as ipcd:
            ipcd.connect(os.path.join(rundir, "tls"))
            ipcd.sendall(frame(f"tls://localhost:{port}/pong".encode()))
            _read_until(server.stdout, b"pong\n")      # tlsd named the service
            server.stdin.write(b"ok")
            server.stdin.flush()
            ipcd.settimeout(20)
            answer, fds, _, _ = socket.recv_fds(ipcd, 100, 1)
            assert answer == frame(b"ok") and len(fds) == 1
            with socket.socket(fileno=fds[0]) as local:
                local.settimeout(20)
                local.sendall(frame(b"up"))
                _read_until(server.stdout, frame(b"up"))
                server.stdin.write(frame(b"down"))
                server.stdin.flush()
                assert recv_exactly(local, 8) == frame(b"down")
                server.stdin.write(b"r\n")                  # renegotiate, please
                server.stdin.flush()
                assert local.recv(100) == b""               # the session ended
        assert b"no renegotiation" in _read_until(server.stdout, b"CONNECTION CLOSED")
    finally:
        server.kill()
        server.communicate()


@pytest.mark.parametrize("uri, text", [
    ("tls://127.0.0.1:99999/pong", "tls://127.0.0.1:99999/pong: Port out of range 0-65535"),
    ("tls://127.0.0.1:x/pong", "tls://127.0.0.1:x/pong: Port could not be cast to integer"),
])
def test_a_bad_port_in_a_uri_names_the_uri(uri, text):
    """The `ne norule bad URI` text of a bad port says which URI, as every
    other bad URI's does (it was urllib's bare 'Port out of range 0-65535')."""
    from pyipc.daemons._tls_options import parse_uri
    with pytest.raises(ValueError) as info:
        parse_uri(uri)
    assert str(info.value).startswith(text)
