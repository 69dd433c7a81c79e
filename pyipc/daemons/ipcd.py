"""`pyipc ipcd`: the service `ipc`, which connects clients to services by name
(libIPC's ipcd; docs/networking.md).

A client with IPC_NETWORK set sends one message "NAME;IPC_NETWORK". ipcd
finds the last rule for NAME and answers a raw `ok` with the connected fd
(SCM_RIGHTS), or `ne CODE TEXT` saying why not. A local target is connected
at once; a `SCHEME://...` target is asked of the local daemon serving that
scheme (service `tcp`, `tls`, ...), which answers ipcd a framed `ok` with the
fd or a framed `ne ...`, relayed to the client unchanged.

Nothing here blocks the loop: a scheme daemon's socket is watched as an
external fd and read when it is readable, so one slow remote never delays the
other requests. Each request has a deadline (`request_timeout`, from the
client's connection to ipcd's answer) and at most `max_requests` are served at
once (the next ones are answered `ne busy`). A request is at most MAX_REQUEST
bytes (more: `ne badrequest`; see REQUEST_RECEIVE_LIMIT for what no answer reaches).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from typing import Any, Dict, Optional

from .. import Event, EventType, InvalidNameError, IPCError, _rundir
from .._types import DEFAULT_MAX_MESSAGE_SIZE, IPCD_SERVICE
from . import _netwire as wire
from . import _rules, _sockets, _systemd
from ._runtime import Daemon
from ._timers import TimerHandle

#: Seconds a request may take, from the client's connection to the answer.
DEFAULT_REQUEST_TIMEOUT = 10.0
#: Requests served at once (a scheme daemon being asked); more: `ne busy`.
DEFAULT_MAX_REQUESTS = 256
#: Longest request "NAME;IPC_NETWORK" ipcd serves, in bytes; a longer one is
#: answered `ne badrequest`. Twice Linux's longest environment string
#: (MAX_ARG_STRLEN, 128 KiB): any IPC_NETWORK a program can be started with fits.
MAX_REQUEST = 256 * 1024
#: The max_message_size of ipcd's context: the largest request ipcd receives
#: whole, so that it can answer it (over MAX_REQUEST: `ne badrequest`). pyipc's
#: default, which a client with default limits cannot exceed. A frame announcing
#: more is ended by the core as it reads the header, before ipcd sees anything:
#: that client gets no answer, only the end of the connection.
REQUEST_RECEIVE_LIMIT = DEFAULT_MAX_MESSAGE_SIZE


class _Request:
    """One client of ipcd, from its connection to ipcd's answer."""

    __slots__ = ("client", "deadline", "name", "daemon_fd", "reader", "scheme")

    def __init__(self, client: int, deadline: TimerHandle) -> None:
        self.client = client
        self.deadline = deadline
        self.name = ""
        self.scheme = ""
        self.daemon_fd = -1                  # the scheme daemon's socket, once asked
        self.reader = wire.AnswerReader()


class Ipcd(Daemon):
    """ipcd: serves `ipc` in the run dir (or the socket systemd passes).

    Args:
        rundir: the run directory (default: env `RUNDIR`, else `/tmp/.libipc-run`).
        backend: the pyipc backend of its context (default: as `Context`).
        request_timeout: seconds a request may take, from the client's
            connection to ipcd's answer (then `ne timeout`).
        max_requests: requests waiting for a scheme daemon at once; the next
            ones are answered `ne busy`.
    """

    name = "ipcd"

    def __init__(self, *, rundir: Optional[str] = None, backend: Optional[str] = None,
                 request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
                 max_requests: int = DEFAULT_MAX_REQUESTS) -> None:
        if not request_timeout > 0:
            raise ValueError(f"request_timeout must be > 0 seconds, not {request_timeout!r}")
        if max_requests < 1:
            raise ValueError(f"max_requests must be >= 1, not {max_requests!r}")
        super().__init__(rundir=rundir, backend=backend,
                         max_message_size=REQUEST_RECEIVE_LIMIT)
        self.request_timeout = request_timeout
        self.max_requests = max_requests
        self._requests: Dict[int, _Request] = {}     # by client fd
        self._asking: Dict[int, _Request] = {}       # by scheme daemon fd
        self._listener: Optional[socket.socket] = None   # systemd's socket, if any
        self._service_fd = -1

    @property
    def in_flight(self) -> int:
        """Requests being served now (a scheme daemon asked, no answer yet)."""
        return len(self._asking)

    # ------------------------------------------------------------ set-up

    def setup(self) -> None:
        """Serve `ipc`: the listening socket systemd passed, else a new service."""
        passed = _systemd.listen_fds()
        fds = passed.get(IPCD_SERVICE) or passed.get("unknown") or []
        for fd in fds:
            sock = socket.socket(fileno=fd)
            if self._listener is None and _sockets.is_listening(sock, socket.AF_UNIX):
                sock.setblocking(False)
                self._listener = sock
                self.ctx.add_external(sock.fileno())   # EXTERNAL: clients to accept
                self.log.info("ipcd: serving the socket systemd passed (fd %d)", fd)
            else:
                self.log.warning("ipcd: ignoring fd %d from systemd (not a listening "
                                 "Unix stream socket, or not the first)", fd)
                sock.close()
        if self._listener is None:
            self._service_fd = self.ctx.service_init(IPCD_SERVICE)

    def teardown(self) -> None:
        """Let go of the fds received and of systemd's socket (closed with the context)."""
        for request in list(self._requests.values()):
            request.reader.close()
        if self._listener is not None:
            self._listener.detach()                    # the context closes the fd

    # ------------------------------------------------------------ events

    def on_event(self, ev: Event) -> None:
        """Handle one event (a failure is logged by the runtime, which goes on)."""
        if ev.type == EventType.CONNECTION:
            self._admit(ev.fd)
        elif ev.type == EventType.MESSAGE_RX:
            request = self._requests.get(ev.fd)
            if request is not None and not request.name:
                self._on_request(request, ev.message or b"")
        elif ev.type == EventType.EXTERNAL:
            if self._listener is not None and ev.fd == self._listener.fileno():
                self._accept()
            elif ev.fd in self._asking:
                self._on_daemon_readable(self._asking[ev.fd])
        elif ev.type == EventType.DISCONNECTION:
            request = self._requests.get(ev.fd)
            if request is not None:            # the client gave up: so do we
                self._end(request)
        elif ev.type == EventType.ERROR:
            # A request over REQUEST_RECEIVE_LIMIT ends here, unanswered.
            self.log.info("ipcd: fd %d: %s", ev.fd, ev.error)

    def _accept(self) -> None:
        assert self._listener is not None
        for fd in _sockets.accept_connections(self.ctx, self._listener, "client"):
            self._admit(fd)

    def _admit(self, client: int) -> None:
        handle = self.call_later(self.request_timeout, lambda: self._expired(client))
        self._requests[client] = _Request(client, handle)

    # ------------------------------------------------------------ a request

    def _on_request(self, request: _Request, payload: bytes) -> None:
        if len(payload) > MAX_REQUEST:
            return self._refuse(request, wire.BADREQUEST, f"a request of {len(payload)} "
                                f"bytes; ipcd takes at most {MAX_REQUEST} (IPC_NETWORK "
                                "too long?)")
        try:
            name, rules = _rules.parse_request(payload)
        except _rules.BadRequest as e:
            return self._refuse(request, wire.BADREQUEST, str(e))
        request.name = name
        uri = _rules.find_rule(name, rules)
        if uri is None:
            return self._refuse(request, wire.NORULE, f"no rule for {name} in IPC_NETWORK")
        try:
            target = _rules.target_of(uri)
        except ValueError as e:
            return self._refuse(request, wire.NORULE, str(e))
        self.log.info("ipcd: %s -> %s", name, uri)
        if target.scheme is None:
            self._connect_local(request, target.where)
        else:
            self._ask_daemon(request, target.scheme, target.where)

    def _connect_local(self, request: _Request, where: str) -> None:
        try:        # a name in the run dir (checked: "../x" is no name), or a path
            path = where if where.startswith("/") else _rundir.service_path(
                self.ctx.rundir, where)
        except InvalidNameError as e:
            return self._refuse(request, wire.NORULE, f"{where}: {e}")
        if not self._in_rundir(path):
            # ipcd connects with its own identity and the client chooses the
            # path: any socket ipcd's user may reach would be the client's.
            return self._refuse(request, wire.REFUSED, f"{where}: ipcd reaches only "
                                f"sockets in its run dir {self.ctx.rundir}")
        try:
            sock = _sockets.connect_local(path, where, self.ctx.rundir)
        except _sockets.LocalRefusal as e:
            return self._refuse(request, e.code, str(e))
        with sock:
            self._pass(request, sock.fileno())

    def _in_rundir(self, path: str) -> bool:
        """Whether socket `path` (links resolved) is in the run dir."""
        rundir = os.path.realpath(self.ctx.rundir)
        return os.path.dirname(os.path.realpath(path)) == rundir

    def _ask_daemon(self, request: _Request, scheme: str, uri: str) -> None:
        if self.in_flight >= self.max_requests:
            return self._refuse(request, wire.BUSY, f"ipcd serves {self.max_requests} "
                                "requests at once (--max-requests)")
        path = os.path.join(self.ctx.rundir, scheme)
        try:
            sock = _sockets.connect_local(path, scheme, self.ctx.rundir)
        except _sockets.LocalRefusal as e:
            if e.code == wire.BUSY:
                return self._refuse(request, wire.BUSY, f"the {scheme} daemon: {e}")
            return self._refuse(request, wire.NODAEMON, f"{e} (is the {scheme} daemon, "
                                f"pyipc {scheme}d, running?)")
        try:
            sent = sock.send(wire.frame(uri.encode()), wire.SEND_FLAGS)
        except OSError as e:
            sock.close()
            return self._refuse(request, wire.NODAEMON, f"cannot ask the {scheme} "
                                f"daemon: {e.strerror or e}")
        if sent != len(uri.encode()) + 4:       # a URI fits an empty socket buffer
            sock.close()
            return self._refuse(request, wire.NODAEMON, f"the {scheme} daemon is not reading")
        try:
            self.ctx.add_external(sock.fileno())      # EXTERNAL once it answers
        except IPCError as e:                         # max_connections reached
            sock.close()
            return self._refuse(request, wire.BUSY, str(e))
        request.scheme = scheme
        request.daemon_fd = sock.detach()             # the context owns it now
        self._asking[request.daemon_fd] = request

    def _on_daemon_readable(self, request: _Request) -> None:
        scheme = request.scheme
        try:
            answer = request.reader.read(request.daemon_fd)
        except EOFError as e:
            return self._refuse(request, wire.NODAEMON, f"the {scheme} daemon failed: {e}")
        except ValueError as e:
            return self._refuse(request, wire.NODAEMON, f"the {scheme} daemon sent {e}")
        if answer is None:
            return                               # more to come
        fd = request.reader.take_fd()
        if answer == b"ok" and fd is not None:
            try:
                self._pass(request, fd)
            finally:
                os.close(fd)
        elif answer.startswith(b"ne ") and fd is None:
            self._answer(request, answer[:wire.MAX_REFUSAL + 3])   # relayed unchanged
        else:
            if fd is not None:
                os.close(fd)
            self._refuse(request, wire.NODAEMON, f"the {scheme} daemon answered "
                         "neither ok with a fd nor ne")

    def _expired(self, client: int) -> None:
        request = self._requests.get(client)
        if request is None:
            return
        if not request.name:        # answered as tcpd and tlsd answer a silent peer
            return self._refuse(request, wire.TIMEOUT, f"no request within "
                                f"{self.request_timeout:g} s (ipcd --request-timeout)")
        where = f"the {request.scheme} daemon" if request.scheme else "the service"
        self._refuse(request, wire.TIMEOUT, f"no answer from {where} in "
                     f"{self.request_timeout:g} s (ipcd --request-timeout)")

    # ------------------------------------------------------------ answers

    def _pass(self, request: _Request, fd: int) -> None:
        if not wire.send_with_fd(request.client, b"ok", fd):
            self.log.info("ipcd: client of %s left before its answer", request.name)
        self._end(request)

    def _refuse(self, request: _Request, code: str, text: str) -> None:
        self.log.info("ipcd: %s: %s %s", request.name or "?", code, text)
        self._answer(request, wire.refusal(code, text))

    def _answer(self, request: _Request, data: bytes) -> None:
        wire.send_raw(request.client, data)
        self._end(request)

    def _end(self, request: _Request) -> None:
        """Forget the request: its timer, the scheme daemon's socket, the client."""
        del self._requests[request.client]
        self.cancel(request.deadline)
        request.reader.close()
        if request.daemon_fd >= 0:
            del self._asking[request.daemon_fd]
            self.ctx.close(request.daemon_fd)
        try:
            self.ctx.close(request.client)
        except IPCError:
            pass                                 # already gone (its DISCONNECTION)


# ---------------------------------------------------------------- command line

def add_command(subparsers: Any) -> None:
    """`pyipc ipcd`."""
    p = subparsers.add_parser(
        "ipcd", help="serve ipc: connect clients to services by name (IPC_NETWORK)",
        description="Serve the service ipc in the run dir: a client with IPC_NETWORK set "
                    "asks it for a service by name, and gets a connection to the local "
                    "service, or to a remote one through the daemon of the URI's scheme "
                    "(pyipc tcpd for tcp://). Foreground; stops on SIGTERM or Ctrl-C; "
                    "systemd socket activation and readiness (docs/networking.md).")
    # --rundir and --backend are pyipc's own options (pyipc --rundir DIR ipcd).
    p.add_argument("--request-timeout", type=float, default=DEFAULT_REQUEST_TIMEOUT,
                   metavar="SECONDS",
                   help=f"time a request may take (default {DEFAULT_REQUEST_TIMEOUT:g})")
    p.add_argument("--max-requests", type=int, default=DEFAULT_MAX_REQUESTS, metavar="N",
                   help=f"requests served at once; more are answered 'busy' "
                        f"(default {DEFAULT_MAX_REQUESTS})")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    try:
        daemon = Ipcd(rundir=args.rundir, backend=args.backend,
                      request_timeout=args.request_timeout, max_requests=args.max_requests)
    except ValueError as e:                     # a bad option value: usage error
        print(f"pyipc ipcd: {e}", file=sys.stderr)
        return 2
    daemon.run()
    return 0
