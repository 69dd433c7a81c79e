"""Each context keeps its pending events in one queue: the core's for the
native backend (Python holds none between calls), the EventQueue of the
event loop for the pure one; the base class holds no queue of its own."""

from __future__ import annotations

import pyipc
from pyipc import EventType
from pyipc._events import EventQueue

from conftest import Pair, require_backend, wait_for


def test_the_base_class_holds_no_event_queue():
    assert not any("pending" in slot for slot in pyipc.Context.__slots__)


def test_pure_keeps_its_events_in_one_event_queue(rundir):
    require_backend("pure")
    with pyipc.Context(rundir=rundir, backend="pure") as server, \
            pyipc.Context(rundir=rundir, backend="pure") as client:
        pair = Pair(server, client, "one")
        client.write_many(pair.client_fd, [b"a", b"b", b"c"])
        got = [wait_for(server, EventType.MESSAGE_RX)[-1].message]
        assert isinstance(server._pending, EventQueue)
        got += [ev.message for ev in server._pending]   # what came with it
        assert got == [b"a", b"b", b"c"][:len(got)]


def test_native_leaves_the_events_it_does_not_return_in_the_core(rundir):
    """wait_event() takes one event from the core: the others stay there
    (the reads find them there), none in a Python cache."""
    require_backend("native")
    from pyipc import _native
    with pyipc.Context(rundir=rundir, backend="native") as server, \
            pyipc.Context(rundir=rundir, backend="native") as client:
        pair = Pair(server, client, "one")
        client.write_many(pair.client_fd, [b"a", b"b", b"c"])
        first = server.wait_event(timeout=5)
        assert (first.type, first.message) == (EventType.MESSAGE_RX, b"a")
        left = _native.lib.ipc_pending_events(server._ctx)
        assert not server._handed
        assert server.read_many(pair.server_fd, timeout=5)[:left] == [b"b", b"c"][:left]
