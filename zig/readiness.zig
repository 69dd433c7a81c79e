//! ipc_context_fd(): one fd that is readable (level-triggered) whenever a
//! wait with a zero timeout would return something, so that another event
//! loop (selectors, asyncio, GLib...) can drive a context.
//!
//! It is an outer poller (epoll on Linux, kqueue on the BSDs and macOS) that
//! watches three things:
//!   - the context's own poller fd: readable while any fd the context
//!     watches is ready (a message, a client, a hang-up, room for scheduled
//!     data, another thread's wake-up);
//!   - a pipe holding one byte while decoded events wait in the queue (the
//!     context raises and lowers it at the end of each call: `setPending`);
//!   - a one-shot timer (timerfd, EVFILT_TIMER) armed for when the context's
//!     timer is due.
//! Nested pollers leave the context's own loop untouched: a context whose
//! fileno() is never asked for pays nothing. The poll(2) backend has no fd
//! to nest, so it has no Readiness (the caller reports that).

const std = @import("std");
const builtin = @import("builtin");
const c = std.c;
const sys = @import("sys.zig");
const Wakeup = @import("wakeup.zig").Wakeup;

pub const Error = error{SystemResources};

const is_linux = builtin.os.tag == .linux;

/// The kqueue identifier of the timer (timers have their own namespace).
const timer_ident = 1;

pub const Readiness = struct {
    /// The fd handed out: the outer epoll or kqueue.
    outer: i32,
    /// Holds a byte while events are pending (signal/drain).
    flag: Wakeup,
    /// Linux: the timerfd; elsewhere unused (-1): the timer lives in `outer`.
    timer_fd: i32 = -1,
    /// Whether `flag` holds its byte.
    raised: bool = false,
    /// The monotonic time (ns) the timer is armed for; null: disarmed.
    armed_ns: ?i64 = null,

    /// Whether fd is one of this Readiness's own fds.
    pub fn owns(self: *const Readiness, fd: i32) bool {
        return fd == self.outer or fd == self.flag.read_fd or fd == self.flag.write_fd or
            (self.timer_fd >= 0 and fd == self.timer_fd);
    }

    /// A Readiness over `inner`, the context's poller fd.
    pub fn init(inner: i32) Error!Readiness {
        const outer = try newOuter();
        errdefer sys.closeFd(outer);
        var flag = Wakeup.init() catch return error.SystemResources;
        errdefer flag.deinit();
        var self: Readiness = .{ .outer = outer, .flag = flag };
        if (is_linux) {
            const flags: c.TFD = .{ .NONBLOCK = true, .CLOEXEC = true };
            const fd = c.timerfd_create(.MONOTONIC, @bitCast(flags));
            if (fd < 0) return error.SystemResources;
            self.timer_fd = fd;
        }
        errdefer sys.closeFd(self.timer_fd);
        try self.watch(inner);
        try self.watch(flag.read_fd);
        if (is_linux) try self.watch(self.timer_fd);
        return self;
    }

    /// Close every fd (a forked child closes its copies only: nothing here
    /// changes what the parent's copies see).
    pub fn deinit(self: *Readiness) void {
        sys.closeFd(self.timer_fd);
        self.flag.deinit();
        sys.closeFd(self.outer);
        self.* = undefined;
    }

    /// Readable while `yes`: events wait in the queue. A system call only
    /// when it changes.
    pub fn setPending(self: *Readiness, yes: bool) void {
        if (yes == self.raised) return;
        if (yes) self.flag.signal() else self.flag.drain();
        self.raised = yes;
    }

    /// Readable from `due_ns` (monotonic) on; null: never. An alarm armed
    /// earlier that has not fired yet is kept (it fires early: one empty
    /// round, whose end arms the right time), which saves a system call per
    /// wait in a busy loop; one that fired is always replaced.
    pub fn armTimer(self: *Readiness, due_ns: ?i64) void {
        if (due_ns == self.armed_ns) return;
        if (due_ns) |due| if (self.armed_ns) |armed| {
            if (armed < due and sys.nowNs() < armed) return;
        };
        self.setTimer(due_ns);
        self.armed_ns = due_ns;
    }

    fn newOuter() Error!i32 {
        if (is_linux) {
            const fd = c.epoll_create1(std.os.linux.EPOLL.CLOEXEC);
            return if (fd < 0) error.SystemResources else fd;
        }
        const kq = c.kqueue();
        if (kq < 0) return error.SystemResources;
        _ = c.fcntl(kq, c.F.SETFD, @as(c_int, c.FD_CLOEXEC));
        return kq;
    }

    fn watch(self: *Readiness, fd: i32) Error!void {
        if (is_linux) {
            const linux = std.os.linux;
            var ev: linux.epoll_event = .{ .events = linux.EPOLL.IN, .data = .{ .fd = fd } };
            if (c.epoll_ctl(self.outer, linux.EPOLL.CTL_ADD, fd, &ev) != 0)
                return error.SystemResources;
            return;
        }
        var ev = kevent(@intCast(fd), c.EVFILT.READ, c.EV.ADD | c.EV.ENABLE);
        var none: [0]c.Kevent = .{};
        if (c.kevent(self.outer, @ptrCast(&ev), 1, &none, 0, null) < 0)
            return error.SystemResources;
    }

    /// Arm (or with null disarm) the timer; arming also clears one that fired.
    fn setTimer(self: *Readiness, due_ns: ?i64) void {
        if (is_linux) {
            // Absolute monotonic time (sys.nowNs's clock); zero disarms.
            const at = if (due_ns) |d| @max(d, 1) else 0;
            const spec: c.itimerspec = .{
                .it_interval = .{ .sec = 0, .nsec = 0 },
                .it_value = .{
                    .sec = @intCast(@divTrunc(at, std.time.ns_per_s)),
                    .nsec = @intCast(@rem(at, std.time.ns_per_s)),
                },
            };
            const flags: c.TFD.TIMER = .{ .ABSTIME = true };
            _ = c.timerfd_settime(self.timer_fd, @bitCast(flags), &spec, null);
            return;
        }
        // kqueue: delete the old one-shot (a fired one stays pending until
        // deleted), then add the new one, in milliseconds from now.
        var none: [0]c.Kevent = .{};
        var del = kevent(timer_ident, c.EVFILT.TIMER, c.EV.DELETE);
        _ = c.kevent(self.outer, @ptrCast(&del), 1, &none, 0, null);
        const due = due_ns orelse return;
        const left_ns = @max(due - sys.nowNs(), 0);
        var add = kevent(timer_ident, c.EVFILT.TIMER, c.EV.ADD | c.EV.ONESHOT);
        add.data = @intCast(@divTrunc(left_ns + std.time.ns_per_ms - 1, std.time.ns_per_ms));
        _ = c.kevent(self.outer, @ptrCast(&add), 1, &none, 0, null);
    }

    fn kevent(ident: usize, filter: i32, flags: u32) c.Kevent {
        var ev = std.mem.zeroes(c.Kevent);
        ev.ident = ident;
        ev.filter = @intCast(filter);
        ev.flags = @intCast(flags);
        return ev;
    }
};

// ---------------------------------------------------------------- tests

const testing = std.testing;

fn readable(fd: i32) bool {
    var pfd = [1]c.pollfd{.{ .fd = fd, .events = c.POLL.IN, .revents = 0 }};
    return c.poll(&pfd, 1, 0) == 1;
}

fn waitReadable(fd: i32, ms: i32) bool {
    var pfd = [1]c.pollfd{.{ .fd = fd, .events = c.POLL.IN, .revents = 0 }};
    return c.poll(&pfd, 1, ms) == 1;
}

test "the outer fd follows the inner fd, the pending flag and the timer" {
    var fds: [2]c.fd_t = undefined;
    try testing.expectEqual(@as(c_int, 0), c.pipe(&fds));
    defer for (fds) |fd| sys.closeFd(fd);
    var r = try Readiness.init(fds[0]);
    defer r.deinit();
    try testing.expect(!readable(r.outer));
    // The inner fd.
    _ = c.write(fds[1], "x", 1);
    try testing.expect(readable(r.outer));
    var byte: [1]u8 = undefined;
    _ = c.read(fds[0], &byte, 1);
    try testing.expect(!readable(r.outer));
    // The pending flag.
    r.setPending(true);
    try testing.expect(readable(r.outer));
    r.setPending(false);
    try testing.expect(!readable(r.outer));
    // The timer: due now, then disarmed.
    r.armTimer(sys.nowNs() + 5 * std.time.ns_per_ms);
    try testing.expect(waitReadable(r.outer, 2000));
    r.armTimer(null);
    try testing.expect(!readable(r.outer));
}

test "an earlier alarm that has not fired is kept; one that fired is replaced" {
    var fds: [2]c.fd_t = undefined;
    try testing.expectEqual(@as(c_int, 0), c.pipe(&fds));
    defer for (fds) |fd| sys.closeFd(fd);
    var r = try Readiness.init(fds[0]);
    defer r.deinit();
    const hour = std.time.ns_per_hour;
    const first = sys.nowNs() + hour;
    r.armTimer(first);
    r.armTimer(first + hour);
    try testing.expectEqual(@as(?i64, first), r.armed_ns);
    r.armTimer(sys.nowNs()); // due at once: replaces the later one
    try testing.expect(waitReadable(r.outer, 2000));
    const later = sys.nowNs() + hour;
    r.armTimer(later); // the fired one is replaced: no longer readable
    try testing.expectEqual(@as(?i64, later), r.armed_ns);
    try testing.expect(!readable(r.outer));
}
