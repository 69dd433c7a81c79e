"""Run directory and service names: resolution, checks, creation, locks.

Used by the pure backend; the Zig core applies the same rules with the same
messages (see docs/reference.md, "Errors" and "Run directory").
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat
from typing import Optional, Tuple, Union

from ._checks import check_name
from ._types import (DEFAULT_RUNDIR, MAX_SOCKET_PATH, InvalidNameError, IPCError,
                     RunDirError, ServiceBusyError)

PathLike = Union[str, "os.PathLike[str]"]
#: Which file a path names: (st_dev, st_ino), equal for the same file.
FileId = Tuple[int, int]


def resolve_rundir(rundir: Optional[PathLike]) -> str:
    """The `rundir` argument, else env RUNDIR, else libIPC's default.

    A str or str path only (TypeError otherwise), without NUL and without a
    lone surrogate that is not a surrogate escape (ValueError: no file name
    gives one): both backends refuse these the same way, before anything is
    touched.
    """
    if rundir is None:
        return os.environ.get("RUNDIR") or DEFAULT_RUNDIR
    path = os.fspath(rundir)
    if not isinstance(path, str):
        raise TypeError(f"rundir must be str or os.PathLike[str], not {type(path).__name__}")
    if "\0" in path:
        raise ValueError("rundir must not contain NUL")
    try:
        path.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise ValueError("rundir must not contain a lone surrogate that is not an "
                         "undecodable byte's escape") from None
    return path


def service_path(rundir: str, name: str) -> str:
    """`RUNDIR/NAME` after checking the name; raises InvalidNameError."""
    check_name(name)
    if not name:
        raise InvalidNameError("invalid service name: empty")
    if "/" in name:
        raise InvalidNameError("invalid service name: contains '/'")
    if "\0" in name:
        raise InvalidNameError("invalid service name: contains NUL")
    # connect() through ipcd sends "NAME;IPC_NETWORK": a ';' would add rules.
    if ";" in name:
        raise InvalidNameError("invalid service name: contains ';'")
    # RUNDIR/. is the run dir itself, RUNDIR/.. its parent: not a socket path.
    if name in (".", ".."):
        raise InvalidNameError("invalid service name: '.' and '..' are not names")
    path = os.path.join(rundir, name)
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise InvalidNameError(
            f"invalid service name: socket path is longer than {MAX_SOCKET_PATH} bytes")
    return path


def check_rundir(rundir: str, create: bool) -> bool:
    """Check (and with `create`, make) the run dir; False when it is missing.

    Refuses a symlink, a non-directory, a directory writable by others and one
    owned by another user than us or root.
    """
    rundir = strip_slashes(rundir)
    try:
        st = os.lstat(rundir)
    except FileNotFoundError:
        if not create:
            return False
        _create(rundir)
        st = _lstat(rundir)
    except OSError as e:        # e.g. a parent that is not a directory (ENOTDIR)
        raise _cannot_create(rundir, e) from None
    if stat.S_ISLNK(st.st_mode):
        raise RunDirError(f"run directory {rundir} is a symlink")
    if not stat.S_ISDIR(st.st_mode):
        raise RunDirError(f"run directory {rundir} is not a directory")
    if st.st_mode & stat.S_IWOTH:
        raise RunDirError(f"run directory {rundir} is writable by others")
    # Another user's run dir could hand us their sockets; root's is trusted.
    if st.st_uid not in (0, os.geteuid()):
        raise RunDirError(f"run directory {rundir} is owned by another user (uid {st.st_uid})")
    return True


def strip_slashes(rundir: str) -> str:
    """`rundir` without trailing slashes ("/" stays "/").

    lstat("link/") follows the symlink "link": the check must see "link".
    """
    return rundir.rstrip("/") or rundir[:1]


def _cannot_create(rundir: str, e: OSError) -> RunDirError:
    return RunDirError(f"cannot create run directory {rundir}: {os.strerror(e.errno or 0)}",
                       e.errno)


def _lstat(rundir: str) -> os.stat_result:
    try:
        return os.lstat(rundir)
    except OSError as e:
        raise _cannot_create(rundir, e) from None


def _create(rundir: str) -> None:
    try:
        os.makedirs(rundir, mode=0o770, exist_ok=True)
        os.chmod(rundir, 0o770)     # makedirs' mode is filtered by the umask
    except OSError as e:
        raise _cannot_create(rundir, e) from None


def lock_service(rundir: str, name: str, path: str) -> int:
    """Take the exclusive lock `NAME.lock`; return its fd (held until closed).

    A symlink there is refused, not followed: it would make us create and
    lock a file anywhere, outside the run dir.
    """
    lock_path = path + ".lock"
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        fd = os.open(lock_path, flags, 0o660)
    except OSError as e:        # e.g. ENXIO: a socket of service "NAME.lock" is there
        # O_NOFOLLOW's errno varies (ELOOP, EMLINK on FreeBSD): look instead.
        if os.path.islink(lock_path):
            raise IPCError(f"cannot start service {name}: {lock_path} is a symlink") from None
        raise _start_failed(name, e.errno) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise ServiceBusyError(f"service {name} is already running in {rundir}") from None
        raise _start_failed(name, e.errno) from None
    _share_lock(fd, name)
    return fd


def _share_lock(fd: int, name: str) -> None:
    """Give the lock file mode 0660, as the run dir (0770) and socket (0660)
    are: open()'s mode is filtered by the umask, and a lock file the group
    cannot open made another member's service_init fail with EACCES instead
    of ServiceBusyError. Only our own lock file of one link: another user's
    keeps its owner's mode (root included), and a hard link to some other
    file is not made group-readable through it."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_uid != os.geteuid():
        return
    try:
        os.fchmod(fd, 0o660)
    except OSError as e:
        if e.errno != errno.EPERM:
            os.close(fd)
            raise _start_failed(name, e.errno) from None


def listen_service(rundir: str, name: str, path: str) -> Tuple[socket.socket, int, FileId]:
    """Serve `name` at `path` in `rundir` (created if need be): take its lock,
    replace a stale socket, listen (mode 0660, non-blocking). The listening
    socket, the lock's fd and the socket file's FileId, the first two the
    caller's to close: the socket file removed first
    (remove_own_socket(path, file_id)), then the lock released.
    ServiceBusyError while another process serves `name`."""
    check_rundir(rundir, create=True)
    lock_fd = lock_service(rundir, name, path)
    sock = None
    file_id: Optional[FileId] = None
    try:
        remove_stale_socket(path, name)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.bind(path)
        file_id = socket_file_id(path)
        os.chmod(path, 0o660)
        sock.listen(socket.SOMAXCONN)
        sock.setblocking(False)
    except OSError as e:
        if sock is not None:
            sock.close()
        if file_id is not None:             # bound: the file is ours (as the core's errdefer)
            remove_own_socket(path, file_id)
        os.close(lock_fd)
        if isinstance(e, IPCError):
            raise
        raise _start_failed(name, e.errno) from None
    return sock, lock_fd, file_id


def _start_failed(name: str, errno_: Optional[int]) -> IPCError:
    err = IPCError(f"cannot start service {name}: {os.strerror(errno_ or 0)}")
    err.errno = errno_
    return err


def remove_stale_socket(path: str, name: str) -> None:
    """Remove a socket file left by a dead service (we hold the lock).

    Anything but a socket at `path` is left alone and refused: it may be
    another service's lock file (service "x.lock" next to service "x") or a
    file that is not ours to delete.
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise IPCError(f"cannot start service {name}: {path} exists and is not a socket")
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def socket_file_id(path: str) -> FileId:
    """The FileId of the file at `path` (not following a symlink)."""
    st = os.lstat(path)
    return st.st_dev, st.st_ino


def remove_own_socket(path: str, file_id: FileId) -> None:
    """Remove a closing service's socket file, only if `path` still names the
    file it bound (`file_id`): the run dir may have been removed and a new
    service of the same name started there since (or a tmp cleaner removed
    NAME.lock and another context took the name), and that socket is not
    ours to remove. The core's rundir.removeOwnSocket."""
    try:
        if socket_file_id(path) == file_id:
            os.unlink(path)
    except FileNotFoundError:
        pass
