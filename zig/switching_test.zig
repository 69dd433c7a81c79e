//! Tests of the switching extension (switching.zig): MORE and its bound per
//! round, send(), end(), State.events. Each test switches two socketpairs'
//! inner ends, added as external fds of one context (no run dir needed), and
//! plays both foreign peers on the outer ends.

const std = @import("std");
const c = std.c;
const testing = std.testing;
const Context = @import("context.zig").Context;
const sys = @import("sys.zig");
const framing = @import("framing.zig");
const EventType = @import("events.zig").EventType;
const switching = @import("switching.zig");

const gpa = testing.allocator;

/// One side of a switch: `inner` belongs to the context, `outer` is the peer.
const Side = struct {
    inner: i32,
    outer: i32,

    fn init() !Side {
        var fds: [2]c.fd_t = undefined;
        try testing.expectEqual(@as(c_int, 0), c.socketpair(c.AF.UNIX, c.SOCK.STREAM, 0, &fds));
        return .{ .inner = fds[0], .outer = fds[1] };
    }
};

/// A context switching two sides (a and b); deinit closes everything.
const Board = struct {
    ctx: *Context,
    a: Side,
    b: Side,

    fn init() !Board {
        const ctx = try Context.create(gpa);
        errdefer ctx.destroy();
        const a = try Side.init();
        errdefer sys.closeFd(a.outer);
        const b = try Side.init();
        errdefer sys.closeFd(b.outer);
        // Owned by the context from here: destroy() closes them.
        try ctx.addExternal(a.inner);
        try ctx.addExternal(b.inner);
        try switching.add(ctx, a.inner, b.inner);
        return .{ .ctx = ctx, .a = a, .b = b };
    }

    fn deinit(self: *Board) void {
        self.ctx.destroy();
        sys.closeFd(self.a.outer);
        sys.closeFd(self.b.outer);
    }

    /// One round (timer 0: it ends with a TIMER when nothing else came);
    /// the events it brought, TIMER left out, copied into `out`.
    fn round(self: *Board, out: *Events) !void {
        const ctx = self.ctx;
        ctx.events.releaseLent(gpa);
        ctx.setTimer(0);
        try ctx.wait(false);
        while (ctx.events.peek()) |ev| {
            if (ev.kind != .timer) try out.add(ev.kind, ev.fd, ev.data);
            try ctx.events.pop(gpa, false);
        }
    }
};

/// Events seen by a test (kind, fd, payload or error text).
const Events = struct {
    kinds: std.ArrayList(EventType) = .empty,
    fds: std.ArrayList(i32) = .empty,
    data: std.ArrayList([]u8) = .empty,

    fn add(self: *Events, kind: EventType, fd: i32, data: []const u8) !void {
        const copy = try gpa.dupe(u8, data);
        errdefer gpa.free(copy);
        try self.data.append(gpa, copy);
        try self.kinds.append(gpa, kind);
        try self.fds.append(gpa, fd);
    }

    fn count(self: *const Events, kind: EventType) usize {
        var n: usize = 0;
        for (self.kinds.items) |k| n += @intFromBool(k == kind);
        return n;
    }

    fn deinit(self: *Events) void {
        for (self.data.items) |d| gpa.free(d);
        self.data.deinit(gpa);
        self.kinds.deinit(gpa);
        self.fds.deinit(gpa);
    }
};

fn sendAll(fd: i32, data: []const u8) !void {
    var done: usize = 0;
    while (done < data.len) {
        const n = c.write(fd, data[done..].ptr, data.len - done);
        try testing.expect(n > 0);
        done += @intCast(n);
    }
}

/// Read what is there now (fd made non-blocking by the caller), appended to `out`.
fn readAvailable(fd: i32, out: *std.ArrayList(u8)) !?void {
    var buf: [64 * 1024]u8 = undefined;
    const n = c.recv(fd, &buf, buf.len, c.MSG.DONTWAIT);
    if (n == 0) return null; // the end
    if (n < 0) return {};
    try out.appendSlice(gpa, buf[0..@intCast(n)]);
}

// ------------------------------------------------------------ a protocol with MORE

/// Newline-ended records: the first call reads everything there is, then
/// each call hands out one record, returning MORE while some are left
/// (the C callbacks have no user pointer: test state is file-level).
const Lines = struct {
    var held: [8192]u8 = undefined;
    var len: usize = 0;
    var pos: usize = 0;
    var calls: usize = 0;

    fn reset() void {
        len = 0;
        pos = 0;
        calls = 0;
    }

    fn in(orig: c_int, payload: [*]u8, mlen: *u32) callconv(.c) c_int {
        calls += 1;
        if (pos == len) {
            const n = c.read(orig, &held, held.len);
            if (n <= 0) return @backingInt(switching.CbResult.fd_closing);
            len = @intCast(n);
            pos = 0;
        }
        const end = std.mem.indexOfScalarPos(u8, held[0..len], pos, '\n') orelse
            return @backingInt(switching.CbResult.err);
        const record = held[pos..end];
        if (record.len > mlen.*) return @backingInt(switching.CbResult.err);
        @memcpy(payload[0..record.len], record);
        mlen.* = @intCast(record.len);
        pos = end + 1;
        const result: switching.CbResult = if (pos < len) .more else .no_error;
        return @backingInt(result);
    }
};

test "MORE: every record of one read, in order, at most max_more_per_round calls a round" {
    var board = try Board.init();
    defer board.deinit();
    Lines.reset();
    try switching.setCallbacks(board.ctx, board.a.inner, Lines.in, null);
    const n = 3 * switching.max_more_per_round + 8;
    var text: std.ArrayList(u8) = .empty;
    defer text.deinit(gpa);
    for (0..n) |i| try text.print(gpa, "r{d:0>3}\n", .{i});
    try sendAll(board.a.outer, text.items);

    var events: Events = .{};
    defer events.deinit();
    var per_round: [8]usize = undefined;
    var rounds: usize = 0;
    while (events.count(.switch_rx) < n) : (rounds += 1) {
        try testing.expect(rounds < per_round.len);
        const before = Lines.calls;
        try board.round(&events);
        per_round[rounds] = Lines.calls - before;
    }
    const m = switching.max_more_per_round;
    try testing.expectEqualSlices(usize, &.{ m, m, m, 8 }, per_round[0..rounds]);

    // The other side gets them framed, in order.
    _ = sys.setNonblocking(board.b.outer, true);
    var got: std.ArrayList(u8) = .empty;
    defer got.deinit(gpa);
    while (got.items.len < n * (framing.header_size + 4)) {
        try board.round(&events);
        _ = try readAvailable(board.b.outer, &got);
    }
    for (0..n) |i| {
        const at = i * (framing.header_size + 4);
        var want: [4]u8 = undefined;
        _ = try std.fmt.bufPrint(&want, "r{d:0>3}", .{i});
        try testing.expectEqualSlices(u8, &framing.encodeHeader(4), got.items[at..][0..4]);
        try testing.expectEqualStrings(&want, got.items[at + 4 ..][0..4]);
    }
}

test "pause_reading: a paused fd's `in` is not called for its MORE until it is resumed" {
    var board = try Board.init();
    defer board.deinit();
    Lines.reset();
    try switching.setCallbacks(board.ctx, board.a.inner, Lines.in, null);
    const n = 2 * switching.max_more_per_round;
    var text: std.ArrayList(u8) = .empty;
    defer text.deinit(gpa);
    for (0..n) |i| try text.print(gpa, "r{d:0>3}\n", .{i});
    try sendAll(board.a.outer, text.items);

    var events: Events = .{};
    defer events.deinit();
    try board.round(&events);
    try testing.expectEqual(switching.max_more_per_round, Lines.calls);
    try board.ctx.pauseReading(board.a.inner, true);
    // Calling `in` reads the fd: not while it is paused, and the round may sleep.
    try testing.expect(!switching.moreReady(board.ctx));
    for (0..3) |_| try board.round(&events);
    try testing.expectEqual(switching.max_more_per_round, Lines.calls);
    try board.ctx.pauseReading(board.a.inner, false);
    var rounds: usize = 0;
    while (events.count(.switch_rx) < n) : (rounds += 1) {
        try testing.expect(rounds < 4);
        try board.round(&events);
    }
    try testing.expectEqual(n, Lines.calls);
}

/// An `in` that replaces itself by `second`, which unregisters itself: each
/// returns MORE (one record each), as if more were held.
const Replacer = struct {
    var ctx: *Context = undefined;
    var first_calls: usize = 0;
    var second_calls: usize = 0;

    fn first(orig: c_int, payload: [*]u8, mlen: *u32) callconv(.c) c_int {
        first_calls += 1;
        switching.setCallbacks(ctx, orig, second, null) catch return @backingInt(switching.CbResult.err);
        return give(payload, mlen, "one");
    }

    fn second(orig: c_int, payload: [*]u8, mlen: *u32) callconv(.c) c_int {
        second_calls += 1;
        switching.setCallbacks(ctx, orig, null, null) catch return @backingInt(switching.CbResult.err);
        return give(payload, mlen, "two");
    }

    fn give(payload: [*]u8, mlen: *u32, record: []const u8) c_int {
        @memcpy(payload[0..record.len], record);
        mlen.* = @intCast(record.len);
        return @backingInt(switching.CbResult.more);
    }
};

test "an `in` that replaces or unregisters itself is not called again through the old pointer" {
    var board = try Board.init();
    defer board.deinit();
    Replacer.ctx = board.ctx;
    Replacer.first_calls = 0;
    Replacer.second_calls = 0;
    try switching.setCallbacks(board.ctx, board.a.inner, Replacer.first, null);
    try sendAll(board.a.outer, "x");
    var events: Events = .{};
    defer events.deinit();
    try board.round(&events);
    try board.round(&events);
    try testing.expectEqual(@as(usize, 1), Replacer.first_calls);
    try testing.expectEqual(@as(usize, 1), Replacer.second_calls);
    try testing.expectEqual(@as(usize, 2), events.count(.switch_rx));
    try testing.expectEqualStrings("one", events.data.items[0]);
    try testing.expectEqualStrings("two", events.data.items[1]);
}

test "switch_events off: relayed without SWITCH_RX/TX; the end is still reported" {
    var board = try Board.init();
    defer board.deinit();
    switching.setEvents(board.ctx, false);
    var events: Events = .{};
    defer events.deinit();
    const msg = comptime framing.encodeHeader(2) ++ "hi".*;
    try sendAll(board.a.outer, &msg);
    _ = sys.setNonblocking(board.b.outer, true);
    var got: std.ArrayList(u8) = .empty;
    defer got.deinit(gpa);
    while (got.items.len < msg.len) {
        try board.round(&events);
        _ = try readAvailable(board.b.outer, &got);
    }
    try testing.expectEqualSlices(u8, &msg, got.items);
    try testing.expectEqual(@as(usize, 0), events.kinds.items.len);
    sys.closeFd(board.a.outer);
    board.a.outer = -1;
    while (events.count(.disconnection) < 2) try board.round(&events);
    try testing.expectEqualSlices(EventType, &.{ .disconnection, .disconnection }, events.kinds.items);
}

test "send: raw bytes between forwarded frames; its bounds" {
    var board = try Board.init();
    defer board.deinit();
    const ctx = board.ctx;
    try ctx.setLimits(.{ .max_message_size = 100, .max_queue_size = 1000 });
    var events: Events = .{};
    defer events.deinit();
    try switching.send(ctx, board.b.inner, "RAW");
    try sendAll(board.a.outer, &(comptime framing.encodeHeader(1) ++ "x".*));
    while (events.count(.switch_tx) < 1) try board.round(&events);
    _ = sys.setNonblocking(board.b.outer, true);
    var got: std.ArrayList(u8) = .empty;
    defer got.deinit(gpa);
    while (got.items.len < 3 + 5) _ = try readAvailable(board.b.outer, &got);
    try testing.expectEqualSlices(u8, &(comptime "RAW".* ++ framing.encodeHeader(1) ++ "x".*), got.items);

    // The bound: data alone over max_queue_size; a queue over it already.
    const big = try gpa.alloc(u8, 1001);
    defer gpa.free(big);
    @memset(big, 'z');
    try testing.expectError(error.QueueFull, switching.send(ctx, board.b.inner, big));
    try testing.expectEqualStrings(
        "switch_send of 1001 bytes exceeds max_queue_size (1000)",
        ctx.last.text(),
    );
    try switching.send(ctx, board.b.inner, big[0..1000]); // at the bound: taken
    try switching.send(ctx, board.b.inner, "y"); // at, not over: taken
    try testing.expectError(error.QueueFull, switching.send(ctx, board.b.inner, "w"));
    // Misuse.
    try testing.expectError(error.UnknownFd, switching.send(ctx, 9999, "x"));
    const lone = try Side.init();
    defer sys.closeFd(lone.outer);
    try ctx.addExternal(lone.inner);
    try testing.expectError(error.UnknownFd, switching.send(ctx, lone.inner, "x"));
    try testing.expectEqualStrings("fd is not switched", withoutNumber(ctx.last.text()));
    try testing.expectError(error.Generic, switching.end(ctx, board.a.inner, ""));
    const too_long = switching.max_end_reason + 1;
    const long: [too_long]u8 = @splat('r');
    try testing.expectError(error.Generic, switching.end(ctx, board.a.inner, &long));
    try testing.expectError(error.Generic, switching.end(ctx, board.a.inner, "\xff"));
}

/// "fd 12 is not switched" -> "fd is not switched"
fn withoutNumber(text: []const u8) []const u8 {
    const S = struct {
        var buf: [128]u8 = undefined;
    };
    const space = std.mem.indexOfScalar(u8, text, ' ') orelse return text;
    const next = std.mem.indexOfScalarPos(u8, text, space + 1, ' ') orelse return text;
    const out = std.fmt.bufPrint(&S.buf, "{s}{s}", .{ text[0..space], text[next..] }) catch
        return text;
    return out;
}

test "end: what is queued goes out first, then both sides close" {
    var board = try Board.init();
    defer board.deinit();
    const ctx = board.ctx;
    var events: Events = .{};
    defer events.deinit();
    const big = try gpa.alloc(u8, 1 << 20); // more than the socketpair holds
    defer gpa.free(big);
    for (big, 0..) |*b, i| b.* = @truncate(i *% 7);
    try switching.send(ctx, board.a.inner, big);
    try switching.end(ctx, board.a.inner, "bye");
    try testing.expectError(error.ConnectionClosed, switching.send(ctx, board.a.inner, "late"));
    // b had nothing queued: closed at once, after a's ERROR.
    try board.round(&events);
    try testing.expectEqualSlices(EventType, &.{ .err, .disconnection }, events.kinds.items);
    try testing.expectEqualStrings("bye", events.data.items[0]);
    try testing.expectEqual(board.b.inner, events.fds.items[1]);
    _ = sys.setNonblocking(board.a.outer, true);
    var got: std.ArrayList(u8) = .empty;
    defer got.deinit(gpa);
    var rounds: usize = 0;
    while (try readAvailable(board.a.outer, &got) != null) : (rounds += 1) {
        try testing.expect(rounds < 100_000); // a lost end fails, not hangs
        try board.round(&events);
    }
    try testing.expectEqualSlices(u8, big, got.items);
    try testing.expectEqual(@as(usize, 2), events.count(.disconnection));
    try testing.expectEqual(board.a.inner, events.fds.items[events.fds.items.len - 1]);
}

test "add: a side whose switch ended and still drains is refused (its end would close the new partner)" {
    var board = try Board.init();
    defer board.deinit();
    const ctx = board.ctx;
    const big = try gpa.alloc(u8, 1 << 20); // more than the socketpair holds
    defer gpa.free(big);
    @memset(big, 'q');
    try switching.send(ctx, board.a.inner, big);
    try switching.end(ctx, board.b.inner, null); // b closed; a drains its queue
    const third = try Side.init();
    defer sys.closeFd(third.outer);
    try ctx.addExternal(third.inner);
    try testing.expectError(error.ConnectionClosed, switching.add(ctx, board.a.inner, third.inner));
    var buf: [64]u8 = undefined;
    const want = try std.fmt.bufPrint(&buf, "connection on fd {d} is closed by the peer", .{board.a.inner});
    try testing.expectEqualStrings(want, ctx.last.text());
    try testing.expect(ctx.table.get(third.inner).?.peer == null);
}

test "C ABI: ipc_switch_send, ipc_switch_end and ipc_context_switch_events" {
    const abi = @import("exports.zig");
    const errors = @import("errors.zig");
    // No context: an error code, never a crash.
    try testing.expect(abi.ipc_switch_send(null, 0, "x", 1) < 0);
    try testing.expect(abi.ipc_switch_end(null, 0, null, 0) < 0);
    abi.ipc_context_switch_events(null, 0);

    var handle: ?*anyopaque = null;
    try testing.expectEqual(@as(c_int, 0), abi.ipc_context_init(&handle));
    defer abi.ipc_context_deinit(&handle);
    const ctx: *Context = @ptrCast(@alignCast(handle.?));
    const a = try Side.init();
    defer sys.closeFd(a.outer);
    const b = try Side.init();
    defer sys.closeFd(b.outer);
    try testing.expectEqual(@as(c_int, 0), abi.ipc_add_external(handle, a.inner));
    try testing.expectEqual(@as(c_int, 0), abi.ipc_add_external(handle, b.inner));
    try testing.expectEqual(@as(c_int, 0), abi.ipc_add_switch(handle, a.inner, b.inner));

    abi.ipc_context_switch_events(handle, 0);
    try testing.expect(!ctx.switch_state.events);
    abi.ipc_context_switch_events(handle, 1);
    try testing.expect(ctx.switch_state.events);

    try testing.expectEqual(@as(c_int, 0), abi.ipc_switch_send(handle, a.inner, "abc", 3));
    try testing.expectEqual(@as(c_int, 0), abi.ipc_switch_send(handle, a.inner, null, 0));
    try testing.expectEqual(errors.code(error.UnknownFd), abi.ipc_switch_send(handle, 9999, "x", 1));
    try testing.expectEqualStrings(
        "fd 9999 is not managed by this context",
        std.mem.span(abi.ipc_last_error(handle)),
    );
    // A reason that is there but empty is refused; NULL is no reason.
    try testing.expectEqual(errors.code(error.Generic), abi.ipc_switch_end(handle, a.inner, "", 0));
    try testing.expectEqualStrings(
        "reason must not be empty (NULL for no reason)",
        std.mem.span(abi.ipc_last_error(handle)),
    );
    try testing.expectEqual(@as(c_int, 0), abi.ipc_switch_end(handle, a.inner, null, 0));
    try testing.expectEqual(
        errors.code(error.ConnectionClosed),
        abi.ipc_switch_send(handle, a.inner, "late", 4),
    );
}

/// An `out` callback that writes its output through send() (the way a
/// protocol daemon keeps order and gets back-pressure).
const Echo = struct {
    var ctx: ?*Context = null;
    var failures: usize = 0;

    fn out(dest: c_int, payload: [*]const u8, mlen: u32) callconv(.c) c_int {
        switching.send(ctx.?, dest, payload[0..mlen]) catch {
            failures += 1;
            return @backingInt(switching.CbResult.err);
        };
        return @backingInt(switching.CbResult.no_error);
    }
};

test "send from fd's own `out` is never refused: back-pressure bounds it" {
    var board = try Board.init();
    defer board.deinit();
    const ctx = board.ctx;
    try ctx.setLimits(.{ .max_message_size = 1000, .max_queue_size = 2000 });
    Echo.ctx = ctx;
    Echo.failures = 0;
    try switching.setCallbacks(ctx, board.b.inner, null, Echo.out);
    // 20 frames of 900 bytes in one write: one read forwards them all, far
    // past b's bound, while b's peer reads nothing.
    var frames: std.ArrayList(u8) = .empty;
    defer frames.deinit(gpa);
    const body: [900]u8 = @splat('f');
    for (0..20) |_| {
        try frames.appendSlice(gpa, &framing.encodeHeader(body.len));
        try frames.appendSlice(gpa, &body);
    }
    try sendAll(board.a.outer, frames.items);
    var events: Events = .{};
    defer events.deinit();
    while (events.count(.switch_tx) < 20) try board.round(&events);
    try testing.expectEqual(@as(usize, 0), Echo.failures);
    // From outside the callback the bound holds: b's queue is over it.
    try testing.expectError(error.QueueFull, switching.send(ctx, board.b.inner, "x"));
    // Nothing lost: b's peer gets every byte.
    _ = sys.setNonblocking(board.b.outer, true);
    var got: std.ArrayList(u8) = .empty;
    defer got.deinit(gpa);
    while (got.items.len < 20 * body.len) {
        try board.round(&events);
        _ = try readAvailable(board.b.outer, &got);
    }
    try testing.expectEqual(@as(usize, 20 * body.len), got.items.len);
}

// ------------------------------------------------------------ a callback that closes

/// An `in` callback that closes its own fd (and with it the switch) through
/// the context, then hands a payload back: the code that called it still
/// holds the connection's record, so the record must outlive the call.
const Closer = struct {
    var ctx: ?*Context = null;
    var dead_after_close: usize = 0;
    var close_all = false;

    fn in(orig: c_int, payload: [*]u8, mlen: *u32) callconv(.c) c_int {
        var buf: [64]u8 = undefined;
        _ = c.read(orig, &buf, buf.len);
        const context = ctx.?;
        if (close_all) context.closeAll() else context.close(orig) catch unreachable;
        dead_after_close = context.table.dead.items.len;
        payload[0] = 'x';
        mlen.* = 1;
        return @backingInt(switching.CbResult.no_error);
    }
};

fn closeFromCallback(close_all: bool) !void {
    var board = try Board.init();
    defer board.deinit();
    Closer.ctx = board.ctx;
    Closer.close_all = close_all;
    Closer.dead_after_close = 0;
    try switching.setCallbacks(board.ctx, board.a.inner, Closer.in, null);
    try sendAll(board.a.outer, "hello");
    var events: Events = .{};
    defer events.deinit();
    try board.round(&events);
    // Both records (fd and its switch peer) still held when the callback
    // returned; freed by the round once it had.
    try testing.expectEqual(@as(usize, 2), Closer.dead_after_close);
    try testing.expectEqual(@as(usize, 0), board.ctx.table.dead.items.len);
    try testing.expectEqual(@as(usize, 0), events.kinds.items.len); // closed: no event
}

test "close() from a switch callback: the records live until the callback returned" {
    try closeFromCallback(false);
}

test "close_all() from a switch callback: the records live until the callback returned" {
    try closeFromCallback(true);
}

// ------------------------------------------------------------ a callback that reads

/// An `out` callback that tries to read and to wait before it forwards: the
/// loop that called it is still decoding from the buffers a read would
/// decode into (one connection's bytes went to another's peer), so both are
/// refused, saying why.
const Reader = struct {
    var ctx: ?*Context = null;
    var read_text: [64]u8 = undefined;
    var read_len: usize = 0;
    var wait_refused = false;

    fn out(dest: c_int, payload: [*]const u8, mlen: u32) callconv(.c) c_int {
        const context = ctx.?;
        var buf: [64]u8 = undefined;
        var len: usize = 0;
        if (context.readFd(dest, &buf, &len)) |_| {
            read_len = 0;
        } else |e| {
            const text = context.last.text();
            read_len = if (e == error.Generic) @min(text.len, read_text.len) else 0;
            @memcpy(read_text[0..read_len], text[0..read_len]);
        }
        wait_refused = if (context.beginWait(false)) |_| false else |e| e == error.Generic;
        switching.send(ctx.?, dest, payload[0..mlen]) catch
            return @backingInt(switching.CbResult.err);
        return @backingInt(switching.CbResult.no_error);
    }
};

test "a read or a wait inside a switch callback is refused, and nothing is lost" {
    var board = try Board.init();
    defer board.deinit();
    Reader.ctx = board.ctx;
    Reader.read_len = 0;
    Reader.wait_refused = false;
    try switching.setCallbacks(board.ctx, board.b.inner, null, Reader.out);
    var frames: std.ArrayList(u8) = .empty;
    defer frames.deinit(gpa);
    for ([_][]const u8{ "AAAAA", "CCCCC" }) |m| {
        try frames.appendSlice(gpa, &framing.encodeHeader(@intCast(m.len)));
        try frames.appendSlice(gpa, m);
    }
    try sendAll(board.a.outer, frames.items);
    var events: Events = .{};
    defer events.deinit();
    _ = sys.setNonblocking(board.b.outer, true);
    var got: std.ArrayList(u8) = .empty;
    defer got.deinit(gpa);
    while (got.items.len < 10) {
        try board.round(&events);
        _ = try readAvailable(board.b.outer, &got);
    }
    try testing.expectEqualStrings("cannot read inside a switch callback", Reader.read_text[0..Reader.read_len]);
    try testing.expect(Reader.wait_refused);
    try testing.expectEqualStrings("AAAAACCCCC", got.items);
}

// ------------------------------------------------------------ a callback that lingers

/// An `out` callback that, on its first call, makes another framed
/// connection readable and lingers: a linger runs rounds of the loop, which
/// read that connection into the scratch buffer the read that called the
/// callback is still decoding (the frames after this one were replaced by
/// the other connection's bytes). There it only writes, and waits for room.
const Lingerer = struct {
    var ctx: ?*Context = null;
    var other_outer: i32 = -1;
    var calls: usize = 0;
    var text: [64]u8 = undefined;
    var text_len: usize = 0;

    fn out(dest: c_int, payload: [*]const u8, mlen: u32) callconv(.c) c_int {
        const context = ctx.?;
        calls += 1;
        if (calls == 1) {
            var frames: [3 * 9]u8 = undefined;
            for (0..3) |i| {
                frames[i * 9 ..][0..4].* = framing.encodeHeader(5);
                @memcpy(frames[i * 9 + 4 ..][0..5], "DDDDD");
            }
            sendAll(other_outer, &frames) catch return @backingInt(switching.CbResult.err);
            if (context.linger(-1, 100 * std.time.ns_per_ms)) |_| {
                text_len = 0;
            } else |_| {
                const t = context.last.text();
                text_len = @min(t.len, text.len);
                @memcpy(text[0..text_len], t[0..text_len]);
            }
        }
        switching.send(context, dest, payload[0..mlen]) catch
            return @backingInt(switching.CbResult.err);
        return @backingInt(switching.CbResult.no_error);
    }
};

test "a linger inside a switch callback only writes: it would read into the loop's buffers" {
    var board = try Board.init();
    defer board.deinit();
    const ctx = board.ctx;
    // A framed connection whose peer never reads, with more scheduled than
    // its socket takes (something for the linger to wait for), and another
    // that sends while the callback runs.
    const stuck = try Side.init();
    defer sys.closeFd(stuck.outer);
    try ctx.addConnection(stuck.inner);
    const other = try Side.init();
    defer sys.closeFd(other.outer);
    try ctx.addConnection(other.inner);
    const big = try gpa.alloc(u8, 4 << 20);
    defer gpa.free(big);
    @memset(big, 's');
    try ctx.schedule(stuck.inner, big);
    Lingerer.ctx = ctx;
    Lingerer.other_outer = other.outer;
    Lingerer.calls = 0;
    Lingerer.text_len = 0;
    try switching.setCallbacks(ctx, board.b.inner, null, Lingerer.out);
    // Three frames in one write: one read decodes them all.
    var frames: std.ArrayList(u8) = .empty;
    defer frames.deinit(gpa);
    for (0..3) |_| {
        try frames.appendSlice(gpa, &framing.encodeHeader(5));
        try frames.appendSlice(gpa, "AAAAA");
    }
    try sendAll(board.a.outer, frames.items);
    var events: Events = .{};
    defer events.deinit();
    _ = sys.setNonblocking(board.b.outer, true);
    var got: std.ArrayList(u8) = .empty;
    defer got.deinit(gpa);
    while (got.items.len < 15 or events.count(.message_rx) < 3) {
        try board.round(&events);
        _ = try readAvailable(board.b.outer, &got);
    }
    try testing.expectEqualStrings("AAAAAAAAAAAAAAA", got.items);
    for (events.kinds.items, events.fds.items, events.data.items) |k, fd, d| {
        if (k != .message_rx) continue;
        try testing.expectEqual(other.inner, fd);
        try testing.expectEqualStrings("DDDDD", d);
    }
    // It waited for the stuck connection, writing only.
    try testing.expectEqualStrings("linger timed out", Lingerer.text[0..Lingerer.text_len]);
}

// ------------------------------------------------------------ a callback that deinits

/// An `in` callback that tears the context down (a fatal protocol error),
/// through the C ABI, then says its fd is closing.
const Deiniter = struct {
    var handle: ?*anyopaque = null;
    var after: ?*anyopaque = undefined;

    fn in(orig: c_int, payload: [*]u8, mlen: *u32) callconv(.c) c_int {
        _ = payload;
        mlen.* = 0;
        var buf: [64]u8 = undefined;
        _ = c.read(orig, &buf, buf.len);
        @import("exports.zig").ipc_context_deinit(&handle);
        after = handle;
        return @backingInt(switching.CbResult.fd_closing);
    }
};

test "C ABI: ipc_context_deinit inside a switch callback frees the context when the wait returns" {
    const abi = @import("exports.zig");
    const errors = @import("errors.zig");
    try testing.expectEqual(@as(c_int, 0), abi.ipc_context_init(&Deiniter.handle));
    // Freed by the callback; a failed test frees it here.
    defer abi.ipc_context_deinit(&Deiniter.handle);
    const local = Deiniter.handle;
    const a = try Side.init();
    defer sys.closeFd(a.outer);
    const b = try Side.init();
    defer sys.closeFd(b.outer);
    try testing.expectEqual(@as(c_int, 0), abi.ipc_add_external(local, a.inner));
    try testing.expectEqual(@as(c_int, 0), abi.ipc_add_external(local, b.inner));
    try testing.expectEqual(@as(c_int, 0), abi.ipc_add_switch(local, a.inner, b.inner));
    try testing.expectEqual(@as(c_int, 0), abi.ipc_set_switch_callbacks(local, a.inner, Deiniter.in, null));
    abi.ipc_context_timer(local, 1000);
    try sendAll(a.outer, "fatal");
    // The context was freed under the callback, and the wait that ran it
    // went on with it (use after free: a Debug panic in runMore).
    var evs: [4]abi.IpcEvent = undefined;
    var n: usize = 0;
    try testing.expectEqual(errors.code(error.Generic), abi.ipc_wait_events(local, &evs, evs.len, &n));
    try testing.expectEqual(@as(usize, 0), n);
    try testing.expectEqual(@as(?*anyopaque, null), Deiniter.after);
    // Everything was closed: the peers see the end.
    var buf: [8]u8 = undefined;
    try testing.expectEqual(@as(isize, 0), c.read(a.outer, &buf, buf.len));
    try testing.expectEqual(@as(isize, 0), c.read(b.outer, &buf, buf.len));
}
