"""Simulated hosts for the networking tests: Linux network namespaces joined by
veth links, each host with its own run directory and its own processes.

Path-named Unix sockets are reachable across network namespaces, so each host
gets a run directory of its own: a shared one would let a client reach a
service without the network. A process "on" a host runs under `ip netns exec`;
a fd passed by SCM_RIGHTS keeps the namespace it was made in, so the test
process (in the root namespace) is a client on host A when it asks host A's
ipcd through A's run directory: the TCP socket it receives is A's.

Needs root and `ip` (iproute2); `available()` says why not otherwise. Every
namespace and process is removed by `Network.close()`, which the fixtures
call as finalizers.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional, Sequence

#: Seconds a daemon has to say READY=1 (a loaded CI machine starts Python slowly).
READY_TIMEOUT = 30.0


def available() -> Optional[str]:
    """None when namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "no ip command (iproute2)"
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class Host:
    """One network namespace: its name, address, run directory and processes."""

    def __init__(self, netns: str, address: str, ifname: str, rundir: str) -> None:
        self.netns = netns
        self.address = address
        self.address6 = ""          # its IPv6 address on the same link
        self.ifname = ifname
        self.rundir = rundir
        self.procs: List[subprocess.Popen] = []

    def run(self, argv: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
        """Run a command in this host's namespace to its end."""
        return subprocess.run(["ip", "netns", "exec", self.netns, *argv], **kwargs)

    def spawn(self, argv: Sequence[str], env: Dict[str, str], **kwargs) -> subprocess.Popen:
        """Start a command in this host's namespace (ended by Network.close)."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.netns, *argv], env=env, **kwargs)
        self.procs.append(proc)
        return proc

    def pongd(self, name: str, env: Dict[str, str]) -> subprocess.Popen:
        """`pyipc pongd NAME` (an echo service) on this host, returned once it serves."""
        proc = self.spawn([sys.executable, "-m", "pyipc", "--rundir", self.rundir,
                           "pongd", name], env, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith(f"pongd: serving {name}")   # ready
        return proc

    def daemon(self, args: Sequence[str], env: Dict[str, str], backend: str) -> subprocess.Popen:
        """`pyipc ARGS` on this host, its run dir and `backend`, returned once
        it told systemd's readiness protocol READY=1 (a datagram socket the
        test binds: its path is reachable from the namespace)."""
        notify_dir = tempfile.mkdtemp(prefix="pyipc-notify-")
        path = os.path.join(notify_dir, "n")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
                notify.bind(path)
                notify.settimeout(READY_TIMEOUT)
                # Its log goes to a file: a pipe nobody reads could fill and stall it.
                log_path = os.path.join(self.rundir, f".{args[0]}-{len(self.procs)}.log")
                with open(log_path, "w") as log:
                    proc = self.spawn([sys.executable, "-m", "pyipc", "--rundir",
                                       self.rundir, "--backend", backend, *args],
                                      env=dict(env, NOTIFY_SOCKET=path), stderr=log)
                try:
                    state = notify.recv(100)
                except socket.timeout:
                    proc.kill()
                    proc.wait(10)
                    with open(log_path) as log:
                        raise RuntimeError(f"pyipc {' '.join(args)} on {self.netns} did "
                                           f"not become ready: {log.read()}") from None
                assert state == b"READY=1", state
        finally:
            shutil.rmtree(notify_dir, ignore_errors=True)
        return proc

    def stop_all(self) -> None:
        """SIGTERM every process still running here, then SIGKILL the stubborn."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        self.procs.clear()

    def link(self, up: bool) -> None:
        """Bring this host's veth end up or down (down: a cut cable)."""
        _ip("-n", self.netns, "link", "set", self.ifname, "up" if up else "down")


class Network:
    """Hosts a, b (and c) joined by veth links a-b (10.201.1.0/24 and
    fd00:201:1::/64) and b-c (10.201.2.0/24, fd00:201:2::/64).

    Names carry the pid so that concurrent runs never meet.
    """

    def __init__(self, hosts: int = 2) -> None:
        assert 2 <= hosts <= 3
        tag = f"{os.getpid() % 100000}"
        self.hosts: List[Host] = []
        self._tmp = tempfile.mkdtemp(prefix="pyipc-net-")
        self._netns: List[str] = []
        try:
            for i, letter in enumerate("abc"[:hosts]):
                netns = f"pyipc-{tag}-{letter}"
                _ip("netns", "add", netns)
                self._netns.append(netns)
                _ip("-n", netns, "link", "set", "lo", "up")
                rundir = os.path.join(self._tmp, letter)
                os.mkdir(rundir, 0o770)
                self.hosts.append(Host(netns, "", "", rundir))
            # a <-> b on 10.201.1.0/24, b <-> c on 10.201.2.0/24
            self._join(self.hosts[0], self.hosts[1], tag, 1)
            if hosts == 3:
                self._join(self.hosts[1], self.hosts[2], tag, 2)
            self._write_hosts_files()
        except BaseException:
            self.close()
            raise

    def _join(self, left: Host, right: Host, tag: str, subnet: int) -> None:
        ends = []
        for host, side, last in ((left, "l", 1), (right, "r", 2)):
            ifname = f"p{tag}{subnet}{side}"[:15]
            ends.append((host, ifname, f"10.201.{subnet}.{last}", f"fd00:201:{subnet}::{last}"))
        _ip("link", "add", ends[0][1], "type", "veth", "peer", "name", ends[1][1])
        for host, ifname, address, address6 in ends:
            _ip("link", "set", ifname, "netns", host.netns)
            # Keep the IPv6 address through a link down/up (a cut-cable test):
            # by default Linux drops IPv6 addresses when the link goes down.
            subprocess.run(["ip", "netns", "exec", host.netns, "sh", "-c",
                            f"echo 1 > /proc/sys/net/ipv6/conf/{ifname}/keep_addr_on_down"],
                           check=True, capture_output=True)
            _ip("-n", host.netns, "addr", "add", f"{address}/24", "dev", ifname)
            # nodad: usable at once (duplicate address detection would take ~2 s)
            _ip("-n", host.netns, "addr", "add", f"{address6}/64", "dev", ifname, "nodad")
            _ip("-n", host.netns, "link", "set", ifname, "up")
            if not host.address:                    # a host's first link names it
                host.address, host.address6, host.ifname = address, address6, ifname

    def _write_hosts_files(self) -> None:
        """Host names: `ip netns exec NS` shows /etc/netns/NS/hosts as /etc/hosts,
        so in every namespace "host-a", "host-b"... name the hosts."""
        lines = ["127.0.0.1 localhost", "::1 localhost"]
        for host, letter in zip(self.hosts, "abc"):
            lines += [f"{host.address} host-{letter}", f"{host.address6} host-{letter}"]
        for netns in self._netns:
            os.makedirs(f"/etc/netns/{netns}", exist_ok=True)
            with open(f"/etc/netns/{netns}/hosts", "w") as f:
                f.write("\n".join(lines) + "\n")

    def close(self) -> None:
        """End every process, remove every namespace (and the veths in them)."""
        for host in self.hosts:
            host.stop_all()
        for netns in self._netns:
            subprocess.run(["ip", "netns", "del", netns], capture_output=True)
            shutil.rmtree(f"/etc/netns/{netns}", ignore_errors=True)
        self._netns.clear()
        shutil.rmtree(self._tmp, ignore_errors=True)
