//! pyipc framing: a 4-byte big-endian length, then that many payload bytes.
//!
//! The decoder is incremental and allocation-light: frames wholly inside the
//! input chunk are handed to the sink straight from it (no copy); only an
//! unfinished frame is kept, in a buffer that grows with the bytes that have
//! actually arrived (at most doubling, never to the announced size at once:
//! a peer that announces 4 GiB and sends 10 bytes costs 10 bytes, not 4 GiB)
//! and is freed when the frame is done, so an idle connection holds no
//! receive memory.

const std = @import("std");
const assert = std.debug.assert;
const Allocator = std.mem.Allocator;

pub const header_size = 4;

/// Above this capacity an emptied buffer is freed rather than kept.
const keep_capacity = 256;
/// A partial frame with at least this much missing is read into its own buffer
/// directly (see readTarget), instead of through the scratch buffer.
pub const direct_read_min = 64 * 1024;

/// What a sink may fail with: out of memory, or Stopped (the connection went
/// away while handling a frame; decoding must end at once).
pub const SinkError = error{ OutOfMemory, Stopped };
pub const FeedError = SinkError || error{FrameTooLarge};

pub fn encodeHeader(len: u32) [header_size]u8 {
    var h: [header_size]u8 = undefined;
    std.mem.writeInt(u32, &h, len, .big);
    return h;
}

fn announced(bytes: []const u8) u32 {
    return std.mem.readInt(u32, bytes[0..header_size], .big);
}

pub const Decoder = struct {
    /// Unconsumed bytes of the stream, starting at a frame boundary.
    buf: std.ArrayList(u8) = .empty,
    /// The length a peer announced when feed failed with FrameTooLarge.
    too_large: u32 = 0,

    pub fn deinit(self: *Decoder, gpa: Allocator) void {
        self.buf.deinit(gpa);
        self.* = .{};
    }

    /// True while part of a frame (even a partial header) is buffered.
    pub fn hasPartial(self: *const Decoder) bool {
        return self.buf.items.len > 0;
    }

    /// Decode the stream `buffered ++ input`: call `sink.frame(payload)` for
    /// every complete frame, in order; keep what remains. FrameTooLarge comes
    /// after the frames before the bad header were delivered, and before
    /// anything was allocated for it; the decoder is not usable afterwards.
    pub fn feed(
        self: *Decoder,
        gpa: Allocator,
        input: []const u8,
        max: u32,
        sink: anytype,
    ) FeedError!void {
        var rest = input;
        if (self.buf.items.len > 0) {
            rest = try self.drainBuffered(gpa, rest, max, sink);
            if (self.buf.items.len > 0) {
                assert(rest.len == 0);
                return;
            }
        }
        var off: usize = 0;
        while (rest.len - off >= header_size) {
            const n = announced(rest[off..]);
            if (n > max) return self.refuse(n);
            const end = off + header_size + @as(usize, n);
            if (end > rest.len) break;
            try sink.frame(rest[off + header_size .. end]);
            off = end;
        }
        if (off < rest.len) try self.stash(gpa, rest[off..]);
    }

    /// Complete buffered frames with bytes taken from `input`; emit them.
    /// Returns the part of `input` not taken.
    fn drainBuffered(
        self: *Decoder,
        gpa: Allocator,
        input: []const u8,
        max: u32,
        sink: anytype,
    ) FeedError![]const u8 {
        var rest = input;
        while (self.buf.items.len > 0) {
            rest = try self.take(gpa, rest, header_size);
            if (self.buf.items.len < header_size) return rest;
            const n = announced(self.buf.items);
            if (n > max) return self.refuse(n);
            const need = header_size + @as(usize, n);
            rest = try self.take(gpa, rest, need);
            if (self.buf.items.len < need) return rest;
            if (need == self.buf.items.len and need >= direct_read_min and
                @hasDecl(@TypeOf(sink.*), "frameOwned"))
            {
                // The buffer holds exactly this large frame: hand it over
                // whole (no copy); the decoder starts empty.
                const memory = self.buf.allocatedSlice();
                self.buf = .empty;
                try sink.frameOwned(memory, memory[header_size..need]);
                continue;
            }
            try sink.frame(self.buf.items[header_size..need]);
            self.consume(gpa, need);
        }
        return rest;
    }

    /// Append bytes of `input` to the buffer until it holds `want` bytes.
    fn take(
        self: *Decoder,
        gpa: Allocator,
        input: []const u8,
        want: usize,
    ) Allocator.Error![]const u8 {
        if (self.buf.items.len >= want) return input;
        const k = @min(want - self.buf.items.len, input.len);
        try self.buf.appendSlice(gpa, input[0..k]);
        return input[k..];
    }

    /// Drop the first `n` buffered bytes (one frame); free a large emptied buffer.
    fn consume(self: *Decoder, gpa: Allocator, n: usize) void {
        const items = self.buf.items;
        assert(n <= items.len);
        if (n == items.len) {
            if (self.buf.capacity > keep_capacity)
                self.buf.clearAndFree(gpa)
            else
                self.buf.clearRetainingCapacity();
            return;
        }
        @memmove(items[0 .. items.len - n], items[n..]);
        self.buf.shrinkRetainingCapacity(items.len - n);
    }

    /// Keep an unfinished frame: only the bytes that came (the announced
    /// length is trusted for nothing but the limit check).
    fn stash(self: *Decoder, gpa: Allocator, tail: []const u8) Allocator.Error!void {
        assert(self.buf.items.len == 0);
        try self.buf.appendSlice(gpa, tail);
    }

    fn refuse(self: *Decoder, n: u32) error{FrameTooLarge} {
        self.too_large = n;
        return error.FrameTooLarge;
    }

    /// Before a read while a large frame is in progress: make room for at
    /// least direct_read_min more bytes of it, doubling the buffer at most
    /// (capped at the frame's end), so memory follows what actually arrives.
    pub fn growForRead(self: *Decoder, gpa: Allocator) Allocator.Error!void {
        if (self.buf.items.len < header_size) return;
        const need = header_size + @as(usize, announced(self.buf.items));
        if (need < self.buf.items.len + direct_read_min) return;
        if (self.buf.capacity >= self.buf.items.len + direct_read_min) return;
        const want = @min(need, @max(self.buf.capacity * 2, self.buf.items.len + direct_read_min));
        try self.buf.ensureTotalCapacityPrecise(gpa, want);
    }

    /// Bytes a buffer for the large frame in progress should hold (the whole
    /// frame), or null when there is none (no header yet, or a small frame)
    /// or the decoder's own buffer is already that large.
    pub fn wantsBuffer(self: *const Decoder) ?usize {
        if (self.buf.items.len < header_size) return null;
        const need = header_size + @as(usize, announced(self.buf.items));
        if (need < self.buf.items.len + direct_read_min or self.buf.capacity >= need) return null;
        return need;
    }

    /// Take `memory` (a buffer of gpa's, at least wantsBuffer() bytes) as the
    /// buffer of the frame in progress; what was buffered moves into it.
    pub fn adopt(self: *Decoder, gpa: Allocator, memory: []u8) void {
        const have = self.buf.items.len;
        assert(memory.len >= have);
        @memcpy(memory[0..have], self.buf.items);
        self.buf.deinit(gpa);
        self.buf = .initBuffer(memory); // owned from now on: freed by deinit
        self.buf.items.len = have;
    }

    /// The buffered bytes: the start of one unfinished frame (a partial
    /// header, or a header and part of its payload), or nothing.
    pub fn buffered(self: *const Decoder) []const u8 {
        return self.buf.items;
    }

    /// Forget the buffered bytes: the caller took the unfinished frame over
    /// (read_into completes it in the caller's buffer).
    pub fn discard(self: *Decoder, gpa: Allocator) void {
        self.consume(gpa, self.buf.items.len);
    }

    /// Where to read next when a large frame is in progress: the free space of
    /// its own buffer up to the frame's end (saves a copy per byte), else null
    /// (read into the scratch buffer and feed it). growForRead makes the room.
    pub fn readTarget(self: *Decoder) ?[]u8 {
        if (self.buf.items.len < header_size) return null;
        const need = header_size + @as(usize, announced(self.buf.items));
        if (need < self.buf.items.len + direct_read_min) return null;
        const end = @min(need, self.buf.capacity);
        if (end <= self.buf.items.len) return null;
        return self.buf.allocatedSlice()[self.buf.items.len..end];
    }

    /// Account for `n` bytes read into the slice readTarget gave; the caller then
    /// calls feed with an empty input to emit the frame once it is complete.
    pub fn commitRead(self: *Decoder, n: usize) void {
        assert(self.buf.items.len + n <= self.buf.capacity);
        self.buf.items.len += n;
    }
};

// ---------------------------------------------------------------- tests

const testing = std.testing;

/// A sink that records every payload (tests only).
const Collect = struct {
    gpa: Allocator,
    frames: std.ArrayList([]u8) = .empty,

    fn frame(self: *Collect, payload: []const u8) SinkError!void {
        const copy = try self.gpa.dupe(u8, payload);
        errdefer self.gpa.free(copy);
        try self.frames.append(self.gpa, copy);
    }

    fn deinit(self: *Collect) void {
        for (self.frames.items) |f| self.gpa.free(f);
        self.frames.deinit(self.gpa);
    }
};

fn encodeAll(gpa: Allocator, payloads: []const []const u8) ![]u8 {
    var out: std.ArrayList(u8) = .empty;
    errdefer out.deinit(gpa);
    for (payloads) |p| {
        try out.appendSlice(gpa, &encodeHeader(@intCast(p.len)));
        try out.appendSlice(gpa, p);
    }
    return out.toOwnedSlice(gpa);
}

const sample = [_][]const u8{ "hello", "", "x", "a longer message with some bytes", "", "end" };

fn expectSample(col: *const Collect) !void {
    try testing.expectEqual(sample.len, col.frames.items.len);
    for (sample, col.frames.items) |want, got| try testing.expectEqualStrings(want, got);
}

test "every split point of a stream gives the same frames" {
    const gpa = testing.allocator;
    const stream = try encodeAll(gpa, &sample);
    defer gpa.free(stream);
    for (0..stream.len + 1) |cut| {
        var dec: Decoder = .{};
        defer dec.deinit(gpa);
        var col: Collect = .{ .gpa = gpa };
        defer col.deinit();
        try dec.feed(gpa, stream[0..cut], 100, &col);
        try dec.feed(gpa, stream[cut..], 100, &col);
        try expectSample(&col);
        try testing.expect(!dec.hasPartial());
    }
}

test "one byte at a time, and all frames in one chunk" {
    const gpa = testing.allocator;
    const stream = try encodeAll(gpa, &sample);
    defer gpa.free(stream);
    {
        var dec: Decoder = .{};
        defer dec.deinit(gpa);
        var col: Collect = .{ .gpa = gpa };
        defer col.deinit();
        for (0..stream.len) |i| try dec.feed(gpa, stream[i .. i + 1], 100, &col);
        try expectSample(&col);
    }
    {
        var dec: Decoder = .{};
        defer dec.deinit(gpa);
        var col: Collect = .{ .gpa = gpa };
        defer col.deinit();
        try dec.feed(gpa, stream, 100, &col);
        try expectSample(&col);
    }
}

test "header split in two, then the payload apart" {
    const gpa = testing.allocator;
    var dec: Decoder = .{};
    defer dec.deinit(gpa);
    var col: Collect = .{ .gpa = gpa };
    defer col.deinit();
    const h = encodeHeader(3);
    try dec.feed(gpa, h[0..2], 10, &col);
    try testing.expect(dec.hasPartial());
    try dec.feed(gpa, h[2..], 10, &col);
    try testing.expectEqual(@as(usize, 0), col.frames.items.len);
    try dec.feed(gpa, "abc", 10, &col);
    try testing.expectEqual(@as(usize, 1), col.frames.items.len);
    try testing.expectEqualStrings("abc", col.frames.items[0]);
    try testing.expect(!dec.hasPartial());
}

test "an oversize announcement is refused before allocation, after earlier frames" {
    const gpa = testing.allocator;
    var dec: Decoder = .{};
    defer dec.deinit(gpa);
    var col: Collect = .{ .gpa = gpa };
    defer col.deinit();
    var stream: [4 + 2 + 4]u8 = undefined;
    @memcpy(stream[0..4], &encodeHeader(2));
    @memcpy(stream[4..6], "ok");
    @memcpy(stream[6..10], &encodeHeader(0xFFFF_FFFF));
    // testing.allocator would fail the test on a 4 GiB allocation attempt.
    try testing.expectError(error.FrameTooLarge, dec.feed(gpa, &stream, 16, &col));
    try testing.expectEqual(@as(u32, 0xFFFF_FFFF), dec.too_large);
    try testing.expectEqual(@as(usize, 1), col.frames.items.len);
    // Same through the buffered path: header split over two feeds.
    var dec2: Decoder = .{};
    defer dec2.deinit(gpa);
    const h = encodeHeader(17);
    try dec2.feed(gpa, h[0..3], 16, &col);
    try testing.expectError(error.FrameTooLarge, dec2.feed(gpa, h[3..], 16, &col));
    try testing.expectEqual(@as(u32, 17), dec2.too_large);
}

test "exactly max bytes is accepted; a large frame is read in place" {
    const gpa = testing.allocator;
    const size = 200 * 1024;
    const payload = try gpa.alloc(u8, size);
    defer gpa.free(payload);
    for (payload, 0..) |*b, i| b.* = @truncate(i);
    var dec: Decoder = .{};
    defer dec.deinit(gpa);
    var col: Collect = .{ .gpa = gpa };
    defer col.deinit();
    try dec.feed(gpa, &encodeHeader(size), size, &col);
    var done: usize = 0;
    while (true) {
        try dec.growForRead(gpa);
        const target = dec.readTarget() orelse break;
        const k = @min(target.len, 50_000);
        @memcpy(target[0..k], payload[done .. done + k]);
        dec.commitRead(k);
        done += k;
        try dec.feed(gpa, &.{}, size, &col);
    }
    try dec.feed(gpa, payload[done..], size, &col);
    try testing.expectEqual(@as(usize, 1), col.frames.items.len);
    try testing.expectEqualSlices(u8, payload, col.frames.items[0]);
    try testing.expectEqual(@as(usize, 0), dec.buf.capacity); // freed once done
}

test "several frames left in the buffer are all drained" {
    const gpa = testing.allocator;
    const stream = try encodeAll(gpa, &sample);
    defer gpa.free(stream);
    var dec: Decoder = .{};
    defer dec.deinit(gpa);
    try dec.buf.appendSlice(gpa, stream); // as read_fd's blocking read leaves it
    var col: Collect = .{ .gpa = gpa };
    defer col.deinit();
    try dec.feed(gpa, &.{}, 100, &col);
    try expectSample(&col);
}

test "a huge announcement within the limit reserves only what arrives" {
    const gpa = testing.allocator;
    var dec: Decoder = .{};
    defer dec.deinit(gpa);
    var col: Collect = .{ .gpa = gpa };
    defer col.deinit();
    var chunk: [4 + 10]u8 = undefined;
    @memcpy(chunk[0..4], &encodeHeader(0xFFFF_FFFF));
    @memset(chunk[4..], 'x');
    try dec.feed(gpa, &chunk, 0xFFFF_FFFF, &col);
    try testing.expect(dec.buf.capacity < 4096);
    // Reading in place: the buffer doubles with the data, never jumps to 4 GiB.
    var received: usize = chunk.len;
    for (0..20) |_| {
        try dec.growForRead(gpa);
        const target = dec.readTarget().?;
        const k = @min(target.len, 100_000);
        @memset(target[0..k], 'y');
        dec.commitRead(k);
        received += k;
        try dec.feed(gpa, &.{}, 0xFFFF_FFFF, &col);
        try testing.expect(dec.buf.capacity <= 2 * received + direct_read_min);
    }
    try testing.expectEqual(@as(usize, 0), col.frames.items.len);
    try testing.expect(dec.hasPartial());
}

test "a large frame completed in the decoder's buffer is handed over whole" {
    const gpa = testing.allocator;
    const Owner = struct {
        gpa: Allocator,
        owned: usize = 0,
        small: usize = 0,
        first: u8 = 0,
        owned_len: usize = 0,
        pub fn frame(self: *@This(), payload: []const u8) SinkError!void {
            _ = payload;
            self.small += 1;
        }
        pub fn frameOwned(self: *@This(), memory: []u8, payload: []const u8) SinkError!void {
            defer self.gpa.free(memory);
            self.owned += 1;
            self.first = payload[0];
            self.owned_len = payload.len;
        }
    };
    var sink: Owner = .{ .gpa = gpa };
    var dec: Decoder = .{};
    defer dec.deinit(gpa);
    const header = encodeHeader(200_000);
    try dec.feed(gpa, &header, 1 << 20, &sink);
    var part: [50_000]u8 = undefined;
    @memset(&part, 7);
    for (0..4) |_| {
        try dec.growForRead(gpa);
        try dec.feed(gpa, &part, 1 << 20, &sink);
    }
    try testing.expectEqual(@as(usize, 1), sink.owned);
    try testing.expectEqual(@as(u8, 7), sink.first);
    try testing.expectEqual(@as(usize, 200_000), sink.owned_len);
    try testing.expect(!dec.hasPartial());
    try dec.feed(gpa, &(encodeHeader(1) ++ [_]u8{1}), 1 << 20, &sink); // small: copied
    try testing.expectEqual(@as(usize, 1), sink.small);
}
