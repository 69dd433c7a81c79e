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
    _,
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

/// A switched fd is readable: read it with its `in` callback, or with pyipc
/// framing (every complete frame forwarded).
pub fn switchIn(ctx: *Context, conn: *Conn) Allocator.Error!void {
    const cb = conn.cb_in orelse return ctx.readConn(conn, true);
    const buf = try buffer(ctx);
    var mlen: u32 = @intCast(buf.len);
    var result: CbResult = @fromBackingInt(@intCast(cb(conn.fd, buf.ptr, &mlen)));
    // A length past the buffer is a broken callback: never trust it.
    if (result == .no_error and mlen > buf.len) result = .err;
    switch (result) {
        .no_error => try forward(ctx, conn, buf[0..mlen]),
        else => try callbackResult(ctx, conn, result),
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
    try ctx.events.pushData(ctx.gpa, .switch_rx, origin.fd, origin.index, payload);
    const dest = origin.peer orelse return;
    std.debug.assert(dest.alive);
    if (dest.cb_out) |out| {
        const len: u32 = @intCast(payload.len);
        const result: CbResult = @fromBackingInt(@intCast(out(dest.fd, payload.ptr, len)));
        if (result == .no_error) return ctx.events.push(ctx.gpa, .switch_tx, dest.fd, dest.index);
        return callbackResult(ctx, dest, result);
    }
    try ctx.markDirty(dest);
    try dest.queue.push(ctx.gpa, payload, .switched);
    ctx.updateInterest(dest);
    ctx.updateInterest(origin); // pause reading origin if dest is over its bound
}
