"""A client on host A reaches services on host B by name through ipcd + tlsd,
across two network namespaces joined by a veth link (tests/netns.py), each
host with its own run directory and daemons (`pyipc ... ipcd|tlsd|pongd` as
processes under `ip netns exec`), on both backends: messages both ways, a
1 MiB message, 1,000 messages in order; the remote tlsd down, a missing or
unexposed remote service, a certificate from another CA, an expired one, a
plaintext client on the TLS port, mutual TLS without a client certificate, a
link cut mid-stream; socat's OpenSSL client (a standard tool) talking to tlsd.

Skipped only where namespaces cannot be made (not root, no `ip`); CI runs as
root, so there it always runs.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from typing import Dict, Iterator

import pytest

import pyipc

import netns
from conftest import (BACKENDS, CHILD_ENV, check_echo_large_and_in_order,
                      frame, require_backend, require_network, require_socat)
from tlsd_harness import Certs



@pytest.fixture(scope="module", autouse=True)
def namespaces() -> None:
    """Every test here makes hosts of network namespaces."""
    require_network()
import trustme  # a test dependency (pyproject's test extra): missing, the run fails

#: Seconds after which tlsd ends a connection whose peer went silent (short
#: here so that the cut-link test is quick).
DEAD_PEER = 2.0
PORT = 9443          # B's tlsd (certificate from A's CA)
EXPIRED_PORT = 9444  # B's tlsd with an expired certificate
STRANGER_PORT = 9445  # B's tlsd with a certificate from a CA A does not trust
MUTUAL_PORT = 9446   # B's tlsd asking for a client certificate
WSS_PORT = 8443      # B's websocketd (wss://, asking for a client certificate)


class Stack:
    """Host B: services pong and hidden, four listening tlsd (see the ports);
    host A: ipcd and a dialing tlsd trusting the test CA. `network` is the
    IPC_NETWORK of a client on A."""

    def __init__(self, net: netns.Network, backend: str, certs: Certs, tmp: str) -> None:
        self.a, self.b = net.hosts
        self.backend = backend
        self.extra: list = []           # B's other tlsd (own run dirs), ended with B's
        try:
            self._start(certs, tmp)
        except BaseException:
            for host in self.extra:
                host.stop_all()
            raise

    def _start(self, certs: Certs, tmp: str) -> None:
        backend = self.backend
        env = dict(CHILD_ENV, PYIPC_BACKEND=backend)
        for name in ("pong", "hidden"):
            self.b.pongd(name, env)
        b = self.b.address
        server = certs._issue(tmp, f"b-{backend}.pem", b)
        expired = certs._issue(tmp, f"b-expired-{backend}.pem", b, expired=True)
        os.makedirs(os.path.join(tmp, "stranger"), exist_ok=True)
        stranger = Certs(os.path.join(tmp, "stranger"), trustme)._issue(
            tmp, f"b-stranger-{backend}.pem", b)
        common = ["--expose", "pong,missing", "--dead-peer-timeout", str(DEAD_PEER)]
        self.b.daemon(["tlsd", "--listen", f"{b}:{PORT}", "--cert", server, *common], env,
                      backend)
        # The faulty listeners are other tlsd on B: each needs a run dir of its
        # own (a run dir has one service `tls`); they refuse before any service.
        for port, cert, more in ((EXPIRED_PORT, expired, []), (STRANGER_PORT, stranger, []),
                                 (MUTUAL_PORT, server, ["--client-ca", certs.ca])):
            rundir = tempfile.mkdtemp(prefix="pyipc-b-", dir=tmp)
            host = netns.Host(self.b.netns, b, self.b.ifname, rundir)
            self.extra.append(host)
            host.daemon(["tlsd", "--listen", f"{b}:{port}", "--cert", cert, *common, *more],
                        env, backend)
        self.a.daemon(["tlsd", "--ca", certs.ca, "--dead-peer-timeout", str(DEAD_PEER),
                       "--connect-timeout", "5"], env, backend)
        self.a.daemon(["ipcd", "--request-timeout", "10"], env, backend)
        # The wss scheme, with mutual TLS: B's websocketd asks for a client
        # certificate, A's presents one and verifies B's.
        self.b.daemon(["websocketd", "--host", b, "--port", str(WSS_PORT), "--cert", server,
                       "--client-ca", certs.ca, "--expose", "pong"], env, backend)
        self.a.daemon(["websocketd", "--dial-ca", certs.ca, "--dial-cert",
                       certs._issue(tmp, f"a-{backend}.pem", "host-a"),
                       "--connect-timeout", "5"], env, backend)
        self.network = ";".join([
            f"wsspong wss://{b}:{WSS_PORT}/pong",
            f"pong tls://{b}:{PORT}/pong",
            f"missing tls://{b}:{PORT}/missing",
            f"hidden tls://{b}:{PORT}/hidden",
            f"down tls://{b}:{PORT + 10}/pong",
            f"expired tls://{b}:{EXPIRED_PORT}/pong",
            f"stranger tls://{b}:{STRANGER_PORT}/pong",
            f"mutual tls://{b}:{MUTUAL_PORT}/pong",
        ])

    def client(self) -> pyipc.Context:
        """A context of a client on host A (A's run dir: A's ipcd)."""
        return pyipc.Context(rundir=self.a.rundir, backend=self.backend)


@pytest.fixture(scope="module")
def tmp() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="pyipc-tls-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def certs(tmp) -> Certs:
    return Certs(tmp, trustme)


@pytest.fixture(scope="module")
def net() -> Iterator[netns.Network]:
    network = netns.Network(hosts=2)
    try:
        yield network
    finally:
        network.close()


@pytest.fixture(scope="module", params=BACKENDS)
def stack(request, net, certs, tmp) -> Iterator[Stack]:
    backend = require_backend(request.param)
    stack = None
    try:
        stack = Stack(net, backend, certs, tmp)
        yield stack
    finally:
        for host in net.hosts + (stack.extra if stack is not None else []):
            host.stop_all()


@pytest.fixture
def client(stack, monkeypatch) -> Iterator[pyipc.Context]:
    monkeypatch.setenv("IPC_NETWORK", stack.network)
    with stack.client() as ctx:
        yield ctx


# ------------------------------------------------------------ reaching pong on B

def test_messages_both_ways_large_and_in_order(client):
    check_echo_large_and_in_order(client, client.connect("pong", timeout=15), b"hello B, privately")


# ------------------------------------------------------------ faults, answered

def test_through_websocketd_over_wss_with_mutual_tls(client):
    """The wss scheme: A's websocketd dials B's over TLS (each verifies the
    other's certificate), which serves pong."""
    check_echo_large_and_in_order(client, client.connect("wsspong", timeout=15),
                                  b"hello B over wss")


def test_remote_tlsd_down(client, stack):
    with pytest.raises(pyipc.NetworkError, match=r"\(unreachable\): .*Connection refused"):
        client.connect("down", timeout=15)


def test_remote_service_missing(client):
    with pytest.raises(pyipc.ServiceNotFoundError, match=r"\(noservice\).*no service missing"):
        client.connect("missing", timeout=15)


def test_unexposed_service(client):
    with pytest.raises(pyipc.NetworkError, match=r"\(refused\).*service hidden is not exposed"):
        client.connect("hidden", timeout=15)


def test_certificate_from_another_ca(client):
    with pytest.raises(pyipc.NetworkError, match=r"\(tls\).*certificate verify failed"):
        client.connect("stranger", timeout=15)


def test_expired_certificate(client):
    with pytest.raises(pyipc.NetworkError, match=r"\(tls\).*expired"):
        client.connect("expired", timeout=15)


def test_mutual_tls_without_a_client_certificate(client):
    with pytest.raises(pyipc.NetworkError, match=r"\(tls\)"):
        client.connect("mutual", timeout=15)


PLAINTEXT = r"""
import socket, struct, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
s.sendall(b"pong\n" + struct.pack(">I", 5) + b"hello")      # tcpd's handshake, no TLS
got = b""
while True:
    more = s.recv(100)
    if not more:
        break
    got += more
print("closed", len(got), got.startswith(b"ok"))
"""


def test_plaintext_client_is_refused_and_tlsd_keeps_serving(client, stack):
    out = stack.a.run([sys.executable, "-c", PLAINTEXT, stack.b.address, str(PORT)],
                      capture_output=True, text=True, timeout=30)
    assert out.stdout.startswith("closed") and "True" not in out.stdout, (out.stdout,
                                                                          out.stderr)
    fd = client.connect("pong", timeout=15)              # B's tlsd still serves
    client.write(fd, b"still here")
    assert client.read(fd, timeout=10) == b"still here"
    client.close(fd)


def test_link_cut_mid_stream_ends_the_connection(client, stack):
    fd = client.connect("pong", timeout=15)
    client.write(fd, b"before")
    assert client.read(fd, timeout=10) == b"before"
    stack.a.link(up=False)
    try:
        started = time.monotonic()
        with pytest.raises(pyipc.IPCError) as info:
            client.write(fd, b"into the void")        # relayed by A's tlsd, never acked
            client.read(fd, timeout=DEAD_PEER * 5)
        took = time.monotonic() - started
    finally:
        stack.a.link(up=True)
    # The connection's end (A's tlsd gave up on B), not the read's own timeout.
    assert not isinstance(info.value, pyipc.TimeoutError), info.value
    assert took < DEAD_PEER * 4, took
    client.close(fd)


# ------------------------------------------------------------ a standard TLS client

def test_socat_openssl_reaches_pong_through_tlsd(stack, certs):
    require_socat()
    proc = stack.a.spawn(["socat", "-", f"OPENSSL:{stack.b.address}:{PORT},"
                          f"cafile={certs.ca}"], CHILD_ENV,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(b"pong\n" + frame(b"via socat and OpenSSL"))
    proc.stdin.flush()
    want = b"ok" + frame(b"via socat and OpenSSL")
    assert proc.stdout.read(len(want)) == want
    proc.stdin.close()
    assert proc.wait(10) == 0
