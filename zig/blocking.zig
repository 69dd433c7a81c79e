//! How one blocking call (read, read_many, read_into, write, write_many, the
//! ipcd hand-over of connect) waits, and what ends the wait early:
//!
//! - busy_poll: transfers that do not wait come first, for busy_poll_us;
//! - then transfers that wait in the kernel (our sockets are in blocking
//!   mode: the kernel wakes the call itself, README "How the blocking calls
//!   wait"), or, when the call has a timeout, poll(2) up to its deadline;
//! - a signal: in an *interruptible* context (the Python binding sets it, so
//!   that the signal's Python handler runs, PEP 475) the call ends with
//!   error.Interrupted, having consumed nothing; otherwise (C programs, as
//!   libIPC) the wait goes on;
//! - the deadline: error.Timeout;
//! - another thread's ipc_wakeup, for the reads of an interruptible context
//!   (`wake`): error.Interrupted, having consumed nothing, as for a signal.
//!   The reads then poll(2) before each transfer instead of waiting in the
//!   kernel, so that the wake-up pipe is watched too (the Python binding
//!   has other threads hand write(), schedule() and close() over to the
//!   thread blocked in a read: pyipc/_threads.py).
//!
//! A spin that ends without result also ends an interruptible call with
//! error.Interrupted: a signal that came during the spin found no system call
//! to interrupt, and its handler must run before the call sleeps. The context
//! then skips the spin of the call that follows (skip_spin), so the retry
//! sleeps at once instead of spinning again.

const std = @import("std");
const sys = @import("sys.zig");
const Wakeup = @import("wakeup.zig").Wakeup;

/// Why a blocking call stopped before it was done.
pub const Stop = error{ Interrupted, Timeout };

pub const Blocking = struct {
    /// busy_poll: transfers do not wait until this time (monotonic ns; 0: no spin).
    spin_end_ns: i64 = 0,
    /// The call's timeout as a monotonic deadline in ns; null: no limit.
    deadline_ns: ?i64 = null,
    interruptible: bool = false,
    /// Set when a spin ended an interruptible call (see the file comment).
    skip_next_spin: ?*bool = null,
    /// A wake-up pipe whose signal ends the wait (Interrupted); it is drained.
    wake: ?*const Wakeup = null,

    /// How the next transfer waits: not in the kernel while spinning, nor
    /// when a deadline must be kept (poll() waits then, see idle).
    pub fn mode(self: *const Blocking) sys.Wait {
        const polls = self.deadline_ns != null or self.wake != null;
        return if (self.spin_end_ns != 0 or polls) .no else .yes;
    }

    /// Nothing moved: spin on while there is time, else wait until fd has
    /// `events` (sys.POLLIN or POLLOUT), the deadline passes, a signal or
    /// (with `wake`) another thread's wake-up comes.
    pub fn idle(self: *Blocking, fd: i32, events: i16) Stop!void {
        if (self.spin_end_ns != 0) return self.spinOn();
        const wake_fd: i32 = if (self.wake) |w| w.read_fd else -1;
        while (true) {
            const timeout_ms: i32 = if (self.deadline_ns) |d| msUntil(d) else -1;
            switch (sys.pollFdOrWake(fd, events, wake_fd, timeout_ms)) {
                .ready => return,
                .woken => {
                    self.wake.?.drain();
                    return error.Interrupted;
                },
                .interrupted => try self.interrupted(),
                .timed_out => if (self.deadline_ns) |d| if (sys.nowNs() >= d) return error.Timeout,
            }
        }
    }

    /// A transfer that waits was interrupted by a signal: Interrupted when
    /// the context is interruptible, else nothing (the caller goes on).
    pub fn interrupted(self: *const Blocking) Stop!void {
        if (self.interruptible) return error.Interrupted;
    }

    /// Whether the deadline has passed (for waits that poll in rounds).
    pub fn expired(self: *const Blocking) bool {
        const d = self.deadline_ns orelse return false;
        return sys.nowNs() >= d;
    }

    fn spinOn(self: *Blocking) Stop!void {
        // Gives the CPU to a process on the same one (the peer, often): see
        // Context.spinRounds.
        std.Thread.yield() catch {};
        if (sys.nowNs() < self.spin_end_ns) return;
        self.spin_end_ns = 0;
        if (self.interruptible) {
            if (self.skip_next_spin) |flag| flag.* = true;
            return error.Interrupted;
        }
    }
};

/// Whole milliseconds from now until `deadline_ns`, rounded up (a poll that
/// ends early would only be repeated), at least 0.
pub fn msUntil(deadline_ns: i64) i32 {
    const left = std.math.divCeil(
        i64,
        deadline_ns - sys.nowNs(),
        std.time.ns_per_ms,
    ) catch unreachable;
    return @intCast(std.math.clamp(left, 0, std.math.maxInt(i32)));
}

/// The deadline of a call that starts now and may last `timeout_ns` (< 0: no limit).
pub fn deadlineAfter(timeout_ns: i64) ?i64 {
    if (timeout_ns < 0) return null;
    return sys.nowNs() +| timeout_ns;
}

const testing = std.testing;

test "idle on a silent socket ends at the deadline" {
    const c = std.c;
    var fds: [2]c.fd_t = undefined;
    try testing.expectEqual(@as(c_int, 0), c.socketpair(c.AF.UNIX, c.SOCK.STREAM, 0, &fds));
    defer sys.closeFd(fds[0]);
    defer sys.closeFd(fds[1]);
    const start = sys.nowNs();
    var b: Blocking = .{ .deadline_ns = deadlineAfter(20 * std.time.ns_per_ms) };
    try testing.expectEqual(sys.Wait.no, b.mode());
    try testing.expectError(error.Timeout, b.idle(fds[0], sys.POLLIN));
    try testing.expect(sys.nowNs() - start >= 20 * std.time.ns_per_ms);
    try testing.expect(b.expired());
}

test "idle returns when the fd is ready; no deadline waits in the kernel" {
    const c = std.c;
    var fds: [2]c.fd_t = undefined;
    try testing.expectEqual(@as(c_int, 0), c.socketpair(c.AF.UNIX, c.SOCK.STREAM, 0, &fds));
    defer sys.closeFd(fds[0]);
    defer sys.closeFd(fds[1]);
    _ = c.send(fds[1], "x", 1, 0);
    var b: Blocking = .{ .deadline_ns = deadlineAfter(std.time.ns_per_s) };
    try b.idle(fds[0], sys.POLLIN);
    const plain: Blocking = .{};
    try testing.expectEqual(sys.Wait.yes, plain.mode());
    try testing.expect(!plain.expired());
}

test "an interruptible spin ends with Interrupted and asks to skip the next spin" {
    var skip = false;
    var b: Blocking = .{
        .spin_end_ns = sys.nowNs() - 1,
        .interruptible = true,
        .skip_next_spin = &skip,
    };
    try testing.expectEqual(sys.Wait.no, b.mode());
    try testing.expectError(error.Interrupted, b.idle(0, sys.POLLIN));
    try testing.expect(skip);
    try testing.expectEqual(@as(i64, 0), b.spin_end_ns);
    // Not interruptible: the spin just ends.
    var quiet: Blocking = .{ .spin_end_ns = sys.nowNs() - 1 };
    try quiet.idle(0, sys.POLLIN);
    try testing.expectError(error.Interrupted, (Blocking{ .interruptible = true }).interrupted());
    try (Blocking{}).interrupted();
}

test "a wake-up ends idle with Interrupted and is drained; fd ready wins" {
    const c = std.c;
    var fds: [2]c.fd_t = undefined;
    try testing.expectEqual(@as(c_int, 0), c.socketpair(c.AF.UNIX, c.SOCK.STREAM, 0, &fds));
    defer sys.closeFd(fds[0]);
    defer sys.closeFd(fds[1]);
    var w = try Wakeup.init();
    defer w.deinit();
    var b: Blocking = .{ .wake = &w, .interruptible = true };
    try testing.expectEqual(sys.Wait.no, b.mode());
    w.signal();
    try testing.expectError(error.Interrupted, b.idle(fds[0], sys.POLLIN));
    // Drained: a second wait ends only when fd is ready (it wins over a wake-up).
    _ = c.send(fds[1], "x", 1, 0);
    w.signal();
    try b.idle(fds[0], sys.POLLIN);
    try testing.expectError(error.Interrupted, b.idle(fds[1], sys.POLLIN));
}
