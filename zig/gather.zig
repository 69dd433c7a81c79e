//! Frames gathered for one writev (write_many): a small payload is copied,
//! with its header, into one buffer, so many frames go out as one iovec; a
//! large one is written from where it is (its header copied, its payload an
//! iovec of its own). Per-frame iovecs cost the kernel far more than the copy
//! of a small payload: 68-byte frames as two iovecs each took 103 ns a frame,
//! copied into one buffer 27.7 ns (bench/c/gather.c on one CPU of the
//! development VM, medians of 7).

const std = @import("std");
const assert = std.debug.assert;
const iovec_const = std.posix.iovec_const;

const framing = @import("framing.zig");

/// Payloads up to this size are copied; larger ones are written in place.
pub const copy_max = 1024;
/// The buffer copied frames are gathered in (one writev's worth at most).
pub const buffer_size = 64 * 1024;
/// iovecs per writev: IOV_MAX is 1024 on Linux and the BSDs.
pub const iov_max = 1024;

comptime {
    // A copied frame always fits an empty buffer (see fits).
    assert(framing.header_size + copy_max <= buffer_size);
    // Every frame takes at most two iovecs (header, payload): an empty
    // Gather always takes one frame.
    assert(iov_max >= 2);
}

pub const Gather = struct {
    buf: []u8,
    used: usize = 0,
    iov: [iov_max]iovec_const = undefined,
    count: usize = 0,
    /// The last iovec is the run of copied bytes ending at buf[used]: the
    /// next copied frame extends it rather than taking another iovec.
    copying: bool = false,

    /// Whether one more frame with a `len`-byte payload fits; when it does
    /// not, write parts() and reset() first.
    pub fn fits(self: *const Gather, len: usize) bool {
        const copied = framing.header_size + (if (len <= copy_max) len else 0);
        return self.count + 2 <= iov_max and self.used + copied <= self.buf.len;
    }

    /// Add one frame: its header, then its payload (copied when small).
    pub fn add(self: *Gather, payload: []const u8) void {
        assert(self.fits(payload.len));
        const start = self.used;
        const header = framing.encodeHeader(@intCast(payload.len));
        @memcpy(self.buf[start..][0..framing.header_size], &header);
        self.used += framing.header_size;
        const small = payload.len <= copy_max;
        if (small) {
            @memcpy(self.buf[self.used..][0..payload.len], payload);
            self.used += payload.len;
        }
        self.appendCopied(self.buf[start..self.used]);
        if (!small) {
            self.append(.{ .base = payload.ptr, .len = payload.len });
            self.copying = false;
        }
    }

    /// The iovecs of every frame added since the last reset.
    pub fn parts(self: *Gather) []iovec_const {
        return self.iov[0..self.count];
    }

    pub fn isEmpty(self: *const Gather) bool {
        return self.count == 0;
    }

    /// Forget the frames (after they were written); the buffer is reused.
    pub fn reset(self: *Gather) void {
        self.used = 0;
        self.count = 0;
        self.copying = false;
    }

    /// Copied bytes extend the last iovec when it is the copied run.
    fn appendCopied(self: *Gather, piece: []const u8) void {
        if (self.copying) {
            const last = &self.iov[self.count - 1];
            assert(last.base + last.len == piece.ptr);
            last.len += piece.len;
            return;
        }
        self.append(.{ .base = piece.ptr, .len = piece.len });
        self.copying = true;
    }

    fn append(self: *Gather, part: iovec_const) void {
        assert(self.count < iov_max);
        self.iov[self.count] = part;
        self.count += 1;
    }
};

const testing = std.testing;

/// Every byte the iovecs point at, in order.
fn joined(gpa: std.mem.Allocator, parts: []const iovec_const) ![]u8 {
    var out: std.ArrayList(u8) = .empty;
    errdefer out.deinit(gpa);
    for (parts) |p| try out.appendSlice(gpa, p.base[0..p.len]);
    return out.toOwnedSlice(gpa);
}

test "small frames become one iovec; the bytes are header + payload in order" {
    var buf: [256]u8 = undefined;
    var g: Gather = .{ .buf = &buf };
    g.add("ab");
    g.add("");
    g.add("xyz");
    try testing.expectEqual(@as(usize, 1), g.parts().len);
    const bytes = try joined(testing.allocator, g.parts());
    defer testing.allocator.free(bytes);
    try testing.expectEqualSlices(
        u8,
        "\x00\x00\x00\x02ab\x00\x00\x00\x00\x00\x00\x00\x03xyz",
        bytes,
    );
}

test "a payload over copy_max is written in place, between copied runs" {
    var buf: [256]u8 = undefined;
    var g: Gather = .{ .buf = &buf };
    const large: [copy_max + 1]u8 = @splat(7);
    const at_edge: [copy_max]u8 = @splat(5);
    var big_buf: [2 * copy_max + 64]u8 = undefined;
    var g2: Gather = .{ .buf = &big_buf };
    g2.add(&at_edge); // copied: exactly copy_max
    try testing.expectEqual(@as(usize, 1), g2.parts().len);

    g.add("a");
    g.add(&large);
    g.add("b");
    // [header a, a, header large] [large] [header b, b]
    try testing.expectEqual(@as(usize, 3), g.parts().len);
    try testing.expectEqual(@as([*]const u8, &large), g.parts()[1].base);
    const bytes = try joined(testing.allocator, g.parts());
    defer testing.allocator.free(bytes);
    try testing.expectEqual(@as(usize, 4 + 1 + 4 + large.len + 4 + 1), bytes.len);
    try testing.expectEqualSlices(u8, &framing.encodeHeader(copy_max + 1), bytes[5..9]);
    try testing.expectEqualSlices(u8, &large, bytes[9..][0..large.len]);
    try testing.expectEqualSlices(u8, "\x00\x00\x00\x01b", bytes[9 + large.len ..]);
}

test "fits: the buffer's room and the iovec count are both bounds" {
    var buf: [16]u8 = undefined;
    var g: Gather = .{ .buf = &buf };
    try testing.expect(g.fits(12)); // 4 + 12 = 16: exactly full
    try testing.expect(!g.fits(13));
    try testing.expect(g.fits(copy_max + 1)); // only its header is copied
    g.add("12345678"); // 12 of 16 bytes used: room for one empty frame
    try testing.expect(g.fits(0));
    try testing.expect(!g.fits(1));
    g.reset();
    try testing.expect(g.isEmpty());
    try testing.expect(g.fits(12));

    // Large payloads take two iovecs each: iov_max / 2 of them fit at most.
    var room: [4 * iov_max]u8 = undefined;
    var h: Gather = .{ .buf = &room };
    const large: [copy_max + 1]u8 = @splat(1);
    var added: usize = 0;
    while (h.fits(large.len)) : (added += 1) h.add(&large);
    try testing.expectEqual(@as(usize, iov_max / 2), added);
    try testing.expectEqual(@as(usize, iov_max), h.parts().len);
}
