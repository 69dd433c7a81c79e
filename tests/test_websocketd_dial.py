"""websocketd as the `ws` scheme's daemon: a client on host A reaches `pong`
on host B by name through A's ipcd and websocketd (which dials) and B's
websocketd (which serves), on both backends. Hosts are two run directories
on 127.0.0.1 here; across network namespaces: test_network_tcp.py.
Refusals are answered with their reason: not exposed, not running, nothing
listening, no answer in time, a bad URI."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import socket
import tempfile
import threading
from typing import Iterator, Tuple

import pytest

import pyipc
from pyipc.daemons._netwire import MAX_URI
from pyipc.daemons.ipcd import Ipcd
from pyipc.daemons.websocketd import Options, WebSocketd

from conftest import spin_until
from daemon_harness import Pong, fail_first_offload, frame, read_frame, running


@pytest.fixture
def hosts() -> Iterator[Tuple[str, str]]:
    """Two run directories: host A (the client's) and host B (pong's)."""
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        yield a, b


@contextlib.contextmanager
def host_b(rundir: str, backend: str, **options: object) -> Iterator[WebSocketd]:
    """pong and a websocketd exposing it (and `missing`, not running)."""
    options.setdefault("expose", frozenset({"pong", "missing"}))
    with running(Pong(rundir=rundir, backend=backend)), \
            running(WebSocketd(Options(port=0, **options), rundir=rundir,  # type: ignore[arg-type]
                               backend=backend)) as wsd:
        yield wsd                                                 # type: ignore[misc]


@contextlib.contextmanager
def host_a(rundir: str, backend: str, **options: object) -> Iterator[WebSocketd]:
    """ipcd and a websocketd that dials (it exposes nothing)."""
    with running(Ipcd(rundir=rundir, backend=backend, request_timeout=10)), \
            running(WebSocketd(Options(port=0, **options), rundir=rundir,  # type: ignore[arg-type]
                               backend=backend)) as wsd:
        yield wsd                                                 # type: ignore[misc]


def port_of(wsd: WebSocketd) -> int:
    return int(wsd.addresses[0][1])


def test_a_client_reaches_a_service_on_another_host_by_name(hosts, backend, monkeypatch):
    a, b = hosts
    with host_b(b, backend) as remote, host_a(a, backend):
        monkeypatch.setenv("IPC_NETWORK", f"p ws://127.0.0.1:{port_of(remote)}/pong")
        with pyipc.Context(rundir=a, backend=backend) as ctx:
            fd = ctx.connect("p", timeout=10)
            big = os.urandom(1 << 20)
            messages = [b"", b"ping", big] + [i.to_bytes(4, "big") for i in range(1000)]
            ctx.write_many(fd, messages)
            got = [ctx.read(fd, timeout=10) for _ in messages]
            assert got == messages                    # whole, in order, each once


def test_the_remote_ending_ends_the_clients_connection(hosts, backend, monkeypatch):
    """B's websocketd stops (1001 to A's): the client reads what was sent
    before, then sees the connection closed."""
    a, b = hosts
    with host_a(a, backend):
        with host_b(b, backend) as remote:
            monkeypatch.setenv("IPC_NETWORK", f"p ws://127.0.0.1:{port_of(remote)}/pong")
            ctx = pyipc.Context(rundir=a, backend=backend)
            fd = ctx.connect("p", timeout=10)
            ctx.write(fd, b"last")
            assert ctx.read(fd, timeout=10) == b"last"
        with ctx, pytest.raises(pyipc.ConnectionClosedError):
            ctx.read(fd, timeout=10)


def test_the_client_leaving_ends_the_remote_services_connection(hosts, backend, monkeypatch):
    """The client closes: B's service sees its connection end (A's
    websocketd closed the WebSocket with 1000)."""
    a, b = hosts
    with host_b(b, backend) as remote, host_a(a, backend):
        monkeypatch.setenv("IPC_NETWORK", f"p ws://127.0.0.1:{port_of(remote)}/pong")
        with pyipc.Context(rundir=a, backend=backend) as ctx:
            fd = ctx.connect("p", timeout=10)
            ctx.write(fd, b"hello")
            assert ctx.read(fd, timeout=10) == b"hello"
            assert len(remote.sessions) == 2              # its WebSocket and pong's side
            ctx.close(fd)
        spin_until(lambda: not remote.sessions, timeout=10)   # the remote's own thread


@pytest.mark.parametrize("path, cls, text", [
    ("secret", pyipc.NetworkError, "404 Not Found: no service 'secret' is exposed here"),
    ("missing", pyipc.ServiceNotFoundError, "service 'missing' is not running"),
])
def test_remote_refusals_are_said(hosts, backend, monkeypatch, path, cls, text):
    a, b = hosts
    with host_b(b, backend) as remote, host_a(a, backend):
        monkeypatch.setenv("IPC_NETWORK", f"p ws://127.0.0.1:{port_of(remote)}/{path}")
        with pyipc.Context(rundir=a, backend=backend) as ctx:
            with pytest.raises(cls, match=text):
                ctx.connect("p", timeout=10)


def test_nothing_listening_is_unreachable(hosts, backend, monkeypatch):
    a, _ = hosts
    with socket.socket() as s, host_a(a, backend):
        s.bind(("127.0.0.1", 0))                       # bound, not listening: refused
        monkeypatch.setenv("IPC_NETWORK", f"p ws://127.0.0.1:{s.getsockname()[1]}/pong")
        with pyipc.Context(rundir=a, backend=backend) as ctx:
            with pytest.raises(pyipc.NetworkError, match="unreachable.*Connection refused"):
                ctx.connect("p", timeout=10)


def test_a_remote_that_never_answers_is_a_timeout(hosts, backend):
    """A listener that accepts (in the kernel) and never answers the
    request: the dial is answered at --connect-timeout."""
    a, _ = hosts
    with socket.create_server(("127.0.0.1", 0)) as silent, \
            host_a(a, backend, connect_timeout=0.5):
        uri = f"ws://127.0.0.1:{silent.getsockname()[1]}/pong"
        assert ask_ws(a, uri) == f"ne timeout no answer from {uri} in 0.5 s".encode()


def test_dials_count_against_max_handshakes_at_and_past_the_edge(hosts, backend):
    """max_handshakes 1: one dial is made (the remote sees its connection);
    the next, while it is in progress, is answered busy at once."""
    a, _ = hosts
    with socket.create_server(("127.0.0.1", 0)) as silent, \
            host_a(a, backend, max_handshakes=1, connect_timeout=10):
        uri = f"ws://127.0.0.1:{silent.getsockname()[1]}/pong"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as first:
            first.connect(os.path.join(a, "ws"))
            first.sendall(frame(uri.encode()))
            conn, _ = silent.accept()                  # the first dial, in progress
            with conn:
                assert ask_ws(a, uri) == (b"ne busy websocketd has 1 handshakes in "
                                          b"progress (max_handshakes)")


_WS_BASE = "ws://127.0.0.1:1/"


@pytest.mark.parametrize("uri, text", [
    ("ws://127.0.0.1:1/", b"ne norule bad URI: ws://127.0.0.1:1/: no service name"),
    ("tcp://127.0.0.1:1/pong", b"ne norule bad URI: tcp://127.0.0.1:1/pong: not a ws://"),
    ("ws://127.0.0.1:1/pong?x=1", b"ne norule bad URI: ws://127.0.0.1:1/pong?x=1: no "
                                  b"service name"),
    # At MAX_URI a URI is parsed; past it, refused as ipcd refuses it.
    (_WS_BASE + "x" * (MAX_URI - len(_WS_BASE)), b"ne norule bad URI: service name longer"),
    (_WS_BASE + "x" * (MAX_URI + 1 - len(_WS_BASE)),
     b"ne badrequest a URI of %d bytes; websocketd takes at most %d" % (MAX_URI + 1, MAX_URI)),
])
def test_a_bad_uri_is_answered(hosts, backend, uri, text):
    a, _ = hosts
    with host_a(a, backend):
        assert ask_ws(a, uri).startswith(text)


def test_without_dial_there_is_no_ws_service_and_two_share_a_run_dir(hosts, backend):
    a, _ = hosts
    with running(WebSocketd(Options(port=0, dial=False), rundir=a, backend=backend)):
        assert not os.path.exists(os.path.join(a, "ws"))
        assert not os.path.exists(os.path.join(a, "wss"))
        with running(WebSocketd(Options(port=0), rundir=a, backend=backend)):
            assert os.path.exists(os.path.join(a, "ws"))
            assert os.path.exists(os.path.join(a, "wss"))


@pytest.mark.parametrize("scheme", ["ws", "wss"])
def test_ipcd_names_websocketd_when_the_ws_daemon_is_missing(hosts, backend, monkeypatch,
                                                             scheme):
    a, _ = hosts
    with running(Ipcd(rundir=a, backend=backend, request_timeout=5)):
        monkeypatch.setenv("IPC_NETWORK", f"p {scheme}://127.0.0.1:1/pong")
        with pyipc.Context(rundir=a, backend=backend) as ctx:
            with pytest.raises(pyipc.NetworkError, match="pyipc websocketd, running"):
                ctx.connect("p", timeout=10)


def ask_ws(rundir: str, uri: str, service: str = "ws") -> bytes:
    """Do what ipcd does: send the `ws` (or `wss`) service the framed URI;
    its answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(20)
        sock.connect(os.path.join(rundir, service))
        try:
            sock.sendall(frame(uri.encode()))
        except (BrokenPipeError, ConnectionResetError):
            pass                # refused before it asked (stopping): the answer is there
        return read_frame(sock)


# ------------------------------------------------------------ faults found by review

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


@contextlib.contextmanager
def fake_remote(answer) -> Iterator[int]:
    """A WebSocket 'server' on 127.0.0.1 that reads each request and sends
    answer(request); its port. Connections stay open until the block ends."""
    server = socket.create_server(("127.0.0.1", 0))
    conns: list = []

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            conns.append(conn)
            request = b""
            while b"\r\n\r\n" not in request:
                more = conn.recv(4096)
                if not more:
                    break
                request += more
            conn.sendall(answer(request))
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        server.shutdown(socket.SHUT_RDWR)     # wakes the accept (a close would not)
        server.close()
        thread.join(10)
        for conn in conns:
            conn.close()


def accept_101(request: bytes) -> bytes:
    key = [line.split(b":", 1)[1].strip() for line in request.split(b"\r\n")
           if line.lower().startswith(b"sec-websocket-key")][0]
    accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
    return (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")


def test_an_answer_that_is_not_http_is_said_at_once(hosts, backend):
    """It waited out the whole connect timeout, then blamed a silent remote."""
    a, _ = hosts
    with fake_remote(lambda request: b"garbage\r\n\r\n") as port, \
            host_a(a, backend, connect_timeout=60):
        answer = ask_ws(a, f"ws://127.0.0.1:{port}/pong")
    assert answer.startswith(f"ne refused 127.0.0.1:{port}: not a WebSocket answer: ".encode())


def test_a_remote_that_closes_without_answering_is_unreachable(hosts, backend):
    """A bare close is said as such ('refused ... not a WebSocket answer'
    took it for garbage once answers that are not HTTP were refused)."""
    a, _ = hosts
    with socket.create_server(("127.0.0.1", 0)) as server, host_a(a, backend):
        def close_unanswered() -> None:
            conn, _ = server.accept()
            with conn:
                request = b""
                while b"\r\n\r\n" not in request:
                    request += conn.recv(4096)
        closer = threading.Thread(target=close_unanswered)
        closer.start()
        port = server.getsockname()[1]
        answer = ask_ws(a, f"ws://127.0.0.1:{port}/pong")
        closer.join(10)
    assert answer == (f"ne unreachable 127.0.0.1:{port} closed the connection without "
                      f"answering the WebSocket request").encode()


def test_a_dial_asked_while_stopping_is_refused(hosts, backend):
    """Stopping, websocketd serves on for its WebSockets' close answers (a
    remote that never answers its 1001 holds it CLOSE_TIMEOUT): a dial asked
    meanwhile is refused; it was served, a WebSocket opened after the 1001s."""
    a, _ = hosts
    with fake_remote(accept_101) as silent_closer, fake_remote(accept_101) as other:
        wsd = WebSocketd(Options(port=0), rundir=a, backend=backend)
        with running(wsd):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as first:
                first.connect(os.path.join(a, "ws"))
                first.sendall(frame(f"ws://127.0.0.1:{silent_closer}/pong".encode()))
                assert read_frame(first) == b"ok"
            wsd.stop()
            assert wsd.dialer is not None
            spin_until(lambda: wsd.dialer._stopping)       # in its last CLOSE_TIMEOUT
            assert ask_ws(a, f"ws://127.0.0.1:{other}/pong") == \
                b"ne nodaemon websocketd is stopping"


def test_served_handshakes_count_the_dials_too(hosts, backend):
    """max_handshakes 1 and a dial in progress: a browser's connection is
    answered 503 busy (dials counted against the bound one way only)."""
    a, _ = hosts
    with socket.create_server(("127.0.0.1", 0)) as silent, \
            host_a(a, backend, max_handshakes=1) as wsd:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as first:
            first.connect(os.path.join(a, "ws"))
            first.sendall(frame(f"ws://127.0.0.1:{silent.getsockname()[1]}/pong".encode()))
            conn, _ = silent.accept()                       # the dial, in progress
            with conn, socket.create_connection(("127.0.0.1", port_of(wsd)),
                                                timeout=10) as browser:
                assert browser.recv(100).startswith(b"HTTP/1.1 503 Service Unavailable")


def test_a_hosts_share_comes_back_when_no_worker_can_be_started(hosts, backend):
    """The dial's worker thread cannot start: that dial fails, and the host's
    share of dials is given back (every later dial to it was 'busy')."""
    a, _ = hosts
    wsd = WebSocketd(Options(port=0, max_handshakes_per_host=1, connect_timeout=5),
                     rundir=a, backend=backend)
    fail_first_offload(wsd)
    with socket.socket() as closed, running(wsd):
        closed.bind(("127.0.0.1", 0))                 # bound, not listening: refused
        uri = f"ws://127.0.0.1:{closed.getsockname()[1]}/pong"
        assert ask_ws(a, uri).startswith(b"ne nodaemon ")    # the failed one, answered
        assert ask_ws(a, uri).startswith(b"ne unreachable ")


def _unmasked_binary_frames(messages: list) -> bytes:
    """Server-to-client binary frames (unmasked), one per message."""
    def header(size: int) -> bytes:
        return bytes([0x82, size]) if size < 126 else b"\x82\x7e" + size.to_bytes(2, "big")
    return b"".join(header(len(m)) + m for m in messages)


@pytest.mark.parametrize("size, count, max_buffer, max_message_size", [
    # 200 messages (11 KB): they were dropped, the client told ok, then its
    # socket ended.
    (50, 200, 1000, 100),
    # 20 x 900 bytes take the queue over its byte bound before a mark
    # (credit.py) was due: 14 of them waited in websocketd for good (no
    # MESSAGE_TX was to come).
    (900, 20, 4096, 1000),
])
def test_frames_with_the_remotes_101_past_the_queue_bound_all_reach_the_client(
        hosts, backend, monkeypatch, size, count, max_buffer, max_message_size):
    """Messages that came in one segment with the remote's 101, more than
    websocketd's queue toward ipcd's client takes at once, reach the client
    as its queue drains, all, in order."""
    a, _ = hosts
    sent = [b"%03d" % i + b"x" * (size - 3) for i in range(count)]
    frames = _unmasked_binary_frames(sent)
    with fake_remote(lambda request: accept_101(request) + frames) as port, \
            host_a(a, backend, max_buffer=max_buffer, max_message_size=max_message_size):
        monkeypatch.setenv("IPC_NETWORK", f"p ws://127.0.0.1:{port}/pong")
        with pyipc.Context(rundir=a, backend=backend) as ctx:
            fd = ctx.connect("p", timeout=10)
            assert [ctx.read(fd, timeout=10) for _ in sent] == sent


def test_a_ping_from_a_remote_behind_on_its_reading_is_answered_and_loses_nothing(
        hosts, backend, monkeypatch):
    """The remote reads slower than the local client writes (websocketd's
    queue toward it at its bound: backpressure) and pings, as `websockets`
    servers do every 20 s. The pong waits for room: every message reaches
    the remote, in order, and the pong. The WebSocket ended with no close
    frame (a third of the messages lost, the client's write failed)."""
    from websockets.frames import Frame, Opcode
    from websockets.protocol import State
    from websockets.server import ServerProtocol

    from wsd_helpers import ClientQueueWatch, Flood

    a, _ = hosts
    watch = ClientQueueWatch(monkeypatch)
    flood = Flood(64, 256 * 1024)          # 16 MiB: past the bound and the socket buffers
    with socket.create_server(("127.0.0.1", 0)) as server, \
            host_a(a, backend, max_buffer=1 << 20, max_message_size=1 << 20) as wsd:
        watch.daemon = wsd
        monkeypatch.setenv("IPC_NETWORK", f"p ws://127.0.0.1:{server.getsockname()[1]}/pong")
        failures: list = []

        def local_client() -> None:
            try:
                with pyipc.Context(rundir=a, backend=backend) as ctx:
                    fd = ctx.connect("p", timeout=10)
                    for i in range(flood.count):
                        ctx.write(fd, flood.message(i), timeout=10)
                    ctx.read(fd, timeout=10)          # held open until the remote ends
            except pyipc.IPCError as e:
                failures.append(e)
        writer = threading.Thread(target=local_client)
        writer.start()
        conn, _ = server.accept()
        with conn:
            conn.settimeout(10)
            request = b""
            while b"\r\n\r\n" not in request:
                request += conn.recv(4096)
            conn.sendall(accept_101(request))
            assert watch.over.wait(10)
            conn.sendall(b"\x89\x04ping")                 # unmasked: from the server side
            remote = ServerProtocol(state=State.OPEN)
            frames: list = []
            while sum(f.opcode is Opcode.BINARY for f in frames) < flood.count:
                data = conn.recv(65536)
                assert data, (f"ended after {len(frames)} frames",
                              [(f.opcode.name, len(f.data)) for f in frames], failures)
                remote.receive_data(data)
                frames += [e for e in remote.events_received() if isinstance(e, Frame)]
            assert [f.data for f in frames if f.opcode is Opcode.BINARY] == \
                [flood.message(i) for i in range(flood.count)]
            assert [f.data for f in frames if f.opcode is Opcode.PONG] == [b"ping"]
        writer.join(15)
        assert not failures or isinstance(failures[0], pyipc.ConnectionClosedError), failures
