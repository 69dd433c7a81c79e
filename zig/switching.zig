//! Switching: two fds forwarding to each other (libIPC's mechanism for the
//! network daemons). By default each side is read with pyipc framing and each
//! payload is framed and queued for the other side. Custom callbacks (libIPC's
//! semantics, per fd) replace either half:
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
const Context = context.Context;
const Conn = context.Conn;

pub const CbResult = enum(c_int) {
    no_error = 0,
    err = 1,
    fd_closing = 2,
    ignore = 3,
    _,
};

/// A switched fd is readable: read it with its `in` callback, or with pyipc
/// framing (every complete frame forwarded).
pub fn switchIn(ctx: *Context, conn: *Conn) Allocator.Error!void {
    const cb = conn.cb_in orelse return ctx.readConn(conn, true);
    const buf = try ctx.switchBuffer();
    var mlen: u32 = @intCast(buf.len);
    var result: CbResult = @enumFromInt(cb(conn.fd, buf.ptr, &mlen));
    // A length past the buffer is a broken callback: never trust it.
    if (result == .no_error and mlen > buf.len) result = .err;
    switch (result) {
        .no_error => try forward(ctx, conn, buf[0..mlen]),
        else => try callbackResult(ctx, conn, result),
    }
}

/// What a callback result other than NO_ERROR does to `conn`.
fn callbackResult(ctx: *Context, conn: *Conn, result: CbResult) Allocator.Error!void {
    switch (result) {
        .no_error, .ignore => {},
        .fd_closing => try ctx.drop(conn, null),
        else => {
            var buf: [64]u8 = undefined;
            const text = std.fmt.bufPrint(&buf, "switch callback failed on fd {d}", .{conn.fd}) catch unreachable;
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
        const result: CbResult = @enumFromInt(out(dest.fd, payload.ptr, @intCast(payload.len)));
        if (result == .no_error) return ctx.events.push(ctx.gpa, .switch_tx, dest.fd, dest.index);
        return callbackResult(ctx, dest, result);
    }
    try ctx.markDirty(dest);
    try dest.queue.push(ctx.gpa, payload, .switched);
    ctx.updateInterest(dest);
    ctx.updateInterest(origin); // pause reading origin if dest is over its bound
}
