//! Readiness notification, chosen at compile time: epoll on Linux, kqueue on
//! the BSDs and macOS, poll(2) elsewhere. Level-triggered everywhere: an fd is
//! reported again in the next round while it stays ready, which is what the
//! event loop's per-round read budget relies on.
//!
//! The context asks for write readiness only while a fd has queued frames,
//! and for neither (the fd is removed) while back-pressure pauses a switched fd.

const std = @import("std");
const builtin = @import("builtin");
pub const Interest = @import("conn_table.zig").Interest;

pub const Ready = struct {
    fd: i32,
    readable: bool,
    writable: bool,
};

pub const Error = error{ SystemResources, Unexpected, Interrupted };

pub const Poller = if (@import("build_options").force_poll) @import("poller_poll.zig").Poller else switch (builtin.os.tag) {
    .linux => @import("poller_epoll.zig").Poller,
    .freebsd, .netbsd, .openbsd, .dragonfly, .macos, .ios => @import("poller_kqueue.zig").Poller,
    else => @import("poller_poll.zig").Poller,
};

test "poller reports readable and writable" {
    const c = std.c;
    const gpa = std.testing.allocator;
    var p = try Poller.init(gpa);
    defer p.deinit(gpa);
    var fds: [2]c.fd_t = undefined;
    try std.testing.expectEqual(@as(c_int, 0), c.socketpair(c.AF.UNIX, c.SOCK.STREAM | c.SOCK.NONBLOCK, 0, &fds));
    defer _ = c.close(fds[0]);
    defer _ = c.close(fds[1]);
    try p.update(gpa, fds[1], .{}, .{ .read = true });
    var out: [8]Ready = undefined;
    try std.testing.expectEqual(@as(usize, 0), try p.wait(&out, 0));
    _ = c.send(fds[0], "x", 1, 0);
    var n = try p.wait(&out, 1000);
    try std.testing.expectEqual(@as(usize, 1), n);
    try std.testing.expectEqual(fds[1], out[0].fd);
    try std.testing.expect(out[0].readable);
    try p.update(gpa, fds[1], .{ .read = true }, .{ .read = true, .write = true });
    n = try p.wait(&out, 1000);
    try std.testing.expect(n >= 1);
    var saw_write = false;
    for (out[0..n]) |r| saw_write = saw_write or r.writable;
    try std.testing.expect(saw_write);
    try p.update(gpa, fds[1], .{ .read = true, .write = true }, .{});
    try std.testing.expectEqual(@as(usize, 0), try p.wait(&out, 0));
}

test {
    _ = @import("poller_poll.zig");
}
