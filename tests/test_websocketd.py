"""websocketd's WebSocket side with a standard client (the `websockets`
package), on both backends: messages both ways (binary, text, fragmented,
bursts), pings, the size bound (1009), every way a connection ends and its
close code, data sent along with the handshake, wss://, backpressure toward a
slow client; and the command line (clean stop on SIGTERM, socket activation)."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import struct
import ssl
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

import trustme  # a test dependency (pyproject's test extra): missing, the run fails

from websockets.client import ClientProtocol  # noqa: E402
from websockets.exceptions import ConnectionClosed, InvalidMessage  # noqa: E402
from websockets.frames import Frame, Opcode  # noqa: E402
from websockets.http11 import Response  # noqa: E402
from websockets.protocol import State  # noqa: E402
from websockets.sync.client import connect  # noqa: E402
from websockets.uri import parse_uri  # noqa: E402

import pyipc  # noqa: E402
from pyipc import EventType  # noqa: E402

from conftest import CHILD_ENV, spin_until, wait_for  # noqa: E402
from wsd_helpers import (ClientQueueWatch, DaemonThread, Flood, ServiceThread,  # noqa: E402
                         sink)

KIB = 1024
MIB = 1024 * KIB


@pytest.fixture
def start(backend, rundir):
    """start(daemon options...) -> DaemonThread; service(name, handle) -> ServiceThread."""
    threads = []

    class Starter:
        def daemon(self, **options):
            options.setdefault("expose", frozenset({"echo", "sink"}))
            d = DaemonThread(rundir, backend, **options)
            threads.append(d)
            return d

        def service(self, name="echo", handle=None, **limits):
            s = ServiceThread(rundir, backend, name, handle, **limits)
            threads.append(s)
            return s

    yield Starter()
    for t in reversed(threads):
        t.stop()


def closed_by_server(ws):
    """The close frame the server sent (code, reason), once the client sees it."""
    with pytest.raises(ConnectionClosed):
        while True:
            ws.recv(timeout=10)
    return ws.protocol.close_rcvd.code, ws.protocol.close_rcvd.reason


def disconnected(service):
    return service.wait_for(lambda evs: any(e.type == EventType.DISCONNECTION for e in evs))


# ------------------------------------------------------------ messages

@pytest.mark.parametrize("size", [0, KIB, MIB])
def test_binary_messages_echo(start, size):
    start.service()
    d = start.daemon()
    payload = os.urandom(size)
    with connect(d.url("/echo"), max_size=2 * MIB, open_timeout=10) as ws:
        ws.send(payload)
        assert ws.recv(timeout=10) == payload


@pytest.mark.parametrize("size", [0, KIB, MIB])
def test_text_message_is_its_utf8_bytes_and_comes_back_binary(start, size):
    service = start.service()
    d = start.daemon()
    text = ("é" * size)[:size // 2] if size else ""
    with connect(d.url("/echo"), max_size=2 * MIB, open_timeout=10) as ws:
        ws.send(text)
        answer = ws.recv(timeout=10)
    assert isinstance(answer, bytes) and answer == text.encode()
    assert service.messages() == [text.encode()]


def test_fragmented_message_is_one_pyipc_message(start):
    service = start.service()
    d = start.daemon()
    parts = [b"frag", b"", b"mented", os.urandom(70 * KIB)]
    with connect(d.url("/echo"), open_timeout=10) as ws:
        ws.send(iter(parts))                 # one message in four frames
        ws.send([ "tex", "t"])               # a fragmented text message
        assert ws.recv(timeout=10) == b"".join(parts)
        assert ws.recv(timeout=10) == b"text"
    assert service.messages() == [b"".join(parts), b"text"]


def test_a_burst_of_messages_arrives_whole_and_in_order(start):
    # Many frames per read: on_in hands them over one by one (CBEvent.MORE).
    service = start.service()
    d = start.daemon()
    sent = [i.to_bytes(4, "big") * (i % 300) for i in range(3000)]
    with connect(d.url("/echo"), open_timeout=10) as ws:
        for m in sent:
            ws.send(m)
        got = [ws.recv(timeout=10) for _ in sent]
    assert got == sent
    assert service.messages() == sent


def test_messages_from_the_service_go_to_the_client(start):
    # The service speaks first and sends several messages in one write.
    def greet(ctx, ev):
        if ev.type == EventType.CONNECTION:
            ctx.write_many(ev.fd, [b"hello", b"", b"x" * 100_000])
    start.service("sink", greet)
    d = start.daemon()
    with connect(d.url("/sink"), open_timeout=10) as ws:
        assert [ws.recv(timeout=10) for _ in range(3)] == [b"hello", b"", b"x" * 100_000]


def test_ping_is_answered_with_pong(start):
    start.service()
    d = start.daemon()
    with connect(d.url("/echo"), open_timeout=10) as ws:
        assert ws.ping(b"are you there").wait(10)
        ws.send(b"still here")
        assert ws.recv(timeout=10) == b"still here"


# ------------------------------------------------------------ the size bound

def test_message_at_max_message_size_passes_one_past_is_1009(start):
    service = start.service()
    d = start.daemon(max_message_size=64 * KIB)
    with connect(d.url("/echo"), max_size=MIB, open_timeout=10) as ws:
        ws.send(b"a" * (64 * KIB))
        assert ws.recv(timeout=10) == b"a" * (64 * KIB)
        ws.send(b"b" * (64 * KIB + 1))
        assert closed_by_server(ws) == (1009, "frame with 65537 bytes exceeds limit of 65536 bytes")
    disconnected(service)
    assert service.messages() == [b"a" * (64 * KIB)]


def test_fragmented_message_over_the_bound_is_1009(start):
    service = start.service()
    d = start.daemon(max_message_size=64 * KIB)
    with connect(d.url("/echo"), open_timeout=10) as ws:
        # The 1009 may come before the client sent its last (empty) fragment:
        # then send() itself meets the close.
        with contextlib.suppress(ConnectionClosed):
            ws.send(iter([b"c" * (40 * KIB), b"c" * (40 * KIB)]))
        code, _ = closed_by_server(ws)
    assert code == 1009
    disconnected(service)
    assert service.messages() == []


def test_a_client_message_far_over_the_bound_is_told_1009(start):
    """--max-message-size 1 MiB, a standard client sends 8 MB, 8 times: each
    time it reads the 1009. websocketd closed the socket at the first bytes
    after the failure, the rest of the message unread: a reset, which the
    client often met before it read the close frame (1006 instead)."""
    start.service()
    d = start.daemon(max_message_size=MIB)
    codes = []
    for _ in range(8):
        with connect(d.url("/echo"), max_size=None, open_timeout=10) as ws:
            with pytest.raises(ConnectionClosed) as closed:
                ws.send(b"x" * 8_000_000)
                ws.recv(timeout=10)
            codes.append(closed.value.rcvd.code if closed.value.rcvd else None)
    assert codes == [1009] * 8


def _start_oversize_until_1009(s: socket.socket, client: ClientProtocol) -> None:
    """Send the first 64 KiB of a masked binary frame announcing 8 MB, then
    read websocketd's 1009 close frame and, right after it, its FIN."""
    s.sendall(b"\x82\xff" + struct.pack(">Q", 8_000_000) + b"\0" * 4 + b"x" * 65536)
    while client.close_rcvd is None:
        data = s.recv(65536)
        assert data, "the end before the close frame"
        client.receive_data(data)
    assert client.close_rcvd.code == 1009
    assert s.recv(65536) == b""                     # its FIN right after the close frame


def test_after_a_1009_the_clients_input_is_read_to_its_end(start):
    """A lingering close: after the 1009, websocketd half-closes (the client
    reads the close frame, then the end) and reads what the client still
    sends, until the client's own end; never a reset."""
    start.service()
    d = start.daemon(max_message_size=MIB)
    with socket.create_connection(("127.0.0.1", d.port), timeout=10) as s:
        _start_oversize_until_1009(s, handshake(s, d.url("/echo")))
        s.sendall(b"x" * (2 * MIB))                 # the rest of the message: read, no reset
        s.shutdown(socket.SHUT_WR)
        s.settimeout(5)
        assert s.recv(65536) == b""                 # (ConnectionResetError without it)


def test_after_a_1009_a_client_that_never_ends_is_closed_at_close_timeout(start,
                                                                         monkeypatch):
    """The lingering close is bounded: a client that neither ends nor stops
    sending has its socket closed CLOSE_TIMEOUT after the 1009."""
    from pyipc.daemons.websocketd import daemon as daemon_module
    monkeypatch.setattr(daemon_module, "CLOSE_TIMEOUT", 1.0)
    start.service()
    d = start.daemon(max_message_size=MIB)
    with socket.create_connection(("127.0.0.1", d.port), timeout=10) as s:
        _start_oversize_until_1009(s, handshake(s, d.url("/echo")))
        assert d.daemon.lingering                   # still reading it
        s.sendall(b"x" * 65536)
        spin_until(lambda: not d.daemon.lingering, timeout=5)


def test_invalid_utf8_in_a_text_message_is_1007(start):
    service = start.service()
    d = start.daemon()
    with socket.create_connection(("127.0.0.1", d.port), timeout=10) as s:
        client = handshake(s, d.url("/echo"))
        client.send_text(b"\xff\xfe not UTF-8")
        s.sendall(b"".join(client.data_to_send()))
        frames = read_frames(s, client)
    assert frames[-1].opcode is Opcode.CLOSE and frames[-1].data[:2] == (1007).to_bytes(2, "big")
    disconnected(service)
    assert service.messages() == []


# ------------------------------------------------------------ how connections end

def test_client_close_disconnects_from_the_service(start):
    service = start.service()
    d = start.daemon()
    with connect(d.url("/echo"), open_timeout=10) as ws:
        ws.send(b"last words")
        ws.close()          # close handshake: returns once the server answered
        assert ws.protocol.close_rcvd.code == 1000
    events = disconnected(service)
    assert service.messages() == [b"last words"]
    assert [e.type for e in events][-1] == EventType.DISCONNECTION


def test_client_vanishing_without_close_frame_disconnects_too(start):
    service = start.service()
    d = start.daemon()
    with socket.create_connection(("127.0.0.1", d.port), timeout=10) as s:
        client = handshake(s, d.url("/echo"))
        client.send_binary(b"then gone")
        s.sendall(b"".join(client.data_to_send()))
    disconnected(service)
    assert service.messages() == [b"then gone"]


def test_service_closing_the_connection_closes_with_1000(start):
    def answer_then_hang_up(ctx, ev):
        if ev.type == EventType.MESSAGE_RX:
            ctx.write(ev.fd, b"bye " + ev.message)
            ctx.close(ev.fd)
    start.service("sink", answer_then_hang_up)
    d = start.daemon()
    with connect(d.url("/sink"), open_timeout=10) as ws:
        ws.send(b"alice")
        assert ws.recv(timeout=10) == b"bye alice"       # sent before the close: not lost
        assert closed_by_server(ws) == (1000, "the service closed the connection")


def test_service_closing_while_the_client_sends_still_closes_with_1000(start):
    """The service answers and hangs up while the client is still sending:
    websocketd's next write to it fails (EPIPE). Its last message and the
    close frame still reach the client (the core dropped the service's side
    without letting the session read it: no message, no close frame, 1006)."""
    def last_word(ctx, ev):
        if ev.type == EventType.MESSAGE_RX and ev.message == b"bye":
            ctx.write(ev.fd, b"last")
            ctx.close(ev.fd)
    start.service("sink", last_word)
    d = start.daemon()
    with connect(d.url("/sink"), open_timeout=10) as ws:
        ws.send(b"bye")
        for _ in range(200):
            try:
                ws.send(b"m" * 100)
            except ConnectionClosed:    # the close came: it takes no more
                break
        assert ws.recv(timeout=10) == b"last"
        assert closed_by_server(ws) == (1000, "the service closed the connection")


def test_client_that_never_answers_our_close_is_cut_after_close_timeout(start):
    # The service hangs up; the client gets the close frame, does not answer,
    # and websocketd closes the TCP connection CLOSE_TIMEOUT (2 s) later.
    def hang_up(ctx, ev):
        if ev.type == EventType.MESSAGE_RX:
            ctx.close(ev.fd)
    start.service("sink", hang_up)
    d = start.daemon()
    with socket.create_connection(("127.0.0.1", d.port), timeout=10) as s:
        client = handshake(s, d.url("/sink"))
        client.send_binary(b"bye")
        s.sendall(b"".join(client.data_to_send()))
        frames = []
        while True:                       # read, never answer
            data = s.recv(65536)
            if not data:
                break
            client.receive_data(data)
            frames += [e for e in client.events_received() if isinstance(e, Frame)]
    assert [(f.opcode, f.data[:2]) for f in frames] == [(Opcode.CLOSE, b"\x03\xe8")]


def test_service_stopping_closes_with_1000(start):
    service = start.service()
    d = start.daemon()
    with connect(d.url("/echo"), open_timeout=10) as ws:
        ws.send(b"x")
        assert ws.recv(timeout=10) == b"x"
        service.stop()
        assert closed_by_server(ws) == (1000, "the service closed the connection")


def test_daemon_stopping_waits_for_the_clients_close_answer(start):
    """Stopping, websocketd sends 1001 and waits (CLOSE_TIMEOUT at most) for
    the client's answering close frame before it closes the TCP connection:
    a clean close (browsers said wasClean false: the answer reached a closed
    socket, which answered with a reset)."""
    start.service()
    d = start.daemon()
    with socket.create_connection(("127.0.0.1", d.port), timeout=10) as s:
        client = handshake(s, d.url("/echo"))
        client.send_binary(b"x")
        s.sendall(b"".join(client.data_to_send()))
        echoed: list = []
        while not echoed:                       # the echo first: then nothing is in flight
            client.receive_data(s.recv(65536))
            echoed = [e for e in client.events_received() if isinstance(e, Frame)]
        d.daemon.stop()
        frames = echoed + read_frames(s, client)    # answers the close, then reads to EOF
    d.thread.join(10)
    assert [(f.opcode, f.data[:2]) for f in frames] == [
        (Opcode.BINARY, b"x"), (Opcode.CLOSE, b"\x03\xe9")]
    assert client.close_rcvd.code == 1001 and client.close_sent.code == 1001


def test_daemon_stopping_takes_no_new_client_and_does_not_spin(start):
    """While it waits for close answers, websocketd no longer listens: a
    client in the backlog is refused (its connection reset or closed), not
    left to make each wait return at once (100% CPU for CLOSE_TIMEOUT)."""
    import resource
    start.service()
    d = start.daemon()
    with socket.create_connection(("127.0.0.1", d.port), timeout=10) as s:
        handshake(s, d.url("/echo"))                # open, and never answers a close
        late = socket.create_connection(("127.0.0.1", d.port), timeout=10)
        before = resource.getrusage(resource.RUSAGE_SELF)
        d.daemon.stop()
        d.thread.join(10)
        after = resource.getrusage(resource.RUSAGE_SELF)
    with late:
        try:
            assert late.recv(100) == b""
        except ConnectionResetError:
            pass
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert cpu < 1.0, f"{cpu:.2f} s of CPU while waiting CLOSE_TIMEOUT (2 s)"


def test_daemon_stopping_closes_with_1001(start):
    service = start.service()
    d = start.daemon()
    with connect(d.url("/echo"), open_timeout=10) as ws:
        ws.send(b"x")
        assert ws.recv(timeout=10) == b"x"
        d.stop()
        assert closed_by_server(ws) == (1001, "websocketd is stopping")
    disconnected(service)


# ------------------------------------------------------------ the handshake's bytes

def handshake(sock, url):
    """Open a WebSocket over sock with websockets' sans-I/O client; return it."""
    client = ClientProtocol(parse_uri(url))
    client.send_request(client.connect())
    sock.sendall(b"".join(client.data_to_send()))
    while not any(isinstance(e, Response) for e in client.events_received()):
        client.receive_data(sock.recv(65536))
    return client


def read_frames(sock, client):
    """Frames the server sends until it closes the connection (a close frame
    is answered, as a client must)."""
    frames = []
    while True:
        data = sock.recv(65536)
        if not data:
            client.receive_eof()
        else:
            client.receive_data(data)
        frames += [e for e in client.events_received() if isinstance(e, Frame)]
        answer = b"".join(client.data_to_send())
        if answer:
            sock.sendall(answer)
        if not data:
            return frames


def test_frames_sent_with_the_request_are_not_lost(start):
    # RFC 6455 says a client waits for the 101; one that does not still
    # loses nothing.
    service = start.service()
    d = start.daemon()
    client = ClientProtocol(parse_uri(d.url("/echo")))
    client.send_request(client.connect())
    request = b"".join(client.data_to_send())
    # Frames can only be made once open: a second protocol object makes them.
    early = ClientProtocol(parse_uri(d.url("/echo")), state=State.OPEN)
    for m in (b"one", b"two"):
        early.send_binary(m)
    with socket.create_connection(("127.0.0.1", d.port), timeout=10) as s:
        s.sendall(request + b"".join(early.data_to_send()))    # all in one segment
        echoed = []
        while len(echoed) < 2:
            client.receive_data(s.recv(65536))
            echoed += [e.data for e in client.events_received() if isinstance(e, Frame)]
    assert echoed == [b"one", b"two"]
    assert service.messages() == [b"one", b"two"]


def _request_with_messages(url: str, messages: list, close_too: bool = False
                           ) -> tuple[ClientProtocol, bytes]:
    """A client of `url` and the bytes of its WebSocket request followed by
    `messages` (and a close frame): all sent before any answer."""
    client = ClientProtocol(parse_uri(url))
    client.send_request(client.connect())
    request = b"".join(client.data_to_send())
    early = ClientProtocol(parse_uri(url), state=State.OPEN)
    for m in messages:
        early.send_binary(m)
    if close_too:
        early.send_close(1000, "done")
    return client, request + b"".join(early.data_to_send())


@pytest.mark.parametrize("close_too", [False, True])
def test_frames_with_the_request_past_the_queue_bound_all_reach_the_service(start,
                                                                            close_too):
    """--max-buffer 1000: 200 messages (11 KB) sent along with the request
    go to the service as its queue drains (back-pressure), in order, then a
    close frame sent with them is answered (after it no echo is sent: the
    client is closing). They were dropped: 101, then a bare TCP close (the
    first that did not fit made it fail)."""
    service = start.service()
    d = start.daemon(max_buffer=1000, max_message_size=100)
    sent = [b"%03d" % i + b"x" * 47 for i in range(200)]
    client, opening = _request_with_messages(d.url("/echo"), sent, close_too)
    with socket.create_connection(("127.0.0.1", d.port), timeout=10) as s:
        s.sendall(opening)                                     # all in one segment
        if close_too:       # (`client` does not know `early` closed: it is not answered)
            while client.close_rcvd is None:
                data = s.recv(65536)
                assert data, "closed without a close frame"
                client.receive_data(data)
            assert client.close_rcvd.code == 1000
        else:
            echoed: list = []
            while len(echoed) < len(sent):
                data = s.recv(65536)
                assert data, f"closed after {len(echoed)} echoes"
                client.receive_data(data)
                echoed += [e.data for e in client.events_received() if isinstance(e, Frame)]
            assert echoed == sent
    service.wait_for(lambda evs: len([e for e in evs if e.type == EventType.MESSAGE_RX])
                     == len(sent))
    assert service.messages() == sent


@pytest.mark.parametrize("size, count", [(900, 20), (1000, 12)])
def test_frames_with_the_request_past_the_byte_bound_before_a_mark_all_reach_the_service(
        start, size, count):
    """--max-buffer 4096 --max-message-size 1000 (a mark every 8 messages by
    count): messages of 900 bytes, and of the size bound itself, sent with
    the request take the service's queue over its byte bound before a mark
    was due. All are echoed, in order; the rest waited in the session for
    good (6 of 20 echoed: no MESSAGE_TX was to come to hand them over)."""
    service = start.service()
    d = start.daemon(max_buffer=4096, max_message_size=1000)
    sent = [b"%04d" % i + b"x" * (size - 4) for i in range(count)]
    client, opening = _request_with_messages(d.url("/echo"), sent)
    with socket.create_connection(("127.0.0.1", d.port), timeout=5) as s:
        s.sendall(opening)                                     # all in one segment
        echoed: list = []
        while len(echoed) < len(sent):
            data = s.recv(65536)        # (a hang is socket.timeout)
            assert data, f"closed after {len(echoed)} echoes"
            client.receive_data(data)
            echoed += [e.data for e in client.events_received() if isinstance(e, Frame)]
    assert echoed == sent
    assert service.messages() == sent


def test_bytes_that_are_not_http_close_the_connection_with_400(start):
    d = start.daemon()
    with socket.create_connection(("127.0.0.1", d.port), timeout=10) as s:
        s.sendall(b"\x00\x01\x02\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 400")


# ------------------------------------------------------------ wss://

@pytest.fixture(scope="module")
def certificates():
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return server, client


def test_wss_echo(start, certificates):
    server, client = certificates
    start.service()
    d = start.daemon(ssl_context=server)
    assert d.url("/echo").startswith("wss://")
    with connect(d.url("/echo"), ssl=client, max_size=2 * MIB, open_timeout=10) as ws:
        for size in (0, KIB, MIB):
            payload = os.urandom(size)
            ws.send(payload)
            assert ws.recv(timeout=10) == payload
        assert ws.ping(b"p").wait(10)


def test_wss_serves_the_static_files_over_https(start, certificates):
    server, client = certificates
    d = start.daemon(ssl_context=server)
    url = f"https://127.0.0.1:{d.port}/pyipc.js"
    with urllib.request.urlopen(url, context=client, timeout=10) as r:
        assert r.status == 200 and b"root.pyipc = {" in r.read()


def test_wss_refuses_plain_http_and_untrusted_clients_see_tls_errors(start, certificates):
    server, _ = certificates
    start.service()
    d = start.daemon(ssl_context=server)
    with pytest.raises((InvalidMessage, ConnectionError, OSError)):
        connect(f"ws://127.0.0.1:{d.port}/echo", open_timeout=10)
    with pytest.raises(ssl.SSLCertVerificationError):
        connect(d.url("/echo"), ssl=ssl.create_default_context(), open_timeout=10)


def _masked_binary(payload: bytes) -> bytes:
    mask = b"\x01\x02\x03\x04"
    return bytes([0x82, 0x80 | len(payload)]) + mask + \
        bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def test_wss_a_client_ending_tls_along_with_its_request_is_ended(start, certificates):
    """Request, a message and close_notify in one segment, TCP kept open:
    the service gets the message, then its connection ends, and websocketd
    closes the client's socket (the WebSocket stayed open for good: TLS's
    end was noted by the handshake and passed to no one)."""
    server, client = certificates
    echo = start.service()
    d = start.daemon(ssl_context=server)
    with socket.create_connection(("127.0.0.1", d.port), timeout=10) as sock:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = client.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                sock.sendall(outgoing.read())
                incoming.write(sock.recv(65536))
        tls.write(b"GET /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                  b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                  b"Sec-WebSocket-Version: 13\r\n\r\n" + _masked_binary(b"hello"))
        with contextlib.suppress(ssl.SSLWantReadError):
            tls.unwrap()
        sock.sendall(outgoing.read())                   # all of it in one segment
        while sock.recv(65536):                         # until websocketd closes
            pass
    events = disconnected(echo)
    assert [e.message for e in events if e.type == EventType.MESSAGE_RX] == [b"hello"]


def test_wss_daemon_stop_closes_with_1001(start, certificates):
    server, client = certificates
    start.service()
    d = start.daemon(ssl_context=server)
    with connect(d.url("/echo"), ssl=client, open_timeout=10) as ws:
        ws.send(b"x")
        assert ws.recv(timeout=10) == b"x"
        d.stop()
        assert closed_by_server(ws)[0] == 1001


# ------------------------------------------------------------ backpressure

def test_slow_client_gets_backpressure_not_unbounded_buffering(start):
    """The service sends 64 KiB messages as fast as pyipc lets it to a client
    that does not read. The daemon holds at most its bound (256 KiB + one
    message) for the client, then stops reading the service: the service's
    own queue fills (QueueFullError) after a bounded amount. Then the client
    reads everything: all of it, in order."""
    chunk = 64 * KIB
    sent = []
    full = threading.Event()

    def flood(ctx, ev):
        if ev.type in (EventType.CONNECTION, EventType.MESSAGE_TX) and not full.is_set():
            try:
                while True:
                    ctx.schedule(ev.fd, len(sent).to_bytes(4, "big") * (chunk // 4))
                    sent.append(len(sent))
            except pyipc.QueueFullError:
                full.set()

    start.service("sink", flood, max_message_size=chunk, max_queue_size=chunk + 4)
    d = start.daemon(max_message_size=chunk, max_buffer=4 * chunk)
    with connect(d.url("/sink"), max_size=MIB, open_timeout=10) as ws:
        assert full.wait(10)
        # Socket buffers (service->daemon, daemon->client) plus the daemon's
        # bound: far below what an unbounded relay would have taken.
        assert len(sent) * chunk < 32 * MIB, len(sent)
        got = 0
        while got < len(sent):
            m = ws.recv(timeout=10)
            assert m == got.to_bytes(4, "big") * (chunk // 4)
            got += 1


def behind(start, monkeypatch):
    """A client whose queue in websocketd is over its bound (1 MiB + 4) as it
    does not read; its service (`Flood`) has more to send. The socket, its
    client protocol and the Flood."""
    watch = ClientQueueWatch(monkeypatch)
    flood = Flood(64, 256 * KIB)
    start.service("sink", flood, max_message_size=256 * KIB)
    d = start.daemon(max_message_size=MIB, max_buffer=MIB)
    watch.daemon = d.daemon
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    s.settimeout(10)
    s.connect(("127.0.0.1", d.port))
    client = handshake(s, d.url("/sink"))
    assert watch.over.wait(10)
    return d, s, client, flood


def test_a_session_forgotten_with_replies_owed_does_nothing_more(start, monkeypatch):
    """A client behind on its reading closes (its close echo is owed, the end
    waits for it), then vanishes (a reset): the session is forgotten at the
    DISCONNECTION. Its retry timer, still set, ended the session's old fds
    (a dup for lingering, switch_end) and sent them the owed bytes: by then
    those numbers may be the next client's."""
    from pyipc.daemons.websocketd import daemon as daemon_module
    from pyipc.daemons.websocketd import session as session_module
    late, paid = [], threading.Event()
    linger, pay = daemon_module.WebSocketd._linger, session_module.Session._pay

    def spied_linger(self, session, fd):
        if self.sessions.get(session.fd) is not session:
            late.append((session.fd, fd))
        return linger(self, session, fd)

    def spied_pay(self):
        pay(self)
        if self._ended:
            paid.set()
    monkeypatch.setattr(daemon_module.WebSocketd, "_linger", spied_linger)
    monkeypatch.setattr(session_module.Session, "_pay", spied_pay)
    d, s, client, _ = behind(start, monkeypatch)
    client.send_close(1000, "bye")
    s.sendall(b"".join(client.data_to_send()))
    spin_until(lambda: any(x._end_after for x in d.daemon.sessions.values()), timeout=5)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()                                          # a reset
    spin_until(lambda: not d.daemon.sessions, timeout=5)
    assert paid.wait(5)                                # the timer ran, after the end
    assert late == []


def read_until(s, client, done):
    """Frames (data, pongs, close) read until done(frames); a close frame is
    answered. Fails at the end of the connection before."""
    frames = []
    while not done(frames):
        data = s.recv(65536)
        assert data, f"ended after {len(frames)} frames, no close frame" \
            if not any(f.opcode is Opcode.CLOSE for f in frames) else "ended"
        client.receive_data(data)
        frames += [e for e in client.events_received() if isinstance(e, Frame)]
        s.sendall(b"".join(client.data_to_send()))
    return frames


def test_a_ping_from_a_client_behind_on_its_reading_is_answered_and_loses_nothing(
        start, monkeypatch):
    """A client reads slower than its service writes (its queue at the
    bound: backpressure) and pings (a keepalive). The pong waits for room:
    every message arrives, in order, then the pong. The pong was refused and
    the WebSocket ended with no close frame, the messages queued lost."""
    d, s, client, flood = behind(start, monkeypatch)
    with s:
        client.send_ping(b"keepalive")
        s.sendall(b"".join(client.data_to_send()))
        frames = read_until(s, client, lambda fs: sum(f.opcode is Opcode.BINARY
                                                      for f in fs) == flood.count)
        data = [f.data for f in frames if f.opcode is Opcode.BINARY]
        assert data == [flood.message(i) for i in range(flood.count)]
        assert [f.data for f in frames if f.opcode is Opcode.PONG] == [b"keepalive"]


def test_a_close_from_a_client_behind_on_its_reading_is_answered(start, monkeypatch):
    """Its close frame is echoed (after what was queued for it), not dropped
    with the WebSocket ended bare."""
    d, s, client, flood = behind(start, monkeypatch)
    with s:
        client.send_close(1000, "bye")
        s.sendall(b"".join(client.data_to_send()))
        frames = read_until(s, client, lambda fs: client.close_rcvd is not None)
        data = [f.data for f in frames if f.opcode is Opcode.BINARY]
        assert data == [flood.message(i) for i in range(len(data))]
        assert client.close_rcvd.code == 1000


def test_stopping_with_a_client_behind_on_its_reading_sends_1001_after_its_messages(
        start, monkeypatch):
    """The daemon stops while a client's queue is at its bound: the 1001 goes
    after what is queued for the client, which reads it all (it got the
    messages and a bare TCP close)."""
    d, s, client, flood = behind(start, monkeypatch)
    with s:
        d.daemon.stop()
        frames = read_until(s, client, lambda fs: client.close_rcvd is not None)
        data = [f.data for f in frames if f.opcode is Opcode.BINARY]
        assert data == [flood.message(i) for i in range(len(data))]
        assert (client.close_rcvd.code, client.close_rcvd.reason) == \
            (1001, "websocketd is stopping")


def test_an_end_whose_close_frame_never_fits_is_cut_after_flush_timeout(start, monkeypatch,
                                                                       caplog):
    """The client closes while behind on its reading, and then never reads:
    the echo of its close waits for room FLUSH_TIMEOUT at most, then the
    WebSocket ends without it (both its connections closed)."""
    from pyipc.daemons.websocketd import daemon as daemon_module
    monkeypatch.setattr(daemon_module, "FLUSH_TIMEOUT", 0.5)
    d, s, client, flood = behind(start, monkeypatch)
    with s, caplog.at_level("INFO", logger="pyipc.daemons.websocketd"):
        client.send_close(1000, "bye")
        s.sendall(b"".join(client.data_to_send()))
        spin_until(lambda: "closed without our close frame" in caplog.text, timeout=5)
        spin_until(lambda: not d.daemon.sessions, timeout=5)


def test_pings_from_a_client_that_does_not_read_are_bounded_then_all_answered(
        start, monkeypatch):
    """A client behind on its reading floods pings: websocketd owes one
    read's pongs at most, then stops reading it (the pings wait in the
    kernel: the client's sends stop). Once the client reads, every ping is
    answered, in order, after the messages."""
    d, s, client, flood = behind(start, monkeypatch)
    with s:
        s.setblocking(False)
        ping = b"\x89\xfd\0\0\0\0" + b"p" * 125          # masked (zero key), 125 bytes
        cap, pings, rest = (64 * MIB) // len(ping), 0, b""
        with contextlib.suppress(BlockingIOError):
            while pings < cap and not rest:
                rest = ping[s.send(ping):]
                pings += 1
        assert pings < cap, pings                          # stopped: not read
        s.settimeout(10)
        # The end of a ping the kernel took in part, sent as websocketd reads.
        finish = threading.Thread(target=s.sendall, args=(rest,))
        finish.start()
        frames = read_until(s, client, lambda fs: sum(f.opcode is Opcode.PONG
                                                      for f in fs) == pings
                            and sum(f.opcode is Opcode.BINARY for f in fs) == flood.count)
        finish.join(10)
        data = [f.data for f in frames if f.opcode is Opcode.BINARY]
        assert data == [flood.message(i) for i in range(flood.count)]
        assert [f.data for f in frames if f.opcode is Opcode.PONG] == [b"p" * 125] * pings


def test_service_that_does_not_read_pauses_the_client_not_the_daemon(start, backend, rundir):
    """The other way: a client sends 64 KiB messages as fast as TCP lets it to
    a service that reads nothing. The daemon queues at most its bound for
    the service, then stops reading the client: the client's socket stops
    draining (nothing moves for a second: the only timed check, as
    conftest.quiet does) after a bounded amount. Then the service reads
    everything, whole and in order."""
    chunk = 64 * KIB
    d = start.daemon(max_message_size=chunk, max_buffer=4 * chunk)
    with pyipc.Context(rundir=rundir, backend=backend) as service:
        service.service_init("sink")           # accepts nothing until later
        with socket.create_connection(("127.0.0.1", d.port), timeout=10) as s:
            client = handshake(s, d.url("/sink"))
            s.setblocking(False)
            sent, pending = 0, b""
            while True:
                assert sent * chunk < 64 * MIB, "websocketd kept reading: unbounded"
                if not pending:
                    client.send_binary(sent.to_bytes(4, "big") * (chunk // 4))
                    pending = b"".join(client.data_to_send())
                try:
                    pending = pending[s.send(pending):]
                except BlockingIOError:
                    if not select.select([], [s], [], 1.0)[1]:
                        break                   # paused: nothing drained for 1 s
                    continue
                if not pending:
                    sent += 1
            # TCP and Unix socket buffers plus the daemon's bound.
            assert sent * chunk < 32 * MIB, sent
            total = sent + 1                    # the message being sent when paused
            s.setblocking(True)
            rest = threading.Thread(target=s.sendall, args=(pending,))
            rest.start()
            fd = wait_for(service, EventType.CONNECTION)[-1].fd
            for i in range(total):
                assert service.read(fd, timeout=10) == i.to_bytes(4, "big") * (chunk // 4)
            rest.join(10)


# ------------------------------------------------------------ the command line

@pytest.mark.parametrize("bounds", [
    [], ["--dead-peer-timeout", "32767", "--handshake-timeout", "86400",
         "--connect-timeout", "86400"]], ids=["defaults", "at-the-bounds"])
def test_cli_serves_and_stops_cleanly_on_sigterm(backend, rundir, bounds):
    """Also with the timeouts at their bounds (_sockets.MAX_DEAD_PEER_TIMEOUT,
    _timers.MAX_TIMEOUT): accepted, and a client served."""
    service = ServiceThread(rundir, backend, "echo")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyipc", "-v", "--rundir", rundir, "--backend", backend,
         "websocketd", "--port", "0", "--expose", "echo", *bounds],
        env=CHILD_ENV, stderr=subprocess.PIPE, text=True)
    try:
        port = None
        for line in proc.stderr:
            if "ws on [('127.0.0.1', " in line:
                port = int(line.split("', ")[1].split(")")[0])
            if "ready in" in line:
                break
        assert port is not None
        with connect(f"ws://127.0.0.1:{port}/echo", open_timeout=10) as ws:
            ws.send(b"via the CLI")
            assert ws.recv(timeout=10) == b"via the CLI"
            proc.send_signal(signal.SIGTERM)
            assert closed_by_server(ws) == (1001, "websocketd is stopping")
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stderr.close()
        service.stop()


ACTIVATE = """
import os, socket, sys
s = socket.create_server(("127.0.0.1", 0))
print(s.getsockname()[1], flush=True)
if s.fileno() != 3:
    os.dup2(s.fileno(), 3)
os.set_inheritable(3, True)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1", LISTEN_FDNAMES="websocketd")
os.execv(sys.executable, [sys.executable, "-m", "pyipc", *sys.argv[1:]])
"""


def test_socket_activation(backend, rundir):
    service = ServiceThread(rundir, backend, "echo")
    proc = subprocess.Popen([sys.executable, "-c", ACTIVATE, "--rundir", rundir, "--backend",
                             backend, "websocketd", "--port", "1", "--expose", "echo"],
                            env=CHILD_ENV, stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        # The listening socket exists before the daemon: connecting cannot race.
        with connect(f"ws://127.0.0.1:{port}/echo", open_timeout=10) as ws:
            ws.send(b"activated")
            assert ws.recv(timeout=10) == b"activated"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()
        service.stop()


# ------------------------------------------------------------ faults the review found

def test_a_service_with_a_full_backlog_is_503_and_the_others_are_served(start, rundir):
    """websocketd connects to the service without blocking: one that accepts
    nobody, its backlog full, is answered 503 at once, and the loop goes on
    serving (a blocking connect froze every WebSocket)."""
    from daemon_harness import stuck_service
    from test_websocketd_http import refused
    start.service()
    d = start.daemon(expose=frozenset({"echo", "stuck"}))
    with stuck_service(rundir, "stuck"):
        assert refused(d.url("/stuck")) == (
            503, b"503 Service Unavailable: service 'stuck' is busy: its listen backlog "
                 b"is full\n")
        with connect(d.url("/echo"), open_timeout=10) as ws:
            ws.send(b"still served")
            assert ws.recv(timeout=10) == b"still served"


def test_many_small_fragments_cost_the_message_not_a_list(start):
    """A message in 1-byte fragments (and empty ones) is joined as it comes:
    the daemon holds its bytes, not an object per fragment; the whole
    message reaches the service once."""
    service = start.service("sink", sink)
    d = start.daemon()
    with socket.create_connection(("127.0.0.1", d.port), timeout=10) as s:
        client = handshake(s, d.url("/sink"))
        client.send_binary(b"a", fin=False)
        for byte in b"bcdefghij" * 1000:
            client.send_continuation(bytes([byte]), fin=False)
            client.send_continuation(b"", fin=False)
        client.send_continuation(b"!", fin=True)
        s.sendall(b"".join(client.data_to_send()))
        service.wait_for(lambda evs: any(e.type == EventType.MESSAGE_RX for e in evs))
        sessions = set(d.daemon.sessions.values())
    assert service.messages() == [b"a" + b"bcdefghij" * 1000 + b"!"]
    assert all(isinstance(session._parts, bytearray) for session in sessions)


def test_fragments_over_the_bound_close_with_1009(start):
    service = start.service("sink", sink)
    d = start.daemon(max_message_size=1000)
    with socket.create_connection(("127.0.0.1", d.port), timeout=10) as s:
        client = handshake(s, d.url("/sink"))
        client.send_binary(b"x" * 600, fin=False)
        client.send_continuation(b"x" * 401, fin=True)
        s.sendall(b"".join(client.data_to_send()))
        frames = read_frames(s, client)
    assert frames[0].opcode is Opcode.CLOSE and frames[0].data[:2] == b"\x03\xf1"   # 1009
    assert service.messages() == []


def test_nothing_after_a_failed_message_reaches_the_service(start):
    """Invalid UTF-8 fails the WebSocket (1007): a message sent right after
    it, in the same read, is not delivered (RFC 6455 7.1.7)."""
    service = start.service("sink", sink)
    d = start.daemon()
    with socket.create_connection(("127.0.0.1", d.port), timeout=10) as s:
        client = handshake(s, d.url("/sink"))
        client.send_binary(b"before")
        client.send_frame(Frame(Opcode.TEXT, b"\xff\xfe"))
        client.send_binary(b"after the failure")
        s.sendall(b"".join(client.data_to_send()))
        frames = read_frames(s, client)
    assert frames[0].opcode is Opcode.CLOSE and frames[0].data[:2] == b"\x03\xef"   # 1007
    disconnected(service)
    assert service.messages() == [b"before"]


def test_a_client_that_never_reads_the_end_is_cut(start, monkeypatch):
    """The service sends more than the client's socket takes, then closes;
    the client never reads: FLUSH_TIMEOUT later both fds are closed (the
    core would otherwise hold them and the queue until the client reads)."""
    from pyipc.daemons.websocketd import daemon as daemon_module
    monkeypatch.setattr(daemon_module, "FLUSH_TIMEOUT", 0.5)

    def flood_then_close(ctx, ev):
        if ev.type == EventType.MESSAGE_RX:
            for _ in range(64):
                ctx.schedule(ev.fd, b"z" * 65536)
            ctx.close(ev.fd, linger=30)
    service = start.service("sink", flood_then_close)
    d = start.daemon(max_buffer=8 * MIB)
    with socket.create_connection(("127.0.0.1", d.port), timeout=10) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client = handshake(s, d.url("/sink"))
        client.send_binary(b"go")
        s.sendall(b"".join(client.data_to_send()))
        # Recorded once handled: the service has sent it all, and closed.
        service.wait_for(lambda evs: any(e.type == EventType.MESSAGE_RX for e in evs))
        spin_until(lambda: not d.daemon.sessions, timeout=10)


def test_a_failure_opening_the_session_closes_both_sides(start, monkeypatch):
    """Out of fds (or memory) right after the 101: the client's and the
    service's connections are closed, none left watched by the context and
    known to no one (it spun the loop at 100% CPU, the client hung)."""
    from pyipc.daemons.websocketd import daemon as daemon_module

    def out_of_fds(*args, **kwargs):
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(daemon_module, "Session", out_of_fds)
    service = start.service("sink", sink)
    d = start.daemon()
    with socket.create_connection(("127.0.0.1", d.port), timeout=10) as s:
        handshake(s, d.url("/sink"))
        assert s.recv(100) == b""                   # closed after the 101
    disconnected(service)                           # its side too
    assert not d.daemon.handshakes and not d.daemon.sessions


def test_timeouts_at_their_bounds_serve(start):
    """--dead-peer-timeout at MAX_DEAD_PEER_TIMEOUT (Linux's keepalive bound:
    past it setsockopt failed every connection), the timeouts at MAX_TIMEOUT."""
    from pyipc.daemons._sockets import MAX_DEAD_PEER_TIMEOUT
    from pyipc.daemons._timers import MAX_TIMEOUT
    start.service()
    d = start.daemon(dead_peer_timeout=MAX_DEAD_PEER_TIMEOUT, handshake_timeout=MAX_TIMEOUT,
                     connect_timeout=MAX_TIMEOUT)
    with connect(d.url("/echo"), open_timeout=10) as ws:
        ws.send(b"at the bounds")
        assert ws.recv(timeout=10) == b"at the bounds"
        assert client_sockopt(d, socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 16383
        assert client_sockopt(d, socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 32767000


def test_client_sockets_detect_a_vanished_peer(start):
    """Keepalive and TCP_USER_TIMEOUT on the client's socket (as tcpd's and
    tlsd's --dead-peer-timeout): a browser that vanished is noticed."""
    start.service()
    d = start.daemon(dead_peer_timeout=8)
    with connect(d.url("/echo"), open_timeout=10) as ws:
        ws.send(b"x")
        assert ws.recv(timeout=10) == b"x"
        assert client_sockopt(d, socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert client_sockopt(d, socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 8000


def client_sockopt(d, level: int, option: int) -> int:
    """An option of the one WebSocket client's socket websocketd holds."""
    (fd,) = {session.fd for session in d.daemon.sessions.values()}
    with socket.socket(fileno=os.dup(fd)) as sock:
        return sock.getsockopt(level, option)


# ------------------------------------------------------------ out of file descriptors

#: A websocketd under a low RLIMIT_NOFILE; on a line from stdin it takes every
#: fd left (EMFILE from then on), on the next it gives them back and stops.
_FD_STARVED_DAEMON = """
import logging, os, resource, sys, threading
from pyipc.daemons.websocketd import Options, WebSocketd
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (128, hard))
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
d = WebSocketd(Options(expose=frozenset({"echo"}), port=0, max_message_size=1000),
               rundir=sys.argv[1], backend=sys.argv[2])
def control():
    d.ready.wait()
    print(d.addresses[0][1], flush=True)
    sys.stdin.readline()
    held = []
    try:
        while True:
            held.append(os.open("/dev/null", os.O_RDONLY))
    except OSError:
        pass
    print("full", flush=True)
    sys.stdin.readline()
    for fd in held:
        os.close(fd)
    d.stop()
threading.Thread(target=control, daemon=True).start()
d.run(handle_signals=False)
"""


def test_out_of_fds_a_failing_websocket_still_gets_its_close_frame(start, backend, rundir):
    """EMFILE when a WebSocket fails (1009): the dup that waits for the
    client's close answer cannot be made. The client still gets its close
    frame (the connection closes without waiting for the answer), the log a
    warning, no traceback (os.dup raised inside the switch callback: no
    close frame, a bare TCP close)."""
    start.service("echo")
    proc = subprocess.Popen([sys.executable, "-c", _FD_STARVED_DAEMON, rundir, backend],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=CHILD_ENV)
    try:
        port = int(proc.stdout.readline())
        with connect(f"ws://127.0.0.1:{port}/echo", open_timeout=10) as ws:
            ws.send(b"ping")
            assert ws.recv(timeout=10) == b"ping"
            proc.stdin.write("fill\n")
            proc.stdin.flush()
            assert proc.stdout.readline() == "full\n"
            ws.send(b"x" * 1001)                       # over max_message_size: 1009
            with pytest.raises(ConnectionClosed) as info:
                ws.recv(timeout=10)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1009
        proc.stdin.write("stop\n")
        proc.stdin.flush()
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert "cannot wait for the client's close answer" in err


class _RefusingAddExternal:
    """A daemon's context whose add_external refuses once a WebSocket is
    open (the linger's dup of its client's socket), as at max_connections;
    `refused` holds the inode of each socket refused."""

    def __init__(self, daemon: object) -> None:
        self._daemon = daemon
        self._ctx = daemon.ctx
        self.refused: list = []

    def __getattr__(self, name: str) -> object:
        return getattr(self._ctx, name)

    def add_external(self, fd: int) -> None:
        if self._daemon.sessions:
            self.refused.append(os.fstat(fd).st_ino)
            raise pyipc.IPCError("too many connections")
        self._ctx.add_external(fd)


def _socket_open(inode: int) -> bool:
    """Whether a fd of this process is the socket `inode` (a dup included)."""
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == f"socket:[{inode}]":
                return True
        except OSError:
            pass
    return False


def test_a_close_answer_that_cannot_be_watched_is_not_waited_for(start, caplog):
    """add_external of the dup failing (max_connections, out of memory): the
    dup is closed and a warning logged; the client has its close frame."""
    start.service("echo")
    d = start.daemon(max_message_size=1000)
    refusing = _RefusingAddExternal(d.daemon)
    d.daemon.ctx = refusing
    with connect(d.url("/echo"), open_timeout=10) as ws:
        ws.send(b"x" * 1001)
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=10)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1009
    assert len(refusing.refused) == 1
    spin_until(lambda: not d.daemon.sessions and not _socket_open(refusing.refused[0]))
    assert not d.daemon.lingering
    assert "cannot wait for the client's close answer (too many connections)" in caplog.text


# ------------------------------------------------------------ messages toward a service

def _unsent_bytes(sock: socket.socket) -> int:
    """Bytes of sock's TCP send queue not yet acknowledged (SIOCOUTQ)."""
    import fcntl
    import struct
    import termios
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]


def test_a_flood_of_empty_messages_to_a_service_that_does_not_read_stays_bounded(start):
    """The core's queue bound counts 4 bytes per empty message, which costs
    ~44 B (native) to ~100 B (pure): websocketd queues at most
    bound // MESSAGE_CHARGE messages toward a service, then stops reading
    the WebSocket (plus what its last read held). Messages websocketd holds
    = read from the client (sent, less what waits in the kernel on either
    side) less those in the service's socket buffer. Without the charge it
    read on until the core's byte bound: 262,144 empty messages for 1 MiB
    (this test then never sees websocketd stop reading)."""
    from conftest import unread_bytes
    from pyipc.daemons.websocketd.credit import MESSAGE_CHARGE
    from pyipc.daemons.websocketd.handshake import READ_SIZE

    def pause(ctx: pyipc.Context, ev: pyipc.Event) -> None:    # reads nothing
        if ev.type == EventType.CONNECTION:
            ctx.pause_reading(ev.fd)
    service = start.service("sink", pause)
    d = start.daemon(max_buffer=MIB, max_message_size=1000)
    frame = b"\x82\x80" + b"\0" * 4                   # an empty binary frame, masked
    data = frame * 400_000
    with socket.create_connection(("127.0.0.1", d.port), timeout=10) as s:
        handshake(s, d.url("/sink"))
        conn = service.wait_for(lambda evs: any(
            e.type == EventType.CONNECTION for e in evs))[0].fd
        spin_until(lambda: bool(d.daemon.sessions))     # (the 101 comes just before)
        session = next(iter(d.daemon.sessions.values()))
        s.setblocking(False)
        sent = 0

        def stopped_reading() -> bool:
            """websocketd paused the client (the bound), or read all."""
            return getattr(session, "_paused", False) or \
                (sent == len(data) and unread_bytes(session.fd) == 0
                 and _unsent_bytes(s) == 0)
        deadline = time.monotonic() + 30
        while not stopped_reading():
            assert time.monotonic() < deadline, "websocketd never stopped reading"
            try:
                sent += s.send(data[sent:sent + 65536])
            except BlockingIOError:
                select.select([], [s], [], 0.05)
        read = (sent - _unsent_bytes(s) - unread_bytes(session.fd)) // len(frame)
        held = read - unread_bytes(conn) // 4
        limit = MIB // MESSAGE_CHARGE
        assert held <= limit + READ_SIZE // len(frame), (held, limit)


def test_the_message_charge_at_and_past_its_edge():
    """Credit: bound // MESSAGE_CHARGE messages (1 at least); a mark every
    quarter of them; over only with a mark to wait for."""
    from pyipc.daemons.websocketd.credit import MESSAGE_CHARGE, Credit
    assert Credit(MESSAGE_CHARGE - 1, 0).limit == 1
    assert Credit(MESSAGE_CHARGE, 0).limit == 1
    assert Credit(2 * MESSAGE_CHARGE, 0).limit == 2
    credit = Credit(MIB, 0)
    assert (credit.limit, credit.mark_every) == (MIB // MESSAGE_CHARGE, MIB // MESSAGE_CHARGE // 4)
    for _ in range(credit.limit):
        credit.forwarded(0)
    assert credit.mark_due(0) and not credit.over()   # no mark yet: the byte bound holds
    credit.scheduled()
    assert credit.over() and credit.in_flight == credit.limit + 1
    credit.written()
    assert credit.in_flight == 0 and not credit.over()


def test_the_unmarked_room_at_and_past_its_edge():
    """Credit: what follows the last mark stays within queue bound - (message
    bound + 4), so that a mark of any size always fits once every mark is
    written; a message that would go past it is a mark."""
    from pyipc.daemons.websocketd.credit import Credit
    credit = Credit(4096, 1000)
    assert credit.unmarked_room == 4096 - 1004
    credit.forwarded(1000)
    credit.forwarded(1000)                          # 2008 bytes unmarked
    left = credit.unmarked_left()
    assert left == 4096 - 1004 - 2008
    assert not credit.mark_due(left - 4)            # at the edge: unmarked
    assert credit.mark_due(left - 3)                # one past: a mark
    credit.scheduled()
    assert credit.unmarked_left() == credit.unmarked_room
    assert Credit(1004, 1000).mark_due(0)           # no room: every message a mark


def test_a_client_at_its_message_limit_is_not_paused_once_a_message(start, monkeypatch):
    """A client that floods a service that keeps up reaches websocketd's
    message limit (a 256 KiB read holds thousands of small messages): it is
    read again at half the limit, and the messages held meanwhile go to the
    service in runs with a mark now and then. It was paused and resumed once
    a message, each held message its own schedule() and MESSAGE_TX (49,729
    pauses and 49,869 marks for 50,000 messages: throughput down 35-55%)."""
    from pyipc.daemons.websocketd import session as session_mod
    counts = {"pauses": 0, "marks": 0}
    set_paused, schedule = session_mod.Session._set_paused, session_mod.Session._schedule

    def counting_pause(self, paused):
        counts["pauses"] += paused
        set_paused(self, paused)

    def counting_schedule(self, payload):
        counts["marks"] += 1
        return schedule(self, payload)
    monkeypatch.setattr(session_mod.Session, "_set_paused", counting_pause)
    monkeypatch.setattr(session_mod.Session, "_schedule", counting_schedule)
    got = []

    def collect(ctx: pyipc.Context, ev: pyipc.Event) -> None:
        if ev.type == EventType.MESSAGE_RX:
            got.append(ev.message)
    start.service("sink", collect)
    d = start.daemon(max_buffer=MIB, max_message_size=1000)
    n = 50_000
    with socket.create_connection(("127.0.0.1", d.port), timeout=10) as s:
        handshake(s, d.url("/sink"))
        s.sendall(b"".join(b"\x82\x88\0\0\0\0" + struct.pack(">Q", i) for i in range(n)))
        spin_until(lambda: len(got) == n, timeout=60)
    assert got == [struct.pack(">Q", i) for i in range(n)]
    assert counts["pauses"] < 50, counts          # about once a limit's half, not per message
    assert counts["marks"] < n // 100, counts     # a mark every quarter of the limit
