//! Waking a waiting context from another thread: a non-blocking pipe whose
//! read end the context's poller watches (it is not in the connection table).
//! signal() writes one byte; it is the only thing another thread may do to a
//! context (ipc_wakeup). The loop drains the pipe and its wait returns.

const std = @import("std");
const c = std.c;
const sys = @import("sys.zig");

pub const Error = error{SystemResources};

pub const Wakeup = struct {
    read_fd: i32,
    write_fd: i32,

    pub fn init() Error!Wakeup {
        var fds: [2]c.fd_t = undefined;
        if (c.pipe(&fds) != 0) return error.SystemResources;
        errdefer for (fds) |fd| sys.closeFd(fd);
        for (fds) |fd| {
            if (!sys.setNonblocking(fd, true)) return error.SystemResources;
            if (c.fcntl(fd, c.F.SETFD, @as(c_int, c.FD_CLOEXEC)) < 0) return error.SystemResources;
        }
        return .{ .read_fd = fds[0], .write_fd = fds[1] };
    }

    pub fn deinit(self: *Wakeup) void {
        sys.closeFd(self.read_fd);
        sys.closeFd(self.write_fd);
        self.* = undefined;
    }

    /// Any thread: make read_fd readable. A full pipe (EAGAIN) already is.
    pub fn signal(self: *const Wakeup) void {
        const byte = [1]u8{1};
        _ = c.write(self.write_fd, &byte, 1);
    }

    /// The loop's thread: empty the pipe, so the next wait blocks again.
    pub fn drain(self: *const Wakeup) void {
        var buf: [64]u8 = undefined;
        while (c.read(self.read_fd, &buf, buf.len) > 0) {}
    }
};

fn readable(fd: i32) bool {
    var pfd = [1]c.pollfd{.{ .fd = fd, .events = c.POLL.IN, .revents = 0 }};
    return c.poll(&pfd, 1, 0) == 1;
}

test "signal makes the read end readable until drained; many signals are one" {
    var w = try Wakeup.init();
    defer w.deinit();
    try std.testing.expect(!readable(w.read_fd));
    for (0..100_000) |_| w.signal(); // more than a pipe holds: never blocks
    try std.testing.expect(readable(w.read_fd));
    w.drain();
    try std.testing.expect(!readable(w.read_fd));
}
