"""systemd's two protocols a daemon speaks: socket activation and readiness.

Socket activation (sd_listen_fds(3)): systemd opens the listening sockets and
starts the daemon with them as fds 3, 4, ... and the environment LISTEN_PID
(our pid: the fds are for us, not for a child that inherited the variables),
LISTEN_FDS (how many) and LISTEN_FDNAMES (their names, ':'-separated).

Readiness (sd_notify(3)): a datagram "READY=1" to the Unix socket named by
NOTIFY_SOCKET (a path, or '@' for Linux's abstract namespace) once the daemon
serves; "STOPPING=1" when it begins to stop.

Both are written here in a few lines rather than depending on a binding: the
protocols are small, stable and documented, and the daemons must run where no
systemd library is installed.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Dict, List, Tuple

log = logging.getLogger("pyipc.daemons.systemd")

#: The first fd systemd passes (SD_LISTEN_FDS_START).
LISTEN_FDS_START = 3


def listen_fds(unset_environment: bool = True) -> Dict[str, List[int]]:
    """The sockets systemd passed us, by name ("unknown" when unnamed).

    Empty when not socket-activated, or when the variables were meant for
    another process (LISTEN_PID is not ours). With `unset_environment` the
    variables are removed, so children we start do not take the fds as theirs.
    Each fd is marked close-on-exec.
    """
    pid = os.environ.get("LISTEN_PID", "")
    count = os.environ.get("LISTEN_FDS", "")
    names = os.environ.get("LISTEN_FDNAMES", "")
    if unset_environment:
        for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(var, None)
    if not pid.isdigit() or int(pid) != os.getpid() or not count.isdigit():
        return {}
    fds = range(LISTEN_FDS_START, LISTEN_FDS_START + int(count))
    labels = names.split(":") if names else []
    found: Dict[str, List[int]] = {}
    for i, fd in enumerate(fds):
        os.set_inheritable(fd, False)
        label = labels[i] if i < len(labels) and labels[i] else "unknown"
        found.setdefault(label, []).append(fd)
    log.info("socket activation: %s", found)
    return found


def passed_sockets(first: Tuple[str, ...] = ()) -> List[socket.socket]:
    """Every fd systemd passed us that is a socket, as a socket object (the
    daemon sorts them by kind): those named in `first` before the others, in
    that order. A name only orders them: systemd names an fd after its
    socket unit unless FileDescriptorName= says otherwise, so a daemon that
    took only its own name would ignore a unit named differently. An fd that
    is not a socket is closed, with a warning."""
    passed = listen_fds()
    names = [n for n in first if n in passed] + [n for n in passed if n not in first]
    sockets = []
    for fd in (fd for name in names for fd in passed[name]):
        try:
            sockets.append(socket.socket(fileno=fd))
        except OSError:                 # ENOTSOCK: a file, a pipe
            log.warning("ignoring fd %d from systemd: not a socket", fd)
            os.close(fd)
    return sockets


def notify(state: str) -> bool:
    """Send `state` ("READY=1", "STOPPING=1", "STATUS=...") to systemd.

    False when NOTIFY_SOCKET is not set (not started by systemd with
    Type=notify) or the datagram could not be sent (logged, not raised: a
    daemon keeps serving when its supervisor went away).
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(address)
            s.sendall(state.encode())
    except OSError as e:
        log.warning("could not notify systemd (%s): %s", state, e)
        return False
    return True

