//! poll(2) backend, for systems without epoll or kqueue. The pollfd array is
//! kept between calls (O(1) add/remove with an fd -> position map); poll itself
//! is O(n) in the watched fds, which is why it is only the fallback.

const std = @import("std");
const c = std.c;
const api = @import("api.zig");

pub const Poller = struct {
    fds: std.ArrayList(c.pollfd) = .empty,
    pos: std.AutoHashMapUnmanaged(i32, u32) = .empty,
    /// Entries reported by the last poll, resumed by the next wait call when
    /// `out` was too small to take them all.
    next: usize = 0,
    left: usize = 0,

    pub fn init(gpa: std.mem.Allocator) api.Error!Poller {
        _ = gpa;
        return .{};
    }

    pub fn deinit(self: *Poller, gpa: std.mem.Allocator) void {
        self.fds.deinit(gpa);
        self.pos.deinit(gpa);
    }

    fn events(i: api.Interest) i16 {
        var m: i16 = 0;
        if (i.read) m |= c.POLL.IN;
        if (i.write) m |= c.POLL.OUT;
        return m;
    }

    pub fn update(
        self: *Poller,
        gpa: std.mem.Allocator,
        fd: i32,
        old: api.Interest,
        new: api.Interest,
    ) api.Error!void {
        _ = old;
        const none: api.Interest = .{};
        self.left = 0;
        if (self.pos.get(fd)) |i| {
            if (new == none) {
                _ = self.pos.remove(fd);
                _ = self.fds.swapRemove(i);
                if (i < self.fds.items.len) self.pos.putAssumeCapacity(self.fds.items[i].fd, i);
            } else self.fds.items[i].events = events(new);
            return;
        }
        if (new == none) return;
        self.fds.ensureUnusedCapacity(gpa, 1) catch return error.SystemResources;
        self.pos.put(gpa, fd, @intCast(self.fds.items.len)) catch return error.SystemResources;
        self.fds.appendAssumeCapacity(.{ .fd = fd, .events = events(new), .revents = 0 });
    }

    pub fn wait(self: *Poller, out: []api.Ready, timeout_ms: i32) api.Error!usize {
        if (self.left == 0) {
            // An empty list has no valid pointer: give poll a real (unused) one.
            var none: [1]c.pollfd = undefined;
            const ptr = if (self.fds.items.len == 0) &none else self.fds.items.ptr;
            const rc = c.poll(ptr, @intCast(self.fds.items.len), timeout_ms);
            if (rc < 0) return if (c.errno(rc) == .INTR) error.Interrupted else error.Unexpected;
            self.left = @intCast(rc);
            self.next = 0;
        }
        var n: usize = 0;
        const count = self.fds.items.len;
        while (self.left > 0 and n < out.len and self.next < count) : (self.next += 1) {
            const p = self.fds.items[self.next];
            if (p.revents == 0) continue;
            const bad = p.revents & (c.POLL.HUP | c.POLL.ERR | c.POLL.NVAL) != 0;
            out[n] = .{
                .fd = p.fd,
                .readable = bad or p.revents & c.POLL.IN != 0,
                .writable = bad or p.revents & c.POLL.OUT != 0,
            };
            n += 1;
            self.left -= 1;
        }
        if (self.next >= self.fds.items.len) self.left = 0;
        return n;
    }

    /// None: poll(2) keeps its fds in an array, not in the kernel.
    pub fn fileno(self: *const Poller) ?i32 {
        _ = self;
        return null;
    }
};

test "poll backend reports a readable fd" {
    const gpa = std.testing.allocator;
    var p = try Poller.init(gpa);
    defer p.deinit(gpa);
    var fds: [2]c.fd_t = undefined;
    try std.testing.expectEqual(
        @as(c_int, 0),
        c.socketpair(c.AF.UNIX, c.SOCK.STREAM | c.SOCK.NONBLOCK, 0, &fds),
    );
    defer _ = c.close(fds[0]);
    defer _ = c.close(fds[1]);
    try p.update(gpa, fds[1], .{}, .{ .read = true });
    try p.update(gpa, fds[0], .{}, .{ .read = true });
    var out: [4]api.Ready = undefined;
    try std.testing.expectEqual(@as(usize, 0), try p.wait(&out, 0));
    _ = c.send(fds[0], "x", 1, 0);
    try std.testing.expectEqual(@as(usize, 1), try p.wait(&out, 1000));
    try std.testing.expectEqual(fds[1], out[0].fd);
    try p.update(gpa, fds[0], .{ .read = true }, .{});
    try std.testing.expectEqual(@as(usize, 1), p.fds.items.len);
    try std.testing.expectEqual(@as(u32, 0), p.pos.get(fds[1]).?);
}

comptime {
    api.checkApi(Poller);
}
