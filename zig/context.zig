//! The context: the connection table, the poller, the pending events, the
//! limits, the run dir and the timer, and every operation of the C ABI on
//! them. The rules are the README's "Behaviour in detail"; the pure-Python
//! backend (pyipc/_pure.py) implements the same rules and is the reference for
//! event order and error texts.

const std = @import("std");
const builtin = @import("builtin");
const c = std.c;
const assert = std.debug.assert;
const Allocator = std.mem.Allocator;

const sys = @import("sys.zig");
const errors = @import("errors.zig");
const framing = @import("framing.zig");
const events_mod = @import("events.zig");
const conn_table = @import("conn_table.zig");
const poller_mod = @import("poller/api.zig");
const rundir_mod = @import("rundir.zig");
const credentials = @import("credentials.zig");
const fdpass = @import("fdpass.zig");
const ipcd_answer = @import("ipcd_answer.zig");
const switching = @import("switching.zig");
const Wakeup = @import("wakeup.zig").Wakeup;
const Readiness = @import("readiness.zig").Readiness;
const gather_mod = @import("gather.zig");
const Gather = gather_mod.Gather;
const blocking_mod = @import("blocking.zig");
const Blocking = blocking_mod.Blocking;
const Stop = blocking_mod.Stop;

pub const Error = errors.Error;
pub const Conn = conn_table.Conn;
pub const Credentials = credentials.Credentials;

pub const Limits = struct {
    max_message_size: u32 = 16 << 20,
    max_queue_size: u64 = 64 << 20,
    max_connections: u32 = 65536,
};

/// Largest max_queue_size (2^63 - 1, pyipc's MAX_QUEUE_SIZE_LIMIT): a queue's
/// bytes plus a frame's (compared with it) stay far from overflowing 64 bits.
pub const max_queue_size_limit: u64 = (1 << 63) - 1;

/// Longest busy_poll a context takes, in microseconds (10 ms): it bounds the
/// CPU one wait may burn to save a wake-up that costs tens of microseconds.
pub const max_busy_poll_us = 10_000;

/// Bytes read from one fd per round at most, so one busy peer cannot starve the others.
pub const read_budget = 256 * 1024;
/// The context-wide receive buffer; complete frames are decoded straight from it.
const scratch_size = 256 * 1024;
/// Name of ipcd's service, reached by connect() when IPC_NETWORK is set.
const ipcd_service = "ipc";

comptime {
    // A frame small enough to go through the scratch buffer (under
    // direct_read_min; larger ones are read into their own) arrives whole in one read.
    assert(scratch_size >= framing.direct_read_min + framing.header_size);
    // One full scratch read fits a round's budget for an fd.
    assert(read_budget >= scratch_size);
    // The default limits pass setLimits' own check.
    const defaults: Limits = .{};
    assert(defaults.max_queue_size >= @as(u64, defaults.max_message_size) + framing.header_size);
    // A small frame written by write() is built in one stack buffer of that size.
    assert(gather_mod.copy_max + framing.header_size <= gather_mod.buffer_size);
}

pub const Context = struct {
    gpa: Allocator,
    limits: Limits = .{},
    rundir: []u8,
    /// Milliseconds a wait lasts before a TIMER event; negative: forever.
    timer_ms: i32 = -1,
    /// When the timer last started counting (setTimer, or a wait that
    /// returned events): a zero-timeout wait's TIMER is due timer_ms after it.
    timer_base_ns: i64 = 0,
    /// ipc_context_fd's fd and what it watches; made by the first call.
    readiness: ?Readiness = null,
    /// Microseconds a wait polls without blocking before it sleeps (0: it
    /// sleeps at once). See spinRounds().
    busy_poll_us: u32 = 0,
    /// A signal ends a blocking call with error.Interrupted instead of the
    /// call going on waiting (blocking.zig). Off for C programs, as libIPC.
    interruptible: bool = false,
    /// In an interruptible context, another thread's ipc_wakeup ends a
    /// blocking read (so its reads poll the wake-up pipe too). Off: the reads
    /// wait in the kernel, quicker (issue 21); the Python binding turns it
    /// off while the process has one thread (ipc_context_read_wakeup).
    read_wakeup: bool = true,
    /// The longest a blocking call waits, in ns (negative: no limit); it
    /// applies to every call until changed (ipc_context_call_timeout).
    call_timeout_ns: i64 = -1,
    /// The next blocking call skips busy_poll's spin (blocking.zig).
    skip_spin: bool = false,
    /// After a write or write_many stopped by a signal or its timeout: how
    /// many of its messages were written or begun (a begun one's rest is
    /// queued: it goes out whole). The others were not sent.
    write_count: usize = 0,
    /// The process that made the context: in another one (a forked child),
    /// closing touches neither the service files nor the shared poller.
    owner_pid: c.pid_t,
    /// Found to be in a forked child (see noticeFork); it stays so.
    forked: bool = false,
    table: conn_table.Table = .{},
    poller: poller_mod.Poller,
    events: events_mod.Queue = .{},
    last: errors.LastError = .{},
    scratch: ?[]u8 = null,
    /// write_many's buffer of copied frames (gather.zig), allocated by the
    /// first write_many.
    gather_buf: ?[]u8 = null,
    /// The buffer a custom switch `in` callback fills (max_message_size bytes),
    /// allocated the first time such a callback runs.
    switch_buf: ?[]u8 = null,
    /// Switch callbacks running now (one inside another's forward): the
    /// limits, and with them switch_buf, cannot change under them.
    callback_depth: u32 = 0,
    /// ipc_context_deinit was called inside a switch callback: everything
    /// was closed at once, and the context is freed when the call that ran
    /// the callback returns (freed under the callback, the loop that called
    /// it used freed memory). See deinitInCallback.
    deinit_pending: bool = false,
    /// The switching extension's state: switch_events, fds due for MORE
    /// (switching.zig).
    switch_state: switching.State = .{},
    /// Connections with queued frames: what step 1 of a round flushes.
    dirty: std.ArrayList(*Conn) = .empty,
    /// Lingers running (their rounds: not inside a switch callback, see
    /// linger), and the external fds muted by them (Conn.muted), unmuted when the last ends.
    linger_depth: u32 = 0,
    muted: std.ArrayList(i32) = .empty,
    /// Pinned payloads (schedulePinned) the core still reads from.
    pinned: usize = 0,
    /// Tokens of pinned payloads the core no longer reads (written, or their
    /// connection ended), in order, until the caller collects them
    /// (takeUnpinned). Its spare capacity is never below `pinned`, so a
    /// release never allocates.
    unpinned: std.ArrayList(u64) = .empty,
    /// Fds of connections that ended (DISCONNECTION reported) but are not
    /// closed yet: the number stays taken until the next round, so a new
    /// connection cannot get it while the old one's events are being handled
    /// (a reply to them would go to the wrong peer). See releaseEnded.
    ended: std.AutoHashMapUnmanaged(i32, u32) = .empty,
    ready: [poller_mod.max_batch]poller_mod.Ready = undefined,
    /// Lets another thread end a wait (ipc_wakeup); watched by the poller.
    wakeup: Wakeup,
    /// The wake-up pipe was readable in this wait.
    woken: bool = false,
    /// An fd on /dev/null kept for refusing a client when the process is out
    /// of fds (see refuseWithSpare); opened by the first service_init.
    spare_fd: i32 = -1,

    // ------------------------------------------------------------ lifetime

    /// A new context: run dir from env RUNDIR (when set and non-empty), else
    /// libIPC's default; no timer; default limits.
    pub fn create(gpa: Allocator) Error!*Context {
        const self = try gpa.create(Context);
        errdefer gpa.destroy(self);
        const env = c.getenv("RUNDIR");
        const dir: []const u8 = if (env) |e| std.mem.span(e) else "";
        const rundir = try gpa.dupe(u8, if (dir.len > 0) dir else rundir_mod.default_rundir);
        errdefer gpa.free(rundir);
        // No fd left (EMFILE, ENFILE) is not out of memory: Generic, and
        // errno tells the caller why (there is no context to ask).
        var poller = poller_mod.Poller.init(gpa) catch return error.Generic;
        errdefer poller.deinit(gpa);
        var wakeup = Wakeup.init() catch return error.Generic;
        errdefer wakeup.deinit();
        poller.update(gpa, wakeup.read_fd, .{}, .{ .read = true }) catch return error.Generic;
        self.* = .{
            .gpa = gpa,
            .rundir = rundir,
            .poller = poller,
            .wakeup = wakeup,
            .owner_pid = c.getpid(),
            .timer_base_ns = sys.nowNs(),
        };
        return self;
    }

    /// Close everything and free the context.
    pub fn destroy(self: *Context) void {
        const gpa = self.gpa;
        self.closeAll();
        self.events.deinit(gpa);
        self.table.deinit(gpa);
        self.poller.deinit(gpa);
        self.wakeup.deinit();
        sys.closeFd(self.spare_fd);
        self.dirty.deinit(gpa);
        self.muted.deinit(gpa);
        self.unpinned.deinit(gpa);
        self.ended.deinit(gpa);
        if (self.scratch) |s| gpa.free(s);
        if (self.gather_buf) |s| gpa.free(s);
        if (self.switch_buf) |s| gpa.free(s);
        self.switch_state.deinit(gpa);
        gpa.free(self.rundir);
        gpa.destroy(self);
    }

    /// ipc_context_deinit inside a switch callback: close everything now
    /// (safe there: the records live until the callback returned); the
    /// call that ran the callback ends (checkDeinit) and frees the context
    /// as it returns (exports.zig).
    pub fn deinitInCallback(self: *Context) void {
        self.closeAll();
        self.deinit_pending = true;
    }

    /// The loop stops once a callback asked for the context to be freed.
    fn checkDeinit(self: *Context) Error!void {
        if (self.deinit_pending)
            return self.last.fail(error.Generic, "the context was deinitialised inside a switch callback", .{});
    }

    pub fn setRundir(self: *Context, dir: []const u8) Error!void {
        // Paths are used as C strings: a NUL would silently cut it short.
        if (std.mem.indexOfScalar(u8, dir, 0) != null)
            return self.last.fail(error.Generic, "run directory must not contain NUL", .{});
        const copy = try self.gpa.dupe(u8, dir);
        self.gpa.free(self.rundir);
        self.rundir = copy;
    }

    /// Reads and waits are refused inside a switch callback: they decode
    /// into buffers the loop that called it is still decoding from (the read
    /// scratch buffer, a connection's decoder, switch_buf), so a callback that
    /// read sent one connection's bytes to another's peer and lost frames.
    fn notInCallback(self: *Context, what: []const u8) Error!void {
        if (self.callback_depth > 0)
            return self.last.fail(error.Generic, "cannot {s} inside a switch callback", .{what});
    }

    /// Same ranges as pyipc.Context's checks (and the same texts).
    pub fn setLimits(self: *Context, limits: Limits) Error!void {
        // switch_buf (max_message_size bytes) holds what an `in` callback
        // wrote, read after it returns: freed under it, that was a crash.
        if (self.callback_depth > 0)
            return self.last.fail(
                error.Generic,
                "the limits cannot change inside a switch callback",
                .{},
            );
        if (limits.max_message_size < 1)
            return self.last.fail(
                error.Generic,
                "max_message_size must be between 1 and 4294967295",
                .{},
            );
        const queue_min = @as(u64, limits.max_message_size) + framing.header_size;
        if (limits.max_queue_size < queue_min)
            return self.last.fail(
                error.Generic,
                "max_queue_size must be at least max_message_size + 4",
                .{},
            );
        if (limits.max_queue_size > max_queue_size_limit)
            return self.last.fail(
                error.Generic,
                "max_queue_size must be at most {d}",
                .{max_queue_size_limit},
            );
        if (limits.max_connections < 1 or limits.max_connections > 0x7FFF_FFFF)
            return self.last.fail(
                error.Generic,
                "max_connections must be between 1 and 2147483647",
                .{},
            );
        self.limits = limits;
        if (self.switch_buf) |s| if (s.len != limits.max_message_size) {
            self.gpa.free(s);
            self.switch_buf = null;
        };
    }

    pub fn setTimer(self: *Context, ms: i32) void {
        self.timer_ms = if (ms < 0) -1 else ms;
        self.timer_base_ns = sys.nowNs();
    }

    // ------------------------------------------------------------ readiness fd

    /// The fd another event loop watches (ipc_context_fd): readable while a
    /// zero-timeout wait would return something (readiness.zig). Made by the
    /// first call; the same fd until closeAll closes it.
    pub fn contextFd(self: *Context) Error!i32 {
        if (self.noticeFork()) return self.last.fail(
            error.Generic,
            "cannot watch a context inherited through fork()",
            .{},
        );
        if (self.readiness == null) {
            const inner = self.poller.fileno() orelse return self.last.fail(
                error.Generic,
                "fileno() is not available with the poll(2) poller backend",
                .{},
            );
            self.readiness = Readiness.init(inner) catch return self.last.failErrno(
                error.Generic,
                c.errno(@as(c_int, -1)),
                "cannot make the context's fd: {s}",
                .{errors.errText(c.errno(@as(c_int, -1)))},
            );
        }
        self.syncReadiness();
        return self.readiness.?.outer;
    }

    /// End of every call that may change the pending events or the timer:
    /// the readiness fd shows them (nothing to do when it was never asked for).
    pub fn syncReadiness(self: *Context) void {
        const r = if (self.readiness) |*r| r else return;
        if (self.forked) return; // the pipe and the timer are the parent's too
        // MORE calls due are work a zero-timeout wait does (switching.zig).
        r.setPending(self.events.live > 0 or switching.moreReady(self));
        r.armTimer(if (self.timer_ms < 0) null else self.timerDueNs(self.timer_base_ns));
    }

    fn timerDueNs(self: *const Context, from_ns: i64) i64 {
        return from_ns +| @as(i64, self.timer_ms) * std.time.ns_per_ms;
    }

    pub fn setBusyPoll(self: *Context, us: u32) Error!void {
        if (us > max_busy_poll_us)
            return self.last.fail(
                error.Generic,
                "busy_poll must be at most {d} us",
                .{max_busy_poll_us},
            );
        self.busy_poll_us = us;
    }

    /// The timeout of every blocking call from now on, in ns; negative: none.
    pub fn setCallTimeout(self: *Context, ns: i64) void {
        self.call_timeout_ns = if (ns < 0) -1 else ns;
    }

    /// Whether this process is a forked child of the one that made the
    /// context. Asked by the calls that close: in a child they close its
    /// copies of the fds and nothing else. Unlinking the socket file, or
    /// removing fds from the epoll/kqueue instance the child shares with its
    /// parent, would break the parent's service (README "fork").
    fn noticeFork(self: *Context) bool {
        if (!self.forked and c.getpid() != self.owner_pid) self.forked = true;
        return self.forked;
    }

    // ------------------------------------------------------------ blocking calls

    /// How a blocking call starting now waits (blocking.zig): the call
    /// timeout, signals, and with `spin` busy_poll (unless the call before
    /// asked to skip it).
    fn blocking(self: *Context, spin: bool) Blocking {
        var b: Blocking = .{
            .deadline_ns = blocking_mod.deadlineAfter(self.call_timeout_ns),
            .interruptible = self.interruptible,
            .skip_next_spin = &self.skip_spin,
        };
        if (spin) {
            // The reads (the only callers with `spin`): another thread's
            // wake-up ends them too, in an interruptible context (blocking.zig).
            if (self.interruptible and self.read_wakeup) b.wake = &self.wakeup;
            if (self.busy_poll_us > 0 and !self.skip_spin) {
                b.spin_end_ns = self.spinEndNs();
                if (b.deadline_ns) |d| b.spin_end_ns = @min(b.spin_end_ns, d);
            }
            self.skip_spin = false;
        }
        return b;
    }

    /// The error of a blocking call that `stop`ped, with its text (the pure
    /// backend raises the same): "<what> timed out", "<what> was interrupted
    /// by a signal". Any other error passes through.
    fn stopped(self: *Context, err: Error, comptime what: []const u8, args: anytype) Error {
        return switch (err) {
            error.Interrupted => self.last.fail(
                error.Interrupted,
                what ++ " was interrupted by a signal",
                args,
            ),
            error.Timeout => self.last.fail(error.Timeout, what ++ " timed out", args),
            else => err,
        };
    }

    // ------------------------------------------------------------ table helpers

    pub fn lookup(self: *Context, fd: i32) Error!*Conn {
        if (self.table.get(fd)) |conn| return conn;
        if (self.ended.contains(fd)) return self.closedByPeer(fd);
        return self.last.fail(error.UnknownFd, "fd {d} is not managed by this context", .{fd});
    }

    /// A managed connection: not a service, not an external fd (unless switched).
    pub fn connection(self: *Context, fd: i32) Error!*Conn {
        const conn = try self.lookup(fd);
        if (conn.role == .service or (conn.role == .external and conn.peer == null))
            return self.last.fail(error.UnknownFd, "fd {d} is not a connection", .{fd});
        return conn;
    }

    /// The fd in slot `index`, for libIPC's index-based calls.
    pub fn fdAtIndex(self: *Context, index: usize) Error!i32 {
        if (self.table.atSlot(index)) |conn| return conn.fd;
        // A connection that ended keeps its slot until the next round, as
        // its fd: its index still names it (ipc_close releases it).
        var it = self.ended.iterator();
        while (it.next()) |e| if (e.value_ptr.* == index) return e.key_ptr.*;
        return self.last.fail(
            error.UnknownFd,
            "index {d} is not managed by this context",
            .{index},
        );
    }

    /// What close(fd) would discard: see queuedMessages.
    pub const Queued = struct {
        count: usize,
        /// -1 when fd is not switched.
        peer_fd: i32,
        peer_count: usize,
    };

    /// fd's scheduled messages not yet completely written, and its switch
    /// peer (closed with it) and that one's.
    pub fn queuedMessages(self: *Context, fd: i32) Error!Queued {
        const conn = try self.lookup(fd);
        const peer: ?*Conn = if (conn.peer) |p| (if (p.alive) p else null) else null;
        return .{
            .count = conn.queue.frameCount(),
            .peer_fd = if (peer) |x| x.fd else -1,
            .peer_count = if (peer) |x| x.queue.frameCount() else 0,
        };
    }

    fn checkRoom(self: *Context) Error!void {
        if (self.table.count() >= self.limits.max_connections)
            return self.last.fail(
                error.ConnectionLimit,
                "too many connections (max_connections {d})",
                .{self.limits.max_connections},
            );
    }

    /// Put fd in the table (lowest free slot) and watch it for reading.
    fn addConn(self: *Context, fd: i32, role: conn_table.Role) Error!*Conn {
        const conn = try self.table.add(self.gpa, fd, role);
        errdefer {
            self.table.remove(self.gpa, conn, false);
            self.reapDead();
        }
        const want: poller_mod.Interest = .{ .read = true };
        self.poller.update(self.gpa, fd, .{}, want) catch {
            // errno is still the poller's call's (epoll: EPERM for a regular file).
            const e = c.errno(@as(c_int, -1));
            return self.last.failErrno(
                error.Generic,
                e,
                "cannot watch fd {d}: {s}",
                .{ fd, errors.errText(e) },
            );
        };
        conn.registered = want;
        return conn;
    }

    /// Watch reads unless back-pressure pauses them (the switch peer's queue
    /// is over max_queue_size) or the caller did (pauseReading), and writes
    /// while frames are queued.
    pub fn updateInterest(self: *Context, conn: *Conn) void {
        if (!conn.alive) return;
        const max = self.limits.max_queue_size;
        const paused = if (conn.peer) |p| p.queue.queuedBytes() > max else false;
        const want: poller_mod.Interest = .{
            .read = !paused and !conn.closing and !conn.read_paused and !conn.muted,
            // A queue whose write failed is never sent (a paused fd keeps it
            // until resumed: see flushConn).
            .write = !conn.queue.isEmpty() and !conn.write_closed,
        };
        if (want == conn.registered) return;
        // On failure the old interest stays registered; the next change retries.
        self.poller.update(self.gpa, conn.fd, conn.registered, want) catch return;
        conn.registered = want;
    }

    pub fn markDirty(self: *Context, conn: *Conn) Allocator.Error!void {
        // A write already failed (EPIPE): its queue can only be dropped with
        // it; flushing it again would fail again (and drain again).
        if (conn.dirty_pos != null or conn.write_closed) return;
        try self.dirty.append(self.gpa, conn);
        conn.dirty_pos = @intCast(self.dirty.items.len - 1);
    }

    fn unmarkDirty(self: *Context, conn: *Conn) void {
        const pos = conn.dirty_pos orelse return;
        assert(self.dirty.items[pos] == conn);
        _ = self.dirty.swapRemove(pos);
        if (pos < self.dirty.items.len) self.dirty.items[pos].dirty_pos = pos;
        conn.dirty_pos = null;
    }

    /// After frames were queued or written: keep the dirty list and the
    /// poller's interest (this fd's writes, its switch peer's reads) in step.
    pub fn queueChanged(self: *Context, conn: *Conn) void {
        if (!conn.alive) return;
        if (conn.queue.isEmpty()) self.unmarkDirty(conn);
        self.updateInterest(conn);
        if (conn.peer) |p| self.updateInterest(p);
    }

    /// Close fd and take it out of everything, with no event. A service's
    /// socket file is removed and its lock released. The record is freed by reap.
    fn forget(self: *Context, conn: *Conn) void {
        self.unwatch(conn, false);
        sys.closeFd(conn.fd);
    }

    /// forget() but for closing the fd: the caller closes it or keeps it
    /// reserved, and with `keep_slot` its slot too (table.releaseSlot).
    fn unwatch(self: *Context, conn: *Conn, keep_slot: bool) void {
        assert(conn.alive);
        self.unmarkDirty(conn);
        // A forked child shares the poller and the socket file with its
        // parent: it leaves both alone (noticeFork).
        if (!self.forked) {
            self.poller.update(self.gpa, conn.fd, conn.registered, .{}) catch {};
            if (conn.service_file) |f| f.remove();
        }
        conn.registered = .{};
        sys.closeFd(conn.lock_fd);
        conn.lock_fd = -1;
        // What it still had to write is not written: its pins are free.
        var sink: TxSink = .{ .ctx = self, .conn = conn };
        conn.queue.discard(self.gpa, &sink);
        self.table.remove(self.gpa, conn, keep_slot);
    }

    /// Close the fds of connections that ended before this round, and free
    /// their slots: every event about them has been handed out, since a
    /// round only runs when none is pending.
    fn releaseEnded(self: *Context) void {
        var it = self.ended.iterator();
        while (it.next()) |e| {
            sys.closeFd(e.key_ptr.*);
            self.table.releaseSlot(self.gpa, e.value_ptr.*);
        }
        self.ended.clearRetainingCapacity();
    }

    /// End a connection the event loop way (README "How a connection ends"):
    /// ERROR when there is a reason, then DISCONNECTION; then its switch peer.
    pub fn drop(self: *Context, conn: *Conn, reason: ?[]const u8) Allocator.Error!void {
        if (!conn.alive) return;
        var buf: [128]u8 = undefined;
        const text: ?[]const u8 = reason orelse if (!conn.queue.isEmpty())
            std.fmt.bufPrint(
                &buf,
                "peer closed the connection with {d} scheduled message(s) unsent",
                .{conn.queue.frameCount()},
            ) catch unreachable
        else
            null;
        const fd = conn.fd;
        const index: i64 = conn.index;
        const peer = conn.peer;
        conn.peer = null;
        if (peer) |p| p.peer = null;
        self.unwatch(conn, true);
        // The peer sees the end now (EOF, EPIPE); only the number stays taken,
        // and the slot: a client accepted in the same round got it, and
        // libIPC's ipc_close(ctx, index) / ipc_read on this one's events
        // reached that client.
        // (Not for an external fd: it may be shared, shutdown would end it for all.)
        if (conn.role == .connection) _ = c.shutdown(fd, c.SHUT.RDWR);
        var failed: ?Allocator.Error = null;
        self.ended.put(self.gpa, fd, conn.index) catch |e| {
            sys.closeFd(fd); // cannot keep it reserved: close it now
            self.table.releaseSlot(self.gpa, conn.index);
            failed = e;
        };
        if (text) |t| self.events.pushData(self.gpa, .err, fd, index, t) catch |e| {
            failed = e;
        };
        self.events.push(self.gpa, .disconnection, fd, index) catch |e| {
            failed = e;
        };
        if (peer) |p| self.closeAfterFlush(p) catch |e| {
            failed = e;
        };
        if (failed) |e| return e;
    }

    /// The other side of a switch whose peer ended: closed too, but only once
    /// what was forwarded to it is written, so the ended side's last messages
    /// are not lost. Meanwhile it is not read (its input has nowhere to go).
    pub fn closeAfterFlush(self: *Context, conn: *Conn) Allocator.Error!void {
        if (!conn.alive) return;
        if (conn.queue.isEmpty()) return self.drop(conn, null);
        conn.closing = true;
        self.updateInterest(conn);
    }

    fn scratchBuffer(self: *Context) Allocator.Error![]u8 {
        if (self.scratch) |s| return s;
        self.scratch = self.events.takeSpare(scratch_size) orelse
            try self.gpa.alloc(u8, scratch_size);
        return self.scratch.?;
    }

    fn gatherBuffer(self: *Context) Allocator.Error![]u8 {
        if (self.gather_buf) |s| return s;
        self.gather_buf = try self.gpa.alloc(u8, gather_mod.buffer_size);
        return self.gather_buf.?;
    }

    fn tooLargeText(buf: []u8, size: u64, max: u32) []const u8 {
        return std.fmt.bufPrint(
            buf,
            "message of {d} bytes exceeds max_message_size ({d})",
            .{ size, max },
        ) catch unreachable;
    }

    /// Whether an ERROR's text is tooLargeText's (the connection ended on a
    /// frame over max_message_size).
    fn isTooLargeText(text: []const u8) bool {
        return std.mem.startsWith(u8, text, "message of ") and
            std.mem.indexOf(u8, text, " bytes exceeds max_message_size (") != null;
    }

    /// What a read of fd raises once fd's messages are all taken and its
    /// DISCONNECTION is pending: MessageTooLarge when its pending ERROR says
    /// it ended on a frame over the limit (a bad header that came after
    /// messages, in the same read), else ConnectionClosed.
    fn endedError(self: *Context, fd: i32) Error {
        var it = self.events.iterFd(fd);
        while (it.next()) |ev| {
            if (ev.kind == .err and isTooLargeText(ev.data)) return self.last.failText(
                error.MessageTooLarge,
                ev.data,
            );
            if (ev.kind == .disconnection) break;
        }
        return self.closedByPeer(fd);
    }

    // ------------------------------------------------------------ services and connections

    pub fn serviceInit(self: *Context, name: []const u8) Error!i32 {
        var pbuf: rundir_mod.PathBuf = undefined;
        const path = try rundir_mod.servicePath(&pbuf, self.rundir, name, &self.last);
        try self.checkRoom();
        _ = try rundir_mod.check(self.rundir, true, &self.last);
        const lock_fd = try rundir_mod.lockService(path, name, self.rundir, &self.last);
        errdefer sys.closeFd(lock_fd);
        const fd = try rundir_mod.listenAt(path, name, &self.last);
        // Which file we bound: closing removes the path only while it is still ours.
        const id = sys.lstatId(path.ptr);
        errdefer {
            sys.closeFd(fd);
            rundir_mod.removeOwnSocket(path, id);
        }
        const file = try rundir_mod.SocketFile.create(self.gpa, path, id);
        errdefer file.destroy(self.gpa);
        const conn = try self.addConn(fd, .service);
        conn.service_file = file;
        conn.lock_fd = lock_fd;
        if (self.spare_fd < 0) self.spare_fd = openSpare();
        return fd;
    }

    pub fn connectService(self: *Context, name: []const u8) Error!i32 {
        // A service whose listen backlog is full holds the connect: it waits
        // as a blocking call does (call timeout, signals: sys.connectUnix).
        return self.connectServiceWaiting(name, self.blocking(false));
    }

    /// connectService(), waiting at most as `block` says (its deadline is
    /// the whole call's: connect() through ipcd shares it with the exchange).
    fn connectServiceWaiting(self: *Context, name: []const u8, block: Blocking) Error!i32 {
        var pbuf: rundir_mod.PathBuf = undefined;
        const path = try rundir_mod.servicePath(&pbuf, self.rundir, name, &self.last);
        try self.checkRoom();
        if (!try rundir_mod.check(self.rundir, false, &self.last))
            return self.last.failErrno(
                error.ServiceNotFound,
                .NOENT,
                "no service {s} in {s}",
                .{ name, self.rundir },
            );
        const fd = rundir_mod.connectTo(
            path,
            name,
            self.rundir,
            &self.last,
            block.deadline_ns,
            block.interruptible,
        ) catch |e| return self.stopped(e, "connect to service {s}", .{name});
        errdefer sys.closeFd(fd);
        _ = try self.addConn(fd, .connection);
        return fd;
    }

    /// connect(): through ipcd when env IPC_NETWORK is set and non-empty.
    pub fn connect(self: *Context, name: []const u8) Error!i32 {
        const env = c.getenv("IPC_NETWORK");
        const network: []const u8 = if (env) |e| std.mem.span(e) else "";
        if (network.len == 0) return self.connectService(name);
        // Sent to ipcd as text: the pure backend cannot even decode it.
        if (!std.unicode.utf8ValidateSlice(network))
            return self.last.fail(error.Generic, "IPC_NETWORK is not valid UTF-8", .{});
        return self.connectThroughIpcd(name, network);
    }

    /// Ask ipcd (service "ipc") to connect us: send "NAME;IPC_NETWORK", receive
    /// the connected fd with the raw answer "ok" (libIPC's protocol).
    fn connectThroughIpcd(self: *Context, name: []const u8, network: []const u8) Error!i32 {
        var pbuf: rundir_mod.PathBuf = undefined;
        _ = try rundir_mod.servicePath(&pbuf, self.rundir, name, &self.last);
        // Refused before ipcd is asked, as the Python calls refuse them: the
        // request is text, and one frame.
        if (!std.unicode.utf8ValidateSlice(name))
            return self.last.fail(
                error.InvalidName,
                "service name is not valid UTF-8: ipcd cannot be asked for it",
                .{},
            );
        const request_len = name.len + 1 + network.len;
        if (request_len > self.limits.max_message_size)
            return self.last.fail(
                error.MessageTooLarge,
                "message of {d} bytes exceeds max_message_size ({d})",
                .{ request_len, self.limits.max_message_size },
            );
        // One deadline for the whole call: the connect to ipcd, the request
        // and the answer (as the pure backend's connect()).
        var block = self.blocking(false);
        const ipcd = self.connectServiceWaiting(ipcd_service, block) catch |e| {
            if (e == error.Timeout or e == error.Interrupted)
                return self.stopped(e, "connect to service {s}", .{name});
            if (e != error.ServiceNotFound) return e;
            return self.last.failKeepErrno(
                error.ServiceNotFound,
                "IPC_NETWORK is set but ipcd is not running (no service {s} in {s})",
                .{ ipcd_service, self.rundir },
            );
        };
        var answer: [2000]u8 = undefined;
        var received: i32 = -1;
        const n = self.askIpcd(ipcd, name, network, &answer, &received, &block) catch |stop| {
            self.close(ipcd) catch {};
            return self.stopped(stop, "connect to service {s}", .{name});
        };
        self.close(ipcd) catch {};
        if (n == null or !std.mem.eql(u8, answer[0..n.?], "ok") or received < 0) {
            sys.closeFd(received);
            if (n) |len| if (ipcd_answer.refusal(answer[0..len])) |r| return self.refused(name, r);
            return self.last.fail(error.Generic, "ipcd could not connect to service {s}", .{name});
        }
        errdefer sys.closeFd(received);
        if (!sys.isConnectedStream(received))
            return self.last.fail(
                error.Generic,
                "ipcd sent a file descriptor that is not a connected Unix or TCP stream socket",
                .{},
            );
        if (!sys.setNonblocking(received, false)) return self.last.fail(
            error.Generic,
            "ipcd could not connect to service {s}",
            .{name},
        );
        if (sys.send_flags == 0) sys.setNoSigpipe(received);
        _ = try self.addConn(received, .connection);
        return received;
    }

    /// ipcd's refusal as the error it means, with its code and reason.
    fn refused(self: *Context, name: []const u8, r: ipcd_answer.Refusal) Error {
        if (r.text.len == 0)
            return self.last.fail(r.err(), "ipcd could not connect to service {s} ({s})", .{ name, r.code });
        return self.last.fail(
            r.err(),
            "ipcd could not connect to service {s} ({s}): {s}",
            .{ name, r.code, r.text },
        );
    }

    /// The request/answer exchange with ipcd; null when it failed. It waits
    /// as `block` says (the call's deadline, shared with the connect to
    /// ipcd): a signal or the call timeout stops it. A request over
    /// max_message_size is that error; an ipcd that closed before it took
    /// the whole request (a refusal at its bounds) has its answer read all
    /// the same.
    fn askIpcd(
        self: *Context,
        ipcd: i32,
        name: []const u8,
        network: []const u8,
        answer: []u8,
        received: *i32,
        block: *Blocking,
    ) Error!?usize {
        const request = std.fmt.allocPrint(
            self.gpa,
            "{s};{s}",
            .{ name, network },
        ) catch return null;
        defer self.gpa.free(request);
        self.writeFrame(ipcd, request, block) catch |err| switch (err) {
            error.Interrupted, error.Timeout, error.MessageTooLarge => |e| return e,
            error.ConnectionClosed => {}, // its answer may be there
            else => return null,
        };
        // An ipcd that accepted but does not answer must not hang us.
        try block.idle(ipcd, sys.POLLIN);
        return fdpass.receiveFd(ipcd, answer, received) catch null;
    }

    /// What add_external and add_connection check first: fd is open and not
    /// managed (nor just ended) here, nor one of the context's own fds.
    fn checkNewFd(self: *Context, fd: i32) Error!void {
        if (self.ended.contains(fd)) return self.closedByPeer(fd);
        if (self.table.get(fd) != null)
            return self.last.fail(
                error.Generic,
                "fd {d} is already managed by this context",
                .{fd},
            );
        // Watched or closed as a connection, one of these would be closed
        // twice (the second time maybe someone else's fd) or lose the
        // context its wake-ups.
        if (self.ownsFd(fd))
            return self.last.fail(
                error.Generic,
                "fd {d} is the context's own (its poller, wake-up pipe or spare fd)",
                .{fd},
            );
        if (!sys.isOpen(fd))
            return self.last.fail(error.UnknownFd, "fd {d} is not an open file descriptor", .{fd});
    }

    /// Whether fd is one the context made for itself (never a connection).
    fn ownsFd(self: *const Context, fd: i32) bool {
        if (self.poller.fileno()) |own| if (fd == own) return true;
        if (self.readiness) |*r| if (r.owns(fd)) return true;
        return fd == self.wakeup.read_fd or fd == self.wakeup.write_fd or
            (self.spare_fd >= 0 and fd == self.spare_fd);
    }

    pub fn addExternal(self: *Context, fd: i32) Error!void {
        try self.checkNewFd(fd);
        try self.checkRoom();
        const conn = try self.addConn(fd, .external);
        conn.is_socket = sys.isSocket(fd);
    }

    /// Stop (`on`) or resume watching connection or external fd `fd` for
    /// input: what its peer sends waits in the kernel meanwhile (its writes
    /// block or fail with EAGAIN: back-pressure), and no MESSAGE_RX or
    /// EXTERNAL comes for it. A paused fd's hang-up is seen once resumed.
    /// Blocking reads of fd still read it.
    pub fn pauseReading(self: *Context, fd: i32, on: bool) Error!void {
        const conn = try self.lookup(fd);
        if (conn.role == .service)
            return self.last.fail(error.UnknownFd, "fd {d} is not a connection", .{fd});
        conn.read_paused = on;
        self.updateInterest(conn);
    }

    /// Manage `fd`, a connected Unix or TCP stream socket made elsewhere (received
    /// by SCM_RIGHTS, one end of a socketpair), as a connection: from now on
    /// the context owns it (reads, writes, closes it) as if it had connected.
    pub fn addConnection(self: *Context, fd: i32) Error!void {
        try self.checkNewFd(fd);
        if (!sys.isConnectedStream(fd))
            return self.last.fail(
                error.Generic,
                "fd {d} is not a connected Unix or TCP stream socket",
                .{fd},
            );
        try self.checkRoom();
        // Blocking mode, as the context's own connections are (the loop
        // passes MSG_DONTWAIT where it must not wait).
        if (!sys.setNonblocking(fd, false))
            return self.last.failErrno(
                error.Generic,
                c.errno(@as(c_int, -1)),
                "cannot use fd {d}: {s}",
                .{ fd, errors.errText(c.errno(@as(c_int, -1))) },
            );
        if (sys.send_flags == 0) sys.setNoSigpipe(fd);
        _ = try self.addConn(fd, .connection);
    }

    pub fn peerCredentials(self: *Context, fd: i32) Error!Credentials {
        const conn = try self.connection(fd);
        return switch (credentials.peer(conn.fd)) {
            .ok => |cred| cred,
            .not_unix => self.last.fail(
                error.Generic,
                "cannot read peer credentials of fd {d}: not a Unix socket",
                .{fd},
            ),
            .failed => |e| self.last.failErrno(
                error.Generic,
                e,
                "cannot read peer credentials of fd {d}: {s}",
                .{ fd, errors.errText(e) },
            ),
        };
    }

    // ------------------------------------------------------------ closing

    /// Free the records of closed connections, unless a switch callback is
    /// running: the code that called it still holds its connection's record
    /// (and checks `alive` after the call), so a close() or close_all() made
    /// by the callback must not free it under it. The round's own reap,
    /// once the callbacks have returned, frees them.
    fn reapDead(self: *Context) void {
        if (self.callback_depth > 0) return;
        self.table.reap(self.gpa);
    }

    /// Close fd (and its switch peer) at once, with no event; their pending
    /// events are dropped, and so are their unsent scheduled messages.
    pub fn close(self: *Context, fd: i32) Error!void {
        _ = self.noticeFork();
        if (self.ended.fetchRemove(fd)) |kv| {
            self.events.dropFd(self.gpa, fd);
            sys.closeFd(fd);
            self.table.releaseSlot(self.gpa, kv.value);
            return;
        }
        const conn = try self.lookup(fd);
        const peer = conn.peer;
        conn.peer = null;
        if (peer) |p| p.peer = null;
        for ([_]?*Conn{ conn, peer }) |maybe| {
            const x = maybe orelse continue;
            if (!x.alive) continue;
            self.events.dropFd(self.gpa, x.fd);
            self.forget(x);
        }
        self.reapDead();
    }

    /// Close every fd; slot numbers start from 0 again. The context stays usable.
    /// In a forked child, as soon as it runs (the binding's at-fork hook):
    /// drop this process's references to what the parent shares and may
    /// close, by putting /dev/null on their fd numbers: the services' lock
    /// fds, the listening and connected sockets (those that ended too).
    /// Else a child that never calls in would keep a closed (or crashed)
    /// parent's service name locked (flock ends with the last reference)
    /// and its closed connections open for their peers. The numbers stay
    /// taken, so the child's later close_fd/close_all close them as
    /// before. External fds (the caller's), the poller and the context's fd
    /// are left alone. Nothing happens in the process that made the context.
    pub fn dropSharedInChild(self: *Context) void {
        if (!self.noticeFork()) return;
        const null_fd = c.open("/dev/null", .{ .ACCMODE = .RDWR, .CLOEXEC = true });
        if (null_fd < 0) return; // out of fds: the references stay, as before
        defer sys.closeFd(null_fd);
        for (self.table.slots.items) |maybe| {
            const conn = maybe orelse continue;
            if (conn.lock_fd >= 0) coverWith(null_fd, conn.lock_fd);
            if (conn.role != .external) coverWith(null_fd, conn.fd);
        }
        var it = self.ended.keyIterator();
        while (it.next()) |fd| coverWith(null_fd, fd.*);
    }

    /// dup2 `with` onto `fd`, close-on-exec as every fd of ours is.
    fn coverWith(with: i32, fd: i32) void {
        if (c.dup2(with, fd) < 0) return;
        _ = c.fcntl(fd, c.F.SETFD, @as(c_int, c.FD_CLOEXEC));
    }

    pub fn closeAll(self: *Context) void {
        _ = self.noticeFork();
        for (self.table.slots.items) |maybe| {
            const conn = maybe orelse continue;
            conn.peer = null;
            self.forget(conn);
        }
        self.releaseEnded();
        self.events.clear(self.gpa);
        if (self.readiness) |*r| r.deinit();
        self.readiness = null;
        self.table.resetSlots();
        self.reapDead();
        assert(self.dirty.items.len == 0);
    }

    // ------------------------------------------------------------ sending

    /// Checks shared by write and schedule, in the pure backend's order.
    fn prepareSend(self: *Context, fd: i32, len: u64) Error!*Conn {
        const conn = try self.connection(fd);
        if (len > self.limits.max_message_size)
            return self.last.fail(
                error.MessageTooLarge,
                "message of {d} bytes exceeds max_message_size ({d})",
                .{ len, self.limits.max_message_size },
            );
        if (conn.write_closed or conn.closing) return self.closedByPeer(fd);
        return conn;
    }

    /// prepareSend's checks alone: what a write of `len` bytes to fd would
    /// fail with, in the same order.
    pub fn checkWrite(self: *Context, fd: i32, len: u64) Error!void {
        _ = try self.prepareSend(fd, len);
    }

    pub fn closedByPeer(self: *Context, fd: i32) Error {
        return self.last.fail(
            error.ConnectionClosed,
            "connection on fd {d} is closed by the peer",
            .{fd},
        );
    }

    /// Queue a frame; the next rounds send it (MESSAGE_TX when fully written).
    pub fn schedule(self: *Context, fd: i32, payload: []const u8) Error!void {
        const conn = try self.prepareSchedule(fd, payload.len);
        errdefer if (conn.queue.isEmpty()) self.unmarkDirty(conn);
        try conn.queue.push(self.gpa, payload, .scheduled);
        self.updateInterest(conn);
    }

    /// schedule() without copying the payload: the core writes it from the
    /// caller's memory, which must stay unchanged until `token` comes out of
    /// takeUnpinned() (once the frame is written, or its connection ended).
    pub fn schedulePinned(self: *Context, fd: i32, payload: []const u8, token: u64) Error!void {
        // Room to report it released without allocating (see `unpinned`).
        try self.unpinned.ensureUnusedCapacity(self.gpa, self.pinned + 1);
        if (payload.len == 0) {
            // Nothing to pin: queued as schedule() does, released at once.
            try self.schedule(fd, payload);
            self.unpinned.appendAssumeCapacity(token);
            return;
        }
        const conn = try self.prepareSchedule(fd, payload.len);
        errdefer if (conn.queue.isEmpty()) self.unmarkDirty(conn);
        try conn.queue.pushPinned(self.gpa, .{ .ptr = payload.ptr, .len = payload.len, .token = token });
        self.pinned += 1;
        self.updateInterest(conn);
    }

    /// Move up to out.len released pin tokens, oldest first, to `out`;
    /// returns how many.
    pub fn takeUnpinned(self: *Context, out: []u64) usize {
        const n = @min(out.len, self.unpinned.items.len);
        @memcpy(out[0..n], self.unpinned.items[0..n]);
        self.unpinned.replaceRangeAssumeCapacity(0, n, &.{});
        return n;
    }

    /// A pinned payload is no longer read (TxSink, unwatch).
    fn unpin(self: *Context, token: u64) void {
        assert(self.pinned > 0);
        self.pinned -= 1;
        self.unpinned.appendAssumeCapacity(token);
    }

    /// schedule()'s checks (fd, size, room in fd's queue); fd is then in
    /// the dirty list.
    fn prepareSchedule(self: *Context, fd: i32, len: usize) Error!*Conn {
        const conn = try self.prepareSend(fd, len);
        const queued = conn.queue.queuedBytes();
        if (queued + framing.header_size + len > self.limits.max_queue_size)
            return self.last.fail(
                error.QueueFull,
                "send queue of fd {d} is full ({d} bytes queued, max_queue_size {d})",
                .{ fd, queued, self.limits.max_queue_size },
            );
        try self.markDirty(conn);
        return conn;
    }

    /// Send now: first what is queued for fd (its MESSAGE_TX events are still
    /// reported by the next wait), then this message, blocking until written.
    /// A signal or the call timeout may stop it (keepFramed says what then).
    pub fn write(self: *Context, fd: i32, payload: []const u8) Error!void {
        var block = self.blocking(false);
        self.writeFrame(fd, payload, &block) catch |err| return self.stopped(
            err,
            "write on fd {d}",
            .{fd},
        );
    }

    fn writeFrame(self: *Context, fd: i32, payload: []const u8, block: *Blocking) Error!void {
        const conn = try self.prepareSend(fd, payload.len);
        self.write_count = 0;
        try self.flushBlocking(conn, block);
        const header = framing.encodeHeader(@intCast(payload.len));
        if (payload.len <= gather_mod.copy_max) {
            // A small frame goes out of one buffer: copying it costs less than
            // the kernel's walk over a second iovec.
            var frame: [framing.header_size + gather_mod.copy_max]u8 = undefined;
            @memcpy(frame[0..header.len], &header);
            @memcpy(frame[header.len..][0..payload.len], payload);
            var iov = [1]std.posix.iovec_const{.{
                .base = &frame,
                .len = header.len + payload.len,
            }};
            return self.writeFrames(conn, &iov, &.{@intCast(payload.len)}, 0, block);
        }
        var iov = [2]std.posix.iovec_const{
            .{ .base = &header, .len = header.len },
            .{ .base = payload.ptr, .len = payload.len },
        };
        try self.writeFrames(conn, &iov, &.{@intCast(payload.len)}, 0, block);
    }

    /// The address an empty payload with a null pointer is written from.
    const no_bytes: [*]const u8 = "";

    /// Where write_many's payloads are: back to back in one buffer, or each
    /// at its own address.
    pub const Payloads = union(enum) {
        contiguous: []const u8,
        /// A null pointer only for an empty payload (nothing is read there).
        each: []const ?[*]const u8,
    };

    /// write() of every payload in turn (`lens` their sizes), gathered into
    /// few system calls (small frames copied into one buffer, see gather.zig),
    /// blocking until all are written. Every size is checked before anything
    /// is sent.
    pub fn writeMany(self: *Context, fd: i32, payloads: Payloads, lens: []const u32) Error!void {
        var block = self.blocking(false);
        self.writeManyFrames(fd, payloads, lens, &block) catch |err| return self.stopped(
            err,
            "write on fd {d}",
            .{fd},
        );
    }

    fn writeManyFrames(
        self: *Context,
        fd: i32,
        payloads: Payloads,
        lens: []const u32,
        block: *Blocking,
    ) Error!void {
        var largest: usize = 0;
        var total: usize = 0;
        for (lens) |len| {
            largest = @max(largest, len);
            total += len;
        }
        switch (payloads) {
            .contiguous => |data| assert(total == data.len),
            .each => |ptrs| assert(ptrs.len == lens.len),
        }
        const conn = try self.prepareSend(fd, largest);
        // Before anything is sent: out of memory must leave the queue as it was.
        var gather: Gather = .{ .buf = try self.gatherBuffer() };
        self.write_count = 0;
        try self.flushBlocking(conn, block);
        var offset: usize = 0;
        var first: usize = 0; // lens[first..k] are the frames gathered
        for (lens, 0..) |len, k| {
            const base = switch (payloads) {
                .contiguous => |data| data.ptr + offset,
                .each => |ptrs| ptrs[k] orelse no_bytes,
            };
            offset += len;
            if (!gather.fits(len)) {
                try self.writeFrames(conn, gather.parts(), lens[first..k], first, block);
                gather.reset();
                first = k;
            }
            gather.add(base[0..len]);
        }
        if (!gather.isEmpty()) try self.writeFrames(
            conn,
            gather.parts(),
            lens[first..],
            first,
            block,
        );
    }

    /// Write every byte of `parts`, the frames of payload sizes `lens` (the
    /// call's messages from number `first` on), waiting (see blocking.zig)
    /// while the socket is full. When a signal or the timeout stops it, see
    /// keepFramed and write_count.
    fn writeFrames(
        self: *Context,
        conn: *Conn,
        parts_in: []std.posix.iovec_const,
        lens: []const u32,
        first: usize,
        block: *Blocking,
    ) Error!void {
        var parts = parts_in;
        var written: u64 = 0;
        while (parts.len > 0) {
            const mode = block.mode();
            const want = if (mode == .yes and conn.is_socket) totalLen(parts) else 0;
            const waited: Stop!void = switch (sys.writeSome(conn.fd, parts, conn.is_socket, mode)) {
                .done => |n| blk: {
                    parts = skipWritten(parts, n);
                    written += n;
                    // A send that waits in the kernel returns early only
                    // when a signal came (after moving some bytes).
                    if (n < want) break :blk block.interrupted();
                    continue;
                },
                .would_block => block.idle(conn.fd, sys.POLLOUT),
                .interrupted => block.interrupted(),
                .failed => |e| return self.writeFailed(conn, e),
                .eof => unreachable,
            };
            waited catch |stop| {
                const done = progress(lens, written);
                try self.keepFramed(conn, parts, done.rest);
                self.write_count = first + done.begun;
                return stop;
            };
        }
    }

    /// A write stopped (a signal, its timeout) in the middle of a frame: the
    /// `rest` bytes of that frame, the first of `parts`, are queued (no
    /// MESSAGE_TX is reported for them), so they go out before anything else
    /// on the connection. A peer never finds a later frame inside an earlier
    /// one; frames not begun are not sent (README "Signals and timeouts").
    fn keepFramed(
        self: *Context,
        conn: *Conn,
        parts: []const std.posix.iovec_const,
        rest: u64,
    ) Allocator.Error!void {
        if (rest == 0) return;
        try self.markDirty(conn);
        errdefer if (conn.queue.isEmpty()) self.unmarkDirty(conn);
        try conn.queue.pushRemainder(self.gpa, parts, rest);
        self.updateInterest(conn);
    }

    /// How far frames of payload sizes `lens` got when `written` bytes of
    /// them went out: how many were written or begun, and the bytes left
    /// of the one in progress (0 on a frame boundary).
    const Progress = struct { begun: usize, rest: u64 };

    fn progress(lens: []const u32, written: u64) Progress {
        var start: u64 = 0;
        for (lens, 0..) |len, i| {
            const end = start + framing.header_size + len;
            if (written < end) {
                if (written > start) return .{ .begun = i + 1, .rest = end - written };
                return .{ .begun = i, .rest = 0 };
            }
            start = end;
        }
        return .{ .begun = lens.len, .rest = 0 };
    }

    test progress {
        const lens = [_]u32{ 2, 0, 10 }; // frames of 6, 4 and 14 bytes
        try std.testing.expectEqual(Progress{ .begun = 0, .rest = 0 }, progress(&lens, 0));
        try std.testing.expectEqual(Progress{ .begun = 1, .rest = 5 }, progress(&lens, 1));
        try std.testing.expectEqual(Progress{ .begun = 1, .rest = 0 }, progress(&lens, 6));
        try std.testing.expectEqual(Progress{ .begun = 3, .rest = 4 }, progress(&lens, 20));
        try std.testing.expectEqual(Progress{ .begun = 3, .rest = 0 }, progress(&lens, 24));
    }

    /// Write what is queued for conn, waiting as `block` says. A stop leaves
    /// the queue consistent (it knows how far its first frame went).
    fn flushBlocking(self: *Context, conn: *Conn, block: *Blocking) Error!void {
        var sink: TxSink = .{ .ctx = self, .conn = conn };
        defer self.queueChanged(conn);
        while (true) {
            switch (try conn.queue.flush(self.gpa, conn.fd, conn.is_socket, block.mode(), &sink)) {
                .drained => return,
                .would_block => try block.idle(conn.fd, sys.POLLOUT),
                .interrupted => try block.interrupted(),
                .failed => |e| return self.writeFailed(conn, e),
            }
        }
    }

    /// A failed blocking write: a peer that is gone is ConnectionClosed (the
    /// connection stays until the event loop reports its DISCONNECTION).
    fn writeFailed(self: *Context, conn: *Conn, e: sys.E) Error {
        if (e == .PIPE or e == .CONNRESET) {
            conn.write_closed = true;
            return self.closedByPeer(conn.fd);
        }
        return self.last.failErrno(error.Generic, e, "write failed: {s}", .{errors.errText(e)});
    }

    fn totalLen(parts: []const std.posix.iovec_const) usize {
        var n: usize = 0;
        for (parts) |p| n += p.len;
        return n;
    }

    fn skipWritten(parts: []std.posix.iovec_const, written: usize) []std.posix.iovec_const {
        var n = written;
        var rest = parts;
        while (rest.len > 0 and n >= rest[0].len) {
            n -= rest[0].len;
            rest = rest[1..];
        }
        if (rest.len > 0) {
            rest[0].base += n;
            rest[0].len -= n;
        }
        return rest;
    }

    /// Reports each fully written queued frame (MESSAGE_TX or SWITCH_TX).
    const TxSink = struct {
        ctx: *Context,
        conn: *Conn,
        pub fn unpinned(self: *TxSink, token: u64) void {
            self.ctx.unpin(token);
        }
        pub fn completed(
            self: *TxSink,
            origin: @import("send_queue.zig").Origin,
        ) Allocator.Error!void {
            const kind: events_mod.EventType = switch (origin) {
                .scheduled => .message_tx,
                .switched => .switch_tx,
                // The rest of a write() that was stopped; switch_send's
                // bytes, or a frame relayed while switch_events is off.
                .remainder, .silent => return,
            };
            try self.ctx.events.push(self.ctx.gpa, kind, self.conn.fd, self.conn.index);
        }
    };

    /// Event-loop flush: without blocking; a peer that is gone is read to the
    /// end first (nothing it sent is lost), then dropped.
    fn flushConn(self: *Context, conn: *Conn) Allocator.Error!void {
        var sink: TxSink = .{ .ctx = self, .conn = conn };
        const result = try conn.queue.flush(self.gpa, conn.fd, conn.is_socket, .no, &sink);
        switch (result) {
            .drained, .would_block, .interrupted => {
                self.queueChanged(conn);
                if (conn.closing and conn.queue.isEmpty()) return self.drop(conn, null);
            },
            .failed => |e| {
                if (e == .PIPE or e == .CONNRESET) {
                    conn.write_closed = true;
                    self.unmarkDirty(conn); // nothing more to write (see markDirty)
                    // A paused fd is not read: what the peer sent, and its
                    // end, are seen once it is resumed (pause_reading).
                    if (conn.read_paused and !conn.closing and conn.peer == null)
                        return self.updateInterest(conn);
                    // What the peer sent before it went is read to the end
                    // (a closing side's input has nowhere to go): pyipc
                    // frames all at once, with no budget since nothing
                    // follows them (one budget's worth was read, the rest
                    // dropped unsaid); a foreign protocol's by its `in`
                    // callback, which meets the end itself (it was dropped
                    // unread: websocketd's client lost the last message and
                    // the close frame).
                    if (!conn.closing) {
                        if (conn.cb_in == null) {
                            try self.readUpTo(conn, true, std.math.maxInt(usize));
                        } else if (conn.peer != null) {
                            try switching.drainIn(self, conn);
                        }
                    }
                    if (!conn.alive) return;
                    return self.drop(conn, null);
                }
                var buf: [160]u8 = undefined;
                const text = std.fmt.bufPrint(
                    &buf,
                    "write failed: {s}",
                    .{errors.errText(e)},
                ) catch buf[0..];
                return self.drop(conn, text);
            },
        }
    }

    // ------------------------------------------------------------ receiving

    /// Where decoded frames go: MESSAGE_RX events, or (switched fds in the
    /// event loop) forwarding to the peer. Stops when the connection died.
    const RxSink = struct {
        ctx: *Context,
        conn: *Conn,
        forward: bool,
        /// Forwarding, and the connection was switched when the read began.
        switched: bool = false,
        frames: usize = 0,
        /// The chunk of a scratch buffer that an event took in this read.
        shared: ?*events_mod.Chunk = null,
        pub fn frame(self: *RxSink, payload: []const u8) framing.SinkError!void {
            if (!self.conn.alive) return error.Stopped;
            // The switch ended during this read (a callback failed, or
            // switch_end): the rest of it has nowhere to go, and is dropped
            // as the unread rest of the stream is (the fd closes once what
            // was forwarded to it is written), never a MESSAGE_RX on a
            // switched fd. Pure does the same.
            if (self.switched and self.conn.peer == null) return error.Stopped;
            self.frames += 1;
            if (self.forward and self.conn.peer != null) {
                try switching.forward(self.ctx, self.conn, payload);
                if (!self.conn.alive) return error.Stopped;
            } else if (payload.len >= events_mod.chunk_size) {
                // Large enough for a buffer of its own in the event queue
                // (with its NUL, a copy would not fit a chunk): it keeps the
                // one it arrived in instead (see takeScratch).
                try self.takeScratch(payload);
            } else {
                try self.copy(payload);
            }
        }
        /// A large frame that arrived whole in the scratch buffer: its event
        /// takes that buffer instead of a copy of the payload, and so do the
        /// later large frames of the same read (they share its chunk). The
        /// rest of the read is still decoded from it (it stays valid until
        /// the events are consumed); the next read gets another buffer,
        /// usually the spare this one becomes.
        fn takeScratch(self: *RxSink, payload: []const u8) framing.SinkError!void {
            const ctx = self.ctx;
            const conn = self.conn;
            if (self.shared) |ch| if (events_mod.holds(ch.data, payload))
                return ctx.events.pushShared(ctx.gpa, .message_rx, conn.fd, conn.index, ch, payload);
            const scratch = ctx.scratch orelse return self.copy(payload);
            if (!events_mod.holds(scratch, payload)) return self.copy(payload);
            self.shared = try ctx.events.pushOwned(
                ctx.gpa,
                .message_rx,
                conn.fd,
                conn.index,
                scratch,
                payload,
            );
            ctx.scratch = null;
        }
        fn copy(self: *RxSink, payload: []const u8) framing.SinkError!void {
            try self.ctx.events.pushData(
                self.ctx.gpa,
                .message_rx,
                self.conn.fd,
                self.conn.index,
                payload,
            );
        }
        /// A large frame in a buffer of its own (`memory`, the decoder's):
        /// the event takes the buffer, no copy. Forwarded frames are copied
        /// into the peer's queue, and the buffer is kept as the spare.
        pub fn frameOwned(self: *RxSink, memory: []u8, payload: []const u8) framing.SinkError!void {
            const events = &self.ctx.events;
            if (!self.conn.alive or (self.forward and self.conn.peer != null)) {
                defer events.keepSpare(self.ctx.gpa, memory);
                return self.frame(payload);
            }
            self.frames += 1;
            _ = events.pushOwned(
                self.ctx.gpa,
                .message_rx,
                self.conn.fd,
                self.conn.index,
                memory,
                payload,
            ) catch |err| {
                events.keepSpare(self.ctx.gpa, memory);
                return err;
            };
        }
    };

    /// What one read-and-decode step gave.
    const ReadOutcome = union(enum) {
        /// `n` bytes were read and every complete frame in them delivered.
        read: usize,
        /// The same, but fewer bytes than there was room for: the socket had
        /// no more at that moment, so another read now would only say EAGAIN.
        read_short: usize,
        would_block,
        eof,
        failed: sys.E,
        /// The peer announced a frame over max_message_size (decoder.too_large).
        too_large,
        /// The connection was closed while its frames were delivered.
        stopped,
        /// A read that waits was interrupted by a signal; nothing was read.
        interrupted,
    };

    /// Read once, at most `limit` bytes: into the decoder's own buffer while a
    /// large frame is in progress (no copy), else into the scratch buffer;
    /// then decode what came. `waits` applies to sockets (see sys.Wait); other
    /// fds are in non-blocking mode.
    fn readOnce(
        self: *Context,
        conn: *Conn,
        limit: usize,
        waits: sys.Wait,
        sink: *RxSink,
    ) Allocator.Error!ReadOutcome {
        // A large frame in progress takes the spare buffer when it can hold
        // the whole frame: memory already in use (no page faults), no growing.
        if (conn.decoder.wantsBuffer()) |need| {
            if (self.events.takeSpare(need)) |memory| conn.decoder.adopt(self.gpa, memory);
        }
        try conn.decoder.growForRead(self.gpa);
        const direct = conn.decoder.readTarget();
        const space = direct orelse try self.scratchBuffer();
        const target = space[0..@min(space.len, limit)];
        const n = switch (receive(conn, target, waits)) {
            .done => |n| n,
            .would_block => return .would_block,
            .interrupted => return .interrupted,
            .eof => return .eof,
            .failed => |e| return .{ .failed = e },
        };
        if (direct != null) conn.decoder.commitRead(n);
        const input = if (direct != null) target[0..0] else target[0..n];
        conn.decoder.feed(
            self.gpa,
            input,
            self.limits.max_message_size,
            sink,
        ) catch |err| return switch (err) {
            error.OutOfMemory => {
                // Bytes of this read are lost (a frame that could not be
                // queued, the rest of the read): kept, the connection would
                // decode what follows as if nothing were missing. It ends,
                // said if memory allows; the call fails with OutOfMemory.
                self.drop(conn, "out of memory: messages of this connection were lost") catch {};
                return error.OutOfMemory;
            },
            error.Stopped => .stopped,
            error.FrameTooLarge => .too_large,
        };
        if (!conn.alive) return .stopped;
        return if (n < target.len) .{ .read_short = n } else .{ .read = n };
    }

    /// Read conn until it would block (at most read_budget bytes: the
    /// round's fairness), deliver every complete frame; on EOF, a bad frame
    /// or an error, end it.
    pub fn readConn(self: *Context, conn: *Conn, forward: bool) Allocator.Error!void {
        return self.readUpTo(conn, forward, read_budget);
    }

    /// readConn with its own budget of bytes.
    fn readUpTo(self: *Context, conn: *Conn, forward: bool, budget: usize) Allocator.Error!void {
        var sink: RxSink = .{
            .ctx = self,
            .conn = conn,
            .forward = forward,
            .switched = forward and conn.peer != null,
        };
        var total: usize = 0;
        var buf: [160]u8 = undefined;
        while (total < budget) {
            const reason: ?[]const u8 = switch (try self.readOnce(
                conn,
                budget - total,
                .no,
                &sink,
            )) {
                .read => |n| {
                    total += n;
                    continue;
                },
                // Drained: a read that would only say EAGAIN is saved (one
                // system call per ready fd per round); readiness is level-triggered.
                .read_short, .would_block, .stopped, .interrupted => return,
                .eof => if (conn.decoder.hasPartial())
                    "peer closed the connection in the middle of a message"
                else
                    null,
                .failed => |e| std.fmt.bufPrint(
                    &buf,
                    "read failed: {s}",
                    .{errors.errText(e)},
                ) catch &buf,
                .too_large => tooLargeText(
                    &buf,
                    conn.decoder.too_large,
                    self.limits.max_message_size,
                ),
            };
            return self.drop(conn, reason);
        }
    }

    /// read(): the next message of fd not delivered yet, copied into `out`.
    /// First a MESSAGE_RX still pending, then what is buffered, else block.
    /// Messages that came in the same read wait as MESSAGE_RX events.
    /// A message larger than `out` is kept (BufferTooSmall, *len = its size).
    pub fn readFd(self: *Context, fd: i32, out: []u8, len: *usize) Error!void {
        try self.notInCallback("read");
        if (try self.takePending(fd, out, len)) return;
        var block = self.blocking(true);
        try self.receiveSome(fd, &block);
        // The first new message is now fd's first pending MESSAGE_RX.
        const found = try self.takePending(fd, out, len);
        assert(found);
    }

    /// read_into(): readFd, except that a large frame (direct_read_min bytes
    /// or more) that fits `out` is read from one of our own sockets straight
    /// into `out`: no copy through the core, only the kernel's. BufferTooSmall
    /// (*len = its size) when the next message does not fit; it stays queued.
    pub fn readInto(self: *Context, fd: i32, out: []u8, len: *usize) Error!void {
        try self.notInCallback("read");
        if (try self.takePending(fd, out, len)) return;
        const conn = try self.connection(fd);
        var block = self.blocking(true); // one busy_poll for the whole call
        if (out.len >= framing.direct_read_min and conn.role == .connection and conn.is_socket) {
            if (try self.readFrameInto(conn, out, &block)) |n| {
                len.* = n;
                return;
            }
            // The header read may have completed a message (an empty one).
            if (try self.takePending(fd, out, len)) return;
        }
        try self.receiveSome(fd, &block);
        const found = try self.takePending(fd, out, len);
        assert(found);
    }

    /// The next frame of conn read into `out`, when it is large and fits:
    /// its payload size; else null, with the header bytes read given to the
    /// decoder (the caller then reads the usual way). Reads wait as `block`
    /// says; when a signal or the timeout stops them, what was read goes
    /// back to the decoder, so the next read goes on from there.
    fn readFrameInto(self: *Context, conn: *Conn, out: []u8, block: *Blocking) Error!?usize {
        var header: [framing.header_size]u8 = undefined;
        const had = conn.decoder.buffered();
        const have = @min(had.len, header.len);
        @memcpy(header[0..have], had[0..have]);
        if (have < header.len) {
            var filled: usize = 0;
            if (readExactly(conn, header[have..], &filled, block)) |ended| {
                // The decoder still holds `had`: it gets the header bytes read since.
                return self.directEnded(conn, ended, header[have..][0..filled], "");
            }
        }
        const size = std.mem.readInt(u32, &header, .big);
        const fits = size <= out.len and size <= self.limits.max_message_size;
        if (size < framing.direct_read_min or !fits) {
            // Not for this path: the decoder gets the header bytes read here
            // (a frame over the limit is refused by it, as on any read).
            var sink: RxSink = .{ .ctx = self, .conn = conn, .forward = false };
            conn.decoder.feed(
                self.gpa,
                header[have..],
                self.limits.max_message_size,
                &sink,
            ) catch |err| switch (err) {
                error.OutOfMemory => return error.OutOfMemory,
                error.Stopped => unreachable, // the connection is alive: nothing stops
                error.FrameTooLarge => {
                    var buf: [160]u8 = undefined;
                    const text = tooLargeText(
                        &buf,
                        conn.decoder.too_large,
                        self.limits.max_message_size,
                    );
                    try self.drop(conn, null);
                    self.reapDead();
                    return self.last.failText(error.MessageTooLarge, text);
                },
            };
            return null;
        }
        const payload = out[0..size];
        // Payload bytes the decoder had (none when it had less than a header).
        const got = had[have..];
        @memcpy(payload[0..got.len], got);
        conn.decoder.discard(self.gpa);
        var filled: usize = 0;
        if (readExactly(conn, payload[got.len..], &filled, block)) |ended| {
            // The decoder was emptied: it gets the whole frame read so far.
            return self.directEnded(conn, ended, &header, payload[0 .. got.len + filled]);
        }
        return size;
    }

    /// How a direct read ended: the connection, or the call (a signal, the timeout).
    const Ended = union(enum) { eof, failed: sys.E, stop: Stop };

    /// Reads until `dest` is full (`filled.*` counts the bytes read, also
    /// when it stops early), waiting as `block` says; null when it is full,
    /// else why it ended.
    fn readExactly(conn: *Conn, dest: []u8, filled: *usize, block: *Blocking) ?Ended {
        while (filled.* < dest.len) {
            switch (receive(conn, dest[filled.*..], block.mode())) {
                .done => |n| filled.* += n,
                .would_block => block.idle(
                    conn.fd,
                    sys.POLLIN,
                ) catch |stop| return .{ .stop = stop },
                .interrupted => block.interrupted() catch |stop| return .{ .stop = stop },
                .eof => return .eof,
                .failed => |e| return .{ .failed = e },
            }
        }
        return null;
    }

    /// A direct read ended early. A stop gives the bytes read back to the
    /// decoder (`first`, then `second`: they continue what it holds) and
    /// fails the call, the connection intact; the end of the connection is
    /// reported as receiveSome does.
    fn directEnded(
        self: *Context,
        conn: *Conn,
        ended: Ended,
        first: []const u8,
        second: []const u8,
    ) Error {
        const stop = switch (ended) {
            .stop => |stop| stop,
            else => return self.directFailed(conn, ended),
        };
        var sink: RxSink = .{ .ctx = self, .conn = conn, .forward = false };
        for ([_][]const u8{ first, second }) |part| {
            // Less than one whole frame: nothing is delivered, nothing too large
            // (the header was checked before the payload was read).
            conn.decoder.feed(
                self.gpa,
                part,
                self.limits.max_message_size,
                &sink,
            ) catch |err| switch (err) {
                error.OutOfMemory => return error.OutOfMemory,
                error.Stopped, error.FrameTooLarge => unreachable,
            };
        }
        assert(sink.frames == 0);
        return self.stopped(stop, "read on fd {d}", .{conn.fd});
    }

    /// One read of conn: recv on a socket, waiting or not (see sys.Wait);
    /// read on anything else (in non-blocking mode: it never waits).
    fn receive(conn: *const Conn, buf: []u8, waits: sys.Wait) sys.IoResult {
        return if (conn.is_socket) sys.recvSome(
            conn.fd,
            buf,
            waits,
        ) else sys.readSome(conn.fd, buf);
    }

    /// A direct read ended the connection: reported as receiveSome does.
    fn directFailed(self: *Context, conn: *Conn, ended: Ended) Error {
        const fd = conn.fd;
        defer self.reapDead();
        switch (ended) {
            .stop => unreachable, // directEnded
            .eof => {
                try self.drop(conn, null);
                return self.closedByPeer(fd);
            },
            .failed => |e| {
                var buf: [160]u8 = undefined;
                const text = std.fmt.bufPrint(
                    &buf,
                    "read failed: {s}",
                    .{errors.errText(e)},
                ) catch &buf;
                try self.drop(conn, text);
                return self.last.failTextErrno(error.Generic, e, text);
            },
        }
    }

    /// read_many(): fd's next messages, at least one (blocking for it as
    /// readFd does), at most `max`: pending MESSAGE_RX of fd up to its
    /// DISCONNECTION, in order, as long as `taker.put(payload)` accepts them
    /// (it copies each). Returns how many; 0 when the first was refused.
    pub fn readMany(self: *Context, fd: i32, max: usize, taker: anytype) Error!usize {
        try self.notInCallback("read");
        if (max == 0) return self.last.fail(
            error.Generic,
            "read_many needs room for at least one message",
            .{},
        );
        var got = self.events.takeFd(self.gpa, fd, max, taker);
        if (got.closed) return self.endedError(fd);
        if (got.count > 0 or got.refused) return got.count;
        var block = self.blocking(true);
        try self.receiveSome(fd, &block);
        got = self.events.takeFd(self.gpa, fd, max, taker);
        return got.count;
    }

    /// read() without a copy: fd's next message (blocking for it as readFd
    /// does), lent until the next wait or readLent call.
    pub fn readLent(self: *Context, fd: i32) Error![]const u8 {
        try self.notInCallback("read");
        self.events.releaseLent(self.gpa);
        var next = try self.events.lendNext(self.gpa, fd);
        if (next == .none) {
            var block = self.blocking(true);
            try self.receiveSome(fd, &block);
            next = try self.events.lendNext(self.gpa, fd);
        }
        return switch (next) {
            .message => |payload| payload,
            .closed => self.endedError(fd),
            .none => unreachable, // receiveSome returns with a message of fd pending
        };
    }

    /// Block until fd has delivered at least one new MESSAGE_RX: read and
    /// decode; EOF, a read error or a frame over the limit end fd (and fail,
    /// unless messages before a bad header were delivered).
    /// A signal or the call's timeout (`block`) ends the wait with nothing
    /// consumed: bytes read so far stay in fd's decoder.
    fn receiveSome(self: *Context, fd: i32, block: *Blocking) Error!void {
        const conn = try self.connection(fd);
        defer self.reapDead();
        var sink: RxSink = .{ .ctx = self, .conn = conn, .forward = false };
        var buf: [160]u8 = undefined;
        const outcome = self.readUntilMessage(conn, &sink, block) catch |err| switch (err) {
            error.OutOfMemory => return error.OutOfMemory,
            error.Interrupted, error.Timeout => |stop| return self.stopped(
                stop,
                "read on fd {d}",
                .{fd},
            ),
        };
        switch (outcome) {
            .read, .read_short, .would_block, .interrupted => {},
            .stopped => unreachable, // only the event loop closes while delivering
            .eof => {
                try self.drop(conn, null);
                return self.closedByPeer(fd);
            },
            .failed => |e| {
                const text = std.fmt.bufPrint(
                    &buf,
                    "read failed: {s}",
                    .{errors.errText(e)},
                ) catch &buf;
                try self.drop(conn, text);
                return self.last.failTextErrno(error.Generic, e, text);
            },
            .too_large => {
                const text = tooLargeText(
                    &buf,
                    conn.decoder.too_large,
                    self.limits.max_message_size,
                );
                if (sink.frames == 0) {
                    try self.drop(conn, null);
                    return self.last.failText(error.MessageTooLarge, text);
                }
                // The messages before the bad header are delivered first.
                try self.drop(conn, text);
            },
        }
    }

    /// Read conn until a message is delivered (.read) or the connection
    /// ends (.eof, .failed, .too_large). On our own (blocking-mode) sockets
    /// the read waits in the kernel, which wakes it itself: on the development
    /// VM about 18 us quicker per wait than poll() then read()
    /// (bench/c/wait_modes.c). Anything else is polled when it has nothing.
    /// With busy_poll, reads that do not wait come first, for busy_poll_us;
    /// with a timeout, poll() waits (see blocking.zig).
    fn readUntilMessage(
        self: *Context,
        conn: *Conn,
        sink: *RxSink,
        block: *Blocking,
    ) (Allocator.Error || Stop)!ReadOutcome {
        while (sink.frames == 0) {
            switch (try self.readOnce(conn, std.math.maxInt(usize), block.mode(), sink)) {
                .read, .read_short => {},
                .would_block => try block.idle(conn.fd, sys.POLLIN),
                .interrupted => try block.interrupted(),
                else => |end| return end,
            }
        }
        return .{ .read = 0 };
    }

    /// When a busy_poll starting now ends.
    fn spinEndNs(self: *const Context) i64 {
        return sys.nowNs() + @as(i64, self.busy_poll_us) * std.time.ns_per_us;
    }

    /// Take fd's first pending MESSAGE_RX, if any, into `out`. Its
    /// DISCONNECTION coming first means the peer is gone.
    fn takePending(self: *Context, fd: i32, out: []u8, len: *usize) Error!bool {
        var it = self.events.iterFd(fd);
        while (it.next()) |ev| {
            switch (ev.kind) {
                .message_rx => {
                    if (ev.data.len > out.len) {
                        len.* = ev.data.len;
                        return self.tooSmall(out.len, ev.data.len);
                    }
                    @memcpy(out[0..ev.data.len], ev.data);
                    len.* = ev.data.len;
                    self.events.drop(self.gpa, ev);
                    return true;
                },
                .disconnection => return self.endedError(fd),
                else => {},
            }
        }
        return false;
    }

    // ------------------------------------------------------------ handing events out

    /// Start of every wait call: what the previous one handed out by pointer
    /// may now be reused; then wait (see wait).
    pub fn beginWait(self: *Context, stop_on_wakeup: bool) Error!void {
        try self.notInCallback("wait");
        self.events.releaseLent(self.gpa);
        try self.wait(stop_on_wakeup);
        // Something happened: the timer counts from now.
        if (self.events.live > 0) self.timer_base_ns = sys.nowNs();
    }

    /// How many events are pending.
    pub fn pendingEvents(self: *const Context) usize {
        return self.events.live;
    }

    /// The first pending event, if any (valid until the next change of the queue).
    pub fn firstEvent(self: *Context) ?*const events_mod.Event {
        return self.events.peek();
    }

    /// Take the first pending event out of the queue, its payload lent
    /// (valid until the next wait call: ipc_wait_events) or not (the caller
    /// copied it).
    pub fn popEvent(self: *Context, lend: bool) Allocator.Error!void {
        return self.events.pop(self.gpa, lend);
    }

    /// libIPC's one-event read (ipc_wait_event): the first event's payload,
    /// or for ERROR its text, copied into `out`, and a NUL after a text
    /// when there is room; the event is taken out of the queue. When `out`
    /// is too small, BufferTooSmall with `len.*` the size needed, and the
    /// event stays first. Call after beginWait.
    pub fn takeEventInto(self: *Context, out: []u8, len: *usize) Error!void {
        const ev = self.events.peek().?;
        const data: []const u8 = switch (ev.kind) {
            .message_rx, .switch_rx, .err => ev.data,
            else => "",
        };
        len.* = data.len;
        if (data.len > out.len) return self.tooSmall(out.len, data.len);
        @memcpy(out[0..data.len], data);
        // An error text is a C string when there is room for its NUL.
        if (ev.kind == .err and out.len > data.len) out[data.len] = 0;
        self.events.pop(self.gpa, false) catch unreachable; // no lending: cannot fail
    }

    /// BufferTooSmall, with the text both backends give.
    pub fn tooSmall(self: *Context, have: usize, need: usize) Error {
        return self.last.fail(
            error.BufferTooSmall,
            "buffer of {d} bytes is too small for a message of {d} bytes",
            .{ have, need },
        );
    }

    /// Make a wait in progress in another thread return (ipc_wakeup).
    pub fn wakeUp(self: *const Context) void {
        self.wakeup.signal();
    }

    // ------------------------------------------------------------ the event loop

    /// Make sure at least one event is pending: return at once if one is,
    /// else run rounds until one produces an event or the timer expires.
    /// With `stop_on_wakeup`, also return (with no event) when another thread
    /// called ipc_wakeup during the wait.
    pub fn wait(self: *Context, stop_on_wakeup: bool) Error!void {
        if (self.events.live > 0) return;
        self.releaseEnded();
        // A wake-up that came during an earlier wait already ended that one.
        self.woken = false;
        if (self.table.count() == 0 and self.timer_ms < 0) {
            // A zero-timeout call (a loop driven by ipc_context_fd) cannot
            // hang: nothing is ready, as with fds of which none is.
            if (self.call_timeout_ns == 0) return self.last.fail(error.Timeout, "wait timed out", .{});
            return self.last.fail(error.Generic, "nothing to wait for: no fd and no timer", .{});
        }
        // In nanoseconds, and the poll's timeout rounded up: a TIMER never
        // comes before `timer_ms` have passed: since this call began, or for
        // a zero-timeout call (a loop driven by ipc_context_fd), since the
        // timer last started counting.
        const deadline: ?i64 = if (self.timer_ms >= 0)
            self.timerDueNs(if (self.call_timeout_ns == 0) self.timer_base_ns else sys.nowNs())
        else
            null;
        // The call timeout (a failure, where the timer is an event).
        const block = self.blocking(false);
        const skip_spin = self.skip_spin;
        self.skip_spin = false;
        if (self.busy_poll_us > 0 and !skip_spin) {
            if (try self.spinRounds(earliest(deadline, block.deadline_ns), stop_on_wakeup)) return;
            // A signal during the spin found no system call to interrupt:
            // its handler runs before this call sleeps (blocking.zig).
            if (self.interruptible) {
                self.skip_spin = true;
                return self.last.fail(error.Interrupted, "wait was interrupted by a signal", .{});
            }
        }
        while (true) {
            // Again each round: a callback may have called close_all (the
            // poll would then wait for nothing, for ever without a timeout).
            if (self.table.count() == 0 and self.timer_ms < 0)
                return self.last.fail(error.Generic, "nothing to wait for: no fd and no timer", .{});
            const until = earliest(deadline, block.deadline_ns);
            const timeout: i32 = if (until) |d| msUntil(d) else -1;
            try self.round(timeout);
            if (self.events.live > 0) return;
            if (self.woken) {
                self.woken = false;
                if (stop_on_wakeup) return;
            }
            // Both due (the poll waits whole milliseconds): the one due
            // first is what this wait says, as the pure backend does.
            if (deadline) |d| if (sys.nowNs() >= d and !endsBefore(block.deadline_ns, d)) {
                try self.events.push(self.gpa, .timer, -1, -1);
                return;
            };
            if (block.expired()) return self.last.fail(error.Timeout, "wait timed out", .{});
        }
    }

    /// Whether a call's deadline comes before the timer is due.
    fn endsBefore(call_deadline: ?i64, timer_due: i64) bool {
        const ends = call_deadline orelse return false;
        return ends < timer_due;
    }

    fn earliest(a: ?i64, b: ?i64) ?i64 {
        const x = a orelse return b;
        const y = b orelse return a;
        return @min(x, y);
    }

    /// busy_poll: rounds that do not block, for busy_poll_us at most (less
    /// when the timer's deadline comes first). True when the wait is over: an
    /// event came, or (with `stop_on_wakeup`) a wake-up. Why spin: waking a
    /// process asleep in a readiness wait takes an inter-processor interrupt,
    /// slow on the development VM; a round trip to a spinning event loop was
    /// several times quicker there (README, busy_poll and Benchmarks).
    fn spinRounds(self: *Context, deadline_ns: ?i64, stop_on_wakeup: bool) Error!bool {
        const end_ns = self.spinEndNs();
        while (true) {
            try self.round(0);
            if (self.events.live > 0) return true;
            if (self.woken) {
                self.woken = false;
                if (stop_on_wakeup) return true;
            }
            // Gives the CPU to a process on the same one (the peer, often):
            // without it, a spin there kept the peer waiting for the whole
            // busy_poll (a one-CPU round trip took 129 us instead of 31).
            std.Thread.yield() catch {};
            const now_ns = sys.nowNs();
            if (now_ns >= end_ns) return false;
            if (deadline_ns) |d| if (now_ns >= d) return false;
        }
    }

    const msUntil = blocking_mod.msUntil;

    /// One round: (1) flush every queue without blocking; (2) wait for
    /// readiness (not at all if step 1 produced events); (3) handle every ready fd.
    fn round(self: *Context, timeout_ms: i32) Error!void {
        defer self.reapDead();
        self.switch_state.round +%= 1;
        try self.flushDirty();
        // Not waiting either when an `in` callback asked for MORE (switching.zig).
        const busy = self.events.live > 0 or switching.moreReady(self);
        try self.pollAndHandle(if (busy) 0 else timeout_ms);
        try self.checkDeinit();
        try switching.runMore(self);
        try self.checkDeinit();
    }

    /// Steps 2 and 3 of a round. A signal that ends the wait ends an
    /// interruptible context's call (Interrupted); else it is an empty round.
    fn pollAndHandle(self: *Context, timeout_ms: i32) Error!void {
        const n = self.poller.wait(&self.ready, timeout_ms) catch |err| switch (err) {
            error.Interrupted => if (self.interruptible)
                return self.last.fail(error.Interrupted, "wait was interrupted by a signal", .{})
            else
                return,
            else => return self.last.failErrno(
                error.Generic,
                c.errno(@as(c_int, -1)),
                "waiting for events failed: {s}",
                .{errors.errText(c.errno(@as(c_int, -1)))},
            ),
        };
        for (self.ready[0..n]) |r| try self.handleReady(r);
    }

    // ------------------------------------------------------------ linger

    /// close()'s linger: send what is scheduled for fd (for every fd when fd
    /// is negative) for at most `timeout_ns`. Returns when nothing is left;
    /// Timeout when time ran out first; Interrupted on a signal (interruptible).
    /// The rounds also read and accept: those events wait as usual. Inside a
    /// switch callback it only writes (lingerWriting): rounds there read
    /// other connections into the scratch buffer the loop that called the
    /// callback is still decoding (forwarded frames were replaced by another
    /// client's bytes), ran other fds' callbacks into switch_buf, and
    /// overwrote `ready` under that loop.
    pub fn linger(self: *Context, fd: i32, timeout_ns: i64) Error!void {
        if (fd >= 0) _ = try self.lookup(fd); // an unknown fd is said, as close() says it
        if (self.callback_depth > 0) return self.lingerWriting(fd, timeout_ns);
        self.linger_depth += 1;
        defer {
            self.linger_depth -= 1;
            if (self.linger_depth == 0) self.unmuteAll();
        }
        const deadline = sys.nowNs() +| @max(timeout_ns, 0);
        while (self.hasScheduled(fd)) {
            defer self.reapDead();
            // One attempt before the deadline is looked at: linger(fd, 0)
            // sends what the socket takes now, as every zero-timeout call.
            try self.flushDirty();
            if (!self.hasScheduled(fd)) return;
            if (sys.nowNs() >= deadline) return self.last.fail(
                error.Timeout,
                "linger timed out",
                .{},
            );
            // Waits even with events pending (a round would not): only the
            // queues' room or the deadline ends it.
            try self.pollAndHandle(msUntil(deadline));
            try self.checkDeinit();
        }
    }

    /// linger inside a switch callback: the lingering queues are written,
    /// with poll(2) for room on their fds only; nothing is read or accepted
    /// and no other callback runs. A queue whose write fails is left as it
    /// is, for the loop's next flush (flushConn: its EPIPE path reads the
    /// peer's last input, which cannot happen here): the linger no longer
    /// waits for it.
    fn lingerWriting(self: *Context, fd: i32, timeout_ns: i64) Error!void {
        const gpa = self.gpa;
        const deadline = sys.nowNs() +| @max(timeout_ns, 0);
        // Records live until the callback returned (reapDead): the pointers
        // stay valid, alive or not.
        var left: std.ArrayList(*Conn) = .empty;
        defer left.deinit(gpa);
        if (fd >= 0) {
            const conn = try self.lookup(fd);
            try left.append(gpa, conn);
            if (conn.peer) |p| try left.append(gpa, p);
        } else {
            try left.appendSlice(gpa, self.dirty.items);
        }
        var pfds: std.ArrayList(c.pollfd) = .empty;
        defer pfds.deinit(gpa);
        while (true) {
            // One attempt each; those sent, ended or failed leave the list.
            var i: usize = 0;
            while (i < left.items.len) {
                const conn = left.items[i];
                if (conn.alive and !conn.write_closed and !conn.queue.isEmpty()) {
                    var sink: TxSink = .{ .ctx = self, .conn = conn };
                    const result = try conn.queue.flush(gpa, conn.fd, conn.is_socket, .no, &sink);
                    if (result != .failed) {
                        self.queueChanged(conn);
                        if (conn.closing and conn.queue.isEmpty()) try self.drop(conn, null);
                        if (conn.alive and !conn.queue.isEmpty()) {
                            i += 1;
                            continue;
                        }
                    }
                }
                _ = left.swapRemove(i);
            }
            if (left.items.len == 0) return;
            if (sys.nowNs() >= deadline) return self.last.fail(
                error.Timeout,
                "linger timed out",
                .{},
            );
            pfds.clearRetainingCapacity();
            for (left.items) |conn|
                try pfds.append(gpa, .{ .fd = conn.fd, .events = sys.POLLOUT, .revents = 0 });
            const rc = c.poll(pfds.items.ptr, @intCast(pfds.items.len), msUntil(deadline));
            if (rc < 0 and sys.errno(rc) == .INTR and self.interruptible)
                return self.last.fail(error.Interrupted, "wait was interrupted by a signal", .{});
        }
    }

    /// Stop watching an external fd for input until the lingers end (Conn.muted).
    fn mute(self: *Context, conn: *Conn) Allocator.Error!void {
        if (conn.muted) return;
        try self.muted.append(self.gpa, conn.fd);
        conn.muted = true;
        self.updateInterest(conn);
    }

    /// The last linger ended: its muted fds are watched again (those still
    /// open and external: a number may have been closed and reused meanwhile).
    fn unmuteAll(self: *Context) void {
        for (self.muted.items) |fd| {
            const conn = self.table.get(fd) orelse continue;
            if (!conn.muted) continue;
            conn.muted = false;
            self.updateInterest(conn);
        }
        self.muted.clearRetainingCapacity();
    }

    fn hasScheduled(self: *Context, fd: i32) bool {
        if (fd < 0) return self.dirty.items.len > 0;
        const conn = self.table.get(fd) orelse return false;
        // A queue whose write failed (EPIPE) is never sent: nothing to wait for.
        if (!conn.queue.isEmpty() and !conn.write_closed) return true;
        const peer = conn.peer orelse return false;
        return !peer.queue.isEmpty() and !peer.write_closed;
    }

    /// The fds with scheduled messages still queued, and how many each has
    /// (close_all's warnings): up to out_fds.len of them; returns how many
    /// there are in all.
    pub fn scheduledFds(self: *Context, out_fds: []i32, out_counts: []usize) usize {
        assert(out_fds.len == out_counts.len);
        var n: usize = 0;
        for (self.dirty.items) |conn| {
            if (conn.queue.isEmpty()) continue;
            if (n < out_fds.len) {
                out_fds[n] = conn.fd;
                out_counts[n] = conn.queue.frameCount();
            }
            n += 1;
        }
        return n;
    }

    fn flushDirty(self: *Context) Allocator.Error!void {
        // Downwards: a flush that ends a connection swap-removes it, which
        // only moves an entry already visited into the current position.
        var i = self.dirty.items.len;
        while (i > 0) {
            i -= 1;
            if (i >= self.dirty.items.len) continue;
            try self.flushConn(self.dirty.items[i]);
        }
    }

    fn handleReady(self: *Context, r: poller_mod.Ready) Allocator.Error!void {
        if (r.fd == self.wakeup.read_fd) {
            self.wakeup.drain();
            self.woken = true;
            return;
        }
        // The fd may have been closed earlier in this round.
        const conn = self.table.get(r.fd) orelse return;
        if (conn.role == .service) {
            if (r.readable) try self.acceptAll(conn);
            return;
        }
        // Only written now (a hang-up shows as readable: the flush sees it).
        if (conn.closing) return self.flushConn(conn);
        if (conn.peer != null) {
            if (r.readable) try switching.switchIn(self, conn);
        } else if (conn.role == .external) {
            if (!r.readable) return;
            try self.events.push(self.gpa, .external, conn.fd, conn.index);
            if (self.linger_depth > 0) try self.mute(conn);
            return;
        } else if (r.readable) {
            // A hang-up shows as readable while a write is queued: a paused
            // fd is not read, the flush meets the hang-up (flushConn).
            if (conn.read_paused) return self.flushConn(conn);
            try self.readConn(conn, true);
        }
        if (conn.alive and r.writable) try self.flushConn(conn);
    }

    /// Accept every pending client: CONNECTION each; past max_connections the
    /// client is closed at once and the service gets an ERROR.
    fn acceptAll(self: *Context, service: *Conn) Allocator.Error!void {
        while (true) {
            const fd = sys.accept(service.fd);
            if (fd < 0) {
                switch (c.errno(fd)) {
                    .INTR => continue,
                    .AGAIN => return,
                    else => |e| {
                        var buf: [160]u8 = undefined;
                        const text = std.fmt.bufPrint(
                            &buf,
                            "accept failed: {s}",
                            .{errors.errText(e)},
                        ) catch buf[0..];
                        // Out of fds: a waiting client is refused, so the round does
                        // not spin on it; with no client waiting there is nothing to say.
                        if (e == .MFILE or e == .NFILE) switch (self.refuseWithSpare(service.fd)) {
                            .none_waiting => return,
                            .refused => {
                                try self.events.pushData(
                                    self.gpa,
                                    .err,
                                    service.fd,
                                    service.index,
                                    text,
                                );
                                continue;
                            },
                            .no_spare => {},
                        };
                        return self.events.pushData(
                            self.gpa,
                            .err,
                            service.fd,
                            service.index,
                            text,
                        );
                    },
                }
            }
            if (self.table.count() >= self.limits.max_connections) {
                sys.closeFd(fd);
                var buf: [96]u8 = undefined;
                const text = std.fmt.bufPrint(
                    &buf,
                    "connection refused: max_connections ({d}) reached",
                    .{self.limits.max_connections},
                ) catch unreachable;
                try self.events.pushData(self.gpa, .err, service.fd, service.index, text);
                continue;
            }
            const conn = self.addConn(fd, .connection) catch |err| {
                sys.closeFd(fd);
                if (err == error.OutOfMemory) return error.OutOfMemory;
                // The poller refused it (epoll's max_user_watches): that
                // client is closed and the service told why, as past
                // max_connections; the wait itself did not fail.
                try self.events.pushData(
                    self.gpa,
                    .err,
                    service.fd,
                    service.index,
                    self.last.text(),
                );
                continue;
            };
            try self.events.push(self.gpa, .connection, conn.fd, conn.index);
        }
    }

    /// Out of fds with a client waiting: accept() fails at once every round
    /// (level-triggered readiness), a busy loop. Free the spare fd, accept the
    /// client with it and close it (the client sees EOF), then take the spare
    /// again.
    fn refuseWithSpare(self: *Context, listen_fd: i32) Refused {
        if (self.spare_fd < 0) return .no_spare;
        sys.closeFd(self.spare_fd);
        const fd = sys.accept(listen_fd);
        sys.closeFd(fd);
        self.spare_fd = openSpare();
        return if (fd >= 0) .refused else .none_waiting;
    }

    const Refused = enum { refused, none_waiting, no_spare };

    fn openSpare() i32 {
        return c.open("/dev/null", .{ .ACCMODE = .RDONLY, .CLOEXEC = true });
    }
    // ------------------------------------------------------------ batched scheduling
    // Issue 21: the Python binding keeps small scheduled messages and hands
    // them over in one call when its loop next enters the core; it learns
    // beforehand, from scheduleRoom, what schedule() would refuse.

    /// schedule() of `lens.len` messages in order, the i-th to fds[i], their
    /// payloads back to back in `payloads`. Stops at the first failure;
    /// `done.*` is how many were queued (all of them on success).
    pub fn scheduleMany(
        self: *Context,
        fds: []const i32,
        payloads: []const u8,
        lens: []const u32,
        done: *usize,
    ) Error!void {
        assert(fds.len == lens.len);
        done.* = 0;
        var at: usize = 0;
        for (fds, lens) |fd, len| {
            try self.schedule(fd, payloads[at..][0..len]);
            at += len;
            done.* += 1;
        }
    }

    /// schedule()'s checks of fd and of a `len`-byte payload, in its order,
    /// but the queue bound: what schedule() would fail with. Returns the
    /// bytes (frame headers included) fd's queue takes before it is full.
    pub fn scheduleRoom(self: *Context, fd: i32, len: u64) Error!u64 {
        const conn = try self.prepareSend(fd, len);
        return self.limits.max_queue_size -| conn.queue.queuedBytes();
    }
};

test {
    _ = @import("context_test.zig");
}
