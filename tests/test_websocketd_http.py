"""websocketd's HTTP side, on both backends: static files, clear HTTP errors
for requests that do not become a WebSocket, deny by default, the Origin
allow-list, the handshake's bounds (timeout, connections in handshake); and
the policy functions alone."""

from __future__ import annotations

import select
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import pytest


from websockets.exceptions import InvalidStatus  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

from pyipc.daemons.websocketd.policy import origin_allowed, service_name  # noqa: E402

from conftest import CHILD_ENV, spin_until  # noqa: E402
from pyipc import EventType  # noqa: E402
from wsd_helpers import DaemonThread, ServiceThread  # noqa: E402


@pytest.fixture
def wsd(backend, rundir):
    started = []

    def start(**options):
        options.setdefault("expose", frozenset({"echo"}))
        d = DaemonThread(rundir, backend, **options)
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()


@pytest.fixture
def echo_service(backend, rundir):
    service = ServiceThread(rundir, backend, "echo")
    yield service
    service.stop()


def get(url, method="GET", data=None, headers=None):
    """(status, headers, body) of an HTTP request, errors included."""
    request = urllib.request.Request(url, method=method, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def raw_exchange(port, data):
    """Send raw bytes, return everything the daemon answers until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def refused(url, **kwargs):
    with pytest.raises(InvalidStatus) as info:
        connect(url, open_timeout=10, **kwargs)
    return info.value.response.status_code, bytes(info.value.response.body)


# ------------------------------------------------------------ static files

@pytest.mark.parametrize("path,ctype,marker", [
    ("/pyipc.js", "text/javascript", b"root.pyipc = {"),
    ("/chat.html", "text/html", b"registry.encode(\"Join\""),
    ("/", "text/html", b"<h1>pyipc websocketd</h1>"),
])
def test_static_files_are_served(wsd, path, ctype, marker):
    d = wsd()
    status, headers, body = get(d.http_url(path))
    assert status == 200
    assert headers["Content-Type"].startswith(ctype)
    assert int(headers["Content-Length"]) == len(body)
    assert marker in body


def test_head_of_a_static_file_has_no_body(wsd):
    d = wsd()
    status, headers, body = get(d.http_url("/pyipc.js"), method="HEAD")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 1000


def test_static_file_with_another_method_is_405(wsd):
    status, headers, body = get(wsd().http_url("/pyipc.js"), method="DELETE")
    assert status == 405 and headers["Allow"] == "GET, HEAD"
    assert b"DELETE is not allowed here" in body


# ------------------------------------------------------------ clear HTTP errors

def test_plain_get_of_an_exposed_service_is_426(wsd):
    status, headers, body = get(wsd().http_url("/echo"))
    assert status == 426 and headers["Upgrade"] == "websocket"
    assert body == b"426 Upgrade Required: /echo is a WebSocket endpoint; open it with a " \
                   b"WebSocket client\n"


def test_plain_get_of_anything_else_is_404(wsd):
    status, _, body = get(wsd().http_url("/elsewhere"))
    assert (status, body) == (404, b"404 Not Found: nothing at /elsewhere\n")


def test_request_with_a_body_is_400(wsd):
    status, _, body = get(wsd().http_url("/echo"), method="POST", data=b"x" * 10)
    assert status == 400
    assert b"did not receive a valid HTTP request: unsupported request body" in body


def test_bytes_that_are_not_http_get_400(wsd):
    answer = raw_exchange(wsd().port, b"\x16\x03\x01 this is not HTTP\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"did not receive a valid HTTP request" in answer


def test_bad_handshake_is_400(wsd, echo_service):
    # An upgrade without Sec-WebSocket-Key/Version: websockets says what is missing.
    answer = raw_exchange(wsd().port, b"GET /echo HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                          b"Upgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"Failed to open a WebSocket connection: missing Sec-WebSocket-Key header" \
        in answer
    assert echo_service.events == []        # the service never saw it


@pytest.mark.parametrize("target", ["echo", "*", "http://127.0.0.1/echo"])
def test_a_request_target_that_is_not_a_path_is_400(wsd, echo_service, target):
    """Only a target starting with "/" names a service: "GET echo" reached
    the exposed service echo as if it were "/echo"."""
    answer = raw_exchange(wsd().port, f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                          "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                          "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                          "Sec-WebSocket-Version: 13\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert answer.endswith(f"400 Bad Request: the request target {target!r} is not a "
                           f"path starting with /\n".encode())
    assert echo_service.events == []


UPGRADE = (b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n")


def test_a_request_without_host_is_400(wsd, echo_service):
    """RFC 9112 3.2 and RFC 6455 4.2.1: no Host header is a 400 (it was
    upgraded, with no Origin either)."""
    answer = raw_exchange(wsd().port, b"GET /echo HTTP/1.1\r\n" + UPGRADE + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert answer.endswith(b"400 Bad Request: no Host header\n")
    assert echo_service.events == []


@pytest.mark.parametrize("request_line, headers, status", [
    (b"GET /echo HTTP/1.1", b"Upgrade: websocket\r\n", b"426 Upgrade Required"),
    (b"POST /echo HTTP/1.1", UPGRADE, b"405 Method Not Allowed"),
    (b"GET /echo HTTP/1.0", UPGRADE, b"505 HTTP Version Not Supported"),
])
def test_websockets_own_refusals_of_a_handshake(wsd, echo_service, request_line, headers,
                                                status):
    """What docs/websocket.md says of the requests that websockets' parser
    refuses itself: its own status, with its reason in the body."""
    answer = raw_exchange(wsd().port, request_line + b"\r\nHost: 127.0.0.1\r\n" + headers
                          + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 " + status + b"\r\n"), answer[:60]
    assert echo_service.events == []


@pytest.mark.parametrize("path, status", [(b"/echo", b"426"), (b"/nothing", b"404")])
def test_head_of_an_error_has_its_headers_and_no_body(wsd, path, status):
    """RFC 9110 9.3.2: a response to HEAD has no content (the error's text
    was sent as a body, which a client reads as the next response's start)."""
    answer = raw_exchange(wsd().port, b"HEAD " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 " + status) and b"\r\nContent-Length: " in head
    assert body == b""


@pytest.mark.parametrize("header", ["Origin", "Host"])
def test_a_repeated_origin_or_host_header_is_400(wsd, echo_service, header):
    """Two Origin (or Host) headers: which one the check would take is
    ambiguous, so the request is refused with a reason (it raised, and the
    client got a bare close)."""
    twice = f"{header}: http://127.0.0.1\r\n{header}: http://evil.example\r\n".encode()
    host = b"" if header == "Host" else b"Host: 127.0.0.1\r\n"
    answer = raw_exchange(wsd().port, b"GET /echo HTTP/1.1\r\n" + host + twice +
                          b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
                          b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                          b"Sec-WebSocket-Version: 13\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert answer.endswith(f"400 Bad Request: more than one {header} header\n".encode())
    assert echo_service.events == []


def test_handshake_timeout_must_be_a_positive_number():
    from pyipc.daemons.websocketd import Options
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="handshake_timeout must be > 0"):
            Options(handshake_timeout=bad)
    with pytest.raises(ValueError, match="dead_peer_timeout must be >= 0"):
        Options(dead_peer_timeout=float("nan"))


@pytest.mark.parametrize("option, value", [
    ("dead_peer_timeout", 32768), ("dead_peer_timeout", 86400),
    ("dead_peer_timeout", float("inf")), ("handshake_timeout", 86401),
    ("handshake_timeout", 1e10), ("connect_timeout", 86401), ("connect_timeout", 1e10),
    ("connect_timeout", float("inf")), ("connect_timeout", float("nan"))])
def test_timeouts_past_their_bounds_are_refused(option, value):
    """Past Linux's keepalive bound (32767 s) every connection failed
    (setsockopt EINVAL); a timeout past threading.TIMEOUT_MAX ended the loop
    at its first client. Both are bounded (_sockets.MAX_DEAD_PEER_TIMEOUT,
    _timers.MAX_TIMEOUT: a day)."""
    from pyipc.daemons.websocketd import Options
    bound = 32767 if option == "dead_peer_timeout" else 86400
    with pytest.raises(ValueError, match=f"^{option} must be .* at most {bound} seconds"):
        Options(**{option: value})


@pytest.mark.parametrize("option, value, text", [
    ("--dead-peer-timeout", "32768", "dead_peer_timeout must be >= 0 and at most 32767 "
     "seconds (Linux's longest TCP keepalive idle time), not 32768.0"),
    ("--handshake-timeout", "inf",
     "handshake_timeout must be > 0 and at most 86400 seconds (a day), not inf"),
    ("--connect-timeout", "1e10",
     "connect_timeout must be > 0 and at most 86400 seconds (a day), not 10000000000.0")])
def test_the_cli_refuses_a_timeout_past_its_bound(rundir, option, value, text):
    """Bad usage: exit 2, as tcpd and tlsd (it was 1)."""
    out = subprocess.run([sys.executable, "-m", "pyipc", "--rundir", rundir, "websocketd",
                          "--port", "0", option, value],
                         env=CHILD_ENV, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr == f"pyipc websocketd: {text}\n"


@pytest.mark.parametrize("options, text", [
    (["--port", "99999"], "port must be 0..65535, not 99999"),
    (["--cert", "/nonexistent.pem"], "--cert/--key /nonexistent.pem: No such file or directory"),
    (["--cert", __file__], f"--cert/--key {__file__}: [SSL] PEM lib"),
    (["--dial-ca", "/nonexistent.pem"], "--dial-ca /nonexistent.pem: No such file or directory"),
    (["--dial-cert", "/nonexistent.pem"],
     "--dial-cert/--dial-key /nonexistent.pem: No such file or directory"),
    (["--client-ca", "ca.pem"], "--key and --client-ca need --cert"),
])
def test_the_cli_refuses_bad_options_and_names_bad_files_with_exit_2(rundir, options, text):
    """A bad option value or certificate file: one line naming the option
    and the file, exit 2 as tcpd's and tlsd's (exit 1 and a bare
    '[Errno 2] No such file or directory' before)."""
    out = subprocess.run([sys.executable, "-m", "pyipc", "--rundir", rundir, "websocketd",
                          "--host", "127.0.0.1", "--port", "0", *options],
                         env=CHILD_ENV, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.startswith(f"pyipc websocketd: {text}")
    assert len(out.stderr.splitlines()) == 1


def test_listening_on_double_colon_takes_ipv4_too(wsd):
    """'::' is every address, as the help says: IPv4 clients included."""
    d = wsd(host="::")
    status, _, _ = get(f"http://127.0.0.1:{d.port}/pyipc.js")
    assert status == 200


# ------------------------------------------------------------ deny by default

def test_nothing_is_exposed_by_default(wsd, echo_service):
    d = wsd(expose=frozenset())
    assert refused(d.url("/echo")) == (404, b"404 Not Found: no service 'echo' is exposed "
                                            b"here\n")
    assert echo_service.events == []


def test_unexposed_service_is_404_even_when_running(wsd, echo_service, backend, rundir):
    other = ServiceThread(rundir, backend, "secret")
    try:
        d = wsd()
        assert refused(d.url("/secret"))[0] == 404
        assert other.events == []
    finally:
        other.stop()


def test_exposed_service_not_running_is_503(wsd):
    status, body = refused(wsd().url("/echo"))
    assert (status, body) == (503, b"503 Service Unavailable: service 'echo' is not "
                                   b"running\n")


# ------------------------------------------------------------ Origin

def test_wrong_origin_is_403(wsd, echo_service):
    status, body = refused(wsd().url("/echo"), origin="http://evil.example")
    assert (status, body) == (403, b"403 Forbidden: origin http://evil.example is not "
                                   b"allowed\n")
    assert echo_service.events == []


def test_same_host_origin_is_allowed(wsd):
    # Past the Origin check, the next answer is about the service (not running).
    d = wsd()
    assert refused(d.url("/echo"), origin=f"http://127.0.0.1:{d.port}")[0] == 503


def test_listed_origin_is_allowed_others_not(wsd):
    d = wsd(origins=frozenset({"https://app.example"}))
    assert refused(d.url("/echo"), origin="https://app.example")[0] == 503
    assert refused(d.url("/echo"), origin="https://app.example:8443")[0] == 403


def test_policy_service_name():
    assert service_name("/pong") == "pong"
    assert service_name("/pong?token=1") == "pong"
    assert service_name("/a%20b") == "a b"
    assert service_name("/") == ""
    assert service_name("/a/b") == "a/b"      # never a service name: never exposed


@pytest.mark.parametrize("origin,host,allowed,ok", [
    (None, "h:80", set(), True),
    ("http://h:8080", "h:8080", set(), True),
    ("http://H:8080", "h:8080", set(), True),
    ("http://h", "h:80", set(), True),
    ("https://h", "h:443", set(), True),
    ("https://h", "h", set(), True),
    ("http://h:8081", "h:8080", set(), False),
    ("http://other:8080", "h:8080", set(), False),
    ("null", "h:8080", set(), False),
    ("http://[::1]:8080", "[::1]:8080", set(), True),
    ("https://app", "h:8080", {"https://app"}, True),
    ("https://evil", "h:8080", {"*"}, True),
    ("http://h:8080", None, set(), False),
    # DNS rebinding: the page's name resolved to this machine; same "host"
    # on both headers, but not a name of this machine.
    ("http://attacker.example:8080", "attacker.example:8080", set(), False),
    ("http://H.:8080", "h.:8080", set(), True),
    ("http://127.0.0.1:8080", "127.0.0.1:8080", set(), True),     # addresses: no DNS
    ("http://[::1]:8080", "[::1]:8080", set(), True),
    ("http://attacker.example", "attacker.example", {"http://attacker.example"}, True),
])
def test_policy_origin(origin, host, allowed, ok):
    assert origin_allowed(origin, host, allowed, {"h", "localhost"}) is ok


def test_dns_rebinding_is_refused_403(wsd, echo_service):
    """A page on attacker.example whose name now resolves to 127.0.0.1: the
    browser sends its own Origin and Host attacker.example, which match;
    refused all the same (the Host is not a name of this machine)."""
    d = wsd()
    site = f"attacker.example:{d.port}".encode()
    answer = raw_exchange(d.port, b"GET /echo HTTP/1.1\r\nHost: " + site + b"\r\n"
                          b"Origin: http://" + site + b"\r\n"
                          b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
                          b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                          b"Sec-WebSocket-Version: 13\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 403 Forbidden\r\n")
    assert answer.endswith(b"origin http://" + site + b" is not allowed\n")
    assert echo_service.events == []


# ------------------------------------------------------------ handshake bounds

def test_silent_client_is_closed_after_the_handshake_timeout(wsd):
    d = wsd(handshake_timeout=0.3)
    with socket.create_connection(("127.0.0.1", d.port), timeout=10) as s:
        s.sendall(b"GET /echo HTTP/1.1\r\n")      # half a request, then nothing
        assert s.recv(100) == b""                 # closed by the daemon


def test_connections_in_handshake_are_bounded(wsd):
    d = wsd(max_handshakes=2, max_handshakes_per_host=2)
    waiting = [socket.create_connection(("127.0.0.1", d.port), timeout=10) for _ in range(2)]
    try:
        with socket.create_connection(("127.0.0.1", d.port), timeout=10) as third:
            answer = b""                           # over the bound: told, closed at once
            while chunk := third.recv(1000):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
        assert answer.endswith(b"busy: 2 connections already in their handshake "
                               b"(max_handshakes)\n")
        readable, _, _ = select.select(waiting, [], [], 0)
        assert readable == []                     # the first two still wait
        # A finished handshake frees its place.
        waiting[0].sendall(b"GET /pyipc.js HTTP/1.1\r\nHost: x\r\n\r\n")
        assert waiting[0].recv(100).startswith(b"HTTP/1.1 200 OK")
    finally:
        for s in waiting:
            s.close()


def test_one_host_takes_its_share_of_the_handshakes_not_all(wsd):
    """Connections in their handshake from one peer are bounded by
    max_handshakes_per_host (default half of max_handshakes): one host that
    holds its share cannot have every other host refused."""
    d = wsd(max_handshakes=4)                   # a share of 2 per host
    waiting = [socket.create_connection(("127.0.0.1", d.port), timeout=10) for _ in range(2)]
    try:
        with socket.create_connection(("127.0.0.1", d.port), timeout=10) as third:
            answer = b""
            while chunk := third.recv(1000):
                answer += chunk
        assert answer.endswith(b"busy: 2 connections from 127.0.0.1 already in their "
                               b"handshake (max_handshakes_per_host)\n")
        with socket.create_connection(("127.0.0.1", d.port), timeout=10,
                                      source_address=("127.0.0.2", 0)) as other:
            other.sendall(b"GET /pyipc.js HTTP/1.1\r\nHost: x\r\n\r\n")
            assert other.recv(100).startswith(b"HTTP/1.1 200 OK")
        waiting[0].sendall(b"GET /pyipc.js HTTP/1.1\r\nHost: x\r\n\r\n")
        assert waiting[0].recv(100).startswith(b"HTTP/1.1 200 OK")
        with socket.create_connection(("127.0.0.1", d.port), timeout=10) as again:
            again.sendall(b"GET /pyipc.js HTTP/1.1\r\nHost: x\r\n\r\n")
            assert again.recv(100).startswith(b"HTTP/1.1 200 OK")     # its slot back
    finally:
        for s in waiting:
            s.close()


# ------------------------------------------------------------ without the extra

WITHOUT_WEBSOCKETS = """
import sys
sys.modules["websockets"] = None        # as if the websocket extra were not installed
from pyipc.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_pyipc_command_works_without_the_websocket_extra():
    # Every daemon's subcommand is registered at start: websocketd's must not
    # need websockets until it runs, and then it says what to install.
    ok = subprocess.run([sys.executable, "-c", WITHOUT_WEBSOCKETS, "websocketd", "--help"],
                        env=CHILD_ENV, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "--expose" in ok.stdout
    run = subprocess.run([sys.executable, "-c", WITHOUT_WEBSOCKETS, "websocketd",
                          "--expose", "x"], env=CHILD_ENV, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 1
    assert "pyipc websocketd needs the websocket extra (pip install " \
           "'pyipc-zig[websocket]')" in run.stderr


def test_open_websockets_are_bounded(wsd, echo_service):
    """max_websockets: a request past it is answered 503 saying so, the
    service never sees it; an ended WebSocket gives its place back."""
    d = wsd(max_websockets=2)
    with connect(d.url("/echo"), open_timeout=10) as second:
        with connect(d.url("/echo"), open_timeout=10) as first:
            for ws in (first, second):          # both open at the service
                ws.send(b"open")
                assert ws.recv(timeout=10) == b"open"
            assert refused(d.url("/echo")) == (
                503, b"503 Service Unavailable: busy: 2 WebSockets already open "
                     b"(max_websockets)\n")
            connected = [ev for ev in echo_service.events
                         if ev.type == EventType.CONNECTION]
            assert len(connected) == 2          # the third never reached the service
            second.send(b"still served")
            assert second.recv(timeout=10) == b"still served"
        spin_until(lambda: d.daemon.open_websockets() == 1)
        with connect(d.url("/echo"), open_timeout=10) as third:
            third.send(b"its place")
            assert third.recv(timeout=10) == b"its place"


def test_max_websockets_must_be_positive():
    from pyipc.daemons.websocketd import Options
    with pytest.raises(ValueError, match="max_websockets must be at least 1, not 0"):
        Options(max_websockets=0)


# ------------------------------------------------------------ the request head's bound

def _head_of(size: int) -> bytes:
    """A GET /nothing request whose head (its blank line included) has
    exactly `size` bytes: header lines of 4 KiB at most (under the websockets
    package's own 8 KiB line bound)."""
    head = b"GET /nothing HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    end = b"\r\n"
    i = 0
    while len(head) + len(end) < size:
        room = size - len(head) - len(end) - len(b"X-Pad-000: \r\n")
        assert room >= 1, "a size this code cannot make exactly"
        pad = min(room, 4096) if room - 4096 >= 16 or room <= 4096 else room - 16
        head += b"X-Pad-%03d: " % i + b"p" * pad + b"\r\n"
        i += 1
    head += end
    assert len(head) == size
    return head


def test_a_request_head_at_its_bound_is_served_past_it_is_431(wsd):
    """MAX_REQUEST_HEAD bounds what one unfinished handshake holds (the
    websockets package alone takes 128 lines of 8 KiB: over 1 MiB each)."""
    from pyipc.daemons.websocketd.handshake import MAX_REQUEST_HEAD
    d = wsd()
    assert raw_exchange(d.port, _head_of(MAX_REQUEST_HEAD)).startswith(b"HTTP/1.1 404")
    answer = raw_exchange(d.port, _head_of(MAX_REQUEST_HEAD + 1))
    assert answer.startswith(b"HTTP/1.1 431")
    assert f"request head over {MAX_REQUEST_HEAD} bytes".encode() in answer
    # Without its end: refused once past the bound, not held until the timeout.
    with socket.create_connection(("127.0.0.1", d.port), timeout=10) as s:
        s.sendall(_head_of(MAX_REQUEST_HEAD + 3)[:-2])       # one byte past it
        assert s.recv(65536).startswith(b"HTTP/1.1 431")
