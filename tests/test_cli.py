"""The `pyipc` command: demo, pongd, pong, their exit codes and clean shutdown."""

from __future__ import annotations

import functools
import os
import re
import select
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import pyipc
from pyipc import cli

from conftest import CHILD_ENV, ROOT


def _pyipc(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pyipc", *args], capture_output=True,
                          text=True, env=CHILD_ENV, timeout=120, **kwargs)


@pytest.fixture
def pongd(backend, rundir):
    proc = subprocess.Popen([sys.executable, "-m", "pyipc", "--rundir", rundir,
                             "--backend", backend, "pongd", "p"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=CHILD_ENV)
    try:
        assert proc.stdout.readline().startswith("pongd: serving p in"), proc.stderr.read()
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_demo_runs_services_and_clients(backend):
    done = _pyipc("--backend", backend, "demo", "--clients", "3", "--messages", "4")
    assert done.returncode == 0, done.stderr
    last = done.stdout.splitlines()[-1]
    assert last.startswith("demo: 3 clients exchanged 12 messages with pongd in ")
    assert last.endswith("; all echoes matched; socket removed: True")
    assert done.stdout.count("received 'message") == 12


def test_demo_children_use_the_same_pyipc():
    """`pyipc demo` run in a source checkout (which may have no library built):
    its processes still import the pyipc that runs the demo (the README's demo
    command is the installed `pyipc` script; without one, this is a checkout run)."""
    script = Path(sys.executable).parent / "pyipc"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "pyipc"]
    env = {k: v for k, v in CHILD_ENV.items() if k != "PYIPC_BACKEND"}
    done = subprocess.run(command + ["demo", "--clients", "1", "--messages", "1"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    default = "native" if pyipc.available_backends()["native"] is None else "pure"
    assert done.stdout.splitlines()[0].endswith(f"(backend {default})")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_pongd_echoes_and_ends_cleanly_on_a_signal(backend, rundir, pongd, sig):
    done = _pyipc("--rundir", rundir, "--backend", backend, "pong", "p", "one", "two")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["sent 'one', received 'one'",
                                        "sent 'two', received 'two'"]
    pongd.send_signal(sig)
    out, err = pongd.communicate(timeout=30)
    assert pongd.returncode == 0, err
    assert out.splitlines()[-1] == "pongd: stopped after echoing 2 message(s)"
    assert not os.path.exists(os.path.join(rundir, "p"))


#: pongd must end this soon after SIGINT/SIGTERM (generous: a loaded machine).
STOP_S = 5.0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_pongd_stops_promptly_while_a_client_is_idle(backend, rundir, pongd, sig):
    """The signal's handler runs in pongd's wait (no polling timer): it ends
    within STOP_S with a client connected."""
    with pyipc.Context(rundir=rundir, backend=backend) as ctx:
        fd = ctx.connect("p")
        ctx.write(fd, b"ping")
        assert ctx.read(fd, timeout=30) == b"ping"      # pongd is back in its wait
        pongd.send_signal(sig)
        out, err = pongd.communicate(timeout=STOP_S)
        assert pongd.returncode == 0, err
        assert out.splitlines()[-1] == "pongd: stopped after echoing 1 message(s)"
        assert not os.path.exists(os.path.join(rundir, "p"))


def test_pongd_survives_clients_that_hang_up_after_sending(backend, rundir, pongd):
    for _ in range(30):
        with pyipc.Context(rundir=rundir, backend=backend) as ctx:
            ctx.write(ctx.connect("p"), b"bye")
    done = _pyipc("--rundir", rundir, "--backend", backend, "pong", "p", "still here")
    assert done.returncode == 0, (done.stderr, pongd.poll())
    assert done.stdout == "sent 'still here', received 'still here'\n"


def test_pongd_drops_a_client_that_never_reads_and_keeps_serving(backend, rundir, pongd):
    """A client that sends and never reads fills pongd's queue to it past
    max_queue_size (64 MiB): pongd closes that client, as the examples do,
    and still serves the others (it used to exit 1 on the QueueFullError)."""
    chunk = b"x" * 65536
    with pyipc.Context(rundir=rundir, backend=backend) as ctx:
        fd = ctx.connect("p")
        with pytest.raises(pyipc.ConnectionClosedError):
            for _ in range(4 * 1024):                 # 256 MiB: far past the 64 MiB
                ctx.write(fd, chunk, timeout=30)
    assert pongd.poll() is None, pongd.stderr.read()
    done = _pyipc("--rundir", rundir, "--backend", backend, "pong", "p", "still here")
    assert done.returncode == 0, (done.stderr, pongd.poll())
    pongd.send_signal(signal.SIGTERM)
    out, err = pongd.communicate(timeout=30)
    assert pongd.returncode == 0, err
    assert "never reads its echoes" in err


def test_pong_sends_an_argument_that_is_not_utf8_as_its_bytes(backend, rundir, pongd):
    """A command-line argument with a byte that is not UTF-8 (b'\\xff', a
    surrogate escape in sys.argv) is sent as those bytes and compared as
    bytes: no UnicodeEncodeError traceback."""
    done = _pyipc("--rundir", rundir, "--backend", backend, "pong", "p", "a\udcffb")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "sent 'a\\udcffb', received 'a\\udcffb'\n"
    assert done.stderr == ""


def test_exit_codes(rundir):
    missing = _pyipc("--rundir", rundir, "pong", "nobody", "hi")
    assert missing.returncode == 1
    assert f"no service nobody in {rundir}" in missing.stderr
    assert _pyipc("frobnicate").returncode == 2                # bad usage
    assert _pyipc("--backend", "nosuch", "demo").returncode == 2


@pytest.mark.parametrize("args, error", [
    (["demo", "--clients", "-1"], "argument --clients: must be an integer from 1 to 1000, not '-1'"),
    (["demo", "--clients", "0"], "argument --clients: must be an integer from 1 to 1000, not '0'"),
    (["demo", "--clients", "100000000"],
     "argument --clients: must be an integer from 1 to 1000, not '100000000'"),
    (["demo", "--messages", "-5"],
     "argument --messages: must be an integer from 1 to 100000, not '-5'"),
    (["demo", "--messages", "x"], "argument --messages: must be an integer from 1 to 100000, not 'x'"),
    (["bench", "--repeats", "0"], "argument --repeats: must be an integer from 1 to 1000, not '0'"),
    (["bench", "--repeats", "-1"], "argument --repeats: must be an integer from 1 to 1000, not '-1'"),
    (["bench", "--systems", "nosuch"], "argument --systems: invalid choice: 'nosuch' (choose from "),
])
def test_nonsense_numbers_and_systems_are_bad_usage(args, error):
    """Counts below 1 (or absurdly high) and unknown bench systems: argparse's
    one-line error and exit 2 before anything runs (they used to run, exit 0)."""
    done = _pyipc(*args)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.splitlines()[-1].startswith(f"pyipc {args[0]}: error: {error}")


@pytest.mark.parametrize("daemon", ["tcpd", "tlsd"])
@pytest.mark.parametrize("value", ["", ","])
def test_an_expose_naming_no_service_is_bad_usage(rundir, daemon, value):
    """--expose '' or ',' exposes nothing: a usage error (exit 2, one line),
    where it used to start the daemon exposing nothing without a word."""
    done = _pyipc("--rundir", rundir, daemon, "--expose", value)
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == (
        f"pyipc {daemon}: error: argument --expose: {value!r} names no service "
        "(NAME[,NAME...])")
    assert os.listdir(rundir) == []


def test_tlsd_client_ca_without_listen_is_refused(rundir):
    """--client-ca only checks the peers tlsd accepts: without --listen it is
    refused at once (it used to start and serve with no complaint)."""
    done = _pyipc("--rundir", rundir, "tlsd", "--client-ca", "/nonexistent.pem")
    assert done.returncode == 1
    assert done.stderr == ("pyipc tlsd: --client-ca checks the peers we accept: it needs "
                           "--listen (or listening sockets passed by systemd)\n")


def test_demo_whose_reader_stops_early_still_ends_cleanly(backend):
    """`pyipc demo | head -1`: no traceback, no client left failing, exit 0."""
    proc = subprocess.Popen([sys.executable, "-m", "pyipc", "--backend", backend, "demo"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=CHILD_ENV)
    try:
        assert proc.stdout.readline().startswith("pongd: serving demo in ")
        proc.stdout.close()                       # the reader goes away
        assert proc.wait(60) == 0
        assert proc.stderr.read() == ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _processes_naming(text: str) -> list[str]:
    """The command lines of the running processes that contain `text`."""
    return list(_pids_naming(text).values())


def _pids_naming(text: str) -> dict[int, str]:
    """The running processes whose command line contains `text`: pid -> it."""
    found = {}
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            line = cmdline.read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue                                  # it ended meanwhile
        if text in line:
            found[int(cmdline.parent.name)] = line
    return found


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_demo_stopped_by_a_signal_stops_its_children_and_cleans_up(backend, sig):
    """SIGTERM or SIGINT (Ctrl-C) while demo starts its clients: one line, no
    traceback, exit 128 + signal, no pongd or client left running, temp dir
    removed (SIGTERM used to kill demo at once and leave all of them; SIGINT
    printed tracebacks)."""
    proc = subprocess.Popen([sys.executable, "-m", "pyipc", "--backend", backend, "demo",
                             "--clients", "40"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=CHILD_ENV)
    try:
        ready = proc.stdout.readline()
        workdir = re.fullmatch(r"pongd: serving demo in (/tmp/pyipc-demo-\w+)/run .*\n",
                               ready)
        assert workdir, (ready, proc.stderr.read())
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)    # EOF: no child holds demo's stdout
        assert proc.returncode == 128 + sig
        assert err == f"pyipc demo: interrupted by {signal.Signals(sig).name}\n"
        assert not os.path.exists(workdir[1])
        assert _processes_naming(workdir[1]) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.skipif(not sys.platform.startswith("linux") or not hasattr(os, "pidfd_open"),
                    reason="a child ends with demo where prctl(PR_SET_PDEATHSIG) exists")
def test_demo_killed_leaves_no_child_running(backend):
    """SIGKILL runs none of demo's cleanup: its pongd and clients are ended
    by the kernel (PR_SET_PDEATHSIG), where pongd used to serve on forever.
    (Its temporary directory stays: removed here.)"""
    proc = subprocess.Popen([sys.executable, "-m", "pyipc", "--backend", backend, "demo",
                             "--clients", "20", "--messages", "100000"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=CHILD_ENV)
    workdir = None
    try:
        ready = proc.stdout.readline()
        found = re.fullmatch(r"pongd: serving demo in (/tmp/pyipc-demo-\w+)/run .*\n", ready)
        assert found, ready
        workdir = found[1]
        children = [pid for pid in _pids_naming(workdir) if pid != proc.pid]
        assert children, "demo's children are running"
        pidfds = []
        for pid in children:
            try:
                pidfds.append(os.pidfd_open(pid))
            except ProcessLookupError:
                pass                                  # it ended meanwhile
        proc.kill()
        proc.communicate()
        try:
            for pidfd in pidfds:      # readable when the process has ended
                assert select.select([pidfd], [], [], 30)[0], "a child outlived demo"
        finally:
            for pidfd in pidfds:
                os.close(pidfd)
        assert not os.path.exists(os.path.join(workdir, "run", "demo"))   # pongd's SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)


def test_demo_whose_pongd_cannot_start_removes_its_temp_dir(backend, rundir):
    """demo in a run dir where demo is already served: exit 1, and its
    temporary directory is removed all the same (it was left behind)."""
    before = set(Path("/tmp").glob("pyipc-demo-*"))
    with pyipc.Context(rundir=rundir, backend=backend) as ctx:
        ctx.service_init("demo")
        done = _pyipc("--rundir", rundir, "--backend", backend, "demo", "--clients", "1")
    assert done.returncode == 1
    assert "demo: pongd did not start" in done.stderr
    assert set(Path("/tmp").glob("pyipc-demo-*")) <= before


def test_pong_interrupted_while_waiting_for_its_echo_exits_quietly(backend, rundir):
    """Ctrl-C while pong waits for an echo that never comes: one line, exit
    130, no KeyboardInterrupt traceback."""
    with pyipc.Context(rundir=rundir, backend=backend) as mute:
        mute.service_init("mute")                     # accepts, never answers
        proc = subprocess.Popen([sys.executable, "-m", "pyipc", "--rundir", rundir,
                                 "--backend", backend, "pong", "mute", "anyone?"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=CHILD_ENV)
        try:
            while (ev := mute.wait_event(timeout=60)).type != pyipc.EventType.MESSAGE_RX:
                pass                                  # pong sent: it now waits for the echo
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=30)
            assert (proc.returncode, out, err) == (130, "", "pyipc pong: interrupted by SIGINT\n")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


# -- --version, help texts, bench options ------------------------------------------
def test_version_names_the_distribution_and_the_backend(backend):
    done = _pyipc("--backend", backend, "--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"pyipc-zig {pyipc.__version__} (backend {backend})\n"


def test_version_without_backend_names_the_default_one():
    env = {k: v for k, v in CHILD_ENV.items() if k != "PYIPC_BACKEND"}
    done = subprocess.run([sys.executable, "-m", "pyipc", "--version"], capture_output=True,
                          text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    why_not = pyipc.available_backends()["native"]
    expected = ("(backend native)" if why_not is None
                else f"(backend pure; native cannot load: {why_not})")
    assert done.stdout == f"pyipc-zig {pyipc.__version__} {expected}\n"


#: reStructuredText that must not reach a terminal: ``literal``, `interpreted`,
#: :role:`target`.
REST_MARKUP = re.compile(r"`|:[a-z]+:`")


@pytest.mark.parametrize("command", [[], ["demo"], ["pongd"], ["pong"], ["bench"]])
def test_help_shows_no_rest_markup(command):
    done = _pyipc(*command, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: pyipc")
    assert not REST_MARKUP.search(done.stdout), done.stdout


@pytest.fixture
def installed_elsewhere(tmp_path):
    """A copy of the pyipc package in a directory with no bench/ beside it, as
    in site-packages after a (non-editable) install: (env, cwd) to run it."""
    site = tmp_path / "site"
    shutil.copytree(Path(pyipc.__file__).parent, site / "pyipc",
                    ignore=shutil.ignore_patterns("__pycache__"))
    env = {**CHILD_ENV, "PYTHONPATH": str(site)}
    return env, tmp_path


def test_bench_help_lists_its_options_from_an_installed_package(installed_elsewhere):
    env, cwd = installed_elsewhere
    run = functools.partial(subprocess.run, capture_output=True, text=True, env=env, cwd=cwd,
                            timeout=60)
    where = run([sys.executable, "-c", "import pyipc; print(pyipc.__file__)"]).stdout
    assert where.startswith(str(cwd / "site")), where
    helped = run([sys.executable, "-m", "pyipc", "bench", "--help"])
    assert helped.returncode == 0, helped.stderr
    for option in ("--quick", "--repeats", "--cases", "--systems", "--placement"):
        assert option in helped.stdout, helped.stdout
    assert "source checkout of pyipc-zig" in " ".join(helped.stdout.split())
    ran = run([sys.executable, "-m", "pyipc", "bench", "--quick"])
    assert ran.returncode == 1
    assert ran.stderr == ("pyipc bench: needs a source checkout of pyipc-zig (bench/ is not "
                          "installed with the package): see pyipc bench --help\n")


def test_bench_options_name_what_bench_runs(monkeypatch):
    """pyipc.cli lists bench's cases, systems and placements (for --help from an
    installed package); they are the ones bench/ of the checkout defines."""
    monkeypatch.syspath_prepend(str(ROOT))
    from bench import cases, cbuild, runner
    # systems() compiles the C peers to see if they build: not needed for names.
    monkeypatch.setattr(cbuild, "build_floor", lambda: Path("floor"))
    monkeypatch.setattr(cbuild, "build_core", lambda: Path("core"))
    assert cli.BENCH_CASES == tuple(c.key for c in cases.CASES)
    assert cli.BENCH_SYSTEMS == tuple(s.key for s in cases.systems())
    assert cli.BENCH_PLACEMENTS == runner.PLACEMENTS
