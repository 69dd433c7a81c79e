"""pyipc tcpd (pyipc.daemons.tcpd.Tcpd) on one host (127.0.0.1), both backends:
the listening side's handshake byte by byte (a name and messages in one
segment, libIPC's bare name, CR LF, refusals answered, bounds at and past
their edge), and the dialling side with stand-in remotes (what follows `ok`
is not lost, refusals relayed, garbage and silence answered). Across hosts:
test_network_tcp.py."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from typing import Callable, Iterator, Optional

import pytest

import pyipc
from pyipc.daemons.ipcd import Ipcd
from pyipc.daemons._netwire import MAX_NAME, MAX_REFUSAL, MAX_URI, NAME_TOO_LONG, expose_option
from pyipc.daemons._sockets import (MAX_DEAD_PEER_TIMEOUT, default_per_host, dial_failure,
                                    peer_key, tune_tcp)
from pyipc.daemons._tls_options import TlsdConfig
from pyipc.daemons._timers import MAX_TIMEOUT
from pyipc.daemons.tcpd import Tcpd, parse_uri
from pyipc.daemons.websocketd.options import Options as WebsocketdOptions

from conftest import CHILD_ENV, spin_until, unavailable
from daemon_harness import (Burst, Pong, fail_first_offload, frame, frames_of, hung_lookups,
                            read_exactly, read_frame, reap, running, send_while_slow_to_read,
                            stops_cleanly)


@pytest.fixture
def pong(backend, rundir) -> Iterator[Pong]:
    with running(Pong(rundir=rundir, backend=backend)) as daemon:
        yield daemon


def make_tcpd(backend: str, rundir: str, **kw) -> Tcpd:
    kw.setdefault("listen", ["127.0.0.1:0"])
    kw.setdefault("expose", ["pong", "missing"])
    return Tcpd(rundir=rundir, backend=backend, **kw)


@pytest.fixture
def tcpd(backend, rundir, pong) -> Iterator[Tcpd]:
    with running(make_tcpd(backend, rundir)) as daemon:
        yield daemon


def dial(daemon: Tcpd) -> socket.socket:
    sock = socket.create_connection(daemon.addresses[0][:2], timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_to_end(sock: socket.socket) -> bytes:
    got = bytearray()
    while True:
        more = sock.recv(1 << 16)
        if not more:
            return bytes(got)
        got += more


# ------------------------------------------------------------ listening side

def test_name_and_messages_in_one_segment(tcpd):
    with dial(tcpd) as sock:
        sock.sendall(b"pong\n" + frame(b"first") + frame(b"") + frame(b"third"))
        want = b"ok" + frame(b"first") + frame(b"") + frame(b"third")
        assert read_exactly(sock, len(want)) == want


class CountingTcpd(Tcpd):
    """Tcpd noting the type of every event its loop hands it."""

    def on_event(self, ev: pyipc.Event) -> None:
        self.seen.append(ev.type)
        super().on_event(ev)


def test_relayed_messages_raise_no_events(backend, rundir, pong):
    """switch_events is off: the loop sees the handshake, not the messages."""
    daemon = CountingTcpd(rundir=rundir, backend=backend, listen=["127.0.0.1:0"],
                          expose=["pong"])
    daemon.seen = []
    with running(daemon):
        with dial(daemon) as sock:
            sock.sendall(b"pong\n")
            assert read_exactly(sock, 2) == b"ok"
            for i in range(200):
                sock.sendall(frame(b"%d" % i))
                assert read_frame(sock) == b"%d" % i
    switch_events = {pyipc.EventType.SWITCH_RX, pyipc.EventType.SWITCH_TX}
    assert not switch_events & set(daemon.seen), daemon.seen
    assert len(daemon.seen) < 20                  # accept, name: a handful, not 400


def test_libipc_bare_name(tcpd):
    with dial(tcpd) as sock:
        sock.sendall(b"pong")                     # no newline: taken after the grace
        assert read_exactly(sock, 2) == b"ok"
        sock.sendall(frame(b"hi"))
        assert read_frame(sock) == b"hi"


@pytest.mark.parametrize("name,answer", [
    (b"pong", b"ok"),
    (b"hidden", b"ne refused service hidden is not exposed by this tcpd\n"),
])
def test_a_bare_name_then_the_end_of_sending_is_answered(tcpd, name, answer):
    """A name without its newline (libIPC's), then the peer's end of
    sending: the name is whole, answered at once (it was dropped unanswered
    when the end came before the grace for a newline was over)."""
    with dial(tcpd) as sock:
        sock.sendall(name)
        sock.shutdown(socket.SHUT_WR)
        assert read_to_end(sock) == answer


def test_a_name_sent_a_byte_at_a_time_is_not_cut_short(tcpd):
    """The grace for a bare name runs from the last byte, not the first: a
    name typed (or sent) slower than NAME_GRACE a byte is whole once its
    newline comes (it was taken as "pon" and refused)."""
    from pyipc.daemons._netwire import NAME_GRACE
    with dial(tcpd) as sock:
        for byte in b"pong":
            sock.sendall(bytes([byte]))
            time.sleep(NAME_GRACE / 2)      # the stimulus' pace, not a synchronisation
        sock.sendall(b"\n" + frame(b"whole"))
        assert read_exactly(sock, 2 + 9) == b"ok" + frame(b"whole")


def test_a_typed_line_with_cr_lf(tcpd):
    with dial(tcpd) as sock:
        sock.sendall(b"pong\r\n" + frame(b"x"))
        assert read_exactly(sock, 2 + 5) == b"ok" + frame(b"x")


@pytest.mark.parametrize("name,answer", [
    (b"hidden", b"ne refused service hidden is not exposed by this tcpd\n"),
    (b"ipc", b"ne refused service ipc is not exposed by this tcpd\n"),
    (b"\xff\xfe", b"ne refused the name is not UTF-8\n"),
])
def test_refusals_are_answered(tcpd, name, answer):
    with dial(tcpd) as sock:
        sock.sendall(name + b"\n" + frame(b"lost on purpose"))
        assert read_to_end(sock) == answer


def test_exposed_but_missing_service(tcpd):
    with dial(tcpd) as sock:
        sock.sendall(b"missing\n")
        assert read_to_end(sock) == f"ne noservice no service missing on " \
                                    f"{socket.gethostname()}\n".encode()


def test_name_length_at_and_past_the_edge(backend, rundir):
    """MAX_NAME bytes are read whole (then refused as not exposed), with LF
    or CR LF; one more is refused as too long, newline or not."""
    too_long = b"ne refused %s\n" % NAME_TOO_LONG.encode()
    with running(make_tcpd(backend, rundir)) as daemon:
        for line in (b"x" * MAX_NAME + b"\n", b"x" * MAX_NAME + b"\r\n"):
            with dial(daemon) as sock:
                sock.sendall(line)
                assert read_to_end(sock) == (b"ne refused service %s is not exposed by "
                                             b"this tcpd\n" % (b"x" * MAX_NAME))
        for line in (b"x" * (MAX_NAME + 1) + b"\n", b"x" * (MAX_NAME + 1) + b"\r\n",
                     b"x" * (MAX_NAME + 1), b"x" * 10_000):
            with dial(daemon) as sock:
                sock.sendall(line)
                assert read_to_end(sock) == too_long, line[-3:]


def test_a_dial_for_a_name_past_the_edge_is_refused_before_dialing(backend, rundir):
    with running(make_tcpd(backend, rundir)):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(os.path.join(rundir, "tcp"))
            sock.sendall(frame(b"tcp://127.0.0.1:1/" + b"x" * (MAX_NAME + 1)))
            assert read_frame(sock) == b"ne norule bad URI: " + NAME_TOO_LONG.encode()
    assert parse_uri("tcp://h:1/" + "x" * MAX_NAME)[2] == "x" * MAX_NAME


def test_expose_option_drops_the_spaces_around_names():
    """`--expose 'pong, kv'` exposed " kv" (with its space), and a peer
    asking for kv was refused, with nothing to say why."""
    assert expose_option("pong, kv ,x") == ["pong", "kv", "x"]
    with pytest.raises(argparse.ArgumentTypeError):
        expose_option(" , ")


@pytest.mark.parametrize("make", [
    lambda rundir: Tcpd(rundir=rundir, expose="pong"),
    lambda rundir: Tcpd(rundir=rundir, listen="127.0.0.1:0"),
    lambda rundir: TlsdConfig(expose="pong"),
    lambda rundir: WebsocketdOptions(expose="pong"),
    lambda rundir: WebsocketdOptions(origins="https://app.example"),
])
def test_a_daemons_names_given_as_one_str_are_refused(rundir, make):
    """A str is a collection of its letters: Tcpd(expose="pong") exposed the
    services p, o, n and g, and not pong."""
    with pytest.raises(TypeError, match="must be a (collection of names|list of addresses), "
                                        "not str"):
        make(rundir)


def test_a_peers_name_is_logged_without_its_control_characters(backend, rundir, caplog):
    """The name a remote peer sends reaches the log as one line: with ESC and
    CR in it, a peer wrote to the operator's terminal (`pyipc -v`) or forged
    a log line."""
    caplog.set_level(logging.INFO, logger="pyipc")
    with running(make_tcpd(backend, rundir)) as daemon:
        with dial(daemon) as sock:
            sock.sendall(b"x\x1b[2J\rtcpd: a peer reached pong\n")
            assert read_to_end(sock).startswith(b"ne refused service x [2J tcpd")
    lines = [r.getMessage() for r in caplog.records if "refused a peer" in r.getMessage()]
    assert lines == ["tcpd: refused a peer: refused service x [2J tcpd: a peer reached pong "
                     "is not exposed by this tcpd"]


def test_handshake_timeout(backend, rundir):
    with running(make_tcpd(backend, rundir, handshake_timeout=0.3)) as daemon:
        with dial(daemon) as sock:
            assert read_to_end(sock) == b"ne timeout no service name in 0.3 s\n"


def test_max_pending_at_and_past_the_edge(backend, rundir, pong):
    with running(make_tcpd(backend, rundir, max_pending=2, max_pending_per_host=2)) as daemon:
        idle = [dial(daemon) for _ in range(2)]   # at the edge: both wait for a name
        try:
            spin_until(lambda: daemon.pending == 2)
            with dial(daemon) as third:           # past it
                assert read_to_end(third) == (b"ne busy tcpd has 2 handshakes in "
                                              b"progress (--max-pending)\n")
            idle[0].sendall(b"pong\n" + frame(b"still served"))
            assert read_exactly(idle[0], 2 + 16) == b"ok" + frame(b"still served")
        finally:
            for sock in idle:
                sock.close()


def dial_from(daemon: Tcpd, source: str) -> socket.socket:
    """A peer of tcpd whose address is `source` (one of 127.0.0.0/8)."""
    return socket.create_connection(daemon.addresses[0][:2], timeout=10,
                                    source_address=(source, 0))


def test_max_pending_per_host_at_and_past_the_edge(backend, rundir, pong):
    """One address cannot take every handshake slot: past its share it is
    answered busy while another address is still served, and its share is
    given back as its handshakes end."""
    with running(make_tcpd(backend, rundir, max_pending=10,
                           max_pending_per_host=2)) as daemon:
        idle = [dial_from(daemon, "127.0.0.2") for _ in range(2)]     # at the edge
        try:
            spin_until(lambda: daemon.pending == 2)
            with dial_from(daemon, "127.0.0.2") as third:             # past it
                assert read_to_end(third) == (b"ne busy tcpd has 2 handshakes in progress "
                                              b"from 127.0.0.2 (--max-pending-per-host)\n")
            with dial_from(daemon, "127.0.0.3") as other:             # another host
                other.sendall(b"pong\n" + frame(b"served"))
                assert read_exactly(other, 2 + 10) == b"ok" + frame(b"served")
            idle[0].sendall(b"pong\n")                               # one handshake ends...
            assert read_exactly(idle[0], 2) == b"ok"
            with dial_from(daemon, "127.0.0.2") as again:             # ...its slot is back
                again.sendall(b"pong\n" + frame(b"again"))
                assert read_exactly(again, 2 + 9) == b"ok" + frame(b"again")
        finally:
            for sock in idle:
                sock.close()


def test_peers_are_counted_by_ipv4_address_or_ipv6_64():
    """One IPv6 host has a whole /64 to send from: it gets one share, not one
    per address; an IPv4-mapped address (a dual-stack socket's) is its IPv4."""
    assert peer_key("192.0.2.7") == "192.0.2.7"
    assert peer_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert peer_key("2001:db8:1:2:aaaa::1") == peer_key("2001:db8:1:2:bbbb::9") \
        == "2001:db8:1:2::/64"
    assert peer_key("2001:db8:1:3::1") != peer_key("2001:db8:1:2::1")


def test_max_pending_per_host_defaults_to_half_and_is_checked(rundir):
    assert default_per_host(256) == 128 and default_per_host(9) == 4
    assert default_per_host(1) == 1
    with pytest.raises(ValueError, match="max_pending_per_host must be >= 1, not 0"):
        make_tcpd("pure", rundir, max_pending_per_host=0)


def test_a_fault_handling_a_peer_ends_that_handshake_only(backend, rundir, pong, monkeypatch):
    """A bug (here _serve_name raising) costs that peer its connection at
    once (on_event_failed), not a failure at every wake-up until the
    handshake timeout; its share of the slots is given back and tcpd goes on."""
    def broken(self: Tcpd, incoming: object) -> None:
        raise RuntimeError("a bug")
    with running(make_tcpd(backend, rundir, handshake_timeout=30)) as daemon:
        real = Tcpd._serve_name
        monkeypatch.setattr(Tcpd, "_serve_name", broken)
        with dial(daemon) as sock:
            sock.sendall(b"pong\n")
            assert read_to_end(sock) == b""           # closed at once, not after 30 s
        spin_until(lambda: daemon.pending == 0 and not daemon._incoming_from)
        monkeypatch.setattr(Tcpd, "_serve_name", real)
        with dial(daemon) as sock:
            sock.sendall(b"pong\n" + frame(b"after"))
            assert read_exactly(sock, 2 + 9) == b"ok" + frame(b"after")


def test_a_fault_reading_a_remote_answer_is_answered_to_ipcd(backend, rundir, monkeypatch):
    def broken(self: Tcpd, dial: object) -> None:
        raise RuntimeError("a bug")
    monkeypatch.setattr(Tcpd, "_read_answer", broken)
    with running(make_tcpd(backend, rundir, connect_timeout=30)), \
            socket.create_server(("127.0.0.1", 0)) as remote, \
            ask_tcpd(rundir, f"tcp://127.0.0.1:{remote.getsockname()[1]}/svc") as ipcd:
        conn, _ = remote.accept()
        with conn:
            assert read_exactly(conn, 4) == b"svc\n"
            conn.sendall(b"ok")
            assert tcpd_answer(ipcd) == frame(
                b"ne refused tcpd failed serving this request (see its log)")


def test_ipv6_listener(backend, rundir, pong):
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError as e:
        unavailable(f"no IPv6 loopback here: {e}", "PYIPC_REQUIRE_NETWORK")
    with running(make_tcpd(backend, rundir, listen=["[::1]:0"])) as daemon:
        host, port = daemon.addresses[0][:2]
        assert host == "::1"
        with socket.create_connection(("::1", port), timeout=10) as sock:
            sock.sendall(b"pong\n" + frame(b"v6"))
            assert read_exactly(sock, 2 + 6) == b"ok" + frame(b"v6")


def test_bad_settings_are_refused(rundir):
    for kw in ({"listen": ["1.2.3.4:99999"]}, {"listen": ["[::1"]}, {"max_pending": 0},
               {"connect_timeout": 0}, {"dead_peer_timeout": -1}):
        with pytest.raises(ValueError):
            Tcpd(rundir=rundir, **kw)


def test_options_at_their_bounds_serve_both_ways(backend, rundir, pong, monkeypatch):
    """--dead-peer-timeout at MAX_DEAD_PEER_TIMEOUT, the timeouts at
    MAX_TIMEOUT: a peer is served and a dial made (tcpd dialling itself), the
    sockets tuned to the bound."""
    with running(make_tcpd(backend, rundir, dead_peer_timeout=MAX_DEAD_PEER_TIMEOUT,
                           connect_timeout=MAX_TIMEOUT,
                           handshake_timeout=MAX_TIMEOUT)) as daemon, \
            running(Ipcd(rundir=rundir, backend=backend, request_timeout=MAX_TIMEOUT)):
        with dial(daemon) as sock:
            sock.sendall(b"pong\n" + frame(b"at the bound"))
            assert read_exactly(sock, 2 + 16) == b"ok" + frame(b"at the bound")
        monkeypatch.setenv("IPC_NETWORK", f"p tcp://127.0.0.1:{daemon.addresses[0][1]}/pong")
        with pyipc.Context(rundir=rundir, backend=backend) as ctx:
            fd = ctx.connect("p", timeout=10)
            ctx.write(fd, b"dialled")
            assert ctx.read(fd, timeout=10) == b"dialled"
            with socket.socket(fileno=os.dup(fd)) as handed:      # tcpd's dialled socket
                assert handed.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 16383
                assert handed.getsockopt(socket.IPPROTO_TCP,
                                         socket.TCP_USER_TIMEOUT) == 32767000


@pytest.mark.parametrize("option, value", [
    ("dead_peer_timeout", MAX_DEAD_PEER_TIMEOUT + 1), ("dead_peer_timeout", 86400),
    ("dead_peer_timeout", float("inf")), ("dead_peer_timeout", float("nan")),
    ("connect_timeout", MAX_TIMEOUT + 1), ("connect_timeout", 1e10),
    ("connect_timeout", float("inf")), ("handshake_timeout", float("inf")),
    ("handshake_timeout", float("nan")), ("handshake_timeout", 1e10)])
def test_options_past_their_bounds_are_refused(rundir, option, value):
    """Past Linux's keepalive bound every connection failed (EINVAL from
    setsockopt: peers reset, dials 'Invalid argument'); a timeout of inf or
    past threading.TIMEOUT_MAX ended the loop at its first peer."""
    bound = MAX_DEAD_PEER_TIMEOUT if option == "dead_peer_timeout" else int(MAX_TIMEOUT)
    with pytest.raises(ValueError, match=f"^{option} must be .* at most {bound} seconds"):
        Tcpd(rundir=rundir, **{option: value})


@pytest.mark.parametrize("seconds", [MAX_DEAD_PEER_TIMEOUT + 1, 1e10, float("inf")])
def test_tune_tcp_takes_a_longer_dead_peer_timeout_as_the_bound(seconds):
    """tune_tcp never hands the kernel a value it refuses (EINVAL failed the
    connection), whatever it is given."""
    with socket.socket() as sock:
        tune_tcp(sock, seconds)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 16383
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 32767000


def test_parse_uri():
    assert parse_uri("tcp://10.0.0.2:9001/pong") == ("10.0.0.2", 9001, "pong")
    assert parse_uri("tcp://[::1]:9000/pong") == ("::1", 9000, "pong")
    assert parse_uri("tcp://hostb/kv") == ("hostb", 9000, "kv")
    assert parse_uri("TCP://h:1/a%20b") == ("h", 1, "a b")      # a URI's path is encoded
    # An IPv6 zone, written %25 in a URI (RFC 6874), is dialled as getaddrinfo
    # takes it (it stayed "%25lo": "Name or service not known").
    assert parse_uri("tcp://[fe80::1%25lo]:9/pong") == ("fe80::1%lo", 9, "pong")
    for bad in ("tcp://h:1/", "tcp://h:1", "tls://h:1/x", "tcp://:1/x", "tcp://h:1/a/b",
                "tcp://h:99999/x", "tcp://h:0/x", "tcp://u:p@h:1/x", "tcp://h:1/x?q=1",
                "tcp://h:1/x#f", "tcp://h:1/a%0Ab"):
        with pytest.raises(ValueError):
            parse_uri(bad)


# ------------------------------------------------------------ dialling side

class FakeRemote:
    """A TCP server on 127.0.0.1 standing for a remote tcpd: reads the name
    line, then `behave(conn, name)`."""

    def __init__(self, behave: Callable[[socket.socket, bytes], None]) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.names: list = []
        self.release = threading.Event()
        self.thread = threading.Thread(target=self._serve, args=(behave,), daemon=True)
        self.thread.start()

    def _serve(self, behave: Callable[[socket.socket, bytes], None]) -> None:
        conn, _ = self.listener.accept()
        with conn:
            name = b""
            while not name.endswith(b"\n"):
                more = conn.recv(1)
                if not more:
                    return
                name += more
            self.names.append(name)
            behave(conn, name)

    def close(self) -> None:
        self.release.set()
        self.listener.close()
        self.thread.join(10)


@pytest.fixture
def dialler(backend, rundir, monkeypatch) -> Iterator[Callable[..., Optional[pyipc.IPCError]]]:
    """connect('svc') through a real ipcd and tcpd to a FakeRemote."""
    with running(make_tcpd(backend, rundir, connect_timeout=1)), \
            running(Ipcd(rundir=rundir, backend=backend)):
        def connect(remote: FakeRemote, check: Callable[[pyipc.Context, int], None]) \
                -> Optional[pyipc.IPCError]:
            monkeypatch.setenv("IPC_NETWORK", f"svc tcp://127.0.0.1:{remote.port}/svc")
            with pyipc.Context(rundir=rundir, backend=backend) as ctx:
                try:
                    fd = ctx.connect("svc", timeout=10)
                except pyipc.IPCError as e:
                    return e
                check(ctx, fd)
            return None
        yield connect


def test_what_follows_ok_reaches_the_client(dialler):
    """The remote's first message comes in the same segment as its `ok`."""
    def behave(conn: socket.socket, name: bytes) -> None:
        conn.sendall(b"ok" + frame(b"greeting") + frame(b"second"))
        assert read_frame(conn) == b"reply"

    def check(ctx: pyipc.Context, fd: int) -> None:
        assert ctx.read(fd, timeout=10) == b"greeting"
        assert ctx.read(fd, timeout=10) == b"second"
        ctx.write(fd, b"reply")
    remote = FakeRemote(behave)
    try:
        assert dialler(remote, check) is None
        assert remote.names == [b"svc\n"]
    finally:
        remote.close()


@pytest.mark.parametrize("reply,cls,text", [
    (b"ne noservice no service svc on b\n", pyipc.ServiceNotFoundError,
     "(noservice): no service svc on b"),
    (b"ne refused service svc is not exposed", pyipc.NetworkError,   # no newline, then EOF
     "(refused): service svc is not exposed"),
    (b"HTTP/1.1 400 Bad Request\r\n\r\n", pyipc.NetworkError,
     "(refused): the peer at tcp://127.0.0.1:{port}/svc answered b'HTTP/1.1 400 Bad "
     "Request\\r\\n\\r\\n', not ok: is it a pyipc or libIPC tcpd?"),
    (b"", pyipc.NetworkError,
     "(unreachable): the peer at tcp://127.0.0.1:{port}/svc answered nothing (closed), "
     "not ok: is it a pyipc or libIPC tcpd?"),
    # The start of "ok", then the end: answered at once (tcpd spun on the
    # unread byte until the timeout, then said timeout).
    (b"o", pyipc.NetworkError,
     "(refused): the peer at tcp://127.0.0.1:{port}/svc answered b'o', "
     "not ok: is it a pyipc or libIPC tcpd?"),
    (None, pyipc.NetworkError,                                        # silent
     "(timeout): no answer from tcp://127.0.0.1:{port}/svc in 1 s"),
    # A refusal past MAX_REFUSAL is cut on a character boundary (cut inside
    # the last "é", the client's text ended in U+FFFD).
    (b"ne refused x" + "é".encode() * 300 + b"\n", pyipc.NetworkError,
     "(refused): x" + "é" * ((MAX_REFUSAL - len("refused x")) // 2)),
])
def test_remote_answers_other_than_ok(dialler, reply, cls, text):
    def behave(conn: socket.socket, name: bytes) -> None:
        if reply is None:
            remote.release.wait(30)
        else:
            conn.sendall(reply)
    remote = FakeRemote(behave)
    try:
        err = dialler(remote, lambda ctx, fd: None)
        assert type(err) is cls, err
        assert str(err) == ("ipcd could not connect to service svc "
                            + text.format(port=remote.port))
    finally:
        remote.close()


def ask_tcpd(rundir: str, uri: str) -> socket.socket:
    """A stand-in ipcd's request to tcpd: the URI sent, the answer to read."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(os.path.join(rundir, "tcp"))
    sock.sendall(frame(uri.encode()))
    sock.settimeout(15)
    return sock


def tcpd_answer(sock: socket.socket) -> bytes:
    """tcpd's framed answer to ask_tcpd (a fd that comes with it is closed)."""
    data, fds, _, _ = socket.recv_fds(sock, 1000, 1)
    for fd in fds:
        os.close(fd)
    return data


def test_what_is_in_progress_when_tcpd_stops_is_told_why(backend, rundir, pong):
    """tcpd stopping (SIGTERM's path) answers a peer in its handshake and
    ipcd's dial in progress, instead of closing them with a bare EOF."""
    remote = socket.create_server(("127.0.0.1", 0))       # accepts, never answers
    port = remote.getsockname()[1]
    daemon = make_tcpd(backend, rundir, connect_timeout=10)
    with remote:
        with running(daemon):
            peer = dial(daemon)
            peer.sendall(b"po")                            # half a name
            ipcd = ask_tcpd(rundir, f"tcp://127.0.0.1:{port}/svc")
            conn, _ = remote.accept()                      # tcpd dialled: in progress
            assert read_exactly(conn, 4) == b"svc\n"
        with peer, ipcd, conn:
            assert read_to_end(peer) == b"ne refused tcpd is stopping\n"
            assert tcpd_answer(ipcd) == frame(b"ne nodaemon tcpd is stopping")


class AnswerCountingTcpd(Tcpd):
    """Counts how often tcpd reads a remote's answer (once per readiness)."""

    answer_reads = 0

    def _read_answer(self, dial) -> None:
        self.answer_reads += 1
        super()._read_answer(dial)


def test_an_ok_in_two_segments_is_waited_for_not_spun_on(backend, rundir):
    """The remote's `o` alone, then `k` and a message: tcpd takes the `o` and
    sleeps until the rest comes (it peeked and left the byte in the socket,
    so the loop woke again at once, over 100,000 times a second)."""
    remote = socket.create_server(("127.0.0.1", 0))
    port = remote.getsockname()[1]
    daemon = AnswerCountingTcpd(rundir=rundir, backend=backend, listen=["127.0.0.1:0"],
                                connect_timeout=10)
    with running(daemon), remote, ask_tcpd(rundir, f"tcp://127.0.0.1:{port}/svc") as ipcd:
        conn, _ = remote.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            assert read_exactly(conn, 4) == b"svc\n"
            conn.sendall(b"o")
            # The gap between the two segments (part of the scenario, not a
            # synchronisation): a loop spinning on the byte reads it thousands of times.
            time.sleep(0.3)
            conn.sendall(b"k" + frame(b"greeting"))
            data, fds, _, _ = socket.recv_fds(ipcd, 100, 1)
            assert data == frame(b"ok") and len(fds) == 1
            with socket.socket(fileno=fds[0]) as client:
                assert read_exactly(client, 12) == frame(b"greeting")
    assert daemon.answer_reads <= 4


def remote_answers_ok(remote: socket.socket, ipcd: socket.socket) -> None:
    """A stand-in remote tcpd listening on `remote` takes tcpd's dial for
    svc and answers ok: tcpd then answers ipcd (ask_tcpd's `ipcd`) ok."""
    conn, _ = remote.accept()
    with conn:
        assert read_exactly(conn, 4) == b"svc\n"
        conn.sendall(b"ok")
        assert tcpd_answer(ipcd) == frame(b"ok")


@contextlib.contextmanager
def silent_host(address: str = "127.0.0.1", port: int = 0) -> Iterator[int]:
    """A port of `address` that drops every connection attempt, as a host that
    does not answer: a listener whose accept queue (backlog 0) is filled by
    one connection never accepted. A dial to it hangs until its timeout."""
    with socket.socket() as listener:
        listener.bind((address, port))
        listener.listen(0)
        port = listener.getsockname()[1]
        with socket.create_connection((address, port), timeout=10):
            yield port


def test_a_dial_out_of_time_is_always_answered_timeout(backend, rundir):
    """The dial's worker and its deadline's timer end together: whichever
    the loop handled first answered, `timeout` or `unreachable` with another
    text, at random (4 of 8 unreachable measured)."""
    with silent_host() as port, running(make_tcpd(backend, rundir, connect_timeout=0.3)):
        for _ in range(6):
            with ask_tcpd(rundir, f"tcp://127.0.0.1:{port}/svc") as sock:
                assert tcpd_answer(sock) == frame(
                    b"ne timeout no answer from tcp://127.0.0.1:%d/svc in 0.3 s" % port)


def test_a_dial_that_timed_out_is_said_as_the_deadline_says_it():
    """dial_failure() of a worker's TimeoutError: the deadline's code and text."""
    assert dial_failure("h:1", TimeoutError("timed out"), "no answer in 5 s") == \
        ("timeout", "no answer in 5 s")
    assert dial_failure("h:1", ConnectionRefusedError(111, "Connection refused"), "") == \
        ("unreachable", "h:1: Connection refused")


def test_a_first_address_that_drops_the_dial_leaves_time_for_the_next(backend, rundir,
                                                                       monkeypatch):
    """A host name whose first address drops connection attempts (a broken
    IPv6 route) and whose second answers: the dial gets there. The first took
    the whole --connect-timeout, and the second was never tried."""
    with socket.create_server(("127.0.0.1", 0)) as good:
        good.settimeout(10)
        port = good.getsockname()[1]
        real = socket.getaddrinfo

        def getaddrinfo(host, *args, **kw):          # the daemon's worker runs here
            if host == "two.test":
                return real("127.0.0.3", *args, **kw) + real("127.0.0.1", *args, **kw)
            return real(host, *args, **kw)
        monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
        with silent_host("127.0.0.3", port), \
                running(make_tcpd(backend, rundir, connect_timeout=4)):
            with ask_tcpd(rundir, f"tcp://two.test:{port}/svc") as ipcd:
                remote_answers_ok(good, ipcd)


def test_dials_to_a_silent_host_do_not_hold_up_a_dial_to_another(backend, rundir):
    """32 dials hang on a host that drops connection attempts (more than the
    16 workers there were): a dial to a host that answers still gets its
    worker at once, and its `ok`."""
    with silent_host() as silent_port, socket.create_server(("127.0.0.1", 0)) as good:
        with running(make_tcpd(backend, rundir, connect_timeout=5)):
            hanging = [ask_tcpd(rundir, f"tcp://127.0.0.1:{silent_port}/svc")
                       for _ in range(32)]
            try:
                with ask_tcpd(rundir, f"tcp://127.0.0.1:{good.getsockname()[1]}/svc") \
                        as ipcd:
                    remote_answers_ok(good, ipcd)
                for sock in hanging:
                    assert tcpd_answer(sock).startswith(b"\0\0\0")   # each answered
            finally:
                for sock in hanging:
                    sock.close()


def test_hung_name_lookups_of_one_host_leave_workers_for_others(backend, rundir,
                                                                 monkeypatch):
    """Lookups of one host hang. Each dial is answered at its deadline, but
    its worker stays in the lookup (it cannot be stopped); past
    --max-pending-per-host of those, dials to that host are refused `busy`
    at once, so a dial to another host still finds a worker (with 4 workers,
    four hung lookups made it wait out its timeout)."""
    daemon = make_tcpd(backend, rundir, connect_timeout=1, max_pending_per_host=2)
    daemon._offloader.max_workers = 4
    with hung_lookups(monkeypatch, "hung.example"), \
            socket.create_server(("127.0.0.1", 0)) as good, running(daemon):
        answers = []
        for _ in range(4):
            with ask_tcpd(rundir, "tcp://hung.example:9000/svc") as sock:
                answers.append(tcpd_answer(sock))
        assert answers[:2] == [frame(b"ne timeout no answer from "
                                     b"tcp://hung.example:9000/svc in 1 s")] * 2
        assert answers[2:] == [frame(b"ne busy tcpd has 2 dials to hung.example in "
                                     b"progress (--max-pending-per-host)")] * 2
        with ask_tcpd(rundir, f"tcp://127.0.0.1:{good.getsockname()[1]}/svc") as ipcd:
            remote_answers_ok(good, ipcd)


def test_a_hosts_share_comes_back_when_no_worker_can_be_started(backend, rundir):
    """The first dial's worker thread cannot start: that dial is answered,
    and the host's share of dials is given back (later dials to it were all
    'busy' until a restart)."""
    daemon = make_tcpd(backend, rundir, max_pending_per_host=1, connect_timeout=5)
    fail_first_offload(daemon)
    with socket.socket() as closed, running(daemon):
        closed.bind(("127.0.0.1", 0))                 # bound, not listening: refused
        uri = f"tcp://127.0.0.1:{closed.getsockname()[1]}/svc"
        for expected in (b"ne refused tcpd failed serving this request", b"ne unreachable "):
            with ask_tcpd(rundir, uri) as sock:
                assert tcpd_answer(sock)[4:].startswith(expected)


def test_sigterm_does_not_wait_for_a_dial_in_progress(backend, rundir, tmp_path):
    """A dial hangs on a silent host with --connect-timeout 60: SIGTERM still
    stops tcpd at once (its worker threads were joined at exit)."""
    notify_path = str(tmp_path / "notify")
    with silent_host() as silent_port, \
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(notify_path)
        notify.settimeout(30)
        proc = subprocess.Popen(
            [sys.executable, "-m", "pyipc", "--rundir", rundir, "--backend", backend,
             "tcpd", "--listen", "127.0.0.1:0", "--connect-timeout", "60"],
            env=dict(CHILD_ENV, NOTIFY_SOCKET=notify_path), stderr=subprocess.PIPE)
        try:
            # READY=1: `tcp` listens (its socket file exists from bind on,
            # before listen: a connect then was refused).
            assert notify.recv(100) == b"READY=1"
            with ask_tcpd(rundir, f"tcp://127.0.0.1:{silent_port}/svc"):
                # The dial's worker thread is running (the process's second).
                spin_until(lambda: len(os.listdir(f"/proc/{proc.pid}/task")) >= 2)
                proc.terminate()
                assert proc.wait(20) == 0
        finally:
            reap(proc)


@pytest.mark.parametrize("uri,why", [
    (b"tcp://host:1/", b"tcp://host:1/: no service"),
    # Not a host name (an empty label, one over 63 bytes): said so, where
    # the lookup's UnicodeError came back as `unreachable` with its repr.
    (b"tcp://a..b:1/svc", b"tcp://a..b:1/svc: bad host name 'a..b' (a label is empty"),
    (b"tcp://%s:1/svc" % (b"x" * 64), b"tcp://%s:1/svc: bad host name" % (b"x" * 64)),
])
def test_bad_uri_from_ipcd(backend, rundir, uri, why):
    with running(make_tcpd(backend, rundir)):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(os.path.join(rundir, "tcp"))
            sock.sendall(frame(uri))
            assert read_frame(sock).startswith(b"ne norule bad URI: " + why)


def test_a_uri_past_max_uri_is_refused_as_ipcd_refuses_it(backend, rundir):
    """ipcd hands tcpd no URI over MAX_URI; a local client may send one (the
    core takes messages up to 16 MiB): at the bound it is parsed, past it
    refused as ipcd refuses it, with the same code."""
    base = b"tcp://127.0.0.1:1/"
    with running(make_tcpd(backend, rundir)):
        for size, answer in ((MAX_URI, b"ne norule bad URI: " + NAME_TOO_LONG.encode()),
                             (MAX_URI + 1, b"ne badrequest a URI of %d bytes; tcpd takes "
                                           b"at most %d" % (MAX_URI + 1, MAX_URI))):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect(os.path.join(rundir, "tcp"))
                sock.sendall(frame(base + b"x" * (size - len(base))))
                assert read_frame(sock) == answer


def test_host_names_to_listen_on_and_to_dial(backend, rundir, pong, monkeypatch):
    """`localhost` resolves to one or more loopback addresses: tcpd listens on
    each; ipcd's URI may name the host too."""
    with running(make_tcpd(backend, rundir, listen=["localhost:0"])) as daemon, \
            running(Ipcd(rundir=rundir, backend=backend)):
        assert daemon.addresses
        for address in daemon.addresses:
            assert address[0] in ("127.0.0.1", "::1")
        port = next(a[1] for a in daemon.addresses if a[0] == "127.0.0.1")
        monkeypatch.setenv("IPC_NETWORK", f"p tcp://localhost:{port}/pong")
        with pyipc.Context(rundir=rundir, backend=backend) as ctx:
            fd = ctx.connect("p", timeout=10)
            ctx.write(fd, b"by name")
            assert ctx.read(fd, timeout=10) == b"by name"


ACTIVATE = """
import os, sys
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="2", LISTEN_FDNAMES="tcp:tcp")
os.dup2(int(sys.argv[1]), 3)
os.dup2(int(sys.argv[2]), 4)
os.execv(sys.executable, [sys.executable, "-m", "pyipc", *sys.argv[3:]])
"""


def test_socket_activation(backend, rundir, pong, tmp_path, monkeypatch):
    """systemd passes a TCP listener (tcpd's --listen is then unused) and the
    Unix socket `tcp` (ipcd's way in); READY=1 once both serve."""
    tcp = socket.create_server(("127.0.0.1", 0))
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(os.path.join(rundir, "tcp"))
    unix.listen(8)
    notify_path = str(tmp_path / "notify")
    with tcp, unix, socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(notify_path)
        notify.settimeout(20)
        proc = subprocess.Popen(
            [sys.executable, "-c", ACTIVATE, str(tcp.fileno()), str(unix.fileno()),
             "--rundir", rundir, "--backend", backend, "tcpd", "--listen", "127.0.0.1:1",
             "--expose", "pong"], pass_fds=[tcp.fileno(), unix.fileno()],
            env=dict(CHILD_ENV, NOTIFY_SOCKET=notify_path), stderr=subprocess.PIPE)
        try:
            assert notify.recv(100) == b"READY=1"
            # A peer on the passed TCP socket...
            with socket.create_connection(tcp.getsockname(), timeout=10) as peer:
                peer.sendall(b"pong\n" + frame(b"activated"))
                assert read_exactly(peer, 2 + 13) == b"ok" + frame(b"activated")
            # ...and ipcd's request on the passed Unix socket (dialling the same tcpd).
            with running(Ipcd(rundir=rundir, backend=backend)):
                monkeypatch.setenv("IPC_NETWORK",
                                   f"p tcp://127.0.0.1:{tcp.getsockname()[1]}/pong")
                with pyipc.Context(rundir=rundir, backend=backend) as ctx:
                    fd = ctx.connect("p", timeout=10)
                    ctx.write(fd, b"via ipcd")
                    assert ctx.read(fd, timeout=10) == b"via ipcd"
            stops_cleanly(proc, notify)
        finally:
            reap(proc)


@pytest.mark.parametrize("args,status,text", [
    (["tcpd", "--listen", "127.0.0.1:{port}"], 1, "pyipc tcpd: tcpd cannot listen on "
     "127.0.0.1:{port}: Address already in use"),
    (["tcpd", "--listen", "127.0.0.1:99999"], 2, "pyipc tcpd: '127.0.0.1:99999': bad port"),
    (["tcpd", "--max-pending", "0"], 2, "pyipc tcpd: max_pending must be >= 1, not 0"),
    (["tcpd", "--max-pending-per-host", "0"], 2,
     "pyipc tcpd: max_pending_per_host must be >= 1, not 0"),
    (["ipcd", "--max-requests", "0"], 2, "pyipc ipcd: max_requests must be >= 1, not 0"),
    (["tcpd", "--dead-peer-timeout", "32768"], 2, "pyipc tcpd: dead_peer_timeout must be >= 0 "
     "and at most 32767 seconds (Linux's longest TCP keepalive idle time), not 32768.0"),
    (["tcpd", "--dead-peer-timeout", "inf"], 2,
     "pyipc tcpd: dead_peer_timeout must be >= 0 and at most 32767 seconds"),
    (["tcpd", "--handshake-timeout", "inf"], 2,
     "pyipc tcpd: handshake_timeout must be > 0 and at most 86400 seconds (a day), not inf"),
    (["tcpd", "--connect-timeout", "1e10"], 2,
     "pyipc tcpd: connect_timeout must be > 0 and at most 86400 seconds (a day), "
     "not 10000000000.0"),
    (["ipcd", "--request-timeout", "inf"], 2,
     "pyipc ipcd: request_timeout must be > 0 and at most 86400 seconds (a day), not inf"),
    (["ipcd", "--request-timeout", "86401"], 2,
     "pyipc ipcd: request_timeout must be > 0 and at most 86400 seconds"),
])
def test_cli_errors_are_one_line(backend, rundir, args, status, text):
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "pyipc", "--rundir", rundir, "--backend",
                              backend, *[a.format(port=port) for a in args]],
                             env=CHILD_ENV, capture_output=True, text=True, timeout=60)
    assert out.returncode == status, out.stderr
    assert out.stderr.startswith(text.format(port=port)), out.stderr
    assert "Traceback" not in out.stderr


def test_many_clients_connect_at_once(backend, rundir, pong, monkeypatch):
    """40 clients ask at once: every dial goes through (ipcd and tcpd serve
    them concurrently, the dials on worker threads), each gets its own echo."""
    with running(make_tcpd(backend, rundir)) as daemon, \
            running(Ipcd(rundir=rundir, backend=backend)):
        monkeypatch.setenv("IPC_NETWORK",
                           f"pong tcp://127.0.0.1:{daemon.addresses[0][1]}/pong")
        errors: list = []
        go = threading.Barrier(40)

        def one(i: int) -> None:
            try:
                with pyipc.Context(rundir=rundir, backend=backend) as ctx:
                    go.wait(20)
                    fd = ctx.connect("pong", timeout=30)
                    ctx.write(fd, b"client %d" % i)
                    assert ctx.read(fd, timeout=30) == b"client %d" % i
            except BaseException as e:          # reported below, with its client
                errors.append((i, repr(e)))
        threads = [threading.Thread(target=one, args=(i,)) for i in range(40)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == []


def test_a_services_last_messages_reach_a_peer_that_is_still_sending(backend, rundir):
    """The service writes 40 MiB and closes while the remote peer is still
    sending (it is slow to read): the peer gets every message, then EOF.
    tcpd closed its TCP socket with the peer's bytes unread, which makes
    the kernel send a reset, and the peer's kernel dropped the last
    messages it had not read yet (38 of 40 came, then ECONNRESET)."""
    with running(Burst(rundir=rundir, backend=backend)) as burst, \
            running(make_tcpd(backend, rundir, expose=["burst"])) as daemon, \
            dial(daemon) as sock:
        sock.settimeout(30)
        sock.sendall(b"burst\n")
        assert read_exactly(sock, 2) == b"ok"
        send_while_slow_to_read(sock.sendall)
        data = read_to_end(sock)
    assert frames_of(data) == burst.messages


def test_a_lingering_close_ends_at_the_peers_close_or_its_timeout(backend, rundir,
                                                                    monkeypatch):
    """After a relay's end tcpd keeps the TCP socket open (our side shut
    down: the peer reads EOF) until the peer closes its side, and
    LINGER_CLOSE_TIMEOUT at most; what the peer sends meanwhile is dropped."""
    from pyipc.daemons import _graceful_close
    monkeypatch.setattr(_graceful_close, "LINGER_CLOSE_TIMEOUT", 0.5)
    burst = Burst(count=1, size=8, rundir=rundir, backend=backend)
    with running(burst), running(make_tcpd(backend, rundir, expose=["burst"])) as daemon:
        closer = daemon._closer
        with dial(daemon) as polite, dial(daemon) as silent:
            for sock in (polite, silent):
                sock.sendall(b"burst\n")
                assert read_exactly(sock, 2) == b"ok"
                assert frames_of(read_to_end(sock)) == burst.messages   # then EOF
            spin_until(lambda: len(closer) == 2)
            silent.sendall(b"dropped")                # taken and dropped, no reset
            polite.shutdown(socket.SHUT_WR)           # its close: the linger ends at once
            spin_until(lambda: len(closer) == 1)
            began = time.monotonic()
            spin_until(lambda: len(closer) == 0)      # the silent one: at the timeout
            assert time.monotonic() - began < 0.5 + 2


def test_a_bad_frame_after_ok_ends_that_relay_only(tcpd):
    """A peer announcing more than max_message_size: its relay is closed (the
    core's rule), tcpd goes on serving others."""
    with dial(tcpd) as bad:
        bad.sendall(b"pong\n" + b"\xff\xff\xff\xff" + b"x" * 100)
        assert read_to_end(bad) == b"ok"
    with dial(tcpd) as good:
        good.sendall(b"pong\n" + frame(b"still here"))
        assert read_exactly(good, 2 + 14) == b"ok" + frame(b"still here")


def test_several_listen_addresses(backend, rundir, pong):
    with running(make_tcpd(backend, rundir, listen=["127.0.0.1:0", "127.0.0.2:0"])) as daemon:
        assert [a[0] for a in daemon.addresses] == ["127.0.0.1", "127.0.0.2"]
        for host, port in daemon.addresses:
            with socket.create_connection((host, port), timeout=10) as sock:
                sock.sendall(b"pong\n" + frame(host.encode()))
                assert read_exactly(sock, 2 + 4 + len(host)) == b"ok" + frame(host.encode())
