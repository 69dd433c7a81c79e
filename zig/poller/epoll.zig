//! epoll(7) backend (Linux).

const std = @import("std");
const c = std.c;
const linux = std.os.linux;
const EPOLL = linux.EPOLL;
const api = @import("api.zig");

pub const Poller = struct {
    epfd: i32,
    buf: [api.max_batch]linux.epoll_event = undefined,

    pub fn init(gpa: std.mem.Allocator) api.Error!Poller {
        _ = gpa;
        const fd = c.epoll_create1(EPOLL.CLOEXEC);
        if (fd < 0) return error.SystemResources;
        return .{ .epfd = fd };
    }

    pub fn deinit(self: *Poller, gpa: std.mem.Allocator) void {
        _ = gpa;
        _ = c.close(self.epfd);
    }

    fn mask(i: api.Interest) u32 {
        var m: u32 = 0;
        if (i.read) m |= EPOLL.IN;
        if (i.write) m |= EPOLL.OUT;
        return m;
    }

    /// Change what fd is watched for, from `old` to `new` (none = not watched).
    pub fn update(
        self: *Poller,
        gpa: std.mem.Allocator,
        fd: i32,
        old: api.Interest,
        new: api.Interest,
    ) api.Error!void {
        _ = gpa;
        if (old == new) return;
        const none: api.Interest = .{};
        const op: u32 = if (old == none)
            EPOLL.CTL_ADD
        else if (new == none)
            EPOLL.CTL_DEL
        else
            EPOLL.CTL_MOD;
        var ev: linux.epoll_event = .{ .events = mask(new), .data = .{ .fd = fd } };
        if (c.epoll_ctl(self.epfd, op, fd, &ev) == 0) return;
        return switch (c.errno(@as(c_int, -1))) {
            .NOMEM, .NOSPC => error.SystemResources,
            // The fd was closed behind our back: removing it is then a no-op.
            .BADF, .NOENT => if (op == EPOLL.CTL_DEL) {} else error.Unexpected,
            else => error.Unexpected,
        };
    }

    /// Wait up to timeout_ms (-1: forever) and fill `out`; 0 on timeout;
    /// Interrupted when a signal ended the wait.
    pub fn wait(self: *Poller, out: []api.Ready, timeout_ms: i32) api.Error!usize {
        const max = @min(out.len, self.buf.len);
        const n = c.epoll_wait(self.epfd, &self.buf, @intCast(max), timeout_ms);
        if (n < 0) return if (c.errno(n) == .INTR) error.Interrupted else error.Unexpected;
        for (self.buf[0..@intCast(n)], out[0..@intCast(n)]) |ev, *r| {
            // Hang-up and error make the fd both readable and writable, so that
            // the read or the write that follows reports what happened.
            const bad = ev.events & (EPOLL.HUP | EPOLL.ERR) != 0;
            r.* = .{
                .fd = ev.data.fd,
                .readable = bad or ev.events & EPOLL.IN != 0,
                .writable = bad or ev.events & EPOLL.OUT != 0,
            };
        }
        return @intCast(n);
    }

    /// The epoll fd.
    pub fn fileno(self: *const Poller) ?i32 {
        return self.epfd;
    }
};

comptime {
    api.checkApi(Poller);
}
