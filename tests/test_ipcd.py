"""pyipc ipcd (pyipc.daemons.ipcd.Ipcd) on one host, both backends: the
IPC_NETWORK rules, the scheme daemons it asks (stand-ins here; the real tcpd
is tested across namespaces in test_network_tcp.py), a reason for every
failure, the timeout per request, a slow daemon not stalling the others, the
bound on requests at and past its edge, systemd socket activation and
readiness, and the command line."""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from typing import Iterator

import pytest

import pyipc
from pyipc.daemons.ipcd import MAX_REQUEST as MAX_REQUEST_FOR_TESTS, Ipcd
from pyipc.daemons._rules import find_rule, target_of
from pyipc.daemons._timers import MAX_TIMEOUT

from conftest import CHILD_ENV, spin_until
from daemon_harness import (FakeScheme, Pong, ask_raw, frame, raw_answer, reap, running,
                            stops_cleanly, stuck_service)


@pytest.fixture
def pong(backend, rundir) -> Iterator[Pong]:
    with running(Pong(rundir=rundir, backend=backend)) as daemon:
        yield daemon


@pytest.fixture
def ipcd(backend, rundir) -> Iterator[Ipcd]:
    with running(Ipcd(rundir=rundir, backend=backend, request_timeout=5)) as daemon:
        yield daemon


def client(backend, rundir) -> pyipc.Context:
    return pyipc.Context(rundir=rundir, backend=backend)


def echo_through(ctx: pyipc.Context, name: str) -> bytes:
    fd = ctx.connect(name, timeout=10)
    ctx.write(fd, b"ping " + name.encode())
    return ctx.read(fd, timeout=10)


# ------------------------------------------------------------ the rules

def test_rules_last_match_wins():
    rules = "pong unix://a; other unix://b;pong unix://c ;;pong"
    assert find_rule("pong", rules) == "unix://c"      # "pong" alone has no URI: ignored
    assert find_rule("other", rules) == "unix://b"
    assert find_rule("none", rules) is None
    assert target_of("pong2") == (None, "pong2")
    assert target_of("unix://x") == (None, "x")
    assert target_of("unix:///run/x.sock") == (None, "/run/x.sock")
    assert target_of("TCP://h:1/x") == ("tcp", "TCP://h:1/x")
    for bad in ("unix://", "://x", "a/b://x"):
        with pytest.raises(ValueError):
            target_of(bad)


@pytest.mark.parametrize("scheme", ["a", "Z", "a1", "a+b", "a-b", "a.b", "x-1.2+3"])
def test_an_rfc3986_scheme_names_a_daemon(scheme):
    assert target_of(f"{scheme}://h/x") == (scheme.lower(), f"{scheme}://h/x")


@pytest.mark.parametrize("scheme", ["1x", "-", "+a", ".a", ".", "..", "a_b", "a b", "é",
                                    "\u212acp", "a/b", "a:b", ""])
def test_a_scheme_that_is_not_rfc3986s_is_refused(scheme):
    """RFC 3986: ALPHA *( ALPHA / DIGIT / "+" / "-" / "." ) (a non-ASCII
    letter too, even one whose lower case is ASCII, as the Kelvin sign's)."""
    with pytest.raises(ValueError, match="not a scheme"):
        target_of(f"{scheme}://h/x")


@pytest.mark.parametrize("uri", ["ipc://h/x", "IPC://x", "ipc://"])
def test_the_ipc_scheme_is_refused(uri):
    """ipc:// would make ipcd ask itself."""
    with pytest.raises(ValueError, match="ipc:// would send the request to ipcd itself"):
        target_of(uri)


def test_local_alias_and_unix_rule(pong, ipcd, backend, rundir, monkeypatch):
    monkeypatch.setenv("IPC_NETWORK", "p pong;q unix://pong;r unix://nothing;r unix://pong")
    with client(backend, rundir) as ctx:
        assert echo_through(ctx, "p") == b"ping p"
        assert echo_through(ctx, "q") == b"ping q"
        assert echo_through(ctx, "r") == b"ping r"    # the last rule for r wins


def test_unix_rule_with_an_absolute_path(pong, ipcd, backend, rundir, monkeypatch):
    monkeypatch.setenv("IPC_NETWORK", f"x unix://{os.path.join(rundir, 'pong')}")
    with client(backend, rundir) as ctx:
        assert echo_through(ctx, "x") == b"ping x"


def test_unix_rule_outside_the_run_dir_is_refused(pong, ipcd, backend, rundir, tmp_path,
                                                   monkeypatch):
    """ipcd connects with its own identity: a client must not make it reach a
    socket outside its run dir, directly or through a link."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    outside = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    outside.bind(str(elsewhere / "private"))
    outside.listen(1)
    os.symlink(str(elsewhere / "private"), os.path.join(rundir, "link"))
    with outside, client(backend, rundir) as ctx:
        for rule, path in ((f"x unix://{elsewhere}/private", f"{elsewhere}/private"),
                           ("x unix://link", "link"),
                           (f"x unix://{rundir}/../{os.path.basename(rundir)}/pong", None)):
            monkeypatch.setenv("IPC_NETWORK", rule)
            if path is None:        # ".." that leads back into the run dir is fine
                assert echo_through(ctx, "x") == b"ping x"
                continue
            with pytest.raises(pyipc.NetworkError) as info:
                ctx.connect("x", timeout=10)
            assert str(info.value) == (f"ipcd could not connect to service x (refused): "
                                       f"{path}: ipcd reaches only sockets in its run dir "
                                       f"{rundir}")


REFUSALS = [
    ("nothing here", "zz", pyipc.ServiceNotFoundError,
     "ipcd could not connect to service zz (norule): no rule for zz in IPC_NETWORK"),
    ("zz missing", "zz", pyipc.ServiceNotFoundError,
     "ipcd could not connect to service zz (noservice): no service missing in {rundir}"),
    ("zz unix://missing", "zz", pyipc.ServiceNotFoundError,
     "ipcd could not connect to service zz (noservice): no service missing in {rundir}"),
    ("zz wat://host/zz", "zz", pyipc.NetworkError,
     "ipcd could not connect to service zz (nodaemon): no service wat in {rundir} "
     "(is the wat daemon, pyipc watd, running?)"),
    ("zz ../pong", "zz", pyipc.ServiceNotFoundError,
     "ipcd could not connect to service zz (norule): ../pong: invalid service name: "
     "contains '/'"),
    ("zz a/b://x", "zz", pyipc.ServiceNotFoundError,
     "ipcd could not connect to service zz (norule): a/b://x: not a scheme (RFC 3986: a "
     "letter, then letters, digits, '+', '-' or '.')"),
    ("zz 1x://h/zz", "zz", pyipc.ServiceNotFoundError,
     "ipcd could not connect to service zz (norule): 1x://h/zz: not a scheme (RFC 3986: "
     "a letter, then letters, digits, '+', '-' or '.')"),
    ("zz -://h/zz", "zz", pyipc.ServiceNotFoundError,
     "ipcd could not connect to service zz (norule): -://h/zz: not a scheme (RFC 3986: "
     "a letter, then letters, digits, '+', '-' or '.')"),
    ("zz ipc://h/zz", "zz", pyipc.ServiceNotFoundError,
     "ipcd could not connect to service zz (norule): ipc://h/zz: ipc:// would send the "
     "request to ipcd itself; name the service (unix://NAME) or a daemon's scheme "
     "(tcp://, tls://, ws://)"),
]


@pytest.mark.parametrize("rules,name,cls,text", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_every_failure_has_a_reason(ipcd, backend, rundir, monkeypatch, rules, name, cls, text):
    monkeypatch.setenv("IPC_NETWORK", rules)
    with client(backend, rundir) as ctx, pytest.raises(pyipc.IPCError) as info:
        ctx.connect(name, timeout=10)
    assert type(info.value) is cls
    assert str(info.value) == text.format(rundir=rundir)


@pytest.mark.parametrize("request_bytes,reason", [
    (b"no semicolon", b"ne badrequest the request is not NAME;IPC_NETWORK"),
    (b";pong pong", b"ne badrequest the request is not NAME;IPC_NETWORK"),
    (b"\xff;x y", b"ne badrequest the request is not UTF-8"),
])
def test_a_malformed_request_is_answered(ipcd, rundir, request_bytes, reason):
    with ask_raw(rundir, request_bytes) as sock:
        assert raw_answer(sock) == (reason, None)


def test_request_at_max_request_is_served_past_it_answered(ipcd, rundir):
    from pyipc.daemons.ipcd import MAX_REQUEST
    head = b"zz;zz nowhere;"
    at = head + b"x" * (MAX_REQUEST - len(head))
    with ask_raw(rundir, at) as sock:
        assert raw_answer(sock) == (b"ne noservice no service nowhere in "
                                    + rundir.encode(), None)
    with ask_raw(rundir, at + b"x") as sock:
        assert raw_answer(sock) == (b"ne badrequest a request of %d bytes; ipcd takes at "
                                    b"most %d (IPC_NETWORK too long?)"
                                    % (MAX_REQUEST + 1, MAX_REQUEST), None)


def test_bytes_of_requests_being_read_are_bounded(ipcd, rundir, monkeypatch):
    """MAX_BUFFERED bounds what ipcd holds of unfinished requests, all
    clients together: at the bound they wait, and a short request (up to
    SMALL_REQUEST) is still served; one byte past it the client that brought
    it is answered busy; the others are served."""
    import select
    import pyipc.daemons.ipcd as ipcd_module
    monkeypatch.setattr(ipcd_module, "MAX_BUFFERED", 300_000)
    request = b"zz;" + b"x" * 249_997                   # no rule for zz: ne norule

    def held() -> int:
        return ipcd._held
    a = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    b = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        a.connect(os.path.join(rundir, "ipc"))
        b.connect(os.path.join(rundir, "ipc"))
        a.sendall(frame(request)[:200_004])
        spin_until(lambda: held() == 200_004)
        b.sendall(frame(request)[:4 + 99_992])
        spin_until(lambda: held() == 300_000)             # at the bound
        assert select.select([a, b], [], [], 0)[0] == []   # both wait
        with ask_raw(rundir, b"zz;") as small:              # a short request is served
            assert raw_answer(small)[0].startswith(b"ne norule")
        # SMALL_REQUEST: a request announced at it is never refused for the
        # bound (sent in two parts, it waits for its rest), one byte more is.
        at_small = b"zz;" + b"y" * (ipcd_module.SMALL_REQUEST - 3)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as edge:
            edge.connect(os.path.join(rundir, "ipc"))
            edge.sendall(frame(at_small)[:1000])
            with ask_raw(rundir, b"zz;") as later:          # a barrier: its part was read
                assert raw_answer(later)[0].startswith(b"ne norule")
            edge.sendall(frame(at_small)[1000:])
            assert raw_answer(edge)[0].startswith(b"ne norule")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as past:
            past.connect(os.path.join(rundir, "ipc"))
            past.sendall(frame(at_small + b"y")[:1000])
            assert raw_answer(past)[0].startswith(b"ne busy ipcd holds")
        b.sendall(b"x")                                    # one byte past it
        assert raw_answer(b)[0] == (b"ne busy ipcd holds 300001 bytes of requests "
                                    b"being read, at most 300000")
        a.sendall(frame(request)[200_004:])
        assert raw_answer(a)[0].startswith(b"ne norule no rule for zz")


def test_a_client_with_a_too_long_ipc_network_is_told_why(ipcd, backend, rundir,
                                                          monkeypatch):
    from pyipc.daemons.ipcd import MAX_REQUEST
    monkeypatch.setenv("IPC_NETWORK", "pong pong;" * (MAX_REQUEST // 10 + 1))
    with client(backend, rundir) as ctx, pytest.raises(pyipc.NetworkError) as info:
        ctx.connect("pong", timeout=10)
    assert "(badrequest): a request of" in str(info.value)
    assert f"ipcd takes at most {MAX_REQUEST} (IPC_NETWORK too long?)" in str(info.value)


@pytest.mark.parametrize("announced", [MAX_REQUEST_FOR_TESTS + 1, 16 << 20, 0xFFFFFFFF])
def test_a_header_past_max_request_is_answered_at_once(ipcd, rundir, announced):
    """ipcd reads requests itself: one announced over MAX_REQUEST is answered
    at its header, nothing of it buffered (through a service of its context,
    the core ended a header over 16 MiB with a bare end of stream)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(os.path.join(rundir, "ipc"))
        sock.sendall(struct.pack(">I", announced) + b"pong;pong pong")
        assert raw_answer(sock) == (b"ne badrequest a request of %d bytes; ipcd takes at "
                                    b"most %d (IPC_NETWORK too long?)"
                                    % (announced, MAX_REQUEST_FOR_TESTS), None)
        assert_ended(sock)          # ipcd let go of both its fds of the socket


def assert_ended(sock: socket.socket) -> None:
    """The other end is closed: end of stream, or a reset when it closed with
    bytes of ours unread (a Unix socket reports that once the answer is read)."""
    try:
        assert sock.recv(1) == b""
    except ConnectionResetError:
        pass


def test_a_client_ending_mid_request_is_answered(ipcd, rundir):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(os.path.join(rundir, "ipc"))
        sock.sendall(struct.pack(">I", 100) + b"pong;")
        sock.shutdown(socket.SHUT_WR)
        assert raw_answer(sock) == (b"ne badrequest closed in the middle of a request", None)
        assert_ended(sock)


def test_a_refused_client_still_sending_is_read_to_its_end_not_a_stall(
        pong, ipcd, backend, rundir, monkeypatch):
    """Refused at its header, a client still sending the announced request
    is drained (closed with its bytes unread, its write would fail before it
    reads the answer), a bounded number of reads per event: others are
    served meanwhile."""
    sent: list = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(os.path.join(rundir, "ipc"))

        def send_it_all() -> None:
            try:
                sock.sendall(struct.pack(">I", 16 << 20) + bytes(16 << 20))
                sent.append(True)
            except OSError as e:
                sent.append(e)
        sender = threading.Thread(target=send_it_all)
        sender.start()
        assert raw_answer(sock) == (b"ne badrequest a request of %d bytes; ipcd takes at "
                                    b"most %d (IPC_NETWORK too long?)"
                                    % (16 << 20, MAX_REQUEST_FOR_TESTS), None)
        monkeypatch.setenv("IPC_NETWORK", "p pong")
        with client(backend, rundir) as ctx:
            assert echo_through(ctx, "p") == b"ping p"
        sender.join(30)
        assert sent == [True]               # every byte taken, none refused (EPIPE)
        assert_ended(sock)


def test_a_refused_client_that_never_stops_sending_is_closed_at_the_deadline(backend,
                                                                            rundir):
    """Draining a refused client is bounded by the request's deadline: one
    that goes on sending for ever is closed then (its sends fail)."""
    with running(Ipcd(rundir=rundir, backend=backend, request_timeout=0.5)):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(os.path.join(rundir, "ipc"))
            sock.sendall(struct.pack(">I", 0xFFFFFFFF))
            assert raw_answer(sock)[0].startswith(b"ne badrequest a request of 4294967295")
            sock.settimeout(10)
            chunk = bytes(64 * 1024)
            with pytest.raises((BrokenPipeError, ConnectionResetError)):
                while True:                       # far more than ipcd reads in 0.5 s
                    sock.sendall(chunk)


def test_bytes_after_the_request_are_refused_and_the_daemon_let_go(backend, rundir):
    holder: list = []
    holder.append(FakeScheme(rundir, "slow", hang(holder)))
    fake = holder[0]
    try:
        with running(Ipcd(rundir=rundir, backend=backend)) as daemon:
            with ask_raw(rundir, b"pong;pong slow://h/pong") as sock:
                fake.wait_requests(1)
                spin_until(lambda: daemon.in_flight == 1)
                sock.sendall(b"more")
                assert raw_answer(sock) == (b"ne badrequest bytes after a request", None)
                assert_ended(sock)
            spin_until(lambda: daemon.in_flight == 0)
            fake.release.set()
            fake.threads[0].join(10)
            assert fake.closed_by_ipcd == [True]
    finally:
        fake.close()


def unsent_bytes(sock: socket.socket) -> int:
    """Bytes sock wrote that its peer has not read yet (SIOCOUTQ)."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]


def test_fds_sent_with_a_request_are_never_held(ipcd, rundir):
    """ipcd takes no fd from a client: fds sent with a request are dropped
    as it is read, not kept until it is whole (a client could make ipcd hold
    8 fds a byte). Here each byte but the last comes with 8 copies of the
    read end of a pipe: once ipcd has read them all, a write to the pipe
    fails, so no copy of its read end is left anywhere."""
    request = frame(b"zz;zz nowhere")
    r, w = os.pipe()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(os.path.join(rundir, "ipc"))
            for i in range(len(request) - 1):
                socket.send_fds(sock, [request[i:i + 1]], [r] * 8)
            os.close(r)
            r = -1
            spin_until(lambda: unsent_bytes(sock) == 0)     # ipcd has read them
            with pytest.raises(BrokenPipeError):
                os.write(w, b"x")
            sock.sendall(request[-1:])
            assert raw_answer(sock)[0].startswith(b"ne noservice ")
            assert_ended(sock)
    finally:
        os.close(w)
        if r >= 0:
            os.close(r)


def test_bytes_after_the_request_in_its_write_are_refused(pong, ipcd, rundir):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(os.path.join(rundir, "ipc"))
        sock.sendall(frame(b"pong;pong pong") + b"more")
        assert raw_answer(sock) == (b"ne badrequest bytes after a request", None)
        assert_ended(sock)


def test_a_nul_in_a_rule_is_answered_at_once(ipcd, rundir):
    """Not a failure escaping ipcd's handler, answered only at the deadline."""
    with ask_raw(rundir, b"x;x unix:///a\0b") as sock:
        answer, fd = raw_answer(sock, timeout=2)
        assert fd is None and answer.startswith(b"ne norule ")
        assert b"a NUL in a URI" in answer


def test_a_fault_serving_a_request_is_answered_at_once(ipcd, rundir, monkeypatch):
    """A bug (here find_rule raising) costs that request only, answered at
    once (on_event_failed), not at the deadline; ipcd goes on serving."""
    from pyipc.daemons import _rules
    real = _rules.find_rule
    monkeypatch.setattr(_rules, "find_rule", lambda name, rules: 1 / 0)
    with ask_raw(rundir, b"pong;pong pong") as sock:
        assert raw_answer(sock, timeout=2) == (
            b"ne refused ipcd failed serving this request (see its log)", None)
        assert_ended(sock)
    monkeypatch.setattr(_rules, "find_rule", real)
    with ask_raw(rundir, b"zz;zz nowhere") as sock:
        assert raw_answer(sock)[0].startswith(b"ne noservice ")


# ------------------------------------------------------------ scheme daemons

def test_scheme_daemon_gets_the_uri_and_its_fd_reaches_the_client(
        pong, ipcd, backend, rundir, monkeypatch):
    def answer(conn: socket.socket, uri: bytes) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as target:
            target.connect(os.path.join(rundir, "pong"))
            socket.send_fds(conn, [frame(b"ok")], [target.fileno()])
    fake = FakeScheme(rundir, "fake", answer)
    try:
        monkeypatch.setenv("IPC_NETWORK", "pong fake://somewhere:1/pong")
        with client(backend, rundir) as ctx:
            assert echo_through(ctx, "pong") == b"ping pong"
        assert fake.uris == [b"fake://somewhere:1/pong"]
    finally:
        fake.close()


def test_a_uri_past_max_uri_is_a_bad_request_not_a_daemon_fault(ipcd, rundir):
    """ipcd bounds the URI it hands a scheme daemon (MAX_URI): a longer one
    is the request's fault, said so (it was sent, did not fit the socket, and
    the daemon was blamed: "the tcp daemon is not reading")."""
    from pyipc.daemons._netwire import MAX_URI
    fake = FakeScheme(rundir, "fake", lambda conn, uri: conn.sendall(frame(b"ne refused x")))
    try:
        at = "fake://h:1/" + "x" * (MAX_URI - len("fake://h:1/"))
        with ask_raw(rundir, f"p;p {at}".encode()) as sock:
            assert raw_answer(sock)[0] == b"ne refused x"
        with ask_raw(rundir, f"p;p {at}x".encode()) as sock:
            assert raw_answer(sock)[0] == (b"ne badrequest a URI of %d bytes; ipcd takes "
                                           b"at most %d" % (MAX_URI + 1, MAX_URI))
        assert fake.uris == [at.encode()]
    finally:
        fake.close()


def test_a_client_that_ends_its_sending_side_still_gets_its_answer(ipcd, rundir):
    """A client that sends its request, then shuts down its sending side
    (a half-close), waits for the answer: ipcd answers it when the scheme
    daemon does (it took the EOF for the client leaving: a bare EOF)."""
    def answer(conn: socket.socket, uri: bytes) -> None:
        fake.release.wait(10)
        conn.sendall(frame(b"ne unreachable far away"))
    fake = FakeScheme(rundir, "fake", answer)
    try:
        with ask_raw(rundir, b"p;p fake://h:1/p") as half:
            half.shutdown(socket.SHUT_WR)
            fake.wait_requests(1)
            # A barrier: ipcd handles every ready fd each round, so once a
            # later client is answered, the first one's EOF has been seen.
            with ask_raw(rundir, b"zz;") as later:
                assert raw_answer(later)[0].startswith(b"ne norule")
            fake.release.set()
            assert raw_answer(half) == (b"ne unreachable far away", None)
    finally:
        fake.release.set()
        fake.close()


def test_a_client_that_left_frees_its_request_slot(backend, rundir):
    """A client that closed its socket (not a half-close) while its request
    waited for a scheme daemon: its slot of max_requests is free at once
    (it was held until the request timeout, answering others busy)."""
    fake = FakeScheme(rundir, "fake", lambda conn, uri: fake.release.wait(10))
    try:
        with running(Ipcd(rundir=rundir, backend=backend, request_timeout=5,
                          max_requests=1)):
            with ask_raw(rundir, b"p;p fake://h:1/p"):
                fake.wait_requests(1)
            # A barrier: once a later client is answered, the close was seen.
            with ask_raw(rundir, b"zz;") as later:
                assert raw_answer(later)[0].startswith(b"ne norule")
            with ask_raw(rundir, b"p;p fake://h:1/p"):
                fake.wait_requests(1)               # asked too, not answered busy
    finally:
        fake.release.set()
        fake.close()


def test_a_client_that_half_closed_then_left_frees_its_request_slot(backend, rundir):
    """A client that ended its sending side after its request, then closed:
    ipcd no longer watches it after the half-close, and kept its slot of
    max_requests until the request timeout, answering the next client busy.
    It is found gone when the next request needs the slot."""
    fake = FakeScheme(rundir, "fake", lambda conn, uri: fake.release.wait(10))
    try:
        with running(Ipcd(rundir=rundir, backend=backend, request_timeout=30,
                          max_requests=1)):
            first = ask_raw(rundir, b"p;p fake://h:1/p")
            fake.wait_requests(1)
            first.shutdown(socket.SHUT_WR)
            # A barrier: once a later client is answered, the EOF was seen.
            with ask_raw(rundir, b"zz;") as later:
                assert raw_answer(later)[0].startswith(b"ne norule")
            first.close()                           # it leaves: no event says so
            with ask_raw(rundir, b"p;p fake://h:1/p"):
                fake.wait_requests(1)               # asked too, not answered busy
    finally:
        fake.release.set()
        fake.close()


def test_a_scheme_daemons_long_refusal_is_cut_between_characters(backend, rundir,
                                                                  monkeypatch):
    """A scheme daemon's `ne` longer than 400 bytes is cut on a UTF-8
    character's boundary (ipcd cut it at a byte count, and the client's text
    ended in U+FFFD)."""
    refusal = ("ne refused x" + "é" * 300).encode()
    fake = FakeScheme(rundir, "fake", lambda conn, uri: conn.sendall(frame(refusal)))
    try:
        with running(Ipcd(rundir=rundir, backend=backend, request_timeout=5)):
            monkeypatch.setenv("IPC_NETWORK", "svc fake://h/svc")
            with pyipc.Context(rundir=rundir, backend=backend) as ctx:
                with pytest.raises(pyipc.NetworkError) as err:
                    ctx.connect("svc", timeout=5)
        text = str(err.value)
        assert text.startswith("ipcd could not connect to service svc (refused): xéé")
        assert text.endswith("é") and "\ufffd" not in text
        # 400 bytes with its code ("refused " and 392), less the é it would cut.
        assert len(text.split("(refused): ", 1)[1].encode()) == 391
    finally:
        fake.close()


def test_a_request_in_progress_when_ipcd_stops_is_told_why(backend, rundir):
    """ipcd stopping (SIGTERM's path) answers the requests it still holds
    (`ne nodaemon ipcd is stopping`) instead of closing them with a bare EOF."""
    fake = FakeScheme(rundir, "fake", lambda conn, uri: fake.release.wait(10))
    try:
        with running(Ipcd(rundir=rundir, backend=backend, request_timeout=5)):
            waiting = ask_raw(rundir, b"p;p fake://h:1/p")
            fake.wait_requests(1)
        with waiting:
            assert raw_answer(waiting) == (b"ne nodaemon ipcd is stopping", None)
    finally:
        fake.release.set()
        fake.close()


@pytest.mark.parametrize("reply,cls,text", [
    (frame(b"ne unreachable 10.1.1.1:9000: No route to host"), pyipc.NetworkError,
     "(unreachable): 10.1.1.1:9000: No route to host"),
    (frame(b"ne noservice no service pong on hostb"), pyipc.ServiceNotFoundError,
     "(noservice): no service pong on hostb"),
    (b"", pyipc.NetworkError, "(nodaemon): the fake daemon failed: closed without answering"),
    (frame(b"ok"), pyipc.NetworkError,                    # ok without a fd
     "(nodaemon): the fake daemon answered neither ok with a fd nor ne"),
    (frame(b"maybe"), pyipc.NetworkError,
     "(nodaemon): the fake daemon answered neither ok with a fd nor ne"),
    (b"\x00\x10\x00\x00", pyipc.NetworkError,                # a header: 1 MiB
     "(nodaemon): the fake daemon sent an answer of 1048576 bytes (at most 4096)"),
])
def test_scheme_daemon_refusals_are_relayed(ipcd, backend, rundir, monkeypatch, reply, cls, text):
    fake = FakeScheme(rundir, "fake", lambda conn, uri: conn.sendall(reply))
    try:
        monkeypatch.setenv("IPC_NETWORK", "pong fake://h/pong")
        with client(backend, rundir) as ctx, pytest.raises(pyipc.IPCError) as info:
            ctx.connect("pong", timeout=10)
        assert type(info.value) is cls
        assert str(info.value) == "ipcd could not connect to service pong " + text
    finally:
        fake.close()


def hang(fake_holder: list):
    """An answer() that waits until the test releases it, then says nothing."""
    def answer(conn: socket.socket, uri: bytes) -> None:
        fake_holder[0].release.wait(30)
        fake_holder[0].closed_by_ipcd.append(conn.recv(1) == b"")
    return answer


def test_request_timeout(backend, rundir, monkeypatch):
    holder: list = []
    holder.append(FakeScheme(rundir, "slow", hang(holder)))
    fake = holder[0]
    try:
        with running(Ipcd(rundir=rundir, backend=backend, request_timeout=0.5)):
            monkeypatch.setenv("IPC_NETWORK", "pong slow://h/pong")
            with client(backend, rundir) as ctx, pytest.raises(pyipc.NetworkError) as info:
                ctx.connect("pong", timeout=10)
            assert str(info.value) == ("ipcd could not connect to service pong (timeout): "
                                       "no answer from the slow daemon in 0.5 s "
                                       "(ipcd --request-timeout)")
            fake.release.set()
            fake.threads[0].join(10)
            assert fake.closed_by_ipcd == [True]    # ipcd let go of the daemon too
    finally:
        fake.close()


def test_request_timeout_at_its_bound_serves_every_client(pong, backend, rundir, monkeypatch):
    """--request-timeout at MAX_TIMEOUT (a day): clients after the first are
    served too (at inf, the first's deadline ended ipcd's loop)."""
    with running(Ipcd(rundir=rundir, backend=backend, request_timeout=MAX_TIMEOUT)) as daemon:
        monkeypatch.setenv("IPC_NETWORK", "p pong")
        with client(backend, rundir) as ctx:
            for _ in range(3):
                assert echo_through(ctx, "p") == b"ping p"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as idle:
            idle.connect(os.path.join(rundir, "ipc"))     # its deadline the only timer
            spin_until(lambda: len(daemon._requests) == 1)
            time.sleep(0.2)                               # the loop waits on it
            with client(backend, rundir) as ctx:
                assert echo_through(ctx, "p") == b"ping p"


def test_a_client_that_never_asks_is_answered_at_the_timeout(backend, rundir):
    with running(Ipcd(rundir=rundir, backend=backend, request_timeout=0.3)):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(os.path.join(rundir, "ipc"))
            assert raw_answer(sock) == (
                b"ne timeout no request within 0.3 s (ipcd --request-timeout)", None)
            assert sock.recv(10) == b""             # then closed


def test_a_hung_daemon_does_not_stall_other_requests(pong, backend, rundir, monkeypatch):
    holder: list = []
    holder.append(FakeScheme(rundir, "slow", hang(holder)))
    fake = holder[0]
    try:
        with running(Ipcd(rundir=rundir, backend=backend, request_timeout=30)):
            slow = ask_raw(rundir, b"pong;pong slow://h/pong")
            fake.wait_requests(1)
            monkeypatch.setenv("IPC_NETWORK", "p pong")
            started = time.monotonic()
            with client(backend, rundir) as ctx:
                for _ in range(5):
                    assert echo_through(ctx, "p") == b"ping p"
            assert time.monotonic() - started < 10      # not waiting for the slow one
            slow.close()
    finally:
        fake.close()


def test_max_requests_at_and_past_the_edge(backend, rundir):
    holder: list = []
    holder.append(FakeScheme(rundir, "slow", hang(holder)))
    fake = holder[0]
    try:
        with running(Ipcd(rundir=rundir, backend=backend, max_requests=2)) as daemon:
            first = [ask_raw(rundir, b"pong;pong slow://h/pong") for _ in range(2)]
            fake.wait_requests(2)                   # at the edge: both are served
            spin_until(lambda: daemon.in_flight == 2)
            with ask_raw(rundir, b"pong;pong slow://h/pong") as third:   # past it
                assert raw_answer(third) == (
                    b"ne busy ipcd serves 2 requests at once (--max-requests)", None)
            for sock in first:
                sock.close()                        # those clients give up...
            fake.release.set()
            for t in fake.threads:
                t.join(10)
            spin_until(lambda: daemon.in_flight == 0)   # ...ipcd reads their end
            fake.release.clear()
            with ask_raw(rundir, b"pong;pong slow://h/pong") as again:
                fake.wait_requests(1)               # room again: asked, not refused
                again.settimeout(0.2)
                with pytest.raises(socket.timeout):
                    again.recv(10)
    finally:
        fake.close()


def test_invalid_limits_are_refused(rundir):
    with pytest.raises(ValueError):
        Ipcd(rundir=rundir, request_timeout=0)
    # Past a day (inf, past threading.TIMEOUT_MAX): the loop's wait refused
    # it and ipcd ended at its first client.
    for bad in (MAX_TIMEOUT + 1, 1e10, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="^request_timeout must be > 0 and at most "
                                             "86400 seconds"):
            Ipcd(rundir=rundir, request_timeout=bad)
    with pytest.raises(ValueError):
        Ipcd(rundir=rundir, max_requests=0)


# ------------------------------------------------------------ systemd, CLI

ACTIVATE = """
import os, sys
# argv: the listener's fd, LISTEN_FDNAMES, a file (or "") passed first as fd 3.
import fcntl
fds = [os.open(sys.argv[3], os.O_RDONLY)] if sys.argv[3] else []
fds.append(int(sys.argv[1]))
fds = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in fds]    # none is 3 or 4 then
for at, fd in enumerate(fds, 3):
    os.dup2(fd, at)
os.environ["LISTEN_PID"] = str(os.getpid())
os.environ["LISTEN_FDS"] = str(len(fds))
os.environ["LISTEN_FDNAMES"] = sys.argv[2]
os.execv(sys.executable, [sys.executable, "-m", "pyipc", *sys.argv[4:], "ipcd"])
"""


@pytest.mark.parametrize("names,a_file_first", [
    ("ipc", False),
    ("", False),                        # unnamed
    ("pyipc-ipcd.socket", False),       # systemd's default name: the unit's
    ("other.socket:ipc", True),         # a non-socket fd first: closed, not a crash
])
def test_socket_activation_and_readiness(pong, backend, rundir, tmp_path, monkeypatch,
                                         names, a_file_first):
    """systemd passes the listening `ipc` socket and waits for READY=1; its
    name only orders the fds (ipcd ignored one named after its unit)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(os.path.join(rundir, "ipc"))
    listener.listen(16)
    notify_path = str(tmp_path / "notify")
    passed_inode = os.stat(os.path.join(rundir, "ipc")).st_ino
    activating = ask_raw(rundir, b"p;p pong")     # waits in the passed socket's backlog
    with listener, socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(notify_path)
        notify.settimeout(20)
        proc = subprocess.Popen(
            [sys.executable, "-c", ACTIVATE, str(listener.fileno()), names,
             __file__ if a_file_first else "", "--rundir", rundir,
             "--backend", backend], pass_fds=[listener.fileno()],
            env=dict(CHILD_ENV, NOTIFY_SOCKET=notify_path), stderr=subprocess.PIPE, text=True)
        try:
            assert notify.recv(100) == b"READY=1"
            # The client whose connection started ipcd is served from the
            # passed socket (had ipcd made its own, it would wait forever).
            assert raw_answer(activating)[0] == b"ok"
            assert os.stat(os.path.join(rundir, "ipc")).st_ino == passed_inode
            monkeypatch.setenv("IPC_NETWORK", "p pong")
            with client(backend, rundir) as ctx:
                assert echo_through(ctx, "p") == b"ping p"
            stops_cleanly(proc, notify)
        finally:
            reap(proc)
            activating.close()


def test_cli_serves_and_stops_on_sigterm(pong, backend, rundir, tmp_path, monkeypatch):
    notify_path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(notify_path)
        notify.settimeout(20)
        proc = subprocess.Popen(
            [sys.executable, "-m", "pyipc", "-v", "--rundir", rundir, "--backend", backend,
             "ipcd", "--request-timeout", "3", "--max-requests", "4"],
            env=dict(CHILD_ENV, NOTIFY_SOCKET=notify_path), stderr=subprocess.PIPE, text=True)
        try:
            assert notify.recv(100) == b"READY=1"
            monkeypatch.setenv("IPC_NETWORK", "p pong")
            with client(backend, rundir) as ctx:
                assert echo_through(ctx, "p") == b"ping p"
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=20)
            assert proc.returncode == 0
            assert "ipcd: p -> pong" in err
            assert not os.path.exists(os.path.join(rundir, "ipc"))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=10)


def test_a_service_with_a_full_backlog_is_busy_not_a_stall(ipcd, backend, rundir, monkeypatch):
    """ipcd connects without blocking: a service that accepts nobody and whose
    backlog is full is answered `busy` at once (the loop is not held)."""
    with stuck_service(rundir, "stuck"):
        monkeypatch.setenv("IPC_NETWORK", "s stuck")
        with client(backend, rundir) as ctx, pytest.raises(pyipc.NetworkError) as info:
            ctx.connect("s", timeout=10)
        assert str(info.value) == ("ipcd could not connect to service s (busy): "
                                   "service stuck has a full backlog")
