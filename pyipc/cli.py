"""The ``pyipc`` command: demo, pongd (an echo service), pong (its client) and bench.

Exit codes: 0 success; 1 a pyipc error (service busy, not found, ...) or an echo
that did not match; 2 bad usage (argparse).
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Optional, Sequence

from . import ConnectionClosedError, Context, Event, EventType, IPCError

log = logging.getLogger("pyipc.cli")

def _context(args: argparse.Namespace) -> Context:
    return Context(rundir=args.rundir, backend=args.backend)


def cmd_pongd(args: argparse.Namespace) -> int:
    """Echo every message back to its sender until SIGINT/SIGTERM."""
    # Both signals raise KeyboardInterrupt in the call that waits (it returns to
    # Python so the handler runs), which ends the loop below.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.default_int_handler)
    served = 0
    with _context(args) as ctx:
        try:
            ctx.service_init(args.name)
            print(f"pongd: serving {args.name} in {ctx.rundir} (backend {ctx.backend})",
                  flush=True)
            while True:
                for ev in ctx.wait_events():
                    served += _handle(ctx, ev)
        except KeyboardInterrupt:
            pass      # leaving `with` sends the echoes still scheduled, then closes all
    print(f"pongd: stopped after echoing {served} message(s)", flush=True)
    return 0


def _handle(ctx: Context, ev: Event) -> int:
    """pongd's answer to one event; the number of messages it echoed (0 or 1)."""
    if ev.type == EventType.MESSAGE_RX:
        try:
            ctx.schedule(ev.fd, ev.message)   # never blocks on a slow client
            return 1
        except ConnectionClosedError:
            pass      # the client hung up after sending (its DISCONNECTION follows)
    elif ev.type == EventType.CONNECTION:
        log.info("client connected on fd %d", ev.fd)
    elif ev.type == EventType.DISCONNECTION:
        log.info("client on fd %d left", ev.fd)
    elif ev.type == EventType.ERROR:
        log.warning("fd %d: %s", ev.fd, ev.error)
    return 0


def cmd_pong(args: argparse.Namespace) -> int:
    """Send each MESSAGE to the service and check that it comes back unchanged."""
    with _context(args) as ctx:
        fd = ctx.connect(args.name)
        ok = True
        for text in args.messages:
            ctx.write(fd, text)
            answer = ctx.read(fd).decode("utf-8", "replace")
            same = answer == text
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


def cmd_demo(args: argparse.Namespace) -> int:
    """Start pongd and a few pong clients as separate processes; print a summary."""
    workdir = tempfile.mkdtemp(prefix="pyipc-demo-", dir="/tmp")
    rundir = os.path.abspath(args.rundir) if args.rundir else os.path.join(workdir, "run")
    base = [sys.executable, "-m", "pyipc", "--rundir", rundir]
    if args.backend:
        base += ["--backend", args.backend]
    # The children import this very pyipc: `python -m` puts the working
    # directory first on sys.path, so they start in an empty one (from a source
    # checkout they would otherwise import its pyipc, maybe without the library).
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (here, os.environ.get("PYTHONPATH", "")) if p))
    spawn = functools.partial(subprocess.Popen, stdout=subprocess.PIPE, text=True,
                              cwd=workdir, env=env)
    service = spawn(base + ["pongd", "demo"])
    try:
        ready = service.stdout.readline()      # pongd prints once it listens
        if not ready:
            print("demo: pongd did not start", file=sys.stderr)
            return 1
        _say(ready.rstrip())
        started = time.monotonic()
        clients = [
            spawn(base + ["pong", "--label", f"client {i}: ", "demo"]
                  + [f"message {j} from client {i}" for j in range(args.messages)])
            for i in range(args.clients)]
        failures = 0
        for proc in clients:
            out, _ = proc.communicate()
            _say(out.rstrip())
            failures += proc.returncode != 0
        elapsed = time.monotonic() - started
    finally:
        service.send_signal(signal.SIGTERM)
        out, _ = service.communicate()
        _say(out.rstrip())
    total = args.clients * args.messages
    verdict = "all echoes matched" if not failures else f"{failures} client(s) failed"
    removed = not os.path.exists(os.path.join(rundir, "demo"))
    _say(f"demo: {args.clients} clients exchanged {total} messages with pongd in "
          f"{elapsed:.2f} s; {verdict}; socket removed: {removed}")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0 if not failures and service.returncode == 0 else 1


def _bench_module():
    """The benchmark package of the source checkout (bench/ next to pyipc/), or None."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isfile(os.path.join(root, "bench", "main.py")):
        return None
    if root not in sys.path:
        sys.path.insert(0, root)
    from bench import main as bench_main
    return bench_main


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the benchmarks (bench/ of a source checkout); print the markdown table."""
    bench_main = _bench_module()
    if bench_main is None:
        print("pyipc bench: needs a source checkout (bench/ is not installed with the package)",
              file=sys.stderr)
        return 1
    return bench_main.run(args)


def _add_bench(sub) -> None:
    b = sub.add_parser("bench", help="benchmark pyipc against other IPC (source checkout)")
    bench_main = _bench_module()
    if bench_main is not None:
        bench_main.add_arguments(b)
    b.set_defaults(func=cmd_bench)


def parser() -> argparse.ArgumentParser:
    """The argument parser of the ``pyipc`` command."""
    p = argparse.ArgumentParser(
        prog="pyipc", description=__doc__.split("\n\n")[0],
        epilog="exit codes: 0 success; 1 a pyipc error (service busy or not found, ...) "
               "or an echo that did not match; 2 bad usage. "
               "`pyipc COMMAND --help` explains each command.")
    p.add_argument("--rundir", help="run directory (default: env RUNDIR, else /tmp/.libipc-run)")
    p.add_argument("--backend", choices=["native", "pure"],
                   help="backend (default: env PYIPC_BACKEND, else native if it loads)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv: debug)")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser(
        "demo", help="start pongd and some clients, print what they exchange",
        description="Start `pyipc pongd demo` and N `pyipc pong` clients as separate "
                    "processes (in a temporary run dir unless --rundir is given), print "
                    "every exchange and a summary. Exit 0 when every echo matched.")
    d.add_argument("--clients", type=int, default=3, help="client processes (default 3)")
    d.add_argument("--messages", type=int, default=3, help="messages per client (default 3)")
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
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``pyipc`` and ``python -m pyipc``."""
    args = parser().parse_args(argv)
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(name)s: %(message)s")
    try:
        return args.func(args)
    except IPCError as e:
        print(f"pyipc {args.command}: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # Whoever read our output stopped (`pyipc pong ... | head`): not a failure.
        _quiet_stdout()
        return 0
