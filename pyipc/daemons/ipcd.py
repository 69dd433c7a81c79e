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
once (the next ones are answered `ne busy`).

ipcd listens on its socket itself (or on the one systemd passes) and reads each
request itself, its clients' sockets watched as external fds, rather than
through a service of its context: a request announced over MAX_REQUEST bytes is
then answered `ne badrequest` as soon as its header is read (the core would end
such a connection at the header, with no chance to answer), and nothing of it
is buffered.
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import sys
from typing import Any, Dict, Optional, Set

from .. import Event, EventType, InvalidNameError, IPCError, _rundir
from .._types import IPCD_SERVICE
from . import _netwire as wire
from . import _rules, _sockets, _systemd
from ._runtime import Daemon
from ._timers import MAX_TIMEOUT, TimerHandle, check_timeout

#: Seconds a request may take, from the client's connection to the answer.
DEFAULT_REQUEST_TIMEOUT = 10.0
#: Requests served at once (a scheme daemon being asked); more: `ne busy`.
DEFAULT_MAX_REQUESTS = 256
#: Longest request "NAME;IPC_NETWORK" ipcd serves, in bytes; a longer one is
#: answered `ne badrequest` at its header. Twice Linux's longest environment
#: string (MAX_ARG_STRLEN, 128 KiB): any IPC_NETWORK a program can be started with fits.
MAX_REQUEST = 256 * 1024
#: Bytes of requests being read that ipcd holds at most, all clients together
#: (128 requests of MAX_REQUEST): a client whose bytes would pass it is
#: answered `ne busy`. Without it, clients that each send most of a long
#: request and wait held MAX_REQUEST each, up to the fd limit.
MAX_BUFFERED = 32 * 1024 * 1024
#: Requests announced at up to this many bytes are never refused by
#: MAX_BUFFERED (ipcd reads them in two reads, header and body): only longer
#: ones hold memory for long, and a client with a short request is served
#: whatever the rest do.
SMALL_REQUEST = 64 * 1024
#: Reads per event at most of what a refused client still sends (dropped at
#: once, _sockets.DROP_CHUNK bytes each; the loop serves the others in between).
DRAIN_READS = 16


class _Request:
    """One client of ipcd, from its connection to ipcd's answer."""

    __slots__ = ("client", "deadline", "name", "daemon_fd", "request", "reader", "scheme",
                 "draining")

    def __init__(self, client: int, deadline: TimerHandle) -> None:
        self.client = client
        self.deadline = deadline
        self.name = ""
        self.scheme = ""
        self.daemon_fd = -1                  # the scheme daemon's socket, once asked
        #: Reads the client's request; None once it is whole.
        self.request: Optional[wire.FrameReader] = wire.FrameReader(
            MAX_REQUEST, "a request", take_fds=False)
        #: Reads the scheme daemon's answer.
        self.reader = wire.FrameReader()
        #: Answered while the client still sends: what it sends is read and
        #: dropped until its end or the deadline (see _refuse_and_drain).
        self.draining = False

    def close_readers(self) -> None:
        """Close the fds that came with the request or the answer, not taken."""
        if self.request is not None:
            self.request.close()
        self.reader.close()


class Ipcd(Daemon):
    """ipcd: serves `ipc` in the run dir (or the socket systemd passes).

    Args:
        rundir: the run directory (default: env `RUNDIR`, else `/tmp/.libipc-run`).
        backend: the pyipc backend of its context (default: as `Context`).
        request_timeout: seconds a request may take, from the client's
            connection to ipcd's answer (then `ne timeout`); at most
            MAX_TIMEOUT (a day).
        max_requests: requests waiting for a scheme daemon at once; the next
            ones are answered `ne busy`.
    """

    name = "ipcd"

    def __init__(self, *, rundir: Optional[str] = None, backend: Optional[str] = None,
                 request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
                 max_requests: int = DEFAULT_MAX_REQUESTS) -> None:
        check_timeout("request_timeout", request_timeout)
        if max_requests < 1:
            raise ValueError(f"max_requests must be >= 1, not {max_requests!r}")
        super().__init__(rundir=rundir, backend=backend)
        self.request_timeout = request_timeout
        self.max_requests = max_requests
        self._requests: Dict[int, _Request] = {}     # by client fd
        self._asking: Dict[int, _Request] = {}       # by scheme daemon fd
        #: Clients that ended their sending side, waiting for their answer:
        #: not watched (see _on_client_readable), so a hang-up is not reported.
        self._half_closed: Set[int] = set()
        self._held = 0          # bytes of requests being read, all clients (MAX_BUFFERED)
        self._listener: Optional[socket.socket] = None   # ours, or systemd's
        self._socket_path: Optional[str] = None          # ours: removed at the end
        self._lock_fd = -1                               # ours: held while serving
        self._socket_id: _rundir.FileId = (0, 0)         # which file we bound at _socket_path

    @property
    def in_flight(self) -> int:
        """Requests being served now (a scheme daemon asked, no answer yet)."""
        return len(self._asking)

    # ------------------------------------------------------------ set-up

    def setup(self) -> None:
        """Serve `ipc`: the listening socket systemd passed, else our own in
        the run dir (locked, as a service's: a second ipcd is refused)."""
        for sock in _systemd.passed_sockets(first=(IPCD_SERVICE, "unknown")):
            fd = sock.fileno()
            if self._listener is None and _sockets.is_listening(sock, socket.AF_UNIX):
                self._watch_listener(sock)
                self.log.info("ipcd: serving the socket systemd passed (fd %d)", fd)
            else:
                self.log.warning("ipcd: ignoring fd %d from systemd (not a listening "
                                 "Unix stream socket, or not the first)", fd)
                sock.close()
        if self._listener is None:
            rundir = self.ctx.rundir
            path = _rundir.service_path(rundir, IPCD_SERVICE)
            listener, self._lock_fd, self._socket_id = _rundir.listen_service(
                rundir, IPCD_SERVICE, path)
            self._socket_path = path                  # removed by teardown, lock released
            self._watch_listener(listener)

    def _watch_listener(self, sock: socket.socket) -> None:
        """Serve clients from `sock` (EXTERNAL when they wait); the context
        owns it from then on, else it is closed here."""
        sock.setblocking(False)
        try:
            self.ctx.add_external(sock.fileno())
        except BaseException:
            sock.close()
            raise
        self._listener = sock

    def teardown(self) -> None:
        """Let go of the fds received, and of the listening socket (closed with
        the context): ours is removed, then its lock released."""
        for request in list(self._requests.values()):
            if not request.draining:        # told why, not left with a bare EOF
                wire.send_raw(request.client, wire.refusal(wire.NODAEMON, "ipcd is stopping"))
            request.close_readers()
        if self._listener is not None:
            self._listener.detach()                    # the context closes the fd
        if self._socket_path is not None:
            _rundir.remove_own_socket(self._socket_path, self._socket_id)
            os.close(self._lock_fd)

    # ------------------------------------------------------------ events

    def on_event(self, ev: Event) -> None:
        """Handle one event (a failure is logged by the runtime, which goes on)."""
        if ev.type == EventType.EXTERNAL:
            if self._listener is not None and ev.fd == self._listener.fileno():
                self._accept()
            elif ev.fd in self._asking:
                self._on_daemon_readable(self._asking[ev.fd])
            elif ev.fd in self._requests:
                self._on_client_readable(self._requests[ev.fd])
        elif ev.type == EventType.ERROR:
            self.log.info("ipcd: fd %d: %s", ev.fd, ev.error)

    def on_event_failed(self, ev: Event) -> None:
        """A bug or a resource limit met while serving a request: its client is
        told so at once (rather than at the deadline) and forgotten."""
        request = self._requests.get(ev.fd) or self._asking.get(ev.fd)
        if request is not None and request.client in self._requests:
            self._refuse(request, wire.REFUSED, "ipcd failed serving this request "
                         "(see its log)")

    def _accept(self) -> None:
        """Each waiting client watched (EXTERNAL when it sends), its request
        read by ipcd itself (_on_client_readable)."""
        assert self._listener is not None
        for sock in _sockets.accept_some(self._listener):
            sock.setblocking(False)
            try:
                self.ctx.add_external(sock.fileno())
            except IPCError as e:                      # max_connections reached
                self.log.warning("ipcd: cannot take a client: %s", e)
                wire.send_raw(sock.fileno(), wire.refusal(wire.BUSY, f"ipcd: {e}"))
                sock.close()
                continue
            self._admit(sock.detach())                 # the context owns it now

    def _admit(self, client: int) -> None:
        handle = self.call_later(self.request_timeout, lambda: self._expired(client))
        self._requests[client] = _Request(client, handle)

    # ------------------------------------------------------------ a request

    def _on_client_readable(self, request: _Request) -> None:
        if request.draining:
            return self._drain(request)
        reader = request.request
        if reader is None:
            # Nothing more is to come before the answer: more bytes are a
            # second request (refused); an EOF is the end of the client's
            # sending side, not of its wait (a half-close after the request):
            # it is answered as any other, and one that left makes only that
            # answer's send fail. Its input is not watched any more (its EOF
            # would wake the loop at every round).
            try:
                more = os.read(request.client, 1)
            except BlockingIOError:
                return
            except OSError:
                more = b""
            if not more:
                if _closed_by_peer(request.client):
                    return self._end(request)         # it left: its slot is free
                self._half_closed.add(request.client)
                return self.ctx.pause_reading(request.client, True)
            return self._refuse_and_drain(request, "bytes after a request")
        before = len(reader.data)
        try:
            payload = reader.read(request.client)
        except wire.FrameTooLarge as e:
            return self._refuse_and_drain(request, f"a request of {e.size} bytes; ipcd "
                                          f"takes at most {MAX_REQUEST} (IPC_NETWORK too long?)")
        except ValueError as e:                       # bytes after the request
            return self._refuse_and_drain(request, str(e))
        except EOFError as e:
            if not reader.data:
                return self._end(request)             # left without asking
            return self._refuse(request, wire.BADREQUEST, str(e))
        finally:
            self._held += len(reader.data) - before
        if payload is None:                           # more to come
            if _announced(reader.data) > SMALL_REQUEST and self._held > MAX_BUFFERED:
                self._refuse_and_drain(request, f"ipcd holds {self._held} bytes of "
                                       f"requests being read, at most {MAX_BUFFERED}",
                                       wire.BUSY)
            return
        self._drop_request_reader(request)            # fds sent with it: not ours
        self._on_request(request, payload)

    def _drop_request_reader(self, request: _Request) -> None:
        """The request is read (or refused, or ended): its bytes no longer
        count toward MAX_BUFFERED, its reader is closed."""
        reader = request.request
        if reader is not None:
            self._held -= len(reader.data)
            reader.close()
            request.request = None

    def _refuse_and_drain(self, request: _Request, text: str,
                          code: str = wire.BADREQUEST) -> None:
        """Answer `ne CODE TEXT` to a client that is still sending, and
        read what it sends until it is done (or the deadline): closed with
        its bytes unread, its socket would fail its write (EPIPE) before it
        reads the answer (a lingering close, as web servers make)."""
        self.log.info("ipcd: %s: %s %s", request.name or "?", code, text)
        wire.send_raw(request.client, wire.refusal(code, text))
        sock = socket.socket(fileno=request.client)
        try:
            sock.shutdown(socket.SHUT_WR)            # the answer, then its end
        except OSError:
            return self._end(request)                 # the client is gone already
        finally:
            sock.detach()                             # the context owns the fd
        self._drop_request_reader(request)
        request.close_readers()
        self._stop_asking(request)
        request.draining = True
        self._drain(request)

    def _drain(self, request: _Request) -> None:
        """Read and drop what a refused client sends; end it at its EOF."""
        if _sockets.drop_input(request.client, DRAIN_READS):
            self._end(request)

    def _on_request(self, request: _Request, payload: bytes) -> None:
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
            self._forget_gone()
        if self.in_flight >= self.max_requests:
            return self._refuse(request, wire.BUSY, f"ipcd serves {self.max_requests} "
                                "requests at once (--max-requests)")
        too_long = wire.uri_too_long(uri.encode(), "ipcd")
        if too_long is not None:
            return self._refuse(request, wire.BADREQUEST, too_long)
        path = os.path.join(self.ctx.rundir, scheme)
        try:
            sock = _sockets.connect_local(path, scheme, self.ctx.rundir)
        except _sockets.LocalRefusal as e:
            if e.code == wire.BUSY:
                return self._refuse(request, wire.BUSY, f"the {scheme} daemon: {e}")
            command = "websocketd" if scheme in ("ws", "wss") else f"{scheme}d"
            return self._refuse(request, wire.NODAEMON, f"{e} (is the {scheme} daemon, "
                                f"pyipc {command}, running?)")
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
            # Relayed unchanged, but cut between UTF-8 characters when long.
            self._answer(request, wire.cut_answer(answer))
        else:
            if fd is not None:
                os.close(fd)
            self._refuse(request, wire.NODAEMON, f"the {scheme} daemon answered "
                         "neither ok with a fd nor ne")

    def _expired(self, client: int) -> None:
        request = self._requests.get(client)
        if request is None:
            return
        if request.draining:        # refused already; it sent until the deadline
            return self._end(request)
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

    def _forget_gone(self) -> None:
        """End the requests of half-closed clients that have left since (no
        event says so): their slots are free for the request that needs one."""
        for client in [c for c in self._half_closed if _closed_by_peer(c)]:
            self._end(self._requests[client])

    def _end(self, request: _Request) -> None:
        """Forget the request: its timer, the scheme daemon's socket, the client."""
        del self._requests[request.client]
        self._half_closed.discard(request.client)
        self.cancel(request.deadline)
        self._drop_request_reader(request)
        request.close_readers()
        self._stop_asking(request)
        self.ctx.close(request.client)

    def _stop_asking(self, request: _Request) -> None:
        """Close the scheme daemon's socket of the request, if it was asked."""
        if request.daemon_fd >= 0:
            del self._asking[request.daemon_fd]
            self.ctx.close(request.daemon_fd)
            request.daemon_fd = -1


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
                   help=f"time a request may take (default {DEFAULT_REQUEST_TIMEOUT:g}, "
                        f"at most {MAX_TIMEOUT:g})")
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


def _announced(data: bytearray) -> int:
    """The size a request's header announces (0 while the header is not whole)."""
    return int.from_bytes(data[:4], "big") if len(data) >= 4 else 0


def _closed_by_peer(fd: int) -> bool:
    """Whether the client at fd closed its socket (POLLHUP), rather than
    only its sending side (a half-close, EOF without POLLHUP): one that left
    frees its request at once; a half-closed one waits for its answer."""
    poll = select.poll()
    poll.register(fd, 0)                # POLLHUP is always reported
    return any(mask & select.POLLHUP for _, mask in poll.poll(0))
