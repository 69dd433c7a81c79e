//! The context's queue of pending events, and the memory their payloads live in.
//!
//! Payload copies (MESSAGE_RX, SWITCH_RX) and error texts go into chunks that
//! never move, so a pointer handed to the caller stays valid while later events
//! are queued. Each chunk counts the events that still refer to it; an event
//! releases its reference when it is dropped, copied out, or (for batches
//! handed out by pointer) at the start of the next wait call. An unreferenced
//! chunk is recycled (the current one) or freed. No allocation per message:
//! one chunk serves many small payloads. A large payload's buffer is kept as
//! the one spare (the largest seen, so at most one max-size message per
//! context) and reused: by the next large payload, or as a connection's
//! receive buffer for a large frame (takeSpare), which is then handed back
//! with the whole frame in it (pushOwned), so a stream of large messages
//! cycles through one buffer, with no copy into the queue and no fresh
//! memory (page faults) per message.

const std = @import("std");
const assert = std.debug.assert;
const Allocator = std.mem.Allocator;

/// libIPC's event numbers (enum event_types in libipc.h; abi_test.zig checks them).
pub const EventType = enum(i32) {
    err = 0,
    connection = 1,
    disconnection = 2,
    message_rx = 3,
    message_tx = 4,
    timer = 5,
    external = 6,
    switch_rx = 7,
    switch_tx = 8,
};

pub const chunk_size = 64 * 1024;

/// Whether `part` lies within `memory`.
pub fn holds(memory: []const u8, part: []const u8) bool {
    const start = @intFromPtr(memory.ptr);
    const at = @intFromPtr(part.ptr);
    return at >= start and at + part.len <= start + memory.len;
}

comptime {
    // A frame with its own receive buffer (direct_read_min or more, see
    // framing.zig) is over chunk_size, so that buffer is kept as the spare
    // once consumed (freeChunk), and the next large frame reuses it.
    std.debug.assert(@import("framing.zig").direct_read_min >= chunk_size);
}

pub const Chunk = struct {
    refs: u32 = 0,
    used: usize = 0,
    data: []u8,
};

pub const Event = struct {
    kind: EventType,
    fd: i32,
    index: i64,
    /// Payload (MESSAGE_RX, SWITCH_RX) or error text (ERROR; NUL follows it).
    data: []const u8 = &.{},
    chunk: ?*Chunk = null,
    /// Removed from the queue out of order (read_fd took it, or its fd was closed).
    dropped: bool = false,
};

pub const Queue = struct {
    items: std.ArrayList(Event) = .empty,
    head: usize = 0,
    /// Events in items[head..] that are not dropped.
    live: usize = 0,
    current: ?*Chunk = null,
    /// Chunks of events handed out by pointer, released at the next wait.
    lent: std.ArrayList(*Chunk) = .empty,
    /// One large buffer kept for reuse (see the file comment).
    spare: ?[]u8 = null,

    pub fn deinit(self: *Queue, gpa: Allocator) void {
        self.clear(gpa);
        self.releaseLent(gpa);
        if (self.current) |ch| self.freeChunk(gpa, ch);
        self.current = null;
        self.items.deinit(gpa);
        self.lent.deinit(gpa);
        if (self.spare) |sp| gpa.free(sp);
        self.spare = null;
    }

    /// Queue an event without payload.
    pub fn push(
        self: *Queue,
        gpa: Allocator,
        kind: EventType,
        fd: i32,
        index: i64,
    ) Allocator.Error!void {
        try self.items.append(gpa, .{ .kind = kind, .fd = fd, .index = index });
        self.live += 1;
    }

    /// Queue an event with a copy of `data` (a NUL is stored after it, so
    /// error texts can be handed out as C strings).
    pub fn pushData(
        self: *Queue,
        gpa: Allocator,
        kind: EventType,
        fd: i32,
        index: i64,
        data: []const u8,
    ) Allocator.Error!void {
        try self.items.ensureUnusedCapacity(gpa, 1);
        if (data.len == 0 and kind != .err) return self.push(gpa, kind, fd, index);
        const ch = try self.reserve(gpa, data.len + 1);
        const dest = ch.data[ch.used .. ch.used + data.len];
        @memcpy(dest, data);
        ch.data[ch.used + data.len] = 0;
        ch.used += data.len + 1;
        ch.refs += 1;
        self.items.appendAssumeCapacity(
            .{ .kind = kind, .fd = fd, .index = index, .data = dest, .chunk = ch },
        );
        self.live += 1;
    }

    /// Queue a MESSAGE_RX (or SWITCH_RX) whose payload lies in `memory`, a
    /// buffer of gpa's that the queue now owns (no copy): freed, or kept as
    /// the spare, once the event is consumed, and every other event that
    /// shares the chunk returned (see pushShared).
    pub fn pushOwned(
        self: *Queue,
        gpa: Allocator,
        kind: EventType,
        fd: i32,
        index: i64,
        memory: []u8,
        payload: []const u8,
    ) Allocator.Error!*Chunk {
        try self.items.ensureUnusedCapacity(gpa, 1);
        const ch = try gpa.create(Chunk);
        errdefer gpa.destroy(ch);
        ch.* = .{ .data = memory, .used = memory.len };
        try self.pushShared(gpa, kind, fd, index, ch, payload); // room is there: no failure
        return ch;
    }

    /// Queue another MESSAGE_RX (or SWITCH_RX) whose payload lies in `ch`, a
    /// chunk pushOwned made (no copy).
    pub fn pushShared(
        self: *Queue,
        gpa: Allocator,
        kind: EventType,
        fd: i32,
        index: i64,
        ch: *Chunk,
        payload: []const u8,
    ) Allocator.Error!void {
        assert(kind == .message_rx or kind == .switch_rx);
        assert(holds(ch.data, payload));
        try self.items.ensureUnusedCapacity(gpa, 1);
        ch.refs += 1;
        self.items.appendAssumeCapacity(
            .{ .kind = kind, .fd = fd, .index = index, .data = payload, .chunk = ch },
        );
        self.live += 1;
    }

    /// The spare buffer if it holds at least `n` bytes (the caller owns it now).
    pub fn takeSpare(self: *Queue, n: usize) ?[]u8 {
        const sp = self.spare orelse return null;
        if (sp.len < n) return null;
        self.spare = null;
        return sp;
    }

    /// Keep `data` (a large buffer no longer used) as the spare if it is the
    /// largest one; free the other.
    pub fn keepSpare(self: *Queue, gpa: Allocator, data: []u8) void {
        if (self.spare) |sp| {
            if (sp.len >= data.len) return gpa.free(data);
            gpa.free(sp);
        }
        self.spare = data;
    }

    /// A chunk with `n` free bytes: the current one, or a new one (the old
    /// current is freed if nothing refers to it any more); a payload over
    /// chunk_size gets the spare when it is large enough.
    fn reserve(self: *Queue, gpa: Allocator, n: usize) Allocator.Error!*Chunk {
        if (self.current) |ch| {
            if (ch.refs == 0) ch.used = 0;
            if (ch.data.len - ch.used >= n) return ch;
        }
        const data = (if (n > chunk_size) self.takeSpare(n) else null) orelse
            try gpa.alloc(u8, @max(chunk_size, n));
        errdefer gpa.free(data);
        const ch = try gpa.create(Chunk);
        ch.* = .{ .data = data };
        if (self.current) |old| {
            if (old.refs == 0) self.freeChunk(gpa, old);
        }
        self.current = ch;
        return ch;
    }

    fn freeChunk(self: *Queue, gpa: Allocator, ch: *Chunk) void {
        assert(ch.refs == 0);
        if (ch.data.len > chunk_size) self.keepSpare(gpa, ch.data) else gpa.free(ch.data);
        gpa.destroy(ch);
    }

    /// Drop one reference; free a chunk nobody needs (keep the current one
    /// unless it is oversized: a 16 MiB message must not pin 16 MiB forever).
    fn unref(self: *Queue, gpa: Allocator, ch: *Chunk) void {
        assert(ch.refs > 0);
        ch.refs -= 1;
        if (ch.refs != 0) return;
        if (ch != self.current) return self.freeChunk(gpa, ch);
        ch.used = 0;
        if (ch.data.len > chunk_size) {
            self.freeChunk(gpa, ch);
            self.current = null;
        }
    }

    /// The first live event, if any (dropped ones are skipped and discarded).
    pub fn peek(self: *Queue) ?*Event {
        while (self.head < self.items.items.len) {
            const ev = &self.items.items[self.head];
            if (!ev.dropped) return ev;
            self.head += 1;
        }
        return null;
    }

    /// Remove the first live event; its payload is released at once
    /// (the caller copied it) or lent (valid until releaseLent).
    pub fn pop(self: *Queue, gpa: Allocator, lend: bool) Allocator.Error!void {
        const ev = self.peek() orelse unreachable;
        if (ev.chunk) |ch| {
            if (lend) try self.lent.append(gpa, ch) else self.unref(gpa, ch);
        }
        self.head += 1;
        self.live -= 1;
        self.compact(gpa);
    }

    /// Remove an event from anywhere in the queue. Invalidates other *Event
    /// pointers and iterators (the queue may be compacted).
    pub fn drop(self: *Queue, gpa: Allocator, ev: *Event) void {
        assert(!ev.dropped);
        if (ev.chunk) |ch| self.unref(gpa, ch);
        ev.chunk = null;
        ev.dropped = true;
        self.live -= 1;
        // Taking events from the front one by one (read_fd) must stay O(1):
        // skip the dropped prefix now rather than on every later scan.
        _ = self.peek();
        self.compact(gpa);
    }

    /// Forget the consumed prefix, cheaply: reset when empty, shift when the
    /// prefix is large (amortised O(1) per event).
    fn compact(self: *Queue, gpa: Allocator) void {
        if (self.live == 0) {
            for (self.items.items[self.head..]) |ev| assert(ev.dropped);
            self.head = 0;
            if (self.items.capacity > 4096)
                self.items.clearAndFree(gpa)
            else
                self.items.clearRetainingCapacity();
            return;
        }
        if (self.head < 1024 or self.head < self.items.items.len / 2) return;
        const rest = self.items.items[self.head..];
        @memmove(self.items.items[0..rest.len], rest);
        self.items.shrinkRetainingCapacity(rest.len);
        self.head = 0;
    }

    /// Live events of `fd` still queued, in order.
    pub fn iterFd(self: *Queue, fd: i32) FdIterator {
        return .{ .queue = self, .fd = fd, .pos = self.head };
    }

    pub const FdIterator = struct {
        queue: *Queue,
        fd: i32,
        pos: usize,
        pub fn next(it: *FdIterator) ?*Event {
            while (it.pos < it.queue.items.items.len) {
                const ev = &it.queue.items.items[it.pos];
                it.pos += 1;
                if (!ev.dropped and ev.fd == it.fd) return ev;
            }
            return null;
        }
    };

    /// What takeFd took.
    pub const Taken = struct {
        /// MESSAGE_RX events taken (the taker accepted their payloads).
        count: usize,
        /// fd's DISCONNECTION came before any message: the peer is gone.
        closed: bool,
        /// The taker said no to fd's next message (it stays queued).
        refused: bool,
    };

    /// Take up to `max` of fd's pending MESSAGE_RX, in order: each payload
    /// is offered to `taker.put(payload) bool` (it copies it, or says no and
    /// the taking stops). Stops at fd's DISCONNECTION; fd's other events (an
    /// ERROR) stay queued.
    pub fn takeFd(self: *Queue, gpa: Allocator, fd: i32, max: usize, taker: anytype) Taken {
        var count: usize = 0;
        var closed = false;
        var refused = false;
        for (self.items.items[self.head..]) |*ev| {
            if (count == max) break;
            if (ev.dropped or ev.fd != fd) continue;
            if (ev.kind == .disconnection) {
                closed = count == 0;
                break;
            }
            if (ev.kind != .message_rx) continue;
            if (!taker.put(ev.data)) {
                refused = true;
                break;
            }
            if (ev.chunk) |ch| self.unref(gpa, ch);
            ev.chunk = null;
            ev.dropped = true;
            self.live -= 1;
            count += 1;
        }
        _ = self.peek();
        self.compact(gpa);
        return .{ .count = count, .closed = closed, .refused = refused };
    }

    /// What lendNext found for a fd.
    pub const Next = union(enum) {
        /// fd's next MESSAGE_RX: its payload, lent until releaseLent.
        message: []const u8,
        /// fd's DISCONNECTION comes first: the peer is gone.
        closed,
        /// Nothing for fd yet.
        none,
    };

    /// Take fd's next MESSAGE_RX out of the queue and lend its payload (no
    /// copy; valid until releaseLent), unless its DISCONNECTION comes first.
    pub fn lendNext(self: *Queue, gpa: Allocator, fd: i32) Allocator.Error!Next {
        try self.lent.ensureUnusedCapacity(gpa, 1);
        for (self.items.items[self.head..]) |*ev| {
            if (ev.dropped or ev.fd != fd) continue;
            if (ev.kind == .disconnection) return .closed;
            if (ev.kind != .message_rx) continue;
            const payload = ev.data;
            if (ev.chunk) |ch| self.lent.appendAssumeCapacity(ch);
            ev.chunk = null;
            ev.dropped = true;
            self.live -= 1;
            _ = self.peek();
            self.compact(gpa);
            return .{ .message = payload };
        }
        return .none;
    }

    /// Drop every pending event of `fd` (it was closed by the caller).
    /// One pass that also squeezes out earlier dropped entries.
    pub fn dropFd(self: *Queue, gpa: Allocator, fd: i32) void {
        if (self.live == 0) return;
        const items = self.items.items;
        var keep: usize = self.head;
        for (items[self.head..]) |ev| {
            if (ev.dropped) continue;
            if (ev.fd == fd) {
                if (ev.chunk) |ch| self.unref(gpa, ch);
                self.live -= 1;
                continue;
            }
            items[keep] = ev;
            keep += 1;
        }
        self.items.shrinkRetainingCapacity(keep);
        self.compact(gpa);
    }

    /// Drop every pending event.
    pub fn clear(self: *Queue, gpa: Allocator) void {
        while (self.peek()) |ev| self.drop(gpa, ev);
        assert(self.live == 0);
    }

    /// The payloads handed out by the previous wait are no longer needed.
    pub fn releaseLent(self: *Queue, gpa: Allocator) void {
        for (self.lent.items) |ch| self.unref(gpa, ch);
        if (self.lent.capacity > 4096)
            self.lent.clearAndFree(gpa)
        else
            self.lent.clearRetainingCapacity();
    }
};

// ---------------------------------------------------------------- tests

const testing = std.testing;

test "payloads keep their address while more events are queued" {
    const gpa = testing.allocator;
    var q: Queue = .{};
    defer q.deinit(gpa);
    try q.pushData(gpa, .message_rx, 5, 0, "first");
    const first = q.peek().?.data;
    var big: [10_000]u8 = undefined;
    @memset(&big, 'b');
    for (0..50) |_| try q.pushData(gpa, .message_rx, 5, 0, &big); // several chunks
    try q.pop(gpa, true);
    try q.pushData(gpa, .err, 5, 0, "boom");
    try testing.expectEqualStrings("first", first);
    try testing.expectEqual(@as(usize, 51), q.live);
    q.releaseLent(gpa);
    while (q.peek()) |ev| {
        if (ev.kind == .err) {
            try testing.expectEqualStrings("boom", ev.data);
            try testing.expectEqual(@as(u8, 0), ev.data.ptr[ev.data.len]);
        }
        try q.pop(gpa, false);
    }
    try testing.expectEqual(@as(usize, 0), q.live);
}

test "dropping events of one fd keeps the others in order" {
    const gpa = testing.allocator;
    var q: Queue = .{};
    defer q.deinit(gpa);
    try q.pushData(gpa, .message_rx, 1, 0, "a");
    try q.pushData(gpa, .message_rx, 2, 1, "b");
    try q.push(gpa, .disconnection, 1, 0);
    try q.pushData(gpa, .message_rx, 2, 1, "c");
    q.dropFd(gpa, 1);
    try testing.expectEqual(@as(usize, 2), q.live);
    try testing.expectEqualStrings("b", q.peek().?.data);
    try q.pop(gpa, false);
    try testing.expectEqualStrings("c", q.peek().?.data);
    try q.pop(gpa, false);
    try testing.expect(q.peek() == null);
}

test "a large payload gets its own chunk, kept as the spare after use and reused" {
    const gpa = testing.allocator;
    var q: Queue = .{};
    defer q.deinit(gpa);
    const big = try gpa.alloc(u8, 1 << 20);
    defer gpa.free(big);
    @memset(big, 1);
    try q.pushData(gpa, .message_rx, 3, 0, big);
    const first = q.peek().?.data.ptr;
    try q.pop(gpa, false);
    try testing.expect(q.current == null);
    try testing.expect(q.spare != null);
    try q.pushData(gpa, .message_rx, 3, 0, big[0 .. big.len - 1]);
    try testing.expectEqual(first, q.peek().?.data.ptr); // the same memory, no new buffer
    try testing.expect(q.spare == null);
    try q.pop(gpa, false);
}

test "an owned buffer carries its payload without a copy and becomes the spare" {
    const gpa = testing.allocator;
    var q: Queue = .{};
    defer q.deinit(gpa);
    const small = try gpa.alloc(u8, 100 << 10);
    _ = try q.pushOwned(gpa, .message_rx, 4, 0, small, small[4..]);
    try testing.expectEqual(small.ptr + 4, q.peek().?.data.ptr);
    try q.pop(gpa, false);
    try testing.expectEqual(small.ptr, q.spare.?.ptr);
    const large = try gpa.alloc(u8, 200 << 10);
    _ = try q.pushOwned(gpa, .message_rx, 4, 0, large, large[4..]);
    try q.pop(gpa, true);
    q.releaseLent(gpa);
    try testing.expectEqual(large.ptr, q.spare.?.ptr); // the larger one is kept
    try testing.expect(q.takeSpare(300 << 10) == null);
    const taken = q.takeSpare(150 << 10).?;
    gpa.free(taken);
}

test "taking events from the front one at a time stays compact" {
    const gpa = testing.allocator;
    var q: Queue = .{};
    defer q.deinit(gpa);
    for (0..5000) |i| try q.pushData(gpa, .message_rx, @intCast(i % 2), 0, "m");
    var taken: usize = 0;
    while (q.live > 1) : (taken += 1) {
        var it = q.iterFd(@intCast(taken % 2));
        const ev = it.next().?;
        try testing.expect(it.pos - q.head <= 2); // found at the front, not after a long scan
        q.drop(gpa, ev);
    }
    q.dropFd(gpa, 0);
    q.dropFd(gpa, 1);
    try testing.expectEqual(@as(usize, 0), q.live);
    try testing.expectEqual(@as(usize, 0), q.items.items.len);
}

test "taking fd's messages stops at its disconnection, a full taker; other fds' stay" {
    const gpa = testing.allocator;
    var q: Queue = .{};
    defer q.deinit(gpa);
    try q.pushData(gpa, .message_rx, 1, 0, "a");
    try q.pushData(gpa, .message_rx, 2, 1, "x");
    try q.pushData(gpa, .message_rx, 1, 0, "bb");
    try q.pushData(gpa, .message_rx, 1, 0, "c");
    try q.push(gpa, .disconnection, 1, 0);
    const Taker = struct {
        buf: [3]u8 = undefined,
        used: usize = 0,
        fn put(self: *@This(), payload: []const u8) bool {
            if (self.used + payload.len > self.buf.len) return false;
            @memcpy(self.buf[self.used .. self.used + payload.len], payload);
            self.used += payload.len;
            return true;
        }
    };
    var taker: Taker = .{};
    const first = q.takeFd(gpa, 1, 1, &taker);
    try testing.expectEqual(@as(usize, 1), first.count);
    const rest = q.takeFd(gpa, 1, 10, &taker); // "bb" fits, "c" does not
    try testing.expectEqual(@as(usize, 1), rest.count);
    try testing.expect(!rest.closed);
    try testing.expect(rest.refused);
    try testing.expectEqualStrings("abb", &taker.buf);
    taker.used = 0;
    const last = q.takeFd(gpa, 1, 10, &taker);
    try testing.expectEqual(@as(usize, 1), last.count);
    try testing.expectEqualStrings("c", taker.buf[0..1]);
    const gone = q.takeFd(gpa, 1, 10, &taker);
    try testing.expectEqual(@as(usize, 0), gone.count);
    try testing.expect(gone.closed);
    try testing.expectEqual(@as(usize, 2), q.live); // x, DISCONNECTION
    try testing.expectEqualStrings("x", q.peek().?.data);
}

test "lending fd's next message keeps its payload until releaseLent" {
    const gpa = testing.allocator;
    var q: Queue = .{};
    defer q.deinit(gpa);
    const big = try gpa.alloc(u8, 100 << 10);
    defer gpa.free(big);
    @memset(big, 9);
    try q.pushData(gpa, .message_rx, 2, 0, "other");
    try q.pushData(gpa, .message_rx, 1, 0, big);
    try q.push(gpa, .disconnection, 1, 0);
    const next = try q.lendNext(gpa, 1);
    try testing.expectEqual(@as(usize, big.len), next.message.len);
    try q.pushData(gpa, .message_rx, 2, 0, big); // the lent one is not reused meanwhile
    try testing.expectEqual(@as(u8, 9), next.message[big.len - 1]);
    try testing.expect(q.spare == null);
    try testing.expect(try q.lendNext(gpa, 1) == .closed);
    try testing.expect(try q.lendNext(gpa, 3) == .none);
    q.releaseLent(gpa);
    try testing.expect(q.spare != null); // now it may be reused
}
