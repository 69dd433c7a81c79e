//! Run directory and service names: path building and name checks, run dir
//! checks and creation, the NAME.lock lock, and the service socket itself
//! (listen side and connect side). Texts are the README's, byte for byte.

const std = @import("std");
const c = std.c;
const sys = @import("sys.zig");
const errors = @import("errors.zig");
const Error = errors.Error;
const LastError = errors.LastError;

pub const default_rundir = "/tmp/.libipc-run";
/// Longest socket path accepted (sun_path is 108 bytes on Linux, minus the NUL).
pub const max_socket_path = 107;
/// Room for a socket path plus ".lock" and a NUL.
pub const PathBuf = [max_socket_path + 8]u8;

/// Build RUNDIR/NAME into `buf` after checking the name, in the README's
/// order: empty, contains '/', contains NUL, contains ';', "." or "..",
/// path too long. Like Python's
/// os.path.join, no second '/' is added after a run dir ending with one.
pub fn servicePath(
    buf: *PathBuf,
    rundir: []const u8,
    name: []const u8,
    last: *LastError,
) Error![:0]u8 {
    if (name.len == 0) return last.fail(error.InvalidName, "invalid service name: empty", .{});
    if (std.mem.indexOfScalar(u8, name, '/') != null)
        return last.fail(error.InvalidName, "invalid service name: contains '/'", .{});
    if (std.mem.indexOfScalar(u8, name, 0) != null)
        return last.fail(error.InvalidName, "invalid service name: contains NUL", .{});
    // connect() through ipcd sends "NAME;IPC_NETWORK": a ';' would add rules.
    if (std.mem.indexOfScalar(u8, name, ';') != null)
        return last.fail(error.InvalidName, "invalid service name: contains ';'", .{});
    // RUNDIR/. is the run dir itself, RUNDIR/.. its parent: not a socket path.
    if (std.mem.eql(u8, name, ".") or std.mem.eql(u8, name, ".."))
        return last.fail(
            error.InvalidName,
            "invalid service name: '.' and '..' are not names",
            .{},
        );
    const sep: []const u8 = if (rundir.len == 0 or rundir[rundir.len - 1] == '/') "" else "/";
    const len = rundir.len + sep.len + name.len;
    if (len > max_socket_path or len >= sunPathSize())
        return last.fail(
            error.InvalidName,
            "invalid service name: socket path is longer than {d} bytes",
            .{max_socket_path},
        );
    return sys.printZ(buf, "{s}{s}{s}", .{ rundir, sep, name }) catch unreachable;
}

fn sunPathSize() usize {
    const un: c.sockaddr.un = undefined;
    return un.path.len;
}

/// Check the run dir (and with `create`, make it, mode 0770). Returns false
/// when it does not exist and `create` is false. Refuses a symlink, a
/// non-directory and a directory writable by others.
pub fn check(given: []const u8, create: bool, last: *LastError) Error!bool {
    const rundir = stripSlashes(given);
    var zbuf: [4096]u8 = undefined;
    const z = sys.printZ(&zbuf, "{s}", .{rundir}) catch
        return last.failErrno(
            error.RunDir,
            .NAMETOOLONG,
            "cannot create run directory {s}: {s}",
            .{ rundir, errors.errText(.NAMETOOLONG) },
        );
    var st = sys.lstatMode(z.ptr);
    if (st == .failed and st.failed == .NOENT) {
        if (!create) return false;
        try makeDirs(z, last);
        st = sys.lstatMode(z.ptr);
    }
    const mode = switch (st) {
        .mode => |m| m,
        .failed => |e| return last.failErrno(
            error.RunDir,
            e,
            "cannot create run directory {s}: {s}",
            .{ rundir, errors.errText(e) },
        ),
    };
    if (mode & sys.S_IFMT == sys.S_IFLNK) return last.fail(
        error.RunDir,
        "run directory {s} is a symlink",
        .{rundir},
    );
    if (mode & sys.S_IFMT != sys.S_IFDIR) return last.fail(
        error.RunDir,
        "run directory {s} is not a directory",
        .{rundir},
    );
    if (mode & sys.S_IWOTH != 0) return last.fail(
        error.RunDir,
        "run directory {s} is writable by others",
        .{rundir},
    );
    // Another user's run dir could hand us their sockets; root's is trusted.
    if (sys.lstatOwner(z.ptr)) |uid| if (uid != 0 and uid != c.geteuid())
        return last.fail(
            error.RunDir,
            "run directory {s} is owned by another user (uid {d})",
            .{ rundir, uid },
        );
    return true;
}

/// `rundir` without trailing slashes ("/" stays "/"): lstat("link/") follows
/// the symlink "link", so the checks must see "link".
fn stripSlashes(rundir: []const u8) []const u8 {
    const stripped = std.mem.trimEnd(u8, rundir, "/");
    return if (stripped.len == 0) rundir[0..@min(rundir.len, 1)] else stripped;
}

/// mkdir -p: parents with the default mode, the run dir itself with 0770
/// (then chmod, since mkdir's mode is filtered by the umask).
fn makeDirs(path: [:0]u8, last: *LastError) Error!void {
    var i: usize = 1;
    while (i <= path.len) : (i += 1) {
        if (i < path.len and path[i] != '/') continue;
        const saved = path[i];
        path[i] = 0;
        defer path[i] = saved;
        const leaf = i == path.len;
        const rc = c.mkdir(path[0..i :0].ptr, if (leaf) 0o770 else 0o777);
        if (rc != 0 and c.errno(rc) != .EXIST) {
            return last.failErrno(
                error.RunDir,
                c.errno(rc),
                "cannot create run directory {s}: {s}",
                .{ path[0..path.len], errors.errText(c.errno(rc)) },
            );
        }
        if (leaf and rc == 0 and c.chmod(path.ptr, 0o770) != 0) {
            return last.failErrno(
                error.RunDir,
                c.errno(@as(c_int, -1)),
                "cannot create run directory {s}: {s}",
                .{ path[0..path.len], errors.errText(c.errno(@as(c_int, -1))) },
            );
        }
    }
}

/// Take the exclusive, non-blocking lock RUNDIR/NAME.lock and return its fd,
/// kept open (and locked) for the service's lifetime. The lock file is never
/// removed: unlinking it would let two services lock two different files.
/// A symlink there is refused, not followed: it would make us create and
/// lock a file anywhere, outside the run dir.
pub fn lockService(
    path: [:0]const u8,
    name: []const u8,
    rundir: []const u8,
    last: *LastError,
) Error!i32 {
    var buf: PathBuf = undefined;
    const lock_path = sys.printZ(&buf, "{s}.lock", .{path}) catch unreachable;
    const flags: c.O = .{ .ACCMODE = .RDWR, .CREAT = true, .CLOEXEC = true, .NOFOLLOW = true };
    const fd = c.open(lock_path.ptr, flags, @as(c.mode_t, 0o660));
    if (fd < 0) {
        const e = c.errno(fd);
        // O_NOFOLLOW's errno varies (ELOOP, EMLINK on FreeBSD): look instead.
        switch (sys.lstatMode(lock_path.ptr)) {
            .mode => |m| if (m & sys.S_IFMT == sys.S_IFLNK)
                return last.fail(
                    error.Generic,
                    "cannot start service {s}: {s} is a symlink",
                    .{ name, lock_path },
                ),
            .failed => {},
        }
        return startFailed(name, e, last);
    }
    errdefer sys.closeFd(fd);
    while (c.flock(fd, c.LOCK.EX | c.LOCK.NB) != 0) {
        switch (c.errno(@as(c_int, -1))) {
            .INTR => continue,
            .AGAIN => return last.fail(
                error.ServiceBusy,
                "service {s} is already running in {s}",
                .{ name, rundir },
            ),
            else => |e| return startFailed(name, e, last),
        }
    }
    // Mode 0660 as the run dir (0770) and socket (0660): open()'s mode is
    // filtered by the umask, and a lock file the group cannot open made
    // another member's service_init fail with EACCES, not ServiceBusy.
    // Only our own lock file of one link: another user's keeps its owner's
    // mode (root included), and a hard link to some other file is not made
    // group-readable through it.
    if (sys.ownSoleFile(fd) and c.fchmod(fd, 0o660) != 0) switch (c.errno(@as(c_int, -1))) {
        .PERM => {},
        else => |e| return startFailed(name, e, last),
    };
    return fd;
}

fn startFailed(name: []const u8, e: c.E, last: *LastError) Error {
    return last.failErrno(
        error.Generic,
        e,
        "cannot start service {s}: {s}",
        .{ name, errors.errText(e) },
    );
}

/// Remove a stale socket (we hold the lock, so no live service owns it),
/// bind a new one (mode 0660) and listen. Returns the non-blocking socket.
/// Anything but a socket at that path is left alone and refused: it may be
/// another service's lock file (service "x.lock" next to service "x") or a
/// file that is not ours to delete.
pub fn listenAt(path: [:0]const u8, name: []const u8, last: *LastError) Error!i32 {
    switch (sys.lstatMode(path.ptr)) {
        .mode => |m| if (m & sys.S_IFMT != sys.S_IFSOCK)
            return last.fail(
                error.Generic,
                "cannot start service {s}: {s} exists and is not a socket",
                .{ name, path },
            ),
        .failed => {},
    }
    if (c.unlink(path.ptr) != 0 and c.errno(@as(c_int, -1)) != .NOENT)
        return startFailed(name, c.errno(@as(c_int, -1)), last);
    return switch (sys.listenUnix(path, 0o660)) {
        .fd => |fd| fd,
        .failed => |e| startFailed(name, e, last),
    };
}

/// A service's socket file as its Conn keeps it (allocated, so an idle
/// connection record stays small): the path, removed on close while it
/// still names the file bound (`id`, read after bind).
pub const SocketFile = struct {
    path: [:0]u8,
    id: ?sys.FileId,

    pub fn create(gpa: std.mem.Allocator, path: [:0]const u8, id: ?sys.FileId) !*SocketFile {
        const self = try gpa.create(SocketFile);
        errdefer gpa.destroy(self);
        self.* = .{ .path = try gpa.dupeSentinel(u8, path, 0), .id = id };
        return self;
    }

    pub fn destroy(self: *SocketFile, gpa: std.mem.Allocator) void {
        gpa.free(self.path);
        gpa.destroy(self);
    }

    /// Remove the socket file if it is still ours (removeOwnSocket).
    pub fn remove(self: *const SocketFile) void {
        removeOwnSocket(self.path, self.id);
    }
};

/// Remove a closing service's socket file, only if `path` still names the
/// file it bound (`id`, read after bind): the run dir may have been removed
/// and a new service of the same name started there since (or a tmp cleaner
/// removed NAME.lock and another context took the name), and that socket is
/// not ours to remove. With no `id` nothing is removed. (Our listening socket
/// holds its file's inode while open, so the number is not reused meanwhile.)
pub fn removeOwnSocket(path: [:0]const u8, id: ?sys.FileId) void {
    const ours = id orelse return;
    const now = sys.lstatId(path.ptr) orelse return;
    if (std.meta.eql(now, ours)) _ = c.unlink(path.ptr);
}

/// Connect to the service socket at `path`; returns the socket, in blocking
/// mode (see sys.Wait).
/// See sys.connectUnix for `deadline_ns` and `interruptible`: Timeout and
/// Interrupted are returned with no text (the caller says what stopped).
pub fn connectTo(
    path: [:0]const u8,
    name: []const u8,
    rundir: []const u8,
    last: *LastError,
    deadline_ns: ?i64,
    interruptible: bool,
) Error!i32 {
    return switch (sys.connectUnix(path, deadline_ns, interruptible)) {
        .fd => |fd| fd,
        .timed_out => error.Timeout,
        .interrupted => error.Interrupted,
        .failed => |e| switch (e) {
            .NOENT, .CONNREFUSED, .NOTDIR => last.failErrno(
                error.ServiceNotFound,
                e,
                "no service {s} in {s}",
                .{ name, rundir },
            ),
            else => last.failErrno(
                error.Generic,
                e,
                "cannot connect to service {s}: {s}",
                .{ name, errors.errText(e) },
            ),
        },
    };
}

// ---------------------------------------------------------------- tests

const testing = std.testing;

test "service names are checked in the documented order" {
    var last: LastError = .{};
    var buf: PathBuf = undefined;
    try testing.expectError(error.InvalidName, servicePath(&buf, "/tmp", "", &last));
    try testing.expectEqualStrings("invalid service name: empty", last.text());
    try testing.expectError(error.InvalidName, servicePath(&buf, "/tmp", "a/\x00", &last));
    try testing.expectEqualStrings("invalid service name: contains '/'", last.text());
    try testing.expectError(error.InvalidName, servicePath(&buf, "/tmp", "a\x00", &last));
    try testing.expectEqualStrings("invalid service name: contains NUL", last.text());
    try testing.expectError(error.InvalidName, servicePath(&buf, "/tmp", "a;b", &last));
    try testing.expectEqualStrings("invalid service name: contains ';'", last.text());
    for ([_][]const u8{ ".", ".." }) |dots| {
        try testing.expectError(error.InvalidName, servicePath(&buf, "/tmp", dots, &last));
        try testing.expectEqualStrings(
            "invalid service name: '.' and '..' are not names",
            last.text(),
        );
    }
    try testing.expectEqualStrings("/tmp/...", try servicePath(&buf, "/tmp", "...", &last));
    const long: [103]u8 = @splat('n');
    try testing.expectError(error.InvalidName, servicePath(&buf, "/tmp", &long, &last));
    try testing.expectEqualStrings(
        "invalid service name: socket path is longer than 107 bytes",
        last.text(),
    );
    try testing.expectEqualStrings(
        "/tmp/" ++ long[0..102],
        try servicePath(&buf, "/tmp", long[0..102], &last),
    );
    try testing.expectEqualStrings("/tmp/x", try servicePath(&buf, "/tmp/", "x", &last));
}

test "run dir: created 0770, symlink / file / others-writable refused" {
    var last: LastError = .{};
    var name_buf: [64]u8 = undefined;
    const base = try sys.printZ(&name_buf, "/tmp/pyipc-zig-rd-{d}", .{sys.nowMs() ^ c.getpid()});
    defer _ = c.rmdir(base.ptr);
    var sub_buf: [96]u8 = undefined;
    const sub = try sys.printZ(&sub_buf, "{s}/run", .{base});
    try testing.expect(!try check(sub, false, &last));
    try testing.expect(try check(sub, true, &last));
    try testing.expectEqual(@as(u32, 0o770), sys.lstatMode(sub.ptr).mode & 0o777);
    try testing.expect(try check(sub, true, &last)); // exists already: fine
    _ = c.chmod(sub.ptr, 0o777);
    try testing.expectError(error.RunDir, check(sub, false, &last));
    var msg_buf: [200]u8 = undefined;
    try testing.expectEqualStrings(
        try std.fmt.bufPrint(&msg_buf, "run directory {s} is writable by others", .{sub}),
        last.text(),
    );
    _ = c.rmdir(sub.ptr);
    try testing.expectEqual(@as(c_int, 0), c.symlink("/tmp", sub.ptr));
    try testing.expectError(error.RunDir, check(sub, true, &last));
    try testing.expect(std.mem.endsWith(u8, last.text(), "is a symlink"));
    _ = c.unlink(sub.ptr);
    const f = c.open(sub.ptr, .{ .ACCMODE = .WRONLY, .CREAT = true }, @as(c.mode_t, 0o600));
    sys.closeFd(f);
    try testing.expectError(error.RunDir, check(sub, true, &last));
    try testing.expect(std.mem.endsWith(u8, last.text(), "is not a directory"));
    _ = c.unlink(sub.ptr);
}

test "run dir: trailing slashes are stripped, \"/\" is kept" {
    try testing.expectEqualStrings("/tmp/x", stripSlashes("/tmp/x/"));
    try testing.expectEqualStrings("/tmp/x", stripSlashes("/tmp/x//"));
    try testing.expectEqualStrings("/tmp/x", stripSlashes("/tmp/x"));
    try testing.expectEqualStrings("/", stripSlashes("/"));
    try testing.expectEqualStrings("/", stripSlashes("///"));
    try testing.expectEqualStrings("", stripSlashes(""));
}

test "lock: a symlink NAME.lock is refused and its target not created" {
    var last: LastError = .{};
    var dir_buf: [64]u8 = undefined;
    const dir = try sys.printZ(&dir_buf, "/tmp/pyipc-zig-lk-{d}", .{sys.nowMs() ^ c.getpid()});
    try testing.expectEqual(@as(c_int, 0), c.mkdir(dir.ptr, 0o700));
    defer _ = c.rmdir(dir.ptr);
    var path_buf: PathBuf = undefined;
    const path = try sys.printZ(&path_buf, "{s}/pong", .{dir});
    var lock_buf: PathBuf = undefined;
    const lock = try sys.printZ(&lock_buf, "{s}.lock", .{path});
    var target_buf: PathBuf = undefined;
    const target = try sys.printZ(&target_buf, "{s}-outside", .{dir});
    try testing.expectEqual(@as(c_int, 0), c.symlink(target.ptr, lock.ptr));
    defer _ = c.unlink(lock.ptr);
    try testing.expectError(error.Generic, lockService(path, "pong", dir, &last));
    var msg_buf: [200]u8 = undefined;
    try testing.expectEqualStrings(
        try std.fmt.bufPrint(&msg_buf, "cannot start service pong: {s} is a symlink", .{lock}),
        last.text(),
    );
    try testing.expect(sys.lstatMode(target.ptr) == .failed);
}

test "removeOwnSocket: removes the socket it bound, not one bound there since" {
    var last: LastError = .{};
    var dir_buf: [64]u8 = undefined;
    const dir = try sys.printZ(&dir_buf, "/tmp/pyipc-zig-own-{d}", .{sys.nowMs() ^ c.getpid()});
    try testing.expectEqual(@as(c_int, 0), c.mkdir(dir.ptr, 0o700));
    defer _ = c.rmdir(dir.ptr);
    var path_buf: PathBuf = undefined;
    const path = try sys.printZ(&path_buf, "{s}/x", .{dir});
    const old = try listenAt(path, "x", &last);
    defer sys.closeFd(old);
    const old_id = sys.lstatId(path.ptr).?;
    _ = c.unlink(path.ptr); // the run dir was cleaned under the old service
    const new = try listenAt(path, "x", &last);
    defer sys.closeFd(new);
    const new_id = sys.lstatId(path.ptr).?;
    removeOwnSocket(path, old_id);
    try testing.expect(sys.lstatId(path.ptr) != null); // the new one's: kept
    removeOwnSocket(path, null);
    try testing.expect(sys.lstatId(path.ptr) != null);
    removeOwnSocket(path, new_id);
    try testing.expect(sys.lstatId(path.ptr) == null);
}

test "lock: the lock file is mode 0660 whatever the umask" {
    var last: LastError = .{};
    var dir_buf: [64]u8 = undefined;
    const dir = try sys.printZ(&dir_buf, "/tmp/pyipc-zig-lm-{d}", .{sys.nowMs() ^ c.getpid()});
    try testing.expectEqual(@as(c_int, 0), c.mkdir(dir.ptr, 0o700));
    defer _ = c.rmdir(dir.ptr);
    var path_buf: PathBuf = undefined;
    const path = try sys.printZ(&path_buf, "{s}/m", .{dir});
    var lock_buf: PathBuf = undefined;
    const lock = try sys.printZ(&lock_buf, "{s}.lock", .{path});
    defer _ = c.unlink(lock.ptr);
    const old_mask = c.umask(0o077);
    defer _ = c.umask(old_mask);
    const fd = try lockService(path, "m", dir, &last);
    sys.closeFd(fd);
    try testing.expectEqual(@as(u32, 0o660), sys.lstatMode(lock.ptr).mode & 0o777);
}
