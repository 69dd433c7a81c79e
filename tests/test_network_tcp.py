"""A client on host A reaches services on host B by name through ipcd + tcpd,
across two network namespaces joined by a veth link (tests/netns.py), each
host with its own run directory and daemons (`pyipc ... ipcd|tcpd|websocketd|pongd`
as processes under `ip netns exec`), on both backends: messages both ways, a
1 MiB message, 1,000 messages in order (through tcpd, and through websocketd:
the ws scheme); the remote tcpd down, a missing or
unexposed remote service; a link cut mid-stream; a handshake and first
messages in one segment; socat (a standard tool) talking to tcpd.

Skipped only where namespaces cannot be made (not root, no `ip`); CI runs as
root, so there it always runs.
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
import time
from typing import Dict, Iterator

import pytest

import pyipc

import netns
from conftest import (BACKENDS, CHILD_ENV, check_echo_large_and_in_order,
                      frame, require_backend, require_network, require_socat, ROOT)



@pytest.fixture(scope="module", autouse=True)
def namespaces() -> None:
    """Every test here makes hosts of network namespaces."""
    require_network()

#: Seconds after which tcpd ends a connection whose peer went silent (short
#: here so that the cut-link test is quick).
DEAD_PEER = 2.0
PORT = 9000
#: websocketd's port on B (A's websocketd, which dials, listens on A's own loopback).
WS_PORT = 8080


class Stack:
    """Host A (ipcd, tcpd) and host B (tcpd exposing pong and sink; services
    pong, hidden) for one backend, and the IPC_NETWORK a client on A uses."""

    def __init__(self, net: netns.Network, backend: str) -> None:
        self.a, self.b = net.hosts
        self.backend = backend
        env = dict(CHILD_ENV, PYIPC_BACKEND=backend)
        for name in ("pong", "hidden"):
            self.b.pongd(name, env)
        b_addr = f"{self.b.address}:{PORT}"
        b_addr6 = f"[{self.b.address6}]:{PORT}"
        self.b.daemon(["tcpd", "--listen", b_addr, "--listen", b_addr6, "--expose",
                       "pong,missing", "--dead-peer-timeout", str(DEAD_PEER)], env, backend)
        self.a.daemon(["tcpd", "--dead-peer-timeout", str(DEAD_PEER),
                       "--connect-timeout", "5"], env, backend)
        self.a.daemon(["ipcd", "--request-timeout", "10"], env, backend)
        ws_addr = f"{self.b.address}:{WS_PORT}"
        self.b.daemon(["websocketd", "--host", self.b.address, "--port", str(WS_PORT),
                       "--expose", "pong,missing"], env, backend)
        self.a.daemon(["websocketd", "--connect-timeout", "5"], env, backend)
        self.network = ";".join([
            f"pong tcp://{b_addr}/pong",
            f"pong6 tcp://{b_addr6}/pong",
            f"bynamed tcp://host-b:{PORT}/pong",
            f"missing tcp://{b_addr}/missing",
            f"hidden tcp://{b_addr}/hidden",
            f"down tcp://{self.b.address}:{PORT + 1}/pong",
            f"wspong ws://{ws_addr}/pong",
            f"wsmissing ws://{ws_addr}/missing",
            f"wshidden ws://{ws_addr}/hidden",
        ])

    def client(self) -> pyipc.Context:
        """A context of a client on host A (A's run dir: A's ipcd)."""
        return pyipc.Context(rundir=self.a.rundir, backend=self.backend)


@pytest.fixture(scope="module")
def net() -> Iterator[netns.Network]:
    network = netns.Network(hosts=2)
    try:
        yield network
    finally:
        network.close()


@pytest.fixture(scope="module", params=BACKENDS)
def stack(request, net) -> Iterator[Stack]:
    backend = require_backend(request.param)
    try:
        yield Stack(net, backend)
    finally:
        for host in net.hosts:
            host.stop_all()


@pytest.fixture
def client(stack, monkeypatch) -> Iterator[pyipc.Context]:
    monkeypatch.setenv("IPC_NETWORK", stack.network)
    with stack.client() as ctx:
        yield ctx


# ------------------------------------------------------------ reaching pong on B

def test_messages_both_ways_large_and_in_order(client):
    check_echo_large_and_in_order(client, client.connect("pong", timeout=15), b"hello B")


def test_over_ipv6(client, stack):
    import socket
    fd = client.connect("pong6", timeout=15)
    sock = socket.socket(fileno=fd)
    try:
        assert sock.family == socket.AF_INET6
        assert sock.getpeername()[:2] == (stack.b.address6, PORT)
    finally:
        sock.detach()
    client.write(fd, b"over IPv6")
    assert client.read(fd, timeout=10) == b"over IPv6"
    client.close(fd)


def test_through_websocketd_both_ways_large_and_in_order(client):
    """The ws scheme: A's websocketd dials B's, which serves pong."""
    check_echo_large_and_in_order(client, client.connect("wspong", timeout=15),
                                  b"hello B over a WebSocket")


def test_through_websocketd_refusals_are_said(client):
    with pytest.raises(pyipc.ServiceNotFoundError) as info:
        client.connect("wsmissing", timeout=15)
    assert str(info.value) == ("ipcd could not connect to service wsmissing (noservice): "
                               "503 Service Unavailable: service 'missing' is not running")
    with pytest.raises(pyipc.NetworkError) as info:
        client.connect("wshidden", timeout=15)
    assert str(info.value) == ("ipcd could not connect to service wshidden (refused): "
                               "404 Not Found: no service 'hidden' is exposed here")


def test_by_host_name(client, stack):
    """tcpd on A resolves host-b (the namespace's /etc/hosts) and dials it."""
    fd = client.connect("bynamed", timeout=15)
    client.write(fd, b"to host-b")
    assert client.read(fd, timeout=10) == b"to host-b"
    client.close(fd)


def test_the_fd_is_the_tcp_socket_to_b(client, stack):
    """tcpd hands the dialled socket itself to the client: no relay on A."""
    import socket
    fd = client.connect("pong", timeout=15)
    sock = socket.socket(fileno=fd)
    try:
        assert sock.family == socket.AF_INET
        assert sock.getpeername() == (stack.b.address, PORT)
    finally:
        sock.detach()
    client.close(fd)


def test_asyncio_client(stack, monkeypatch):
    """pyipc.aio's connect() through ipcd takes the TCP socket as a connection too."""
    import asyncio
    import pyipc.aio
    monkeypatch.setenv("IPC_NETWORK", stack.network)

    async def main() -> list:
        async with pyipc.aio.Context(rundir=stack.a.rundir, backend=stack.backend) as ctx:
            conn = await ctx.connect("pong", timeout=15)
            for i in range(100):
                await conn.send(b"aio %d" % i)
            return [await asyncio.wait_for(conn.recv(), 10) for _ in range(100)]
    assert asyncio.run(main()) == [b"aio %d" % i for i in range(100)]


# ------------------------------------------------------------ faults

def test_remote_tcpd_down(client, stack):
    with pytest.raises(pyipc.NetworkError) as info:
        client.connect("down", timeout=15)
    assert str(info.value) == (f"ipcd could not connect to service down (unreachable): "
                               f"{stack.b.address}:{PORT + 1}: Connection refused")


def test_remote_service_missing(client):
    with pytest.raises(pyipc.ServiceNotFoundError) as info:
        client.connect("missing", timeout=15)
    assert re.fullmatch(r"ipcd could not connect to service missing \(noservice\): "
                        r"no service missing on \S+", str(info.value)), info.value


def test_unexposed_service(client):
    with pytest.raises(pyipc.NetworkError) as info:
        client.connect("hidden", timeout=15)
    assert str(info.value) == ("ipcd could not connect to service hidden (refused): "
                               "service hidden is not exposed by this tcpd")


def relay_on_b(stack: Stack, client_port: int) -> bool:
    """Whether tcpd on B still holds the TCP connection from the client's port."""
    out = stack.b.run(["ss", "-Htn", "state", "established", f"( dport = :{client_port} )"],
                      capture_output=True, text=True, check=True)
    return bool(out.stdout.strip())


def test_link_cut_mid_stream_ends_the_connection(client, stack):
    """Both ends see it within about --dead-peer-timeout: the client's
    read fails (TCP_USER_TIMEOUT on unacknowledged data), and tcpd on B ends
    the relay to pong (keepalive probes on an idle connection)."""
    import socket
    fd = client.connect("pong", timeout=15)
    client.write(fd, b"before")
    assert client.read(fd, timeout=10) == b"before"
    sock = socket.socket(fileno=fd)
    client_port = sock.getsockname()[1]
    sock.detach()
    assert relay_on_b(stack, client_port)
    stack.a.link(up=False)
    try:
        started = time.monotonic()
        with pytest.raises(pyipc.IPCError) as info:
            client.write(fd, b"into the void")        # buffered: goes out, never acked
            client.read(fd, timeout=DEAD_PEER * 5)
        took = time.monotonic() - started
        # An error of the connection (the kernel's timeout), not the read's own timeout.
        assert not isinstance(info.value, pyipc.TimeoutError), info.value
        assert took < DEAD_PEER * 4, took
        # No event to wait for on B: look until the relay is gone, within a bound.
        while relay_on_b(stack, client_port):
            assert time.monotonic() - started < DEAD_PEER * 5, "B still relays"
            time.sleep(0.1)
    finally:
        stack.a.link(up=True)
    client.close(fd)


# ------------------------------------------------------------ the wire, from A

ONE_SEGMENT = r"""
import socket, struct, sys, time
frame = lambda p: struct.pack(">I", len(p)) + p
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
if sys.argv[3] == "newline":
    s.sendall(b"pong\n" + frame(b"first") + frame(b"second"))    # one segment
else:                                          # libIPC's tcpd: the bare name
    s.sendall(b"pong")
    assert s.recv(2, socket.MSG_WAITALL) == b"ok"
    s.sendall(frame(b"first") + frame(b"second"))
want = (b"ok" if sys.argv[3] == "newline" else b"") + frame(b"first") + frame(b"second")
got = b""
while len(got) < len(want):
    more = s.recv(100)
    assert more, got
    got += more
print(got == want, repr(got))
"""


@pytest.mark.parametrize("style", ["newline", "bare"])
def test_handshake_and_messages_in_one_segment(stack, style):
    out = stack.a.run([sys.executable, "-c", ONE_SEGMENT, stack.b.address, str(PORT), style],
                      capture_output=True, text=True, timeout=30)
    assert out.stdout.startswith("True"), (out.stdout, out.stderr)


def test_socat_reaches_pong_through_tcpd(stack):
    require_socat()
    proc = stack.a.spawn(["socat", "-", f"TCP:{stack.b.address}:{PORT}"], CHILD_ENV,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(b"pong\n" + frame(b"via socat"))
    proc.stdin.flush()
    want = b"ok" + frame(b"via socat")
    assert proc.stdout.read(len(want)) == want
    proc.stdin.close()                          # socat ends when the stream does
    assert proc.wait(10) == 0


def test_the_network_benchmark_runs():
    """bench/network.py (not a timed test: it must run and report its table)."""
    require_backend("native")
    from pyipc import _native       # the library the checkout's children load
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYIPC_LIBRARY": str(_native.LIBRARY_PATH)}
    done = subprocess.run([sys.executable, "-m", "bench.network", "--repeats", "1",
                           "--rtt-n", "50", "--oneway-n", "20"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert re.search(r"^rtt, 64 B \(us\)(\s+[\d.]+){2}(\s+[\d.]+x){2}$", done.stdout, re.M)
    assert re.search(r"^64 KiB one-way \(MiB/s\)(\s+[\d.]+){2}(\s+[\d.]+x){2}$",
                     done.stdout, re.M)
