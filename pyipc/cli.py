"""The pyipc command: demo, pongd (an echo service), pong (its client), bench,
and the networking daemons ipcd, tcpd, tlsd and websocketd.

Exit codes: 0 success; 1 a pyipc error (service busy, not found, ...) or an echo
that did not match; 2 bad usage (argparse); 128 + signal (130, 143) for demo or
pong stopped by SIGINT/SIGTERM (the services stop with 0).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from types import ModuleType
from typing import Any, Callable, Optional, Sequence

from . import (BackendError, ConnectionClosedError, Context, Event, EventType, IPCError,
               QueueFullError, available_backends)
from ._signal_wakeup import SignalWakeup
from ._version import DISTRIBUTION, __version__
from .daemons._commands import add_daemon_commands

log = logging.getLogger("pyipc.cli")

#: The directory that holds this pyipc package: a source checkout (with bench/
#: beside pyipc/) or site-packages.
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def int_from(low: int, high: int) -> Callable[[str], int]:
    """An argparse `type=`: an int from `low` to `high`, else the one-line
    usage error `must be an integer from LOW to HIGH, not 'TEXT'` (exit 2)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(
                f"must be an integer from {low} to {high}, not {text!r}")
        return value
    parse.__name__ = "int"           # argparse's fallback text names the type
    return parse


#: Bounds of demo's counts: every client is a process.
MAX_DEMO_CLIENTS = 1000
MAX_DEMO_MESSAGES = 100_000
#: Bound of bench --repeats.
MAX_BENCH_REPEATS = 1000


def _context(args: argparse.Namespace) -> Context:
    return Context(rundir=args.rundir, backend=args.backend)


#: The signals that stop a command: Ctrl-C and `kill`.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _on_stop_signals(handler: Any) -> dict[int, Any]:
    """Install `handler` for SIGINT and SIGTERM; the handlers it replaced."""
    return {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}


def cmd_pongd(args: argparse.Namespace) -> int:
    """Echo every message back to its sender until SIGINT/SIGTERM."""
    # Both signals raise KeyboardInterrupt in the call that waits (it returns to
    # Python so the handler runs), which ends the loop below. The wake-up pipe
    # makes the wait return for a signal that came just before it began.
    _on_stop_signals(signal.default_int_handler)
    served = 0
    wakeup = SignalWakeup()
    with _context(args) as ctx:
        try:
            ctx.add_external(wakeup.fd)         # close_all() closes it
            wakeup.install()
            ctx.service_init(args.name)
            print(f"pongd: serving {args.name} in {ctx.rundir} (backend {ctx.backend})",
                  flush=True)
            while True:
                dropped: set[int] = set()     # fds closed while handling this batch
                for ev in ctx.wait_events():
                    if ev.type == EventType.EXTERNAL and ev.fd == wakeup.fd:
                        wakeup.drain()
                    elif ev.fd not in dropped:   # the batch may hold more of its events
                        served += _handle(ctx, ev, dropped)
        except KeyboardInterrupt:
            pass      # leaving `with` sends the echoes still scheduled, then closes all
        finally:
            wakeup.close(read_end_too=False)
    print(f"pongd: stopped after echoing {served} message(s)", flush=True)
    return 0


def _handle(ctx: Context, ev: Event, dropped: set[int]) -> int:
    """pongd's answer to one event; the number of messages it echoed (0 or 1).
    A client that never reads is closed and its fd added to `dropped`."""
    if ev.type == EventType.MESSAGE_RX and ev.message is not None:   # it always has one
        try:
            ctx.schedule(ev.fd, ev.message)   # never blocks on a slow client
            return 1
        except ConnectionClosedError:
            pass      # the client hung up after sending (its DISCONNECTION follows)
        except QueueFullError:
            # It sends and never reads: its queue reached max_queue_size. Drop
            # that client (as examples/pong_service.py does), serve the others.
            log.warning("fd %d never reads its echoes (send queue full): closed", ev.fd)
            ctx.close(ev.fd, linger=0)
            dropped.add(ev.fd)
    elif ev.type == EventType.CONNECTION:
        log.info("client connected on fd %d", ev.fd)
    elif ev.type == EventType.DISCONNECTION:
        log.info("client on fd %d left", ev.fd)
    elif ev.type == EventType.ERROR:
        log.warning("fd %d: %s", ev.fd, ev.error)
    return 0


def cmd_pong(args: argparse.Namespace) -> int:
    """Send each MESSAGE to the service and check that it comes back unchanged.
    SIGINT/SIGTERM stop it quietly (exit 130/143)."""
    _on_stop_signals(_interrupt)
    with _context(args) as ctx:
        fd = ctx.connect(args.name)
        ok = True
        for text in args.messages:
            # The bytes given on the command line, even those that are not
            # UTF-8 (a str with surrogate escapes, which write() refuses).
            payload = os.fsencode(text)
            ctx.write(fd, payload)
            echo = ctx.read(fd)
            same = echo == payload
            answer = os.fsdecode(echo)
            ok &= same
            print(f"{args.label}sent {text!r}, received {answer!r}{'' if same else '  MISMATCH'}",
                  flush=True)
    return 0 if ok else 1


def _quiet_stdout() -> None:
    """Point stdout at /dev/null (its reader is gone), so later output is dropped."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _say(text: str) -> None:
    """print, unless whoever reads our output stopped (`pyipc demo | head`):
    then the demo still runs to its end, without printing."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        _quiet_stdout()


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived while a command that is not a service
    (demo, pong) ran; main() stops it quietly with exit 128 + signum."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _interrupt(signum: int, frame: object) -> None:
    """Signal handler: raise Interrupted(signum) where the program is."""
    raise Interrupted(signum)


#: How long demo waits for a child it stopped before it kills it.
DEMO_STOP_S = 10.0


def cmd_demo(args: argparse.Namespace) -> int:
    """Start pongd and a few pong clients as separate processes; print a summary.
    On SIGINT/SIGTERM, a failure or the end, the children still running are
    stopped and the temporary directory removed."""
    _on_stop_signals(_interrupt)
    workdir = tempfile.mkdtemp(prefix="pyipc-demo-", dir="/tmp")
    children: list[subprocess.Popen[str]] = []
    try:
        return _demo(args, workdir, children)
    finally:
        _on_stop_signals(signal.SIG_IGN)      # a second Ctrl-C: the cleanup goes on
        # The clients first (killed: nothing of theirs to keep), then pongd
        # (children[0]), which SIGTERM stops cleanly, removing its socket.
        for proc in reversed(children[1:]):
            _stop_child(proc, signal.SIGKILL)
        for proc in children[:1]:
            _stop_child(proc, signal.SIGTERM)
        shutil.rmtree(workdir, ignore_errors=True)


def _stop_child(proc: "subprocess.Popen[str]", sig: int) -> None:
    """Send `sig` to `proc` if it still runs, kill it if it is not gone
    within DEMO_STOP_S, and reap it."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        proc.communicate(timeout=DEMO_STOP_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()


#: prctl()'s option: the signal the calling process gets when its parent dies.
PR_SET_PDEATHSIG = 1


def _dies_with_parent(sig: int) -> Optional[Callable[[], None]]:
    """A preexec_fn that has the child sent `sig` when demo dies, even by
    SIGKILL, which runs none of demo's cleanup (Linux: prctl's
    PR_SET_PDEATHSIG); None elsewhere, where such a child outlives demo."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    prctl = ctypes.CDLL(None, use_errno=True).prctl   # found before the fork
    parent = os.getpid()

    def arm() -> None:
        prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:          # demo died before the prctl
            os.kill(os.getpid(), sig)
    return arm


def _demo(args: argparse.Namespace, workdir: str,
          children: "list[subprocess.Popen[str]]") -> int:
    """cmd_demo's work; every process it starts is appended to `children`."""
    rundir = os.path.abspath(args.rundir) if args.rundir else os.path.join(workdir, "run")
    base = [sys.executable, "-m", "pyipc", "--rundir", rundir]
    if args.backend:
        base += ["--backend", args.backend]
    # The children import this very pyipc: `python -m` puts the working
    # directory first on sys.path, so they start in an empty one (from a source
    # checkout they would otherwise import its pyipc, maybe without the library).
    # Each has its own session: a Ctrl-C in the terminal reaches demo only,
    # which then stops them (no traceback from a child still importing).
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (PACKAGE_PARENT, os.environ.get("PYTHONPATH", "")) if p))

    def spawn(command: list[str]) -> "subprocess.Popen[str]":
        # A signal that interrupted Popen() after its fork would leave a child
        # that nobody stops: it is held until the child is in `children`.
        caught: list[int] = []
        previous = _on_stop_signals(lambda signum, frame: caught.append(signum))
        try:
            # pongd (the first) stops cleanly on SIGTERM; the clients are killed.
            proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=workdir,
                                    env=env, start_new_session=True,
                                    preexec_fn=_dies_with_parent(
                                        signal.SIGKILL if children else signal.SIGTERM))
            children.append(proc)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if caught:
            raise Interrupted(caught[0])
        return proc

    service = spawn(base + ["pongd", "demo"])
    assert service.stdout is not None          # stdout=PIPE
    ready = service.stdout.readline()          # pongd prints once it listens
    if not ready:
        print("demo: pongd did not start", file=sys.stderr)
        return 1
    _say(ready.rstrip())
    started = time.monotonic()
    clients = [spawn(base + ["pong", "--label", f"client {i}: ", "demo"]
                     + [f"message {j} from client {i}" for j in range(args.messages)])
               for i in range(args.clients)]
    failures = 0
    for proc in clients:
        out, _ = proc.communicate()
        _say(out.rstrip())
        failures += proc.returncode != 0
    elapsed = time.monotonic() - started
    service.send_signal(signal.SIGTERM)
    out, _ = service.communicate()
    _say(out.rstrip())
    total = args.clients * args.messages
    verdict = "all echoes matched" if not failures else f"{failures} client(s) failed"
    removed = not os.path.exists(os.path.join(rundir, "demo"))
    _say(f"demo: {args.clients} clients exchanged {total} messages with pongd in "
         f"{elapsed:.2f} s; {verdict}; socket removed: {removed}")
    return 0 if not failures and service.returncode == 0 else 1


#: `pyipc bench`'s choices. bench/ says what each one runs; it is not part of
#: the installed package, so its options are listed here, where --help finds
#: them from an installed package too (tests/test_cli.py checks both agree).
BENCH_CASES = ("ev64", "ev64k", "rtt", "tp64", "tp64k", "tp1m", "scale1k", "scale10k")
BENCH_SYSTEMS = ("native", "pure", "raw", "native_busy", "native_raw", "raw_native",
                 "raw_epoll", "mp", "zmq_pair", "zmq_push", "aio", "aio_streams",
                 "zmq_asyncio", "c_floor", "c_busy", "c_core")
BENCH_PLACEMENTS = ("split", "same", "free")


def _bench_module() -> Optional[ModuleType]:
    """bench.main of the source checkout (bench/ next to pyipc/), or None."""
    if not os.path.isfile(os.path.join(PACKAGE_PARENT, "bench", "main.py")):
        return None
    if PACKAGE_PARENT not in sys.path:
        sys.path.insert(0, PACKAGE_PARENT)
    return importlib.import_module("bench.main")


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the benchmarks (bench/ of a source checkout); print the markdown table."""
    bench_main = _bench_module()
    if bench_main is None:
        print("pyipc bench: needs a source checkout of pyipc-zig (bench/ is not "
              "installed with the package): see pyipc bench --help", file=sys.stderr)
        return 1
    status: int = bench_main.run(args)
    return status


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `pyipc bench` (also used by `python -m bench.main`)."""
    p.add_argument("--quick", action="store_true", help="fewer messages per run")
    p.add_argument("--repeats", type=int_from(1, MAX_BENCH_REPEATS), default=None,
                   metavar="N", help="runs of each case per system, 1 to "
                   f"{MAX_BENCH_REPEATS} (default 3, quick: 1)")
    p.add_argument("--cases", nargs="+", choices=BENCH_CASES, metavar="CASE",
                   help="cases to run: " + ", ".join(BENCH_CASES) + " (default: all)")
    p.add_argument("--systems", nargs="+", choices=BENCH_SYSTEMS, metavar="SYSTEM",
                   help="systems to run (default: all): " + " ".join(BENCH_SYSTEMS))
    p.add_argument("--placement", choices=BENCH_PLACEMENTS, default="split",
                   help="CPUs of the two peers: split (default: the server on one CPU, "
                        "the client on another), same (both on one CPU), free (the "
                        "scheduler's choice); pinning needs Linux, elsewhere it is free")


def _add_bench(sub: Any) -> None:
    b = sub.add_parser(
        "bench", help="benchmark pyipc against other IPC (source checkout)",
        description="Run each benchmark case for each system (server and client in "
                    "separate processes, interleaved repeats) and print a markdown "
                    "table of the medians; progress goes to stderr. The benchmark "
                    "programs are in bench/ of a source checkout of pyipc-zig, not in "
                    "the installed package: run pyipc bench there (pip install -e "
                    "'.[bench]' adds pyzmq). Exit 1 when a run failed.")
    add_bench_arguments(b)
    b.set_defaults(func=cmd_bench)


def version_text(backend: Optional[str]) -> str:
    """What `pyipc --version` prints: distribution, version, backend in use."""
    head = f"{DISTRIBUTION} {__version__}"
    try:
        with Context(backend=backend) as ctx:
            used = ctx.backend
    except BackendError as e:
        return f"{head} (backend {backend or os.environ.get('PYIPC_BACKEND')} cannot load: {e})"
    why_not = available_backends()["native"]
    if used == "pure" and why_not is not None:
        return f"{head} (backend pure; native cannot load: {why_not})"
    return f"{head} (backend {used})"


class _VersionAction(argparse.Action):
    """--version: print version_text() for the --backend given before it, exit."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 default: str = argparse.SUPPRESS, help: Optional[str] = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: Optional[str] = None) -> None:
        print(version_text(getattr(namespace, "backend", None)), flush=True)
        parser.exit()


DESCRIPTION = ("The pyipc command: demo, pongd (an echo service), pong (its client), "
               "bench, and the networking daemons ipcd, tcpd, tlsd and websocketd.")


def parser() -> argparse.ArgumentParser:
    """The argument parser of the pyipc command."""
    p = argparse.ArgumentParser(
        prog="pyipc", description=DESCRIPTION,
        epilog="exit codes: 0 success; 1 a pyipc error (service busy or not found, ...) "
               "or an echo that did not match; 2 bad usage; 130/143 demo or pong "
               "stopped by Ctrl-C/SIGTERM. "
               "'pyipc COMMAND --help' explains each command.")
    p.add_argument("--version", action=_VersionAction,
                   help="print the version and the backend in use (after --backend: "
                        "that one), then exit")
    p.add_argument("--rundir", help="run directory (default: env RUNDIR, else /tmp/.libipc-run)")
    p.add_argument("--backend", choices=["native", "pure"],
                   help="backend (default: env PYIPC_BACKEND, else native if it loads)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv: debug)")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser(
        "demo", help="start pongd and some clients, print what they exchange",
        description="Start 'pyipc pongd demo' and N 'pyipc pong' clients as separate "
                    "processes (in a temporary run dir unless --rundir is given), print "
                    "every exchange and a summary. Exit 0 when every echo matched.")
    d.add_argument("--clients", type=int_from(1, MAX_DEMO_CLIENTS), default=3, metavar="N",
                   help=f"client processes, 1 to {MAX_DEMO_CLIENTS} (default 3)")
    d.add_argument("--messages", type=int_from(1, MAX_DEMO_MESSAGES), default=3, metavar="N",
                   help=f"messages per client, 1 to {MAX_DEMO_MESSAGES} (default 3)")
    d.set_defaults(func=cmd_demo)
    s = sub.add_parser(
        "pongd", help="run an echo service until Ctrl-C or SIGTERM",
        description="Serve NAME: every message comes back to its sender. Prints one "
                    "line once listening; Ctrl-C or SIGTERM ends it cleanly (exit 0, "
                    "socket removed). Exit 1 when NAME is already served.")
    s.add_argument("name", nargs="?", default="pong", help="service name (default pong)")
    s.set_defaults(func=cmd_pongd)
    c = sub.add_parser(
        "pong", help="send messages to an echo service and check the echoes",
        description="Connect to service NAME (through ipcd when IPC_NETWORK is set), "
                    "send each MESSAGE and check that it comes back unchanged. Exit 1 "
                    "when the service is missing or an echo differs.")
    c.add_argument("name", nargs="?", default="pong", help="service name (default pong)")
    c.add_argument("messages", nargs="*", default=["hello"], metavar="MESSAGE",
                   help="messages to send (default: hello)")
    c.add_argument("--label", default="", help=argparse.SUPPRESS)
    c.set_defaults(func=cmd_pong)
    _add_bench(sub)
    add_daemon_commands(sub)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of `pyipc` and `python -m pyipc`."""
    args = parser().parse_args(argv)
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(name)s: %(message)s")
    try:
        status: int = args.func(args)
        return status
    except IPCError as e:
        print(f"pyipc {args.command}: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:
        # Ctrl-C or SIGTERM stopped demo or pong (services stop at once with 0).
        print(f"pyipc {args.command}: interrupted by {e}", file=sys.stderr)
        return 128 + e.signum
    except BrokenPipeError:
        # Whoever read our output stopped (`pyipc pong ... | head`): not a failure.
        _quiet_stdout()
        return 0
