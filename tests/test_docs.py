"""The Python examples of README.md and docs/ run as written, on both backends.

Every ```python block of README.md and of docs/**/*.md is one of:

- a program (no marker): run as a subprocess on a fresh run dir; it must exit 0;
- a service (``<!-- service -->`` on a line before it): started in the background,
  it must print ``ready`` once it listens;
- a client (``<!-- client -->`` before it): run as a program against the last
  service before it in the same file, which must still be running when it is done;
- a block that must not run (``<!-- no-run -->`` before it): only compiled. There
  are very few (test_few_blocks_do_not_run).

So an unmarked block that is not a complete program fails. Every process runs on a
temporary run dir (env RUNDIR) with env PYIPC_BACKEND set to the test's backend; every
wait is bounded (a deadlock fails the test instead of hanging it), and every process
started is killed and reaped at the end, whatever happens.

The quick start's service ("A service and a client") is also attacked: clients that
hang up right after sending (or in the middle of a frame), one that writes 20,000
messages of 1 KiB before it reads any echo, and one that never reads. It must keep
serving; so must examples/pong_service.py, the same service with options.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import pytest

import pyipc

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
#: Every page whose Python blocks are run: the README, then docs/ in name order.
PAGES = [README] + sorted((ROOT / "docs").rglob("*.md"))
#: The programs import the same pyipc as the tests.
PYIPC_HOME = str(Path(pyipc.__file__).resolve().parent.parent)
#: Seconds any one wait may take before the test fails (a loaded 2-core machine).
TIMEOUT = 120.0

MARKS = {"<!-- service -->": "service", "<!-- client -->": "client",
         "<!-- no-run -->": "no-run"}
#: At most this many blocks may be marked no-run, in all pages together.
MAX_NO_RUN = 3
PYTHON_FENCE = re.compile(r"^```(python3?|py)\s*$")


@dataclass(frozen=True)
class Block:
    """One ```python block of a page."""

    page: str      # the page's path, relative to the checkout
    line: int      # 1-based line of its opening fence
    kind: str      # "program", "service", "client" or "no-run"
    code: str
    service: Optional["Block"] = None   # for a client: the service block it runs against

    @property
    def id(self) -> str:
        """The block's name in test ids and messages: its first line, or its place."""
        first = self.code.lstrip().splitlines()[0] if self.code.strip() else ""
        title = first[1:].split(":")[0].strip() if first.startswith("#") else ""
        return f"{self.page}:{self.line}" + (f" ({title})" if title else "")


def page_blocks(page: str, text: str) -> List[Block]:
    """Every ```python block of text, with its kind from the marker before it."""
    lines = text.splitlines()
    blocks: List[Block] = []
    service: Optional[Block] = None
    i = 0
    while i < len(lines):
        if not PYTHON_FENCE.match(lines[i]):
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
        assert end is not None, f"{page}:{i + 1}: code block never closed"
        before = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        kind = MARKS.get(before, "program")
        code = "\n".join(lines[i + 1:end]) + "\n"
        assert kind != "client" or service is not None, (
            f"{page}:{i + 1}: a client block with no service block before it")
        block = Block(page, i + 1, kind, code, service if kind == "client" else None)
        if kind == "service":
            service = block
        blocks.append(block)
        i = end + 1
    return blocks


BLOCKS = [block for path in PAGES
          for block in page_blocks(str(path.relative_to(ROOT)), path.read_text(encoding="utf-8"))]


def blocks_of(*kinds: str) -> List[Block]:
    return [b for b in BLOCKS if b.kind in kinds]


def quick_start(title: str) -> Block:
    """The README quick start's block whose first line names the file `title`."""
    found = [b for b in BLOCKS if b.page == "README.md" and b.code.startswith(f"# {title}:")]
    assert len(found) == 1, f"README.md has {len(found)} block(s) headed '# {title}:'"
    return found[0]

def workdir(env: Dict[str, str]) -> str:
    """The processes' working directory: the temporary one that holds RUNDIR."""
    return os.path.dirname(env["RUNDIR"])


class Service:
    """A service running in the background; its output is drained by threads."""

    def __init__(self, argv: List[str], env: Dict[str, str], name: str) -> None:
        self.name = name
        self.popen = subprocess.Popen(argv, env=env, cwd=workdir(env), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)
        self.lines: "queue.Queue[Optional[str]]" = queue.Queue()
        self.stderr: List[str] = []
        threading.Thread(target=self._read_out, daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()

    def _read_out(self) -> None:
        for line in self.popen.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def _read_err(self) -> None:
        for line in self.popen.stderr:
            self.stderr.append(line)

    def wait_ready(self) -> None:
        """Wait (bounded) for a stdout line containing "ready"."""
        seen: List[str] = []
        while True:
            try:
                line = self.lines.get(timeout=TIMEOUT)
            except queue.Empty:
                pytest.fail(f"{self.name}: no 'ready' line within {TIMEOUT} s; saw {seen!r}")
            if line is None:
                self.popen.wait(TIMEOUT)
                pytest.fail(f"{self.name} ended (exit {self.popen.returncode}) before "
                            f"printing 'ready'; stdout {seen!r}; stderr:\n{self.text_err()}")
            seen.append(line)
            if "ready" in line:
                return

    def assert_running(self) -> None:
        assert self.popen.poll() is None, (
            f"{self.name} ended (exit {self.popen.returncode}); stderr:\n{self.text_err()}")

    def text_err(self) -> str:
        return "".join(self.stderr)

    def kill(self) -> None:
        """Kill (if still running) and reap."""
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()


@pytest.fixture
def run_env(backend: str) -> Iterator[Dict[str, str]]:
    """The environment of every process: a fresh RUNDIR and PYIPC_BACKEND=backend."""
    top = tempfile.mkdtemp(prefix="pyipc-docs-", dir="/tmp")
    env = dict(os.environ, RUNDIR=os.path.join(top, "run"), PYIPC_BACKEND=backend,
               PYTHONPATH=os.pathsep.join(
                   p for p in (PYIPC_HOME, os.environ.get("PYTHONPATH", "")) if p))
    try:
        yield env
    finally:
        shutil.rmtree(top, ignore_errors=True)


@pytest.fixture
def services(run_env: Dict[str, str]):
    """start(argv, name) -> a ready Service; every one is killed at teardown."""
    started: List[Service] = []

    def start(argv: List[str], name: str) -> Service:
        service = Service(argv, run_env, name)
        started.append(service)
        service.wait_ready()
        return service

    try:
        yield start
    finally:
        for service in started:
            service.kill()


def start_block(services, block: Block) -> Service:
    return services([sys.executable, "-c", block.code], block.id)


def run_program(code: str, env: Dict[str, str], name: str,
                service: Optional[Service] = None) -> str:
    """Run code as a program (bounded by TIMEOUT); it must exit 0. Its stdout.

    A failure shows the stderr of `service` too (the one it runs against)."""
    def about_service() -> str:
        if service is None:
            return ""
        return (f"\n{service.name} (exit {service.popen.poll()}) stderr:\n"
                f"{service.text_err()}")

    try:
        done = subprocess.run([sys.executable, "-c", code], env=env, cwd=workdir(env),
                              capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as e:   # run() has killed and reaped it
        pytest.fail(f"{name} did not end within {TIMEOUT} s (deadlock?); "
                    f"stdout {e.stdout!r}; stderr {e.stderr!r}{about_service()}")
    assert done.returncode == 0, (
        f"{name} exited {done.returncode}; stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
        f"{about_service()}")
    return done.stdout


# -- every block of README.md and docs/ --------------------------------------------------
def test_the_readme_has_the_quick_start_pair() -> None:
    """The parser finds the quick start (so a broken parser cannot pass by finding
    nothing), and the client runs against the service."""
    service, client = quick_start("pong_service.py"), quick_start("pong_client.py")
    assert service.kind == "service"
    assert client.kind == "client" and client.service == service


def test_every_docs_page_is_read() -> None:
    """docs/ is found, and its pages hold programs and service/client pairs."""
    pages = {b.page for b in BLOCKS}
    assert "docs/guide.md" in pages
    assert len(blocks_of("program")) >= 10 and len(blocks_of("client")) >= 3


def test_few_blocks_do_not_run() -> None:
    """A block that is only compiled proves little: they stay the exception, and
    they compile."""
    skipped = blocks_of("no-run")
    assert len(skipped) <= MAX_NO_RUN, f"too many <!-- no-run --> blocks: {skipped}"
    for block in skipped:
        compile(block.code, block.id, "exec")


def test_the_api_page_documents_every_public_name() -> None:
    """docs/api.md has a ``::: pyipc.NAME`` for every name of pyipc.__all__."""
    page = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^::: pyipc\.(\w+)$", page, re.MULTILINE))
    assert sorted(set(pyipc.__all__) - documented) == []


@pytest.mark.parametrize("block", blocks_of("service"), ids=lambda b: b.id)
def test_service_block_starts(services, block: Block) -> None:
    start_block(services, block).assert_running()


@pytest.mark.parametrize("block", blocks_of("program", "client"), ids=lambda b: b.id)
def test_program_block_runs(services, run_env: Dict[str, str], block: Block) -> None:
    service = start_block(services, block.service) if block.service else None
    run_program(block.code, run_env, block.id, service)
    if service is not None:
        service.assert_running()


def test_quick_start_client_output(services, run_env: Dict[str, str]) -> None:
    service = start_block(services, quick_start("pong_service.py"))
    out = run_program(quick_start("pong_client.py").code, run_env, "pong_client.py", service)
    assert out == "b'hello'\n10000 echoes\n"


# -- the quick-start service under attack ----------------------------------------------
HANG_UP = '''
import os, socket, struct
import pyipc

for _ in range(20):                       # send, then close at once
    with pyipc.Context() as ctx:
        ctx.write(ctx.connect("pong"), b"bye")
for _ in range(5):                        # half a frame, then close
    s = socket.socket(socket.AF_UNIX)
    s.connect(os.path.join(os.environ["RUNDIR"], "pong"))
    s.sendall(struct.pack(">I", 1000) + b"x" * 10)
    s.close()
ctx = pyipc.Context()                     # send, then vanish without closing anything
ctx.write(ctx.connect("pong"), b"x" * 100_000)
os._exit(0)
'''

BATCH = '''
import pyipc

N, SIZE = 20_000, 1024
batch = [i.to_bytes(4, "big") * (SIZE // 4) for i in range(N)]
with pyipc.Context() as ctx:
    fd = ctx.connect("pong")
    ctx.write_many(fd, batch)             # all 20 MiB before reading any echo
    got = 0
    while got < N:
        for message in ctx.read_many(fd):
            if message != batch[got]:
                raise SystemExit(f"echo {got} differs")
            got += 1
print(got, "echoes")
'''

NEVER_READS = '''
import pyipc

chunk = bytes(64 << 10)
with pyipc.Context() as ctx:
    fd = ctx.connect("pong")
    try:
        for _ in range(400):              # 400 x 16 x 64 KiB = 400 MiB, never reading
            ctx.write_many(fd, [chunk] * 16)
    except pyipc.ConnectionClosedError:
        print("dropped")
    else:
        print("never dropped")
'''


@pytest.fixture(params=["readme", "examples"])
def pong_service(request, services) -> Service:
    """The README's quick-start service, or examples/pong_service.py, ready."""
    if request.param == "readme":
        return start_block(services, quick_start("pong_service.py"))
    return services([sys.executable, str(ROOT / "examples" / "pong_service.py")],
                    "examples/pong_service.py")


def still_serves(service: Service, env: Dict[str, str]) -> None:
    """The service is alive and the quick-start client gets its echoes."""
    out = run_program(quick_start("pong_client.py").code, env, "pong_client.py", service)
    assert out.endswith("10000 echoes\n")
    service.assert_running()


def test_service_survives_clients_that_hang_up_at_once(pong_service: Service,
                                                       run_env: Dict[str, str]) -> None:
    run_program(HANG_UP, run_env, "hang-up client", pong_service)
    still_serves(pong_service, run_env)


def test_service_echoes_a_large_batch_written_before_any_read(
        pong_service: Service, run_env: Dict[str, str]) -> None:
    assert run_program(BATCH, run_env, "batch client", pong_service) == "20000 echoes\n"
    still_serves(pong_service, run_env)


def test_service_drops_a_client_that_never_reads(pong_service: Service,
                                                 run_env: Dict[str, str]) -> None:
    assert run_program(NEVER_READS, run_env, "client that never reads",
                       pong_service) == "dropped\n"
    still_serves(pong_service, run_env)
