//! kqueue(2) backend (FreeBSD, NetBSD, OpenBSD, DragonFly, macOS).
//! Read and write interest are two filters; each change is one kevent call.

const std = @import("std");
const c = std.c;
const api = @import("api.zig");

pub const Poller = struct {
    kq: i32,
    buf: [api.max_batch]c.Kevent = undefined,

    pub fn init(gpa: std.mem.Allocator) api.Error!Poller {
        _ = gpa;
        const kq = c.kqueue();
        if (kq < 0) return error.SystemResources;
        _ = c.fcntl(kq, c.F.SETFD, @as(c_int, c.FD_CLOEXEC));
        return .{ .kq = kq };
    }

    pub fn deinit(self: *Poller, gpa: std.mem.Allocator) void {
        _ = gpa;
        _ = c.close(self.kq);
    }

    fn change(fd: i32, filter: i32, flags: u32) c.Kevent {
        var ev = std.mem.zeroes(c.Kevent);
        ev.ident = @intCast(fd);
        ev.filter = @intCast(filter);
        ev.flags = @intCast(flags);
        return ev;
    }

    pub fn update(
        self: *Poller,
        gpa: std.mem.Allocator,
        fd: i32,
        old: api.Interest,
        new: api.Interest,
    ) api.Error!void {
        _ = gpa;
        const add: u32 = c.EV.ADD | c.EV.ENABLE;
        const del: u32 = c.EV.DELETE;
        var changes: [2]c.Kevent = undefined;
        var n: usize = 0;
        if (old.read != new.read) {
            changes[n] = change(fd, c.EVFILT.READ, if (new.read) add else del);
            n += 1;
        }
        if (old.write != new.write) {
            changes[n] = change(fd, c.EVFILT.WRITE, if (new.write) add else del);
            n += 1;
        }
        if (n == 0) return;
        var none: [0]c.Kevent = .{};
        const rc = c.kevent(self.kq, &changes, @intCast(n), &none, 0, null);
        if (rc >= 0) return;
        return switch (c.errno(rc)) {
            .NOMEM => error.SystemResources,
            // Deleting the filters of an fd closed behind our back is a no-op.
            .BADF, .NOENT => if (!new.read and !new.write) {} else error.Unexpected,
            else => error.Unexpected,
        };
    }

    pub fn wait(self: *Poller, out: []api.Ready, timeout_ms: i32) api.Error!usize {
        const max = @min(out.len, self.buf.len);
        var ts: c.timespec = .{
            .sec = @intCast(@divTrunc(timeout_ms, 1000)),
            .nsec = @intCast(@rem(timeout_ms, 1000) * 1_000_000),
        };
        const tsp: ?*const c.timespec = if (timeout_ms < 0) null else &ts;
        const n = c.kevent(self.kq, &self.buf, 0, &self.buf, @intCast(max), tsp);
        if (n < 0) return if (c.errno(n) == .INTR) error.Interrupted else error.Unexpected;
        for (self.buf[0..@intCast(n)], out[0..@intCast(n)]) |ev, *r| {
            // EOF and error flags: let the read or write that follows report them.
            r.* = .{
                .fd = @intCast(ev.ident),
                .readable = ev.filter == c.EVFILT.READ,
                .writable = ev.filter == c.EVFILT.WRITE,
            };
        }
        return @intCast(n);
    }

    /// The kqueue fd.
    pub fn fileno(self: *const Poller) ?i32 {
        return self.kq;
    }
};

comptime {
    api.checkApi(Poller);
}
