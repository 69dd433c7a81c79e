//! A connection's queue of outgoing frames.
//!
//! Frames are stored back to back (header, payload, header, payload...) in
//! two byte buffers: the unwritten part of `front` goes out first, then
//! `back`, in one socket write of at most two parts, so coalescing needs no
//! iovec per frame. New frames go to `back` while `front` still has unwritten
//! bytes, else to `front`; once `front` is written out the two swap. So no
//! queued byte is ever moved (one buffer had to move its unwritten rest to the
//! front now and then: under a steady stream of 64 KiB messages that move was
//! as costly as the copy into the queue). A partial write just advances
//! `head`. A small side list remembers each frame's size and what to report
//! when it is fully written (MESSAGE_TX, or SWITCH_TX for switched
//! forwarding). The buffers are freed when the queue empties, so an idle
//! connection holds none.
//!
//! A pinned frame (pushPinned) keeps only its header in the buffers: its
//! payload is written from the caller's memory, which the caller keeps
//! unchanged until the queue reports the frame's token (`sink.unpinned`,
//! when the frame is written, or discard()). A 64 KiB message is then
//! copied once, by the kernel, as C's write() copies it.

const std = @import("std");
const assert = std.debug.assert;
const Allocator = std.mem.Allocator;
const framing = @import("framing.zig");
const sys = @import("sys.zig");

/// What a completed frame is reported as: MESSAGE_TX, SWITCH_TX, or
/// nothing (the rest of a frame whose write() was stopped, see pushRemainder;
/// `silent`: raw bytes of switch_send, see pushRaw, or a frame relayed while
/// switch_events is off).
pub const Origin = enum(u8) { scheduled, switched, remainder, silent };

/// A payload written from the caller's memory (see pushPinned).
pub const Pin = struct { ptr: [*]const u8, len: usize, token: u64 };

const FrameInfo = struct { size: u64, origin: Origin, pin: ?Pin = null };

/// iovecs one flush builds at most while pinned frames are queued.
const pinned_iov_max = 64;
/// Bytes one flush gathers at most while pinned frames are queued: far more
/// than a socket takes at once, and it keeps the walk over the frames short
/// when many small ones are queued around a pinned one.
const pinned_gather_max = 1 << 20;

/// Above this capacity an emptied buffer is freed rather than kept.
const keep_capacity = 4096;

pub const SendQueue = struct {
    /// Queued bytes written first; bytes before `head` are already written.
    front: std.ArrayList(u8) = .empty,
    head: usize = 0,
    /// Queued bytes written after all of `front`; empty while `front` has
    /// nothing left to write (new frames then go to `front`).
    back: std.ArrayList(u8) = .empty,
    /// One entry per queued frame; entries before `first` are done.
    frames: std.ArrayList(FrameInfo) = .empty,
    first: usize = 0,
    /// Bytes of frames[first] already written.
    first_sent: u64 = 0,
    /// Pinned frames not completely written, and their payload bytes still
    /// to write (they are in no buffer).
    pinned: usize = 0,
    pinned_bytes: u64 = 0,

    pub fn deinit(self: *SendQueue, gpa: Allocator) void {
        self.front.deinit(gpa);
        self.back.deinit(gpa);
        self.frames.deinit(gpa);
        self.* = .{};
    }

    pub fn isEmpty(self: *const SendQueue) bool {
        return self.first == self.frames.items.len;
    }

    /// Bytes still to write (headers included): what max_queue_size bounds.
    pub fn queuedBytes(self: *const SendQueue) u64 {
        return self.ownedBytes() + self.pinned_bytes;
    }

    /// Queued bytes in the two buffers (all but pinned payloads).
    fn ownedBytes(self: *const SendQueue) usize {
        return self.front.items.len - self.head + self.back.items.len;
    }

    /// Frames not completely written yet.
    pub fn frameCount(self: *const SendQueue) usize {
        return self.frames.items.len - self.first;
    }

    /// Append one frame (header + payload). The caller checked the bounds.
    pub fn push(
        self: *SendQueue,
        gpa: Allocator,
        payload: []const u8,
        origin: Origin,
    ) Allocator.Error!void {
        assert(payload.len <= std.math.maxInt(u32));
        const size = framing.header_size + payload.len;
        const tail = try self.reserve(gpa, size);
        tail.appendSliceAssumeCapacity(&framing.encodeHeader(@intCast(payload.len)));
        tail.appendSliceAssumeCapacity(payload);
        self.frames.appendAssumeCapacity(.{ .size = size, .origin = origin });
    }

    /// Append one frame whose payload stays in the caller's memory until
    /// `sink.unpinned(pin.token)` (see the file's comment).
    pub fn pushPinned(self: *SendQueue, gpa: Allocator, pin: Pin) Allocator.Error!void {
        assert(pin.len > 0 and pin.len <= std.math.maxInt(u32));
        const tail = try self.reserve(gpa, framing.header_size);
        tail.appendSliceAssumeCapacity(&framing.encodeHeader(@intCast(pin.len)));
        self.frames.appendAssumeCapacity(.{
            .size = framing.header_size + pin.len,
            .origin = .scheduled,
            .pin = pin,
        });
        self.pinned += 1;
        self.pinned_bytes += pin.len;
    }

    /// Empty the queue without writing it (its connection ended): the
    /// tokens of its pinned frames go to `sink.unpinned`, nothing else is
    /// reported.
    pub fn discard(self: *SendQueue, gpa: Allocator, sink: anytype) void {
        if (self.pinned > 0) {
            for (self.frames.items[self.first..]) |f| {
                if (f.pin) |p| sink.unpinned(p.token);
            }
        }
        self.deinit(gpa);
    }

    /// Append the last `len` bytes of a frame that a blocking write began
    /// (the first `len` bytes of `parts`), so they go out before anything
    /// queued later. Reported as nothing when written.
    pub fn pushRemainder(
        self: *SendQueue,
        gpa: Allocator,
        parts: []const std.posix.iovec_const,
        len: u64,
    ) Allocator.Error!void {
        const tail = try self.reserve(gpa, len);
        var left = len;
        for (parts) |part| {
            if (left == 0) break;
            const take = @min(left, part.len);
            tail.appendSliceAssumeCapacity(part.base[0..take]);
            left -= take;
        }
        assert(left == 0);
        self.frames.appendAssumeCapacity(.{ .size = len, .origin = .remainder });
    }

    /// Append raw bytes (switch_send: a foreign protocol's own output, not
    /// framed), written after what is queued; reported as nothing.
    pub fn pushRaw(self: *SendQueue, gpa: Allocator, data: []const u8) Allocator.Error!void {
        const tail = try self.reserve(gpa, data.len);
        tail.appendSliceAssumeCapacity(data);
        self.frames.appendAssumeCapacity(.{ .size = data.len, .origin = .silent });
    }

    /// The buffer new bytes go to, with room for `size` more and for one
    /// more frame entry: `front` when all of it is written (it is emptied,
    /// nothing to move), else `back`.
    fn reserve(self: *SendQueue, gpa: Allocator, size: usize) Allocator.Error!*std.ArrayList(u8) {
        try self.frames.ensureUnusedCapacity(gpa, 1);
        self.compactFrames();
        const tail = if (self.head == self.front.items.len) blk: {
            assert(self.back.items.len == 0);
            self.front.clearRetainingCapacity();
            self.head = 0;
            break :blk &self.front;
        } else &self.back;
        try tail.ensureUnusedCapacity(gpa, size);
        return tail;
    }

    /// Drop the entries of written frames once they are the larger part of
    /// the list (a few words each: cheap to move, amortised O(1)).
    fn compactFrames(self: *SendQueue) void {
        if (self.first == 0 or self.first < self.frames.items.len / 2) return;
        const live = self.frames.items[self.first..];
        @memmove(self.frames.items[0..live.len], live);
        self.frames.shrinkRetainingCapacity(live.len);
        self.first = 0;
    }

    /// Account for `n` written bytes; for every frame that is now fully
    /// written, in order, call `sink.unpinned(token)` if it was pinned and
    /// `sink.completed(origin)`.
    pub fn advance(self: *SendQueue, gpa: Allocator, n: usize, sink: anytype) Allocator.Error!void {
        assert(n <= self.queuedBytes());
        // First the bookkeeping, all of it, so that a failing sink leaves
        // the queue consistent with what was written.
        const done_from = self.first;
        var left: u64 = n;
        var owned: usize = 0;
        while (self.first < self.frames.items.len) {
            const f = self.frames.items[self.first];
            const take = @min(left, f.size - self.first_sent);
            const in_buffers = if (f.pin == null) take else headerPart(self.first_sent, take);
            owned += @intCast(in_buffers);
            self.pinned_bytes -= take - in_buffers;
            left -= take;
            if (self.first_sent + take < f.size) {
                self.first_sent += take;
                break;
            }
            self.first_sent = 0;
            self.first += 1;
            if (f.pin != null) self.pinned -= 1;
        }
        assert(left == 0);
        self.advanceOwned(owned);
        for (self.frames.items[done_from..self.first]) |f| {
            if (f.pin) |p| sink.unpinned(p.token);
        }
        for (self.frames.items[done_from..self.first]) |f| try sink.completed(f.origin);
        if (self.isEmpty()) self.reset(gpa);
    }

    /// Of `take` bytes written from offset `sent` of a pinned frame, those
    /// of its header (the part in the buffers).
    fn headerPart(sent: u64, take: u64) u64 {
        return @min(sent + take, framing.header_size) -| sent;
    }

    /// `n` bytes of the buffers are written.
    fn advanceOwned(self: *SendQueue, n: usize) void {
        const front_left = self.front.items.len - self.head;
        if (n < front_left) {
            self.head += n;
        } else {
            // front is written out: back (its rest) becomes the front.
            std.mem.swap(std.ArrayList(u8), &self.front, &self.back);
            self.back.clearRetainingCapacity();
            self.head = n - front_left;
        }
    }

    fn reset(self: *SendQueue, gpa: Allocator) void {
        assert(self.queuedBytes() == 0 and self.first_sent == 0 and self.pinned == 0);
        for ([_]*std.ArrayList(u8){ &self.front, &self.back }) |buf| {
            if (buf.capacity > keep_capacity)
                buf.clearAndFree(gpa)
            else
                buf.clearRetainingCapacity();
        }
        if (self.frames.capacity > keep_capacity / @sizeOf(FrameInfo))
            self.frames.clearAndFree(gpa)
        else
            self.frames.clearRetainingCapacity();
        self.head = 0;
        self.first = 0;
    }

    pub const FlushResult = union(enum) {
        /// Everything was written.
        drained,
        /// The socket is full; the rest stays queued.
        would_block,
        /// The write failed (EPIPE: the peer is gone).
        failed: sys.E,
        /// A write that waits (sys.Wait.yes) was interrupted by a signal.
        interrupted,
    };

    /// Write as much as the fd takes (a socket: waiting for room with
    /// `wait == .yes`, see sys.Wait); report completed frames.
    pub fn flush(
        self: *SendQueue,
        gpa: Allocator,
        fd: sys.fd_t,
        is_socket: bool,
        wait: sys.Wait,
        sink: anytype,
    ) Allocator.Error!FlushResult {
        while (!self.isEmpty()) {
            var iov: [pinned_iov_max]std.posix.iovec_const = undefined;
            const parts = iov[0..self.gather(&iov)];
            switch (sys.writeSome(fd, parts, is_socket, wait)) {
                .done => |n| {
                    try self.advance(gpa, n, sink);
                    // A send that waits returns early only when a signal came.
                    if (wait == .yes and is_socket and n < iovLen(parts))
                        return .interrupted;
                },
                .would_block => return .would_block,
                .interrupted => return .interrupted,
                .failed => |e| return .{ .failed = e },
                .eof => unreachable,
            }
        }
        return .drained;
    }

    /// The queued bytes in order, as iovecs in `out`: the two buffers, and
    /// with pinned frames each pinned payload between the runs of buffered
    /// bytes around it. Stops early when `out` is nearly full (the rest goes
    /// in a later write); returns the count.
    fn gather(self: *const SendQueue, out: *[pinned_iov_max]std.posix.iovec_const) usize {
        if (self.pinned == 0) return self.bufferedParts(out, 0, self.ownedBytes());
        var n: usize = 0;
        var run_start: usize = 0; // where the buffered bytes not yet placed begin
        var run: usize = 0;
        var total: u64 = 0;
        var sent = self.first_sent;
        for (self.frames.items[self.first..]) |f| {
            if (n + 5 > out.len) break; // a pinned frame adds 3, the end 2
            if (total >= pinned_gather_max) break;
            total += f.size - sent;
            if (f.pin) |p| {
                run += @intCast(headerPart(sent, f.size));
                n += self.bufferedParts(out[n..], run_start, run);
                run_start += run;
                run = 0;
                const done: usize = @intCast(sent -| framing.header_size);
                out[n] = .{ .base = p.ptr + done, .len = p.len - done };
                n += 1;
            } else run += @intCast(f.size - sent);
            sent = 0;
        }
        return n + self.bufferedParts(out[n..], run_start, run);
    }

    /// Bytes [start, start + len) of the buffered bytes still to write
    /// (the rest of front, then back) as at most two iovecs.
    fn bufferedParts(self: *const SendQueue, out: []std.posix.iovec_const, start: usize, len: usize) usize {
        if (len == 0) return 0;
        const a = self.front.items[self.head..];
        const b = self.back.items;
        if (start >= a.len) {
            out[0] = .{ .base = b.ptr + (start - a.len), .len = len };
            return 1;
        }
        const first = @min(len, a.len - start);
        out[0] = .{ .base = a.ptr + start, .len = first };
        if (first == len) return 1;
        out[1] = .{ .base = b.ptr, .len = len - first };
        return 2;
    }

    fn iovLen(parts: []const std.posix.iovec_const) usize {
        var n: usize = 0;
        for (parts) |p| n += p.len;
        return n;
    }

    /// All queued bytes in order (tests).
    fn queuedForTest(self: *const SendQueue, out: []u8) []u8 {
        const a = self.front.items[self.head..];
        @memcpy(out[0..a.len], a);
        @memcpy(out[a.len..][0..self.back.items.len], self.back.items);
        return out[0 .. a.len + self.back.items.len];
    }
};

// ---------------------------------------------------------------- tests

const testing = std.testing;

const Count = struct {
    /// Sum of the tokens handed back, and the first ones in order.
    unpinned_tokens: u64 = 0,
    order: [128]u64 = undefined,
    unpinned_count: usize = 0,
    scheduled: usize = 0,
    switched: usize = 0,
    remainders: usize = 0,
    silent: usize = 0,
    fn unpinned(self: *Count, token: u64) void {
        self.unpinned_tokens += token;
        if (self.unpinned_count < self.order.len) self.order[self.unpinned_count] = token;
        self.unpinned_count += 1;
    }
    fn completed(self: *Count, origin: Origin) Allocator.Error!void {
        switch (origin) {
            .scheduled => self.scheduled += 1,
            .switched => self.switched += 1,
            .remainder => self.remainders += 1,
            .silent => self.silent += 1,
        }
    }
};

test "partial writes complete frames one by one" {
    const gpa = testing.allocator;
    var q: SendQueue = .{};
    defer q.deinit(gpa);
    try q.push(gpa, "abc", .scheduled); // 7 bytes
    try q.push(gpa, "", .switched); // 4 bytes
    try q.push(gpa, "de", .scheduled); // 6 bytes
    try testing.expectEqual(@as(u64, 17), q.queuedBytes());
    try testing.expectEqual(@as(usize, 3), q.frameCount());
    var count: Count = .{};
    try q.advance(gpa, 6, &count);
    try testing.expectEqual(@as(usize, 0), count.scheduled);
    try q.advance(gpa, 1, &count);
    try testing.expectEqual(@as(usize, 1), count.scheduled);
    try q.advance(gpa, 5, &count); // the empty frame and 1 byte of the last
    try testing.expectEqual(@as(usize, 1), count.switched);
    try testing.expectEqual(@as(u64, 5), q.queuedBytes());
    try q.advance(gpa, 5, &count);
    try testing.expectEqual(@as(usize, 2), count.scheduled);
    try testing.expect(q.isEmpty());
    try testing.expectEqual(@as(u64, 0), q.queuedBytes());
}

/// A connected pair of non-blocking Unix stream sockets.
fn nonBlockingPair() ![2]std.c.fd_t {
    const c = std.c;
    var fds: [2]c.fd_t = undefined;
    try testing.expectEqual(
        @as(c_int, 0),
        c.socketpair(c.AF.UNIX, c.SOCK.STREAM | c.SOCK.NONBLOCK, 0, &fds),
    );
    return fds;
}

test "flush coalesces frames into one socket write" {
    const gpa = testing.allocator;
    const fds = try nonBlockingPair();
    defer sys.closeFd(fds[0]);
    defer sys.closeFd(fds[1]);
    var q: SendQueue = .{};
    defer q.deinit(gpa);
    for (0..100) |_| try q.push(gpa, "0123456789", .scheduled);
    var count: Count = .{};
    try testing.expect(try q.flush(gpa, fds[0], true, .no, &count) == .drained);
    try testing.expectEqual(@as(usize, 100), count.scheduled);
    var buf: [2000]u8 = undefined;
    try testing.expectEqual(@as(usize, 1400), sys.readSome(fds[1], &buf).done);
}

test "a full socket keeps the rest queued; a closed peer gives EPIPE" {
    const gpa = testing.allocator;
    const c = std.c;
    var fds: [2]c.fd_t = undefined;
    // Blocking mode, as pyipc's own sockets: .no must not wait all the same.
    try testing.expectEqual(@as(c_int, 0), c.socketpair(c.AF.UNIX, c.SOCK.STREAM, 0, &fds));
    defer sys.closeFd(fds[0]);
    var q: SendQueue = .{};
    defer q.deinit(gpa);
    const big = try gpa.alloc(u8, 1 << 20);
    defer gpa.free(big);
    @memset(big, 'z');
    for (0..8) |_| try q.push(gpa, big, .scheduled);
    var count: Count = .{};
    try testing.expect(try q.flush(gpa, fds[0], true, .no, &count) == .would_block);
    try testing.expect(count.scheduled < 8);
    sys.closeFd(fds[1]);
    const r = try q.flush(gpa, fds[0], true, .no, &count);
    try testing.expect(r == .failed);
    try testing.expect(r.failed == .PIPE or r.failed == .CONNRESET);
}

test "a remainder goes out before frames queued after it, and reports nothing" {
    const gpa = testing.allocator;
    var q: SendQueue = .{};
    defer q.deinit(gpa);
    const parts = [_]std.posix.iovec_const{ .{ .base = "lo", .len = 2 }, .{
        .base = "!xyz",
        .len = 4,
    } };
    try q.pushRemainder(gpa, &parts, 3); // "lo!": the end of a frame "hello!"
    try q.push(gpa, "ab", .scheduled);
    try testing.expectEqual(@as(u64, 3 + 6), q.queuedBytes());
    var all: [16]u8 = undefined;
    try testing.expectEqualStrings("lo!", q.queuedForTest(&all)[0..3]);
    var count: Count = .{};
    try q.advance(gpa, 3, &count);
    try testing.expectEqual(@as(usize, 1), count.remainders);
    try testing.expectEqual(@as(usize, 0), count.scheduled);
    try q.advance(gpa, 6, &count);
    try testing.expectEqual(@as(usize, 1), count.scheduled);
    try testing.expect(q.isEmpty());
}

test "raw bytes go out between frames, as queued, and report nothing" {
    const gpa = testing.allocator;
    var q: SendQueue = .{};
    defer q.deinit(gpa);
    try q.push(gpa, "ab", .switched); // 6 bytes
    try q.pushRaw(gpa, "RAW"); // 3 bytes, no header
    try q.push(gpa, "c", .switched); // 5 bytes
    try testing.expectEqual(@as(u64, 14), q.queuedBytes());
    var all: [16]u8 = undefined;
    try testing.expectEqualStrings("RAW", q.queuedForTest(&all)[6..9]);
    var count: Count = .{};
    try q.advance(gpa, 8, &count);
    try testing.expectEqual(@as(usize, 1), count.switched);
    try testing.expectEqual(@as(usize, 0), count.silent);
    try q.advance(gpa, 1, &count);
    try testing.expectEqual(@as(usize, 1), count.silent);
    try q.advance(gpa, 5, &count);
    try testing.expectEqual(@as(usize, 2), count.switched);
    try testing.expect(q.isEmpty());
}

test "frames queued while the front is being written go behind it, in order, unmoved" {
    const gpa = testing.allocator;
    var q: SendQueue = .{};
    defer q.deinit(gpa);
    try q.push(gpa, "one", .scheduled); // 7 bytes, into front
    var count: Count = .{};
    try q.advance(gpa, 5, &count); // front has 2 bytes left
    try q.push(gpa, "two", .scheduled); // behind it, into back
    const back_at = q.back.items.ptr;
    try testing.expectEqual(@as(usize, 7), q.back.items.len);
    var all: [32]u8 = undefined;
    try testing.expectEqualStrings("ne\x00\x00\x00\x03two", q.queuedForTest(&all));
    // A write that ends inside back: front done, back becomes the front.
    try q.advance(gpa, 4, &count);
    try testing.expectEqual(@as(usize, 1), count.scheduled);
    try testing.expectEqual(back_at, q.front.items.ptr); // swapped, not copied
    try q.push(gpa, "3", .scheduled);
    try testing.expectEqualStrings("\x00\x03two\x00\x00\x00\x013", q.queuedForTest(&all));
    try q.advance(gpa, 10, &count);
    try testing.expectEqual(@as(usize, 3), count.scheduled);
    try testing.expect(q.isEmpty());
}

test "a pinned payload is written from the caller's memory, between buffered frames, in order" {
    const gpa = testing.allocator;
    var q: SendQueue = .{};
    defer q.deinit(gpa);
    var payload: [10]u8 = @splat('P');
    try q.push(gpa, "ab", .scheduled); // 6 bytes
    try q.pushPinned(gpa, .{ .ptr = &payload, .len = payload.len, .token = 7 }); // 14
    try q.push(gpa, "c", .scheduled); // 5
    try testing.expectEqual(@as(u64, 25), q.queuedBytes());
    // Only the pinned frame's header was copied.
    try testing.expectEqual(@as(usize, 6 + 4 + 5), q.ownedBytes());
    var iov: [pinned_iov_max]std.posix.iovec_const = undefined;
    const parts = iov[0..q.gather(&iov)];
    // "ab" is in front; the header and "c", queued while front had bytes
    // to write, in back: front, back up to the header, payload, "c".
    try testing.expectEqual(@as(usize, 4), parts.len);
    try testing.expectEqual(@as([*]const u8, &payload), parts[2].base);
    try testing.expectEqual(@as(usize, 10), parts[2].len);
    var count: Count = .{};
    // Written up to the middle of the pinned payload: not released yet.
    try q.advance(gpa, 6 + 4 + 3, &count);
    try testing.expectEqual(@as(usize, 1), count.scheduled);
    try testing.expectEqual(@as(u64, 0), count.unpinned_tokens);
    const rest = iov[0..q.gather(&iov)];
    try testing.expectEqual(@as(usize, 2), rest.len);
    try testing.expectEqual(@as([*]const u8, payload[3..].ptr), rest[0].base);
    try testing.expectEqual(@as(usize, 7), rest[0].len);
    try testing.expectEqualStrings("\x00\x00\x00\x01c", rest[1].base[0..rest[1].len]);
    try q.advance(gpa, 7, &count);
    try testing.expectEqual(@as(u64, 7), count.unpinned_tokens);
    try testing.expectEqual(@as(usize, 2), count.scheduled);
    try q.advance(gpa, 5, &count);
    try testing.expectEqual(@as(usize, 3), count.scheduled);
    try testing.expect(q.isEmpty());
    try testing.expectEqual(@as(usize, 0), q.pinned);
}

test "a write that ends inside a pinned frame's header keeps the rest of it buffered" {
    const gpa = testing.allocator;
    var q: SendQueue = .{};
    defer q.deinit(gpa);
    const payload = "0123456789";
    try q.pushPinned(gpa, .{ .ptr = payload, .len = payload.len, .token = 3 });
    var count: Count = .{};
    try q.advance(gpa, 2, &count);
    var iov: [pinned_iov_max]std.posix.iovec_const = undefined;
    const parts = iov[0..q.gather(&iov)];
    try testing.expectEqual(@as(usize, 2), parts.len);
    try testing.expectEqualStrings("\x00\x0a", parts[0].base[0..parts[0].len]);
    try testing.expectEqual(@as(usize, 10), parts[1].len);
    // A frame queued now goes behind it (front still has 2 bytes to write).
    try q.push(gpa, "x", .scheduled);
    try testing.expectEqual(@as(usize, 3), q.gather(&iov));
    try q.advance(gpa, 2 + 10 + 5, &count);
    try testing.expectEqual(@as(usize, 1), count.unpinned_count);
    try testing.expectEqual(@as(u64, 3), count.order[0]);
    try testing.expectEqual(@as(usize, 2), count.scheduled);
    try testing.expect(q.isEmpty());
}

test "many pinned frames are written over several writes, each released once" {
    const gpa = testing.allocator;
    const fds = try nonBlockingPair();
    defer sys.closeFd(fds[0]);
    defer sys.closeFd(fds[1]);
    var q: SendQueue = .{};
    defer q.deinit(gpa);
    const payload = try gpa.alloc(u8, 3000);
    defer gpa.free(payload);
    for (payload, 0..) |*b, i| b.* = @truncate(i);
    // More frames than one gather takes, mixed with buffered ones.
    const frames = 100;
    for (0..frames) |i| {
        if (i % 3 == 0) try q.push(gpa, "small", .scheduled);
        try q.pushPinned(gpa, .{ .ptr = payload.ptr, .len = payload.len, .token = i });
    }
    var count: Count = .{};
    var got: std.ArrayList(u8) = .empty;
    defer got.deinit(gpa);
    var buf: [8192]u8 = undefined;
    while (true) {
        const r = try q.flush(gpa, fds[0], true, .no, &count);
        while (true) switch (sys.readSome(fds[1], &buf)) {
            .done => |n| try got.appendSlice(gpa, buf[0..n]),
            else => break,
        };
        if (r == .drained) break;
    }
    // Each token once, in the order the frames were queued.
    try testing.expectEqual(@as(usize, frames), count.unpinned_count);
    for (count.order[0..frames], 0..) |token, i| try testing.expectEqual(@as(u64, i), token);
    try testing.expectEqual(@as(usize, frames + 34), count.scheduled);
    // The stream decodes to the frames in the order they were queued.
    var at: usize = 0;
    for (0..frames) |i| {
        if (i % 3 == 0) {
            try testing.expectEqualStrings("\x00\x00\x00\x05small", got.items[at..][0..9]);
            at += 9;
        }
        try testing.expectEqualSlices(u8, &framing.encodeHeader(3000), got.items[at..][0..4]);
        try testing.expectEqualSlices(u8, payload, got.items[at + 4 ..][0..3000]);
        at += 3004;
    }
    try testing.expectEqual(got.items.len, at);
}

test "discard releases what is still pinned and reports nothing else" {
    const gpa = testing.allocator;
    var q: SendQueue = .{};
    const payload = "pinned";
    try q.pushPinned(gpa, .{ .ptr = payload, .len = payload.len, .token = 5 });
    try q.push(gpa, "b", .scheduled);
    try q.pushPinned(gpa, .{ .ptr = payload, .len = payload.len, .token = 6 });
    var count: Count = .{};
    try q.advance(gpa, 4 + payload.len, &count); // the first is written and released
    try testing.expectEqual(@as(u64, 5), count.unpinned_tokens);
    q.discard(gpa, &count);
    try testing.expectEqual(@as(usize, 2), count.unpinned_count);
    try testing.expectEqual([2]u64{ 5, 6 }, count.order[0..2].*);
    try testing.expectEqual(@as(usize, 1), count.scheduled);
    try testing.expect(q.isEmpty());
}

test "with a pinned frame queued, one flush gathers about pinned_gather_max bytes, not the whole queue" {
    const gpa = testing.allocator;
    var q: SendQueue = .{};
    defer q.deinit(gpa);
    const payload = "pinned payload";
    try q.pushPinned(gpa, .{ .ptr = payload, .len = payload.len, .token = 1 });
    const small = 200_000; // 1.8 MB of 9-byte frames behind it
    for (0..small) |_| try q.push(gpa, "small", .scheduled);
    var iov: [pinned_iov_max]std.posix.iovec_const = undefined;
    const parts = iov[0..q.gather(&iov)];
    const gathered = SendQueue.iovLen(parts);
    try testing.expect(gathered >= pinned_gather_max);
    try testing.expect(gathered < pinned_gather_max + 9);
    try testing.expect(gathered < q.queuedBytes());
    // Written as gathered, the queue goes on where the write ended.
    var count: Count = .{};
    try q.advance(gpa, gathered, &count);
    try testing.expectEqual(@as(usize, 1), count.unpinned_count);
    try testing.expectEqual(@as(u64, 4 + payload.len + small * 9 - gathered), q.queuedBytes());
}
