"""fork: a child that inherited a Context never harms the parent (issue 16, point 4).

Each scenario runs in a child Python process (so that os.fork never happens
inside pytest itself). There a service Context with one client already
connected forks; the forked child drops its inherited Context one way or
another, or tries calls that it must not make; then the parent proves it
still serves: its socket file is there, the connected client's next message
arrives, a new client gets an echo, and a second service of the same name is
still refused (the parent holds the lock). Every wait is bounded, so a broken
backend fails instead of hanging.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from conftest import CHILD_ENV

#: The scenario: argv[1] = run dir, argv[2] = what the forked child does.
SCRIPT = r'''
import gc
import json
import os
import signal
import stat
import sys
import weakref

import pyipc
from pyipc import EventType

RUNDIR, MODE = sys.argv[1], sys.argv[2]
NAME = "forked"
WAIT_S = 5.0
FORK_TEXT = "this Context was inherited through fork()"


def next_event(ctx):
    """ctx's next event, or None when none comes within WAIT_S."""
    try:
        return ctx.wait_event(timeout=WAIT_S)
    except pyipc.TimeoutError:
        return None


def read_reply(ctx, fd):
    return ctx.read(fd, timeout=WAIT_S)


# -- what the forked child does (none of these returns) ------------------------
def child_sys_exit(service, client, sfd):
    sys.exit(0)             # the Contexts are still open: finalizers at exit


def child_close_all(service, client, sfd):
    service.close_all()
    client.close_all()
    os._exit(0)


def child_with(service, client, sfd):
    with service:
        pass
    with client:
        pass
    os._exit(0)


def child_forbidden(service, client, sfd):
    calls = {
        "read": lambda: service.read(sfd),
        "write": lambda: service.write(sfd, b"from the child"),
        "schedule": lambda: service.schedule(sfd, b"from the child"),
        "wait_event": lambda: service.wait_event(),
        "wait_events": lambda: service.wait_events(),
        "service_init": lambda: service.service_init("other"),
        "connect_service": lambda: service.connect_service(NAME),
        "client write": lambda: client.write(CFD, b"from the child"),
        # fileno()'s timer is the parent's: setting it re-armed the parent's.
        "timer": lambda: setattr(service, "timer", None),
    }
    wrong = []
    for name, call in calls.items():
        try:
            call()
            wrong.append(f"{name}: no error")
        except pyipc.IPCError as e:
            if not str(e).startswith(FORK_TEXT):
                wrong.append(f"{name}: {e!r}")
    try:
        service.close(sfd, linger=-1)
        wrong.append("close(linger=-1): no error")
    except ValueError:
        pass
    service.close(sfd)      # allowed: this process's copy only
    service.close_all()
    client.close_all()
    if wrong:
        print("child: " + "; ".join(wrong), file=sys.stderr, flush=True)
    os._exit(1 if wrong else 0)


CHILD = {"sys_exit": child_sys_exit, "close_all": child_close_all,
         "with": child_with, "forbidden": child_forbidden,
         "forbidden_after_schedule": child_forbidden}


# -- what the parent checks afterwards: True, or what went wrong ----------------
def checked(check):
    try:
        return check()
    except Exception as e:      # reported, so that the other checks still run
        return repr(e)


def socket_file_stays():
    return stat.S_ISSOCK(os.lstat(os.path.join(RUNDIR, NAME)).st_mode)


def connected_client_served(service, client):
    client.write(CFD, b"after the fork")
    ev = next_event(service)
    if ev is not None and ev.type == EventType.MESSAGE_RX and ev.message == b"after the fork":
        return True
    return f"got {ev!r}"


def new_client_served(service):
    with pyipc.Context(rundir=RUNDIR) as new:
        fd = new.connect_service(NAME)
        ev = next_event(service)
        if ev is None or ev.type != EventType.CONNECTION:
            return f"no CONNECTION: {ev!r}"
        new.write(fd, b"ping")
        ev = next_event(service)
        if ev is None or ev.type != EventType.MESSAGE_RX:
            return f"no MESSAGE_RX: {ev!r}"
        service.write(ev.fd, ev.message)
        return read_reply(new, fd) == b"ping"


def scheduled_before_fork_sent(service, client):
    """The parent's message scheduled before the fork goes out once, from
    the parent (the child dropped its copy of the buffer)."""
    ev = next_event(service)
    if ev is None or ev.type != EventType.MESSAGE_TX:
        return f"no MESSAGE_TX: {ev!r}"
    return read_reply(client, CFD) == b"scheduled before the fork"


def lock_still_held():
    with pyipc.Context(rundir=RUNDIR) as other:
        try:
            other.service_init(NAME)
        except pyipc.ServiceBusyError:
            return True
        return "a second service of the same name started"


service = pyipc.Context(rundir=RUNDIR)
service.service_init(NAME)
client = pyipc.Context(rundir=RUNDIR)
CFD = client.connect_service(NAME)
ev = next_event(service)
assert ev is not None and ev.type == EventType.CONNECTION, ev
sfd = ev.fd
if MODE == "forbidden_after_schedule":
    # Buffered by the native backend, with the fd's room known: the child's
    # schedule() must still raise, not take the buffered path.
    service.schedule(sfd, b"scheduled before the fork")
sys.stdout.flush()
sys.stderr.flush()

pid = os.fork()
if pid == 0:
    signal.alarm(20)        # a call that blocks for good kills the child
    if MODE == "gc":
        ref = weakref.ref(service)
        del service
        gc.collect()
        os._exit(0 if ref() is None else 3)
    CHILD[MODE](service, client, sfd)
    os._exit(4)             # not reached

_, status = os.waitpid(pid, 0)
results = {"scheduled": checked(lambda: scheduled_before_fork_sent(service, client))} \
    if MODE == "forbidden_after_schedule" else {}
results |= {
    "child_status": os.waitstatus_to_exitcode(status),
    "socket_file": checked(socket_file_stays),
    "connected_client": checked(lambda: connected_client_served(service, client)),
    "new_client": checked(lambda: new_client_served(service)),
    "lock": checked(lock_still_held),
}
client.close_all()
service.close_all()
print("RESULT " + json.dumps(results, sort_keys=True), flush=True)
'''

#: What the forked child does with its inherited Contexts.
MODES = ["sys_exit",    # sys.exit(0) with them open: finalizers at interpreter exit
         "close_all",   # close_all(), then os._exit(0)
         "with",        # leaves a `with` block, then os._exit(0)
         "gc",          # del + gc.collect() (its finalizer), then os._exit(0)
         "forbidden",   # read/write/schedule/wait_event/service_init... raise, close_all works
         "forbidden_after_schedule"]    # the same after the parent buffered a message

EXPECTED = {"child_status": 0, "socket_file": True, "connected_client": True,
            "new_client": True, "lock": True}


def run_scenario(processes, backend: str, rundir: str, mode: str) -> tuple[dict, str]:
    """Run SCRIPT for ``mode``: its RESULT line as a dict, and its stderr."""
    env = dict(CHILD_ENV, PYIPC_BACKEND=backend)
    proc = processes(SCRIPT, rundir, mode, env=env, stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the {mode} scenario hung on {backend}")
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and len(lines) == 1, (proc.returncode, out, err)
    return json.loads(lines[0][len("RESULT "):]), err


@pytest.mark.parametrize("mode", MODES)
def test_forked_child_leaves_the_parents_service_alone(processes, backend, rundir, mode):
    results, err = run_scenario(processes, backend, rundir, mode)
    expected = dict(EXPECTED, scheduled=True) if mode == "forbidden_after_schedule" \
        else EXPECTED
    assert results == expected, err


#: A forked child closes an ended fd and one fd of a switched pair.
CLOSE_IN_CHILD = r'''
import json, os, socket, sys
import pyipc
from pyipc import EventType

ctx = pyipc.Context(rundir=sys.argv[1])
a, a_peer = socket.socketpair()
b, b_peer = socket.socketpair()
f1, f2 = a.detach(), b.detach()
ctx.add_connection(f1)
ctx.add_connection(f2)
ctx.add_switch(f1, f2)
e, e_peer = socket.socketpair()
ended = e.detach()
ctx.add_connection(ended)
e_peer.close()
ev = ctx.wait_event(timeout=5)
assert (ev.type, ev.fd) == (EventType.DISCONNECTION, ended), ev


def is_open(fd):
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


pid = os.fork()
if pid == 0:
    out = {}
    try:
        ctx.close(ended)
        out["ended"] = "closed"
    except pyipc.IPCError as exc:
        out["ended"] = repr(exc)
    ctx.close(f1)
    try:
        ctx.close(f2)
        out["f2"] = "closed again"
    except pyipc.UnknownFdError:
        out["f2"] = "gone"
    out["open"] = [fd for fd in (ended, f1, f2) if is_open(fd)]
    print("RESULT " + json.dumps(out), flush=True)
    os._exit(0)
_, status = os.waitpid(pid, 0)
ctx.close_all()
sys.exit(os.waitstatus_to_exitcode(status))
'''


def test_a_forked_childs_close_is_the_same_on_both_backends(processes, backend, rundir):
    """close() of an ended fd closes the child's copy; close() of one fd of a
    switched pair closes both (as close() does); the pure backend raised
    ConnectionClosedError for the first and left the second's peer open."""
    proc = processes(CLOSE_IN_CHILD, rundir, env=dict(CHILD_ENV, PYIPC_BACKEND=backend),
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    line = [x for x in out.splitlines() if x.startswith("RESULT ")][0]
    assert json.loads(line[len("RESULT "):]) == {"ended": "closed", "f2": "gone", "open": []}


#: A process forks a worker that never calls pyipc (multiprocessing's fork
#: start method), then closes a connection and its service.
IDLE_CHILD = r'''
import json, os, sys
import pyipc
from pyipc import EventType

rundir = sys.argv[1]
service, client = pyipc.Context(rundir=rundir), pyipc.Context(rundir=rundir)
service.service_init("idle")
cfd = client.connect_service("idle")
ev = service.wait_event(timeout=5)
assert ev.type is EventType.CONNECTION, ev
go_r, go_w = os.pipe()
pid = os.fork()
if pid == 0:                # the worker: idle until the parent is done
    os.close(go_w)
    os.read(go_r, 1)
    os._exit(0)
os.close(go_r)
out = {}
service.close(ev.fd)
try:
    out["peer"] = client.wait_event(timeout=5).type.name
except pyipc.TimeoutError:
    out["peer"] = "nothing"
service.close_all()
again = pyipc.Context(rundir=rundir)
try:
    again.service_init("idle")
    out["serve_again"] = "ok"
except pyipc.IPCError as exc:
    out["serve_again"] = type(exc).__name__
os.write(go_w, b"x")
_, status = os.waitpid(pid, 0)
out["worker"] = os.waitstatus_to_exitcode(status)
again.close_all()
client.close_all()
print("RESULT " + json.dumps(out, sort_keys=True), flush=True)
'''


def test_an_idle_forked_worker_keeps_no_closed_service_or_connection(processes, backend, rundir):
    """The worker's copies of the lock fd and sockets are /dev/null from the
    fork on: the parent's close ends the connection for its peer and frees
    the service name. The worker kept both (flock and a socket end with
    their last reference): no DISCONNECTION, and ServiceBusyError."""
    proc = processes(IDLE_CHILD, rundir, env=dict(CHILD_ENV, PYIPC_BACKEND=backend),
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    line = [x for x in out.splitlines() if x.startswith("RESULT ")][0]
    assert json.loads(line[len("RESULT "):]) == {
        "peer": "DISCONNECTION", "serve_again": "ok", "worker": 0}
