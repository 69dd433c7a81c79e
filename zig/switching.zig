//! Switching: two fds forwarding to each other (libIPC's mechanism for the
//! network daemons), all of it: the callback types and results of the C ABI,
//! pairing fds (ipc_add_switch, ipc_set_switch_callbacks), reading a switched
//! fd, and forwarding what it gave to its peer.
//!
//! By default each side is read with pyipc framing and each payload is framed
//! and queued for the other side. Custom callbacks (libIPC's semantics, per
//! fd) replace either half:
//!   in(fd, buf, &mlen):  reads one unit from fd; on entry *mlen is the
//!                        buffer's capacity (max_message_size); on NO_ERROR it
//!                        holds the payload length.
//!   out(fd, payload, n): writes one payload to fd in its own protocol.
//! Results: NO_ERROR, ERROR (ERROR event, both sides closed), FD_CLOSING (both
//! closed), IGNORE (the unit is dropped). Back-pressure: a side is not read
//! while its peer's queue is over max_queue_size (see Context.updateInterest).
//!
//! pyipc's extension (for protocol daemons: WebSocket, TLS):
//!   MORE (from `in`): the payload is forwarded and `in` is called again
//!     without waiting for readiness (it holds input already read), at most
//!     max_more_per_round times a round; the rest in the next rounds.
//!   send(): raw bytes queued for a switched fd, in order with its other output.
//!   end(): stop reading both sides, write what is queued for each, close each.
//!   State.events: SWITCH_RX/SWITCH_TX reported or not (ipc_context_switch_events).

const std = @import("std");
const Allocator = std.mem.Allocator;
const context = @import("context.zig");
const sys = @import("sys.zig");
const Context = context.Context;
const Conn = context.Conn;
const Error = context.Error;

/// enum cb_event_types of libipc.h (abi_test.zig checks the numbers).
pub const CbResult = enum(c_int) {
    no_error = 0,
    err = 1,
    fd_closing = 2,
    ignore = 3,
    /// pyipc's: forwarded as no_error, and `in` is called again (see above).
    more = 4,
    _,
};

/// Calls of one fd's `in` callback per round at most while it returns MORE
/// (pyipc.MAX_MORE_PER_ROUND): one fd's buffered input cannot starve the others.
pub const max_more_per_round = 64;
/// drainIn's bound on `in` calls (a callback that says NO_ERROR for ever
/// without reading must not hold the loop).
pub const max_drain_calls = 1 << 16;

/// Longest reason end() takes, in bytes (pyipc.MAX_SWITCH_END_REASON).
pub const max_end_reason = 1024;

/// The extension's part of a context (Context.switch_state).
pub const State = struct {
    /// SWITCH_RX and SWITCH_TX are reported (ipc_context_switch_events).
    events: bool = true,
    /// Fds whose `in` callback returned MORE and is due again (their
    /// Conn.more_pending is set). An fd that ended stays until runMore or
    /// moreReady finds it gone.
    more: std.AutoArrayHashMapUnmanaged(i32, void) = .empty,
    /// The current round's number (Context.round): an fd's `in` runs one
    /// batch of at most max_more_per_round calls a round.
    round: u64 = 0,
    /// The fd whose `out` callback is running (-1: none): its send() is
    /// part of forwarding, bounded by back-pressure, never refused.
    out_fd: i32 = -1,

    pub fn deinit(self: *State, gpa: Allocator) void {
        self.more.deinit(gpa);
    }
};

/// The `in` callback of libipc.h's ipc_set_switch_callbacks.
pub const InCallback = *const fn (orig: c_int, payload: [*]u8, mlen: *u32) callconv(.c) c_int;
/// The `out` callback of libipc.h's ipc_set_switch_callbacks.
pub const OutCallback = *const fn (
    dest: c_int,
    payload: [*]const u8,
    mlen: u32,
) callconv(.c) c_int;

// ------------------------------------------------------------ the API

/// Pair fd1 and fd2: what one gives is forwarded to the other.
pub fn add(ctx: *Context, fd1: i32, fd2: i32) Error!void {
    if (fd1 == fd2) return ctx.last.fail(error.Generic, "cannot switch fd {d} with itself", .{fd1});
    const c1 = try switchable(ctx, fd1);
    const c2 = try switchable(ctx, fd2);
    for ([_]*Conn{ c1, c2 }) |x| {
        // A side whose switch ended and still writes what is queued for it
        // (closing), or whose write failed: its end would close the new
        // partner (drop closes the peer), as switch_send refuses it.
        if (x.closing or x.write_closed) return ctx.closedByPeer(x.fd);
        if (x.peer != null)
            return ctx.last.fail(error.Generic, "fd {d} is already switched", .{x.fd});
    }
    c1.peer = c2;
    c2.peer = c1;
    for ([_]*Conn{ c1, c2 }) |x| {
        // Foreign fds are read and written without waiting; our own
        // sockets stay in blocking mode (the loop passes MSG_DONTWAIT).
        if (x.role != .connection) _ = sys.setNonblocking(x.fd, true);
        ctx.updateInterest(x);
    }
}

/// Set (or clear, with null) fd's custom callbacks.
pub fn setCallbacks(ctx: *Context, fd: i32, in: ?InCallback, out: ?OutCallback) Error!void {
    const conn = try switchable(ctx, fd);
    conn.cb_in = in;
    conn.cb_out = out;
}

fn switchable(ctx: *Context, fd: i32) Error!*Conn {
    const conn = try ctx.lookup(fd);
    if (conn.role == .service)
        return ctx.last.fail(error.UnknownFd, "fd {d} is not a connection", .{fd});
    return conn;
}

// ------------------------------------------------------------ the event loop's side

/// A switched fd is readable (or its `in` asked for MORE): read it with its
/// `in` callback, at most max_more_per_round calls, or with pyipc framing
/// (every complete frame forwarded).
pub fn switchIn(ctx: *Context, conn: *Conn) Allocator.Error!void {
    if (conn.cb_in == null) return ctx.readConn(conn, true);
    conn.more_round = ctx.switch_state.round;
    var result: CbResult = .ignore;
    for (0..max_more_per_round) |_| {
        // Read again each time: a call may have unregistered or replaced
        // its callback (whose state its owner may then free).
        const cb = conn.cb_in orelse break;
        result = try callIn(ctx, conn, cb);
        if (result != .more or !mayRead(ctx, conn)) break;
    }
    // MORE after the bound, or paused by back-pressure: called again later.
    if (result == .more and stillSwitched(conn))
        try wantMore(ctx, conn)
    else
        unwantMore(ctx, conn);
}

/// A write to conn failed (the other end is gone): its `in` callback reads
/// what is left and meets the end itself, since a foreign protocol's end may
/// call for words of its own (websocketd's close frame), before conn is
/// dropped. Called while it hands out messages, max_drain_calls at most.
pub fn drainIn(ctx: *Context, conn: *Conn) Allocator.Error!void {
    // Not inside itself (its callback may close or linger, which flushes).
    if (conn.cb_in == null or conn.draining) return;
    conn.draining = true;
    defer conn.draining = false;
    for (0..max_drain_calls) |_| {
        if (!stillSwitched(conn)) return;
        // The callback of now: a call may have replaced it (see switchIn).
        if (!isForwarded(try callIn(ctx, conn, conn.cb_in.?))) return;
    }
}

/// One `in` call and what its result does; the result, or IGNORE when the
/// call ended the switch itself (what it gave has nowhere to go).
fn callIn(ctx: *Context, conn: *Conn, cb: InCallback) Allocator.Error!CbResult {
    ctx.callback_depth += 1;
    defer ctx.callback_depth -= 1;
    const buf = try buffer(ctx);
    var mlen: u32 = @intCast(buf.len);
    var result: CbResult = @fromBackingInt(@intCast(cb(conn.fd, buf.ptr, &mlen)));
    // A length past the buffer is a broken callback: never trust it.
    if (isForwarded(result) and mlen > buf.len) result = .err;
    // The callback may have closed fd, or ended the switch (end()).
    if (!conn.alive or (conn.peer == null and isForwarded(result))) return .ignore;
    if (isForwarded(result))
        try forward(ctx, conn, buf[0..mlen])
    else
        try callbackResult(ctx, conn, result);
    return result;
}

fn isForwarded(result: CbResult) bool {
    return result == .no_error or result == .more;
}

/// conn is still switched, not paused (pause_reading: calling its `in`
/// reads it), and its peer's queue is within its bound.
fn mayRead(ctx: *const Context, conn: *const Conn) bool {
    const peer = conn.peer orelse return false;
    return conn.alive and !conn.closing and !conn.read_paused and
        peer.queue.queuedBytes() <= ctx.limits.max_queue_size;
}

/// conn may still be read with its `in` (a MORE it asked for is due).
fn stillSwitched(conn: *const Conn) bool {
    return conn.alive and !conn.closing and conn.peer != null and conn.cb_in != null;
}

fn wantMore(ctx: *Context, conn: *Conn) Allocator.Error!void {
    if (conn.more_pending) return;
    try ctx.switch_state.more.put(ctx.gpa, conn.fd, {});
    conn.more_pending = true;
}

fn unwantMore(ctx: *Context, conn: *Conn) void {
    if (!conn.more_pending) return;
    _ = ctx.switch_state.more.swapRemove(conn.fd);
    conn.more_pending = false;
}

/// The live connection whose MORE is due under `fd`, or null (the entry
/// is removed when the fd ended, or its number now names another one).
fn pendingMore(ctx: *Context, fd: i32) ?*Conn {
    const more = &ctx.switch_state.more;
    if (!more.contains(fd)) return null;
    if (ctx.table.get(fd)) |conn| if (conn.more_pending) return conn;
    _ = more.swapRemove(fd);
    return null;
}

/// Some fd waits for MORE calls and may be read now: the round must not sleep.
pub fn moreReady(ctx: *Context) bool {
    for (ctx.switch_state.more.keys()) |fd| {
        const conn = ctx.table.get(fd) orelse continue;
        if (conn.more_pending and mayRead(ctx, conn)) return true;
    }
    return false;
}

/// A round's last step: the fds whose `in` asked for MORE and did not run in
/// this round (not readable, or handled before their turn) run now, unless
/// their peer's queue is over its bound.
pub fn runMore(ctx: *Context) Allocator.Error!void {
    const state = &ctx.switch_state;
    if (state.more.count() == 0) return;
    const fds = try ctx.gpa.dupe(i32, state.more.keys());
    defer ctx.gpa.free(fds);
    for (fds) |fd| {
        const conn = pendingMore(ctx, fd) orelse continue;
        if (!stillSwitched(conn)) {
            unwantMore(ctx, conn);
        } else if (conn.more_round != state.round and mayRead(ctx, conn)) {
            try switchIn(ctx, conn);
        }
    }
}

/// The buffer a custom `in` callback fills (max_message_size bytes),
/// allocated the first time such a callback runs (setLimits frees it).
fn buffer(ctx: *Context) Allocator.Error![]u8 {
    if (ctx.switch_buf) |s| return s;
    ctx.switch_buf = try ctx.gpa.alloc(u8, ctx.limits.max_message_size);
    return ctx.switch_buf.?;
}

/// What a callback result other than NO_ERROR does to `conn`.
fn callbackResult(ctx: *Context, conn: *Conn, result: CbResult) Allocator.Error!void {
    switch (result) {
        .no_error, .ignore => {},
        .fd_closing => try ctx.drop(conn, null),
        else => {
            var buf: [64]u8 = undefined;
            const text = std.fmt.bufPrint(
                &buf,
                "switch callback failed on fd {d}",
                .{conn.fd},
            ) catch unreachable;
            try ctx.drop(conn, text);
        },
    }
}

/// One payload read from `origin`: SWITCH_RX, then hand it to the peer (its
/// `out` callback at once, SWITCH_TX on success; else framed and queued,
/// SWITCH_TX when written).
pub fn forward(ctx: *Context, origin: *Conn, payload: []const u8) Allocator.Error!void {
    const events = ctx.switch_state.events;
    if (events) try ctx.events.pushData(ctx.gpa, .switch_rx, origin.fd, origin.index, payload);
    const dest = origin.peer orelse return;
    std.debug.assert(dest.alive);
    if (dest.cb_out) |out| {
        const len: u32 = @intCast(payload.len);
        const outer = ctx.switch_state.out_fd; // (an `out` never runs inside another)
        ctx.switch_state.out_fd = dest.fd;
        ctx.callback_depth += 1;
        const code = out(dest.fd, payload.ptr, len);
        ctx.callback_depth -= 1;
        ctx.switch_state.out_fd = outer;
        const result: CbResult = @fromBackingInt(@intCast(code));
        if (!dest.alive) return; // the callback closed it itself
        if (result != .no_error) return callbackResult(ctx, dest, result);
        if (events) try ctx.events.push(ctx.gpa, .switch_tx, dest.fd, dest.index);
        ctx.updateInterest(origin); // the callback may have queued (send())
        return;
    }
    try ctx.markDirty(dest);
    try dest.queue.push(ctx.gpa, payload, if (events) .switched else .silent);
    ctx.updateInterest(dest);
    ctx.updateInterest(origin); // pause reading origin if dest is over its bound
}

// ------------------------------------------------------------ the extension's calls

/// Queue raw bytes (not framed) for switched fd `fd`, after what is queued
/// for it. Refused when its queue is over max_queue_size already (the state
/// in which its peer is not read), or when `data` alone is larger; except
/// from fd's own `out` callback: that output is forwarding, bounded as
/// forwarded frames are (its peer is not read while the queue is over).
pub fn send(ctx: *Context, fd: i32, data: []const u8) Error!void {
    const conn = try switched(ctx, fd);
    if (fd != ctx.switch_state.out_fd) try checkRoom(ctx, conn, data.len);
    if (data.len == 0) return;
    try ctx.markDirty(conn);
    defer ctx.queueChanged(conn); // unmarks it again if the push failed
    try conn.queue.pushRaw(ctx.gpa, data);
}

fn checkRoom(ctx: *Context, conn: *Conn, len: usize) Error!void {
    const max = ctx.limits.max_queue_size;
    if (len > max) return ctx.last.fail(
        error.QueueFull,
        "switch_send of {d} bytes exceeds max_queue_size ({d})",
        .{ len, max },
    );
    const queued = conn.queue.queuedBytes();
    if (queued > max) return ctx.last.fail(
        error.QueueFull,
        "send queue of fd {d} is full ({d} bytes queued, max_queue_size {d})",
        .{ conn.fd, queued, max },
    );
}

/// End the switch of fd: ERROR with `reason` (if any) for fd; then each
/// side stops being read, writes what is queued for it, and is closed
/// (DISCONNECTION), at once when nothing is queued.
pub fn end(ctx: *Context, fd: i32, reason: ?[]const u8) Error!void {
    if (reason) |r| try checkReason(ctx, r);
    const conn = try switched(ctx, fd);
    const peer = conn.peer.?;
    if (reason) |r| try ctx.events.pushData(ctx.gpa, .err, conn.fd, conn.index, r);
    conn.peer = null;
    peer.peer = null;
    for ([_]*Conn{ conn, peer }) |x| {
        unwantMore(ctx, x);
        try ctx.closeAfterFlush(x);
    }
}

/// The texts are pyipc._checks.check_reason's (Python checks first), but
/// for the empty reason's: a C caller passes NULL for none, not Python's None.
fn checkReason(ctx: *Context, reason: []const u8) Error!void {
    if (reason.len == 0)
        return ctx.last.fail(error.Generic, "reason must not be empty (NULL for no reason)", .{});
    if (reason.len > max_end_reason) return ctx.last.fail(
        error.Generic,
        "reason must be at most {d} bytes in UTF-8",
        .{max_end_reason},
    );
    if (!std.unicode.utf8ValidateSlice(reason))
        return ctx.last.fail(error.Generic, "reason must be UTF-8", .{});
}

/// A switched fd that can still be written (the checks of send and end, in
/// pyipc._pure.switching's order).
fn switched(ctx: *Context, fd: i32) Error!*Conn {
    const conn = try ctx.lookup(fd);
    if (conn.closing or conn.write_closed) return ctx.closedByPeer(fd);
    if (conn.peer == null)
        return ctx.last.fail(error.UnknownFd, "fd {d} is not switched", .{fd});
    return conn;
}

/// Report SWITCH_RX and SWITCH_TX of what is relayed from now on, or not.
pub fn setEvents(ctx: *Context, on: bool) void {
    ctx.switch_state.events = on;
}
