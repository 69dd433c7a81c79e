"""ipcd routes tls:// like any scheme: to the local service `tls` (pyipc
tlsd), whose answer reaches the client, on both backends. Host A and host B
are two run directories on 127.0.0.1; certificates come from trustme."""

from __future__ import annotations

import os
import tempfile
from typing import Iterator

import pytest
import trustme      # a test dependency (pyproject's test extra): missing, the run fails

import pyipc
from pyipc.daemons._tls_options import TlsdConfig
from pyipc.daemons.ipcd import Ipcd
from pyipc.daemons.tlsd import Tlsd

from daemon_harness import Pong, running


@pytest.fixture
def hosts(backend) -> Iterator[tuple]:
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b, \
            tempfile.TemporaryDirectory() as pem:
        ca = trustme.CA()
        ca_path, server_path = os.path.join(pem, "ca.pem"), os.path.join(pem, "server.pem")
        ca.cert_pem.write_to_path(ca_path)
        ca.issue_cert("localhost", "127.0.0.1").private_key_and_cert_chain_pem.write_to_path(
            server_path)
        server = Tlsd(TlsdConfig(listen=("127.0.0.1:0",), cert=server_path,
                                 expose=frozenset({"pong"})), rundir=b, backend=backend)
        with running(Pong(rundir=b, backend=backend)), running(server), \
                running(Tlsd(TlsdConfig(ca=ca_path), rundir=a, backend=backend)), \
                running(Ipcd(rundir=a, backend=backend)):
            yield a, int(server.addresses[0][1])


def test_a_client_reaches_pong_through_ipcd_and_tlsd(hosts, backend, monkeypatch):
    rundir, port = hosts
    monkeypatch.setenv("IPC_NETWORK", f"pong tls://localhost:{port}/pong;"
                                      f"hidden tls://localhost:{port}/hidden")
    with pyipc.Context(rundir=rundir, backend=backend) as ctx:
        fd = ctx.connect("pong", timeout=20)
        for i in range(50):
            ctx.write(fd, b"tls %d" % i)
            assert ctx.read(fd, timeout=10) == b"tls %d" % i
        with pytest.raises(pyipc.IPCError) as info:     # tlsd's refusal, relayed
            ctx.connect("hidden", timeout=20)
        assert type(info.value) is pyipc.NetworkError
        assert str(info.value) == (f"ipcd could not connect to service hidden (refused): "
                                   f"localhost:{port}: service hidden is not exposed")
