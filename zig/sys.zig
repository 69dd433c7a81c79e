//! Thin layer over libc: errno decoding, EINTR-safe read/write/send, blocking
//! waits with poll(2), non-blocking mode, the Unix socket calls (listen,
//! connect, accept), monotonic time, lstat of a path.
//! Everything else calls std.c directly; this file only holds what several
//! files need and what differs between operating systems.

const std = @import("std");
const builtin = @import("builtin");
const c = std.c;
const linux = std.os.linux;

pub const E = c.E;
pub const fd_t = c.fd_t;

/// MSG_NOSIGNAL where it exists: a write to a closed peer must give EPIPE,
/// never SIGPIPE. (macOS has no such flag; there we set SO_NOSIGPIPE instead.)
pub const send_flags: u32 = if (@hasDecl(c.MSG, "NOSIGNAL")) c.MSG.NOSIGNAL else 0;

/// How a transfer on a socket waits. pyipc's own sockets are in blocking
/// mode: the event loop's transfers pass MSG_DONTWAIT (`.no`), a blocking
/// call's pass no flag (`.yes`) and the kernel wakes them when data or room
/// comes, with no poll() and no fcntl() per call (README "How the blocking
/// calls wait"). On a socket in non-blocking mode both return EAGAIN instead
/// of waiting; the blocking calls then poll.
pub const Wait = enum {
    no,
    yes,

    fn flag(self: Wait) u32 {
        return if (self == .no) c.MSG.DONTWAIT else 0;
    }
};

/// The errno of a failed libc call (-1 return).
pub fn errno(rc: anytype) E {
    return c.errno(rc);
}

/// Result of one transfer: bytes moved, or why none were.
pub const IoResult = union(enum) {
    done: usize,
    would_block,
    eof,
    failed: E,
    /// A transfer that waits (Wait.yes) was interrupted by a signal before
    /// it moved anything; the caller decides whether to go on (see blocking.zig).
    interrupted,
};

/// read(2) once, retrying on EINTR. ECONNRESET counts as the end of the stream.
pub fn readSome(fd: fd_t, buf: []u8) IoResult {
    while (true) {
        if (readResult(c.read(fd, buf.ptr, buf.len), buf.len)) |r| return r;
    }
}

/// recv(2) once from a socket, waiting or not (see Wait). EINTR is retried,
/// except in a recv that waits: that one reports .interrupted.
/// ECONNRESET counts as the end of the stream.
pub fn recvSome(fd: fd_t, buf: []u8, wait: Wait) IoResult {
    while (true) {
        if (readResult(c.recv(fd, buf.ptr, buf.len, @intCast(wait.flag())), buf.len)) |r| return r;
        if (wait == .yes) return .interrupted;
    }
}

/// What a read(2) or recv(2) of `len` bytes that returned `n` means; null
/// when a signal interrupted it (call again).
fn readResult(n: isize, len: usize) ?IoResult {
    if (n > 0) return .{ .done = @intCast(n) };
    if (n == 0) return if (len == 0) .{ .done = 0 } else .eof;
    return switch (errno(n)) {
        .INTR => null,
        .AGAIN => .would_block,
        .CONNRESET => .eof,
        else => |e| .{ .failed = e },
    };
}

/// Write an iovec list once: sendmsg with MSG_NOSIGNAL on a socket (send for a
/// single buffer), waiting or not (see Wait); writev on anything else (a pipe
/// given to add_external: in non-blocking mode, it never waits), with SIGPIPE
/// held back (see writevQuiet).
pub fn writeSome(
    fd: fd_t,
    iov: []const std.posix.iovec_const,
    is_socket: bool,
    wait: Wait,
) IoResult {
    if (!is_socket) return writevQuiet(fd, iov);
    while (true) {
        const n = if (iov.len == 1)
            // The kernel takes one buffer through send() more cheaply than a
            // one-entry iovec through sendmsg() (about 0.2 µs a call here).
            c.send(fd, iov[0].base, iov[0].len, send_flags | wait.flag())
        else blk: {
            var msg = std.mem.zeroes(c.msghdr_const);
            msg.iov = iov.ptr;
            msg.iovlen = @intCast(iov.len);
            break :blk c.sendmsg(fd, &msg, send_flags | wait.flag());
        };
        if (n >= 0) return .{ .done = @intCast(n) };
        switch (errno(n)) {
            .INTR => if (wait == .yes) return .interrupted else continue,
            .AGAIN => return .would_block,
            else => |e| return .{ .failed = e },
        }
    }
}

extern "c" fn sigpending(set: *c.sigset_t) c_int;
extern "c" fn sigwait(set: *const c.sigset_t, sig: *c_int) c_int;

fn pipeSignalPending() bool {
    var pending: c.sigset_t = std.posix.sigemptyset();
    if (sigpending(&pending) != 0) return false;
    return std.posix.sigismember(&pending, std.posix.SIG.PIPE);
}

/// writev without SIGPIPE (a pipe has no MSG_NOSIGNAL): SIGPIPE is blocked in
/// this thread for the call, and the one a write to a closed pipe raised is
/// taken off the pending set before the old mask comes back, so the caller
/// only sees EPIPE, whatever the process's SIGPIPE disposition.
fn writevQuiet(fd: fd_t, iov: []const std.posix.iovec_const) IoResult {
    var pipe_set = std.posix.sigemptyset();
    std.posix.sigaddset(&pipe_set, std.posix.SIG.PIPE);
    var old: c.sigset_t = undefined;
    const masked = c.pthread_sigmask(std.posix.SIG.BLOCK, &pipe_set, &old) == 0;
    defer if (masked) {
        var ignored: c.sigset_t = undefined;
        _ = c.pthread_sigmask(std.posix.SIG.SETMASK, &old, &ignored);
    };
    // One already pending (not ours) is left alone.
    const was_pending = masked and pipeSignalPending();
    while (true) {
        const n = c.writev(fd, iov.ptr, @intCast(iov.len));
        if (n >= 0) return .{ .done = @intCast(n) };
        const e = errno(n);
        switch (e) {
            .INTR => continue,
            .AGAIN => return .would_block,
            else => {
                if (e == .PIPE and masked and !was_pending and pipeSignalPending()) {
                    var sig: c_int = 0;
                    _ = sigwait(&pipe_set, &sig); // pending: returns at once
                }
                return .{ .failed = e };
            },
        }
    }
}

/// Block until fd is readable (POLLIN) or writable (POLLOUT): pollFd with
/// no time limit, through signals (for calls that are not interruptible).
pub fn waitFd(fd: fd_t, events: i16) void {
    while (pollFd(fd, events, -1) == .interrupted) {}
}

/// What one poll(2) of a single fd ended with.
pub const PollResult = enum { ready, timed_out, interrupted };

/// Wait until fd is readable (POLLIN) or writable (POLLOUT), at most
/// `timeout_ms` (-1: no limit); a signal ends the wait (.interrupted).
/// Hang-up and error conditions count as ready: the next I/O call reports them.
pub fn pollFd(fd: fd_t, events: i16, timeout_ms: i32) PollResult {
    var pfd = [1]c.pollfd{.{ .fd = fd, .events = events, .revents = 0 }};
    const rc = c.poll(&pfd, 1, timeout_ms);
    if (rc > 0) return .ready;
    if (rc == 0) return .timed_out;
    // Anything else (EINVAL, ENOMEM) is not a wait: let the I/O call that
    // follows report what is wrong with fd.
    return if (errno(rc) == .INTR) .interrupted else .ready;
}

/// pollFd's results, and .woken: the wake-up pipe became readable first.
pub const WakeResult = enum { ready, woken, timed_out, interrupted };

/// pollFd, also ended by another thread's wake-up: `wake_fd` (the read end
/// of a wake-up pipe; negative: none, poll(2) skips it) readable. fd ready
/// wins when both are, so that a transfer in progress goes on.
pub fn pollFdOrWake(fd: fd_t, events: i16, wake_fd: fd_t, timeout_ms: i32) WakeResult {
    var pfd = [2]c.pollfd{
        .{ .fd = fd, .events = events, .revents = 0 },
        .{ .fd = wake_fd, .events = c.POLL.IN, .revents = 0 },
    };
    const rc = c.poll(&pfd, pfd.len, timeout_ms);
    if (rc > 0) return if (pfd[0].revents != 0) .ready else .woken;
    if (rc == 0) return .timed_out;
    // As pollFd: anything but EINTR is left to the I/O call that follows.
    return if (errno(rc) == .INTR) .interrupted else .ready;
}

pub const POLLIN: i16 = c.POLL.IN;
pub const POLLOUT: i16 = c.POLL.OUT;

/// Set or clear O_NONBLOCK.
pub fn setNonblocking(fd: fd_t, on: bool) bool {
    const flags = c.fcntl(fd, c.F.GETFL);
    if (flags < 0) return false;
    const bit: c_int = @bitCast(@as(u32, @bitCast(c.O{ .NONBLOCK = true })));
    const new = if (on) flags | bit else flags & ~bit;
    if (new == flags) return true;
    return c.fcntl(fd, c.F.SETFL, new) >= 0;
}

/// True when fd is an open file descriptor.
pub fn isOpen(fd: fd_t) bool {
    return fd >= 0 and c.fcntl(fd, c.F.GETFD) >= 0;
}

/// True when fd is a socket (so send/sendmsg with MSG_NOSIGNAL work on it).
pub fn isSocket(fd: fd_t) bool {
    var ty: c_int = 0;
    var len: c.socklen_t = @sizeOf(c_int);
    return c.getsockopt(fd, c.SOL.SOCKET, c.SO.TYPE, &ty, &len) == 0;
}

// ------------------------------------------------------------ sockets

/// A socket call's result: the fd, or the errno.
pub const SocketResult = union(enum) { fd: fd_t, failed: E };

/// The address of the Unix socket at `path` (it must fit sun_path).
pub fn unixAddress(path: []const u8) c.sockaddr.un {
    var addr = std.mem.zeroes(c.sockaddr.un);
    addr.family = c.AF.UNIX;
    @memcpy(addr.path[0..path.len], path);
    return addr;
}

/// A non-blocking Unix stream socket listening at `path` with `mode`;
/// on failure nothing is left behind (the socket file is removed).
pub fn listenUnix(path: [:0]const u8, mode: c.mode_t) SocketResult {
    const fd = c.socket(c.AF.UNIX, c.SOCK.STREAM | c.SOCK.CLOEXEC | c.SOCK.NONBLOCK, 0);
    if (fd < 0) return .{ .failed = errno(fd) };
    const addr = unixAddress(path);
    if (c.bind(fd, @ptrCast(&addr), @sizeOf(c.sockaddr.un)) != 0) {
        const e = errno(@as(c_int, -1));
        closeFd(fd);
        return .{ .failed = e };
    }
    if (c.chmod(path.ptr, mode) != 0 or c.listen(fd, 4096) != 0) {
        const e = errno(@as(c_int, -1));
        closeFd(fd);
        _ = c.unlink(path.ptr);
        return .{ .failed = e };
    }
    return .{ .fd = fd };
}

/// What connectUnix ended with.
pub const ConnectResult = union(enum) {
    fd: fd_t,
    failed: E,
    /// The deadline passed while the service's listen backlog was full.
    timed_out,
    /// A signal came while it waited (interruptible calls only).
    interrupted,
};

/// A Unix stream socket connected to `path`, in blocking mode (see Wait).
/// A service whose listen backlog is full holds connect(): `deadline_ns`
/// (monotonic; null: no limit) bounds that wait through SO_SNDTIMEO, which
/// Linux and the BSDs apply to a Unix connect (.timed_out; one attempt even
/// when it has passed). A signal during the wait gives .interrupted when
/// `interruptible`, else connect() is made again: an interrupted Unix
/// connect does not go on in the background (Linux leaves the socket
/// unconnected, with no error to read, so taking it for connected gave a
/// dead fd). On failure the socket is closed.
pub fn connectUnix(path: [:0]const u8, deadline_ns: ?i64, interruptible: bool) ConnectResult {
    const fd = c.socket(c.AF.UNIX, c.SOCK.STREAM | c.SOCK.CLOEXEC, 0);
    if (fd < 0) return .{ .failed = errno(fd) };
    const result = connectLoop(fd, path, deadline_ns, interruptible);
    if (result != .fd) closeFd(fd);
    return result;
}

fn connectLoop(fd: fd_t, path: [:0]const u8, deadline_ns: ?i64, interruptible: bool) ConnectResult {
    const addr = unixAddress(path);
    while (true) {
        if (deadline_ns) |d| setSendTimeout(fd, @max(d - nowNs(), 0));
        if (c.connect(fd, @ptrCast(&addr), @sizeOf(c.sockaddr.un)) == 0) break;
        switch (errno(@as(c_int, -1))) {
            .INTR => if (interruptible) return .interrupted,
            // An earlier attempt that went on after all (not Linux).
            .ISCONN => break,
            .ALREADY, .INPROGRESS => {
                const timeout_ms: i32 = if (deadline_ns) |d| msUntilNs(d) else -1;
                switch (pollFd(fd, POLLOUT, timeout_ms)) {
                    .interrupted => if (interruptible) return .interrupted,
                    .timed_out => return .timed_out,
                    .ready => {},
                }
            },
            .AGAIN => return if (deadline_ns != null) .timed_out else .{ .failed = .AGAIN },
            else => |e| return .{ .failed = e },
        }
    }
    if (deadline_ns != null) setSendTimeout(fd, null); // the writes wait as before
    if (send_flags == 0) setNoSigpipe(fd);
    return .{ .fd = fd };
}

/// SO_SNDTIMEO: `ns` (at least 1 us: 0 means none), or null for none.
fn setSendTimeout(fd: fd_t, ns: ?i64) void {
    const us: i64 = if (ns) |n| @max(1, @divTrunc(n + 999, 1000)) else 0;
    const tv: c.timeval = .{
        .sec = @intCast(@divTrunc(us, 1_000_000)),
        .usec = @intCast(@mod(us, 1_000_000)),
    };
    _ = c.setsockopt(fd, c.SOL.SOCKET, c.SO.SNDTIMEO, &tv, @sizeOf(c.timeval));
}

/// Whole milliseconds until `deadline_ns`, rounded up, at least 0.
fn msUntilNs(deadline_ns: i64) i32 {
    const left = @divTrunc(deadline_ns - nowNs() + 999_999, 1_000_000);
    return @intCast(std.math.clamp(left, 0, std.math.maxInt(i32)));
}

/// Accept one client of a listening socket, in blocking mode (see Wait),
/// close-on-exec; -1 and errno when none could be.
pub fn accept(listen_fd: fd_t) fd_t {
    if (comptime builtin.os.tag.isDarwin()) {
        const fd = c.accept(listen_fd, null, null);
        if (fd >= 0) {
            _ = setNonblocking(fd, false); // blocking mode, not the listener's
            _ = c.fcntl(fd, c.F.SETFD, @as(c_int, c.FD_CLOEXEC));
            setNoSigpipe(fd);
        }
        return fd;
    }
    const fd = c.accept4(listen_fd, null, null, c.SOCK.CLOEXEC);
    if (fd >= 0 and send_flags == 0) setNoSigpipe(fd);
    return fd;
}

/// Where send has no MSG_NOSIGNAL (macOS), ask the socket not to raise SIGPIPE.
pub fn setNoSigpipe(fd: fd_t) void {
    if (@hasDecl(c.SO, "NOSIGPIPE")) {
        const one: c_int = 1;
        _ = c.setsockopt(fd, c.SOL.SOCKET, c.SO.NOSIGPIPE, &one, @sizeOf(c_int));
    }
}

/// Whether fd is a connected Unix or TCP stream socket: the only kinds of fd
/// ipcd may hand us as a connection (tcpd's dialled TCP socket travels as is,
/// libIPC's way: the client then talks to the remote tcpd with no relay).
pub fn isConnectedStream(fd: fd_t) bool {
    var ty: c_int = 0;
    var ty_len: c.socklen_t = @sizeOf(c_int);
    if (c.getsockopt(fd, c.SOL.SOCKET, c.SO.TYPE, &ty, &ty_len) != 0 or ty != c.SOCK.STREAM)
        return false;
    var addr: c.sockaddr.storage = undefined;
    var addr_len: c.socklen_t = @sizeOf(c.sockaddr.storage);
    if (c.getsockname(fd, @ptrCast(&addr), &addr_len) != 0) return false;
    const family = @as(*const c.sockaddr, @ptrCast(&addr)).family;
    if (family != c.AF.UNIX and family != c.AF.INET and family != c.AF.INET6) return false;
    addr_len = @sizeOf(c.sockaddr.storage);
    return c.getpeername(fd, @ptrCast(&addr), &addr_len) == 0;
}

/// Close, ignoring errors: after close(2) the fd is released on every system
/// we target even when it reports EINTR, so retrying would be wrong.
pub fn closeFd(fd: fd_t) void {
    if (fd >= 0) _ = c.close(fd);
}

/// Milliseconds of a monotonic clock.
pub fn nowMs() i64 {
    var ts: c.timespec = undefined;
    _ = c.clock_gettime(c.CLOCK.MONOTONIC, &ts);
    return @as(i64, @intCast(ts.sec)) * 1000 + @divTrunc(@as(i64, @intCast(ts.nsec)), 1_000_000);
}

/// Nanoseconds of the same monotonic clock as nowMs.
pub fn nowNs() i64 {
    var ts: c.timespec = undefined;
    _ = c.clock_gettime(c.CLOCK.MONOTONIC, &ts);
    return @as(i64, @intCast(ts.sec)) * std.time.ns_per_s + @as(i64, @intCast(ts.nsec));
}

/// What lstat(2) tells about a path: its mode, or the errno.
pub const LstatResult = union(enum) { mode: u32, failed: E };

/// lstat a path (does not follow a final symlink). Linux: the statx system call
/// (old glibc has no lstat symbol); elsewhere libc's fstatat.
pub fn lstatMode(path: [*:0]const u8) LstatResult {
    if (builtin.os.tag == .linux) {
        var stx: linux.Statx = undefined;
        const rc = linux.statx(
            linux.AT.FDCWD,
            path,
            linux.AT.SYMLINK_NOFOLLOW,
            .{ .TYPE = true, .MODE = true },
            &stx,
        );
        const e = linux.errno(rc);
        if (e != .SUCCESS) return .{ .failed = @fromBackingInt(@intCast(@backingInt(e))) };
        return .{ .mode = stx.mode };
    } else {
        var st: c.Stat = undefined;
        const rc = c.fstatat(c.AT.FDCWD, path, &st, c.AT.SYMLINK_NOFOLLOW);
        if (rc != 0) return .{ .failed = errno(rc) };
        return .{ .mode = @intCast(st.mode) };
    }
}

/// Which file a path names: device and inode (equal for the same file).
pub const FileId = struct { dev: u64, ino: u64 };

/// What lstat tells of a path that lstatId and lstatOwner need.
const PathStat = struct { id: FileId, uid: u32 };

/// The id and owner of a path (not following a final symlink), or null when
/// it cannot be read (e.g. the path is gone).
fn lstatPath(path: [*:0]const u8) ?PathStat {
    if (builtin.os.tag == .linux) {
        var stx: linux.Statx = undefined;
        const rc = linux.statx(
            linux.AT.FDCWD,
            path,
            linux.AT.SYMLINK_NOFOLLOW,
            .{ .INO = true, .UID = true },
            &stx,
        );
        if (linux.errno(rc) != .SUCCESS) return null;
        const dev = (@as(u64, stx.dev_major) << 32) | stx.dev_minor;
        return .{ .id = .{ .dev = dev, .ino = stx.ino }, .uid = stx.uid };
    } else {
        var st: c.Stat = undefined;
        if (c.fstatat(c.AT.FDCWD, path, &st, c.AT.SYMLINK_NOFOLLOW) != 0) return null;
        // dev_t is signed on some systems: its bits, not its value.
        const Dev = @Int(.unsigned, @bitSizeOf(@TypeOf(st.dev)));
        const id: FileId = .{ .dev = @as(Dev, @bitCast(st.dev)), .ino = @intCast(st.ino) };
        return .{ .id = id, .uid = @intCast(st.uid) };
    }
}

/// The FileId of a path (not following a final symlink), or null when it
/// cannot be read (e.g. the path is gone).
pub fn lstatId(path: [*:0]const u8) ?FileId {
    return if (lstatPath(path)) |st| st.id else null;
}

/// The owner of a path (not following a final symlink), or null when it
/// cannot be read.
pub fn lstatOwner(path: [*:0]const u8) ?u32 {
    return if (lstatPath(path)) |st| st.uid else null;
}

/// True when fd is a regular file of one link owned by the effective user:
/// a file whose mode may be changed for it (a hard link made to someone
/// else's file, or another user's file as seen by root, is not).
pub fn ownSoleFile(fd: fd_t) bool {
    var mode: u32 = 0;
    var nlink: u64 = 0;
    var uid: u32 = 0;
    if (builtin.os.tag == .linux) {
        var stx: linux.Statx = undefined;
        const rc = linux.statx(fd, "", linux.AT.EMPTY_PATH, .{ .TYPE = true, .NLINK = true, .UID = true }, &stx);
        if (linux.errno(rc) != .SUCCESS) return false;
        mode, nlink, uid = .{ stx.mode, stx.nlink, stx.uid };
    } else {
        var st: c.Stat = undefined;
        if (c.fstat(fd, &st) != 0) return false;
        mode, nlink, uid = .{ @intCast(st.mode), @intCast(st.nlink), @intCast(st.uid) };
    }
    return mode & S_IFMT == S_IFREG and nlink == 1 and uid == c.geteuid();
}

pub const S_IFMT: u32 = 0o170000;
pub const S_IFREG: u32 = 0o100000;
pub const S_IFDIR: u32 = 0o040000;
pub const S_IFLNK: u32 = 0o120000;
pub const S_IFSOCK: u32 = 0o140000;
pub const S_IWOTH: u32 = 0o002;

test "readSome and writeSome over a socketpair" {
    var fds: [2]c.fd_t = undefined;
    try std.testing.expectEqual(
        @as(c_int, 0),
        c.socketpair(c.AF.UNIX, c.SOCK.STREAM | c.SOCK.CLOEXEC | c.SOCK.NONBLOCK, 0, &fds),
    );
    defer closeFd(fds[1]);
    var buf: [8]u8 = undefined;
    try std.testing.expect(readSome(fds[1], &buf) == .would_block);
    const iov = [_]std.posix.iovec_const{ .{
        .base = "ab",
        .len = 2,
    }, .{ .base = "cd", .len = 2 } };
    try std.testing.expectEqual(@as(usize, 4), writeSome(fds[0], &iov, true, .no).done);
    try std.testing.expectEqual(@as(usize, 4), readSome(fds[1], &buf).done);
    try std.testing.expectEqualStrings("abcd", buf[0..4]);
    try std.testing.expect(isSocket(fds[0]));
    try std.testing.expect(isOpen(fds[0]));
    closeFd(fds[0]);
    try std.testing.expect(readSome(fds[1], &buf) == .eof);
}

test "writeSome to a pipe nobody reads: EPIPE, no SIGPIPE, none left pending" {
    // SIGPIPE at its default action: a raised one would end the test run.
    var act = std.mem.zeroes(c.Sigaction);
    act.handler = .{ .handler = c.SIG.DFL };
    var saved: c.Sigaction = undefined;
    try std.testing.expectEqual(@as(c_int, 0), c.sigaction(c.SIG.PIPE, &act, &saved));
    defer _ = c.sigaction(c.SIG.PIPE, &saved, null);
    var fds: [2]c.fd_t = undefined;
    try std.testing.expectEqual(@as(c_int, 0), c.pipe(&fds));
    closeFd(fds[0]);
    defer closeFd(fds[1]);
    const iov = [_]std.posix.iovec_const{.{ .base = "x", .len = 1 }};
    const r = writeSome(fds[1], &iov, false, .no);
    try std.testing.expect(r == .failed and r.failed == .PIPE);
    try std.testing.expect(!pipeSignalPending());
}

test "a blocking-mode socket: Wait.no returns at once, Wait.yes takes what is there" {
    var fds: [2]c.fd_t = undefined;
    try std.testing.expectEqual(
        @as(c_int, 0),
        c.socketpair(c.AF.UNIX, c.SOCK.STREAM | c.SOCK.CLOEXEC, 0, &fds),
    );
    defer closeFd(fds[0]);
    defer closeFd(fds[1]);
    var buf: [8]u8 = undefined;
    try std.testing.expect(recvSome(fds[1], &buf, .no) == .would_block);
    const iov = [_]std.posix.iovec_const{.{ .base = "xyz", .len = 3 }};
    try std.testing.expectEqual(@as(usize, 3), writeSome(fds[0], &iov, true, .yes).done);
    try std.testing.expectEqual(@as(usize, 3), recvSome(fds[1], &buf, .yes).done);
    try std.testing.expectEqualStrings("xyz", buf[0..3]);
    // Fill the socket: a write that may not wait stops at EAGAIN.
    const big: [4096]u8 = @splat(0);
    const chunk = [_]std.posix.iovec_const{.{ .base = &big, .len = big.len }};
    while (writeSome(fds[0], &chunk, true, .no) != .would_block) {}
    closeFd(fds[0]);
    fds[0] = -1;
    var total: usize = 0;
    while (true) {
        switch (recvSome(fds[1], &buf, .yes)) {
            .done => |n| total += n,
            .eof => break,
            else => return error.TestUnexpectedResult,
        }
    }
    try std.testing.expect(total > 0);
}

test "lstatId: one file, one id; another file, another; a missing path, null" {
    const tmp = lstatId("/tmp").?;
    try std.testing.expectEqual(tmp, lstatId("/tmp/").?);
    try std.testing.expect(!std.meta.eql(tmp, lstatId("/").?));
    try std.testing.expect(lstatId("/nonexistent-pyipc-path") == null);
}

test "lstatMode sees a directory and a missing path" {
    const r = lstatMode("/tmp");
    try std.testing.expect(r == .mode);
    try std.testing.expectEqual(S_IFDIR, r.mode & S_IFMT);
    const missing = lstatMode("/nonexistent-pyipc-path");
    try std.testing.expect(missing == .failed);
    try std.testing.expectEqual(E.NOENT, missing.failed);
}

/// Format into `buf` with a NUL after the text (for paths given to libc).
pub fn printZ(buf: []u8, comptime fmt: []const u8, args: anytype) error{NoSpaceLeft}![:0]u8 {
    return std.mem.printSentinel(buf, fmt, args, 0);
}
