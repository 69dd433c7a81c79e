//! Readiness notification: what every backend provides, and the one chosen
//! at compile time (epoll on Linux, kqueue on the BSDs and macOS, poll(2)
//! elsewhere, or poll everywhere with -Dpoller=poll). Level-triggered
//! everywhere: an fd is reported again in the next round while it stays
//! ready, which is what the event loop's per-round read budget relies on.
//!
//! The context asks for write readiness only while a fd has queued frames,
//! and for neither (the fd is removed) while back-pressure pauses a switched fd.
//!
//! Every backend is a `Poller` struct with exactly the public functions of
//! `checkApi`; each backend file calls it at compile time, so a backend that
//! drifts from the others fails to build (kqueue's through the FreeBSD
//! cross-compile of `zig build test`).

const std = @import("std");
const builtin = @import("builtin");
const Allocator = std.mem.Allocator;

/// What the poller is asked to watch for an fd (none: not watched).
pub const Interest = packed struct(u2) {
    read: bool = false,
    write: bool = false,
};

/// One ready fd. Hang-up and error count as both readable and writable, so
/// that the read or write that follows reports what happened.
pub const Ready = struct {
    fd: i32,
    readable: bool,
    writable: bool,
};

pub const Error = error{ SystemResources, Unexpected, Interrupted };

/// Ready fds one wait reports at most (the backends' event buffers and the
/// context's `ready` array hold this many).
pub const max_batch = 256;

/// The public API of a backend, with the signature of each function.
fn Api(comptime P: type) type {
    return struct {
        /// A new, empty poller.
        init: fn (Allocator) Error!P,
        deinit: fn (*P, Allocator) void,
        /// Change what fd is watched for, from `old` to `new`.
        update: fn (*P, Allocator, i32, Interest, Interest) Error!void,
        /// Wait up to a timeout in ms (-1: forever) and fill the slice; how
        /// many were filled (0 on timeout); Interrupted when a signal ended it.
        wait: fn (*P, []Ready, i32) Error!usize,
        /// The backend's own fd, readable while a wait would report
        /// something (ipc_context_fd nests it); null when it has none.
        fileno: fn (*const P) ?i32,
    };
}

/// Fails the build unless backend `P` has exactly Api(P)'s public
/// declarations, with exactly its signatures.
pub fn checkApi(comptime P: type) void {
    const want = @typeInfo(Api(P)).@"struct";
    const have = @typeInfo(P).@"struct".decl_names;
    if (have.len != want.field_names.len)
        @compileError(@typeName(P) ++ ": public declarations differ from the poller API");
    for (want.field_names, want.field_types) |name, T| {
        if (!@hasDecl(P, name)) @compileError(@typeName(P) ++ " has no " ++ name);
        if (@TypeOf(@field(P, name)) != T)
            @compileError(@typeName(P) ++ "." ++ name ++ " is not " ++ @typeName(T));
    }
}

const force_poll = @import("build_options").force_poll;

/// The backends this target has (poll(2) everywhere).
const has_epoll = builtin.os.tag == .linux;
const has_kqueue = switch (builtin.os.tag) {
    .freebsd, .netbsd, .openbsd, .dragonfly, .macos, .ios => true,
    else => false,
};

pub const Poller = if (force_poll)
    @import("poll.zig").Poller
else if (has_epoll)
    @import("epoll.zig").Poller
else if (has_kqueue)
    @import("kqueue.zig").Poller
else
    @import("poll.zig").Poller;

// ---------------------------------------------------------------- tests

/// Every backend this target can run, for the tests below.
const backends = .{@import("poll.zig").Poller} ++
    (if (has_epoll) .{@import("epoll.zig").Poller} else .{}) ++
    (if (has_kqueue) .{@import("kqueue.zig").Poller} else .{});

fn expectReadableAndWritable(comptime P: type) !void {
    const c = std.c;
    const testing = std.testing;
    const gpa = testing.allocator;
    var p = try P.init(gpa);
    defer p.deinit(gpa);
    var fds: [2]c.fd_t = undefined;
    const flags = c.SOCK.STREAM | c.SOCK.NONBLOCK;
    try testing.expectEqual(@as(c_int, 0), c.socketpair(c.AF.UNIX, flags, 0, &fds));
    defer _ = c.close(fds[0]);
    defer _ = c.close(fds[1]);
    try p.update(gpa, fds[1], .{}, .{ .read = true });
    var out: [8]Ready = undefined;
    try testing.expectEqual(@as(usize, 0), try p.wait(&out, 0));
    _ = c.send(fds[0], "x", 1, 0);
    var n = try p.wait(&out, 1000);
    try testing.expectEqual(@as(usize, 1), n);
    try testing.expectEqual(fds[1], out[0].fd);
    try testing.expect(out[0].readable);
    try p.update(gpa, fds[1], .{ .read = true }, .{ .read = true, .write = true });
    n = try p.wait(&out, 1000);
    try testing.expect(n >= 1);
    var saw_write = false;
    for (out[0..n]) |r| saw_write = saw_write or r.writable;
    try testing.expect(saw_write);
    try p.update(gpa, fds[1], .{ .read = true, .write = true }, .{});
    try testing.expectEqual(@as(usize, 0), try p.wait(&out, 0));
}

test "every backend reports readable and writable" {
    inline for (backends) |P| try expectReadableAndWritable(P);
}

test {
    // Compiled on every target (checkApi runs in each); the ones this
    // target has not are compiled by the FreeBSD cross-build of the tests.
    inline for (backends) |P| _ = P;
}
