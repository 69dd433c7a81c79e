"""Hostile input to the networking daemons (an adversarial review): each
attack must get a clear answer and leave the daemon serving the next client,
on both backends."""

from __future__ import annotations

import socket

import pytest

pytest.importorskip("websockets")

from websockets.sync.client import connect  # noqa: E402

from pyipc.daemons.websocketd.policy import origin_allowed, service_name  # noqa: E402

from wsd_helpers import DaemonThread, ServiceThread  # noqa: E402

UPGRADE = (b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n")


@pytest.fixture
def echo_wsd(backend, rundir):
    service = ServiceThread(rundir, backend, "echo")
    d = DaemonThread(rundir, backend, expose=frozenset({"echo"}))
    yield d
    d.stop()
    service.stop()


def exchange(port: int, data: bytes) -> bytes:
    """Send raw bytes; everything the daemon answers until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def still_serves(d: DaemonThread) -> None:
    assert d.thread.is_alive(), f"websocketd died: {d.failure!r}"
    with connect(d.url("/echo"), open_timeout=10) as ws:
        ws.send(b"still here")
        assert ws.recv(10) == b"still here"


# ------------------------------------------------------------ websocketd

def test_websocketd_malformed_origin_is_403_not_a_crash(echo_wsd):
    # urllib.parse.urlsplit raises ValueError on "http://[": it used to escape
    # on_event and end the daemon's loop (every client lost).
    answer = exchange(echo_wsd.port, b"GET /echo HTTP/1.1\r\nHost: 127.0.0.1\r\n" + UPGRADE
                      + b"Origin: http://[\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 403 Forbidden\r\n")
    still_serves(echo_wsd)


@pytest.mark.parametrize("upgrade", [b"", UPGRADE])
def test_websocketd_malformed_path_is_404_not_a_crash(echo_wsd, upgrade):
    # "//[x" is a URL with a broken IPv6 netloc to urlsplit (ValueError).
    answer = exchange(echo_wsd.port, b"GET //[x HTTP/1.1\r\nHost: 127.0.0.1\r\n" + upgrade
                      + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 404 Not Found\r\n")
    still_serves(echo_wsd)


def test_websocketd_policy_never_raises_on_malformed_urls():
    assert origin_allowed("http://[", "127.0.0.1", frozenset()) is False
    assert origin_allowed("http://[::1", "[::1]", frozenset()) is False
    assert service_name("//[x") == "/[x"           # not a name any service has
    assert service_name("//echo") == "/echo"       # the path is never a netloc
    assert service_name("/echo#frag") == "echo"
