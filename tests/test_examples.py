"""The programs in examples/ run as separate processes on a temporary run dir,
on both backends: pong, the typed key-value store with concurrent clients, and
the chat that broadcasts each message to every other client.

Services print one ``ready`` line once they listen: the tests wait for it (never
for a fixed time), and stop them with SIGTERM/SIGINT, which must end them with
exit 0 and remove their socket. Every process started is killed and waited for
at the end, whatever happens.
"""

from __future__ import annotations

import ast
import importlib
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Callable, Dict, List, Optional

import pytest

import pyipc

# The `backend` fixture ("pure", "native"; native skipped when it cannot load,
# failed instead when PYIPC_REQUIRE_NATIVE=1) comes from tests/conftest.py.

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
#: The examples import the same pyipc as the tests.
PYIPC_HOME = str(Path(pyipc.__file__).resolve().parent.parent)
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(
    p for p in (PYIPC_HOME, os.environ.get("PYTHONPATH", "")) if p))
ENV.pop("PYIPC_BACKEND", None)
TIMEOUT = 60.0


class Proc:
    """A running example: its stdout lines arrive in a queue (a reader thread)."""

    def __init__(self, script: str, *args: str, stdin: Optional[int] = None) -> None:
        self.name = script
        self.popen = subprocess.Popen(
            [sys.executable, str(EXAMPLES / script), *args], stdin=stdin,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        self.lines: "queue.Queue[Optional[str]]" = queue.Queue()
        self.seen: List[str] = []
        self.stderr = ""
        self._out = threading.Thread(target=self._read, daemon=True)
        self._err = threading.Thread(target=self._read_err, daemon=True)
        self._out.start()
        self._err.start()

    def _read(self) -> None:
        for line in self.popen.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def _read_err(self) -> None:
        self.stderr = self.popen.stderr.read()

    def expect(self, match: Callable[[str], bool], timeout: float = TIMEOUT) -> str:
        """The first new stdout line that matches (fails on timeout or exit)."""
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                pytest.fail(f"{self.name}: no matching line within {timeout} s; "
                            f"saw {self.seen!r}")
            if line is None:
                self.popen.wait(timeout)
                self._err.join(timeout)
                pytest.fail(f"{self.name} ended (exit {self.popen.returncode}) before a "
                            f"matching line; saw {self.seen!r}; stderr: {self.stderr}")
            self.seen.append(line)
            if match(line):
                return line

    def finish(self, timeout: float = TIMEOUT) -> List[str]:
        """Wait for the exit; every stdout line (also those already seen)."""
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.name} did not end within {timeout} s; saw {self.seen!r}")
        self._out.join(timeout)
        self._err.join(timeout)
        while not self.lines.empty():
            line = self.lines.get_nowait()
            if line is not None:
                self.seen.append(line)
        return self.seen

    def kill(self) -> None:
        """Kill (if still running) and reap."""
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()
        if self.popen.stdin is not None and not self.popen.stdin.closed:
            try:
                self.popen.stdin.close()
            except OSError:
                pass


@pytest.fixture
def rundir():
    """A private, short run dir (the example services create it)."""
    top = tempfile.mkdtemp(prefix="pyipc-ex-", dir="/tmp")
    try:
        yield os.path.join(top, "run")
    finally:
        shutil.rmtree(top, ignore_errors=True)


@pytest.fixture
def run(backend: str, rundir: str):
    """start(script, *args) -> Proc with --rundir/--backend; all killed at teardown."""
    started: List[Proc] = []

    def start(script: str, *args: str, stdin: Optional[int] = None) -> Proc:
        proc = Proc(script, "--rundir", rundir, "--backend", backend, *args, stdin=stdin)
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in started:
            proc.kill()


def start_service(run, script: str) -> Proc:
    service = run(script)
    line = service.expect(lambda l: "ready" in l)
    assert line.startswith(script[:-3] + ": ready on ")
    return service


def stop_service(service: Proc, rundir: str, name: str, sig: int = signal.SIGTERM,
                 timeout: float = TIMEOUT) -> List[str]:
    """Signal the service; it must exit 0 within timeout and remove its socket."""
    assert os.path.exists(os.path.join(rundir, name)), (service.popen.poll(), service.seen, service.stderr)
    service.popen.send_signal(sig)
    lines = service.finish(timeout)
    assert service.popen.returncode == 0, service.stderr
    assert not os.path.exists(os.path.join(rundir, name))
    return lines


# -- pong --------------------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_pong(run, rundir: str, backend: str, sig: int) -> None:
    service = start_service(run, "pong_service.py")
    assert f"(backend {backend})" in service.seen[0]
    client = run("pong_client.py", "hello", "", "héllo wörld", "x" * 100000)
    lines = client.finish()
    assert client.popen.returncode == 0, client.stderr
    assert lines[:3] == ["sent 'hello', received 'hello'", "sent '', received ''",
                         "sent 'héllo wörld', received 'héllo wörld'"]
    assert len(lines) == 4 and "MISMATCH" not in lines[3]
    assert stop_service(service, rundir, "pong", sig)[-1] == \
        "pong_service: stopped after 4 echo(es)"


def test_pong_client_without_service(run) -> None:
    client = run("pong_client.py", "hello")
    assert client.finish() == []
    assert client.popen.returncode == 1
    assert "pong_client: no service pong in" in client.stderr


# -- key-value store ---------------------------------------------------------------
CLIENTS = 5
KEYS = 12


def client_ops(i: int) -> List[str]:
    """Client i: puts its keys, reads them back, deletes the odd ones, writes 'last'."""
    ops: List[str] = []
    for j in range(KEYS):
        ops += ["put", f"c{i}-k{j}", f"v{i}-{j}"]
    for j in range(KEYS):
        ops += ["get", f"c{i}-k{j}"]
    for j in range(1, KEYS, 2):
        ops += ["delete", f"c{i}-k{j}"]
    ops += ["put", "last", str(i), "get", f"c{i}-k0"]
    return ops


def test_kv_with_concurrent_clients(run, rundir: str) -> None:
    service = start_service(run, "kv_service.py")
    clients = [run("kv_client.py", *client_ops(i)) for i in range(CLIENTS)]
    for i, client in enumerate(clients):
        lines = client.finish()
        assert client.popen.returncode == 0, (lines, client.stderr)
        expected = ([f"put c{i}-k{j} -> ok" for j in range(KEYS)]
                    + [f"get c{i}-k{j} -> 'v{i}-{j}'" for j in range(KEYS)]
                    + [f"delete c{i}-k{j} -> ok" for j in range(1, KEYS, 2)]
                    + ["put last -> ok", f"get c{i}-k0 -> 'v{i}-0'"])
        assert lines == expected
    final = run("kv_client.py", "dump")
    lines = final.finish()
    assert final.popen.returncode == 0, final.stderr
    assert len(lines) == 1 and lines[0].startswith("dump -> ")
    state = ast.literal_eval(lines[0][len("dump -> "):])
    expected_state: Dict[str, str] = {f"c{i}-k{j}": f"v{i}-{j}"
                                      for i in range(CLIENTS) for j in range(0, KEYS, 2)}
    assert state.pop("last") in {str(i) for i in range(CLIENTS)}
    assert state == expected_state
    assert stop_service(service, rundir, "kv")[-1] == \
        f"kv_service: stopped with {len(expected_state) + 1} key(s)"


def test_kv_errors(run, rundir: str, backend: str) -> None:
    service = start_service(run, "kv_service.py")
    client = run("kv_client.py", "get", "nothing", "delete", "nothing", "put", "a", "1",
                 "get", "a")
    assert client.finish() == ["get nothing -> error: no key 'nothing'",
                               "delete nothing -> error: no key 'nothing'",
                               "put a -> ok", "get a -> '1'"]
    assert client.popen.returncode == 1
    # A request that does not decode gets an error reply; the connection stays.
    sys.path.insert(0, str(EXAMPLES))
    try:
        from kv_messages import Get, Reply, registry
    finally:
        sys.path.remove(str(EXAMPLES))
    with pyipc.Context(rundir=rundir, backend=backend) as ctx:
        fd = ctx.connect("kv")
        ctx.write(fd, b"\x63garbage")
        reply = ctx.read_typed(fd, registry)
        assert isinstance(reply, Reply) and not reply.ok
        assert reply.error.startswith("bad request: unknown message type 99")
        ctx.write(fd, b"\x01\xff")
        assert "is not valid CBOR" in ctx.read_typed(fd, registry).error
        ctx.write_typed(fd, Get("a"), registry)
        assert ctx.read_typed(fd, registry) == Reply(True, "1")
    bad = run("kv_client.py", "frobnicate")
    assert bad.finish() == [] and bad.popen.returncode == 2
    assert "unknown operation 'frobnicate'" in bad.stderr
    stop_service(service, rundir, "kv", signal.SIGINT)


# -- chat ----------------------------------------------------------------------------
NAMES = ["alice", "bob", "carol"]
MESSAGES = 20


def said(lines: List[str]) -> List[tuple]:
    """(sender, text) of every chat line (not the joined/left notices)."""
    out = []
    for line in lines:
        if line.startswith(("joined as ", "* ")):
            continue
        sender, _, text = line.partition(": ")
        out.append((sender, text))
    return out


def test_chat_broadcasts_to_every_other_client(run, rundir: str) -> None:
    service = start_service(run, "chat_service.py")
    clients = {}
    for name in NAMES:     # each joins before the next, and all before anyone speaks
        clients[name] = run("chat_client.py", "--name", name,
                            "--expect", str(MESSAGES * (len(NAMES) - 1)), stdin=subprocess.PIPE)
        joined = clients[name].expect(lambda l: l.startswith("joined as "))
        assert joined == f"joined as {name}; members: " + ", ".join(
            sorted(NAMES[:NAMES.index(name) + 1]))
    texts = {name: [f"message {k} from {name}" for k in range(MESSAGES)] for name in NAMES}
    for name, proc in clients.items():
        proc.popen.stdin.write("".join(t + "\n" for t in texts[name]))
        proc.popen.stdin.close()
    for name, proc in clients.items():
        lines = proc.finish()
        assert proc.popen.returncode == 0, (lines, proc.stderr)
        got = said(lines)
        assert all(sender != name for sender, _ in got), f"{name} received its own message"
        for other in NAMES:
            if other != name:
                assert [t for s, t in got if s == other] == texts[other], (name, other)
        assert len(got) == MESSAGES * (len(NAMES) - 1)
    assert {"* bob joined", "* carol joined"} <= set(clients["alice"].seen)
    stop_service(service, rundir, "chat")


def test_chat_refuses_a_taken_name(run, rundir: str) -> None:
    service = start_service(run, "chat_service.py")
    first = run("chat_client.py", "--name", "dave", stdin=subprocess.PIPE)
    first.expect(lambda l: l.startswith("joined as dave"))
    second = run("chat_client.py", "--name", "dave", stdin=subprocess.PIPE)
    assert second.finish() == [] and second.popen.returncode == 1
    assert "refused: the name 'dave' is taken or empty" in second.stderr
    first.popen.stdin.close()
    first.finish()
    assert first.popen.returncode == 0
    stop_service(service, rundir, "chat")


@pytest.mark.parametrize("script, name, payload", [
    ("pong_service.py", "pong", b"bye"),
    ("kv_service.py", "kv", bytes.fromhex("02a2636b657961786576616c756501")),  # Put("x", 1)
], ids=["pong", "kv"])
def test_services_survive_clients_that_hang_up_at_once(run, rundir: str, backend: str,
                                                       script: str, name: str,
                                                       payload: bytes) -> None:
    """A request whose sender is gone before the reply is sent (the reply raises
    ConnectionClosedError in the service) must not break the service."""
    service = start_service(run, script)
    for _ in range(20):
        with pyipc.Context(rundir=rundir, backend=backend) as ctx:
            ctx.write(ctx.connect(name), payload)
    client = run("pong_client.py", "--name", "pong", "still there") if name == "pong" else \
        run("kv_client.py", "get", "x")
    lines = client.finish()
    assert client.popen.returncode == 0, (lines, client.stderr)
    assert lines == (["sent 'still there', received 'still there'"] if name == "pong"
                     else ["get x -> 1"])
    stop_service(service, rundir, name)


# -- stopping ------------------------------------------------------------------------
#: A service must end this soon after SIGINT/SIGTERM (generous: a loaded machine).
STOP_S = 5.0
SERVICES = [("pong_service.py", "pong"), ("kv_service.py", "kv"),
            ("chat_service.py", "chat"), ("uid_guard_service.py", "guard")]


def example_module(module: str):
    """A module of examples/ (the message registries), imported as the examples do."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        return importlib.import_module(module)
    finally:
        sys.path.remove(str(EXAMPLES))


def exchange(ctx: pyipc.Context, fd: int, name: str) -> None:
    """One request on fd and its answer: the service then waits for the next event."""
    if name == "kv":
        kv = example_module("kv_messages")
        ctx.write_typed(fd, kv.Put("x", 1), kv.registry)
        assert ctx.read_typed(fd, kv.registry, timeout=TIMEOUT) == kv.Reply(True)
    elif name == "chat":
        chat = example_module("chat_messages")
        ctx.write_typed(fd, chat.Join("idle"), chat.registry)
        assert ctx.read_typed(fd, chat.registry, timeout=TIMEOUT) == chat.Welcome(["idle"])
    else:
        ctx.write(fd, b"ping")
        assert ctx.read(fd, timeout=TIMEOUT) == b"ping"


@pytest.mark.parametrize("idle_client", [False, True], ids=["alone", "idle-client"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("script, name", SERVICES, ids=[n for _, n in SERVICES])
def test_services_stop_promptly_on_a_signal(run, rundir: str, backend: str, script: str,
                                            name: str, sig: int, idle_client: bool) -> None:
    """The signal's handler runs in the wait itself (no wakeup fd, no polling): the
    service ends within STOP_S, exit 0, socket removed (also with a client connected)."""
    service = start_service(run, script)
    with pyipc.Context(rundir=rundir, backend=backend) as ctx:
        if idle_client:
            fd = ctx.connect(name)
            exchange(ctx, fd, name)
        lines = stop_service(service, rundir, name, sig, timeout=STOP_S)
        assert lines[-1].startswith(script[:-3] + ": stopped"), lines
