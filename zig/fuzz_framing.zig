//! A long randomised test of the frame decoder (zig build fuzz -- ITERATIONS SEED).
//!
//! Each iteration builds a byte stream (well-formed frames, frames with an
//! oversize announcement, a truncated tail, or plain random bytes), cuts it at
//! random points and feeds the pieces to a Decoder the way the context does
//! (sometimes through growForRead/readTarget/commitRead). A one-shot reference parser of the
//! whole stream says what must come out: the same payloads in the same order,
//! FrameTooLarge exactly when the reference meets an oversize header (with the
//! same announced length), and a partial frame kept exactly when bytes are left.
//! The DebugAllocator fails the run on any leak. Exit status 1 on a mismatch.

const std = @import("std");
const framing = @import("framing.zig");
const Allocator = std.mem.Allocator;

const Expected = struct {
    frames: std.ArrayList([]const u8) = .empty,
    too_large: ?u32 = null,
    leftover: usize = 0,
};

/// The reference: parse the whole stream in one pass (slices into `stream`).
fn reference(gpa: Allocator, stream: []const u8, max: u32) !Expected {
    var exp: Expected = .{};
    errdefer exp.frames.deinit(gpa);
    var off: usize = 0;
    while (stream.len - off >= framing.header_size) {
        const n = std.mem.readInt(u32, stream[off..][0..4], .big);
        if (n > max) {
            exp.too_large = n;
            return exp;
        }
        if (stream.len - off - 4 < n) break;
        try exp.frames.append(gpa, stream[off + 4 .. off + 4 + n]);
        off += 4 + n;
    }
    exp.leftover = stream.len - off;
    return exp;
}

/// Checks each decoded payload against the reference as it comes.
const CheckSink = struct {
    want: []const []const u8,
    next: usize = 0,
    mismatch: bool = false,

    pub fn frame(self: *CheckSink, payload: []const u8) framing.SinkError!void {
        if (self.next >= self.want.len or !std.mem.eql(u8, self.want[self.next], payload)) {
            self.mismatch = true;
            return error.Stopped;
        }
        self.next += 1;
    }
};

const StreamShape = enum { frames, oversize, truncated, garbage };

const Stats = struct {
    iterations: u64 = 0,
    frames: u64 = 0,
    bytes: u64 = 0,
    too_large: u64 = 0,
    partial: u64 = 0,
    by_kind: [4]u64 = .{ 0, 0, 0, 0 },
};

/// A payload size biased to small values, sometimes up to 200 KiB.
fn payloadSize(r: std.Random) u32 {
    return switch (r.uintLessThan(u8, 10)) {
        0...5 => r.uintLessThan(u32, 16),
        6...8 => r.uintLessThan(u32, 4096),
        else => r.uintLessThan(u32, 200 * 1024),
    };
}

fn appendFrame(gpa: Allocator, out: *std.ArrayList(u8), r: std.Random, size: u32) !void {
    try out.appendSlice(gpa, &framing.encodeHeader(size));
    const start = out.items.len;
    try out.resize(gpa, start + size);
    r.bytes(out.items[start..]);
}

/// Build one stream of the given kind; returns the max_message_size to use.
fn buildStream(gpa: Allocator, out: *std.ArrayList(u8), r: std.Random, kind: StreamShape) !u32 {
    var max: u32 = if (r.boolean()) 16 << 20 else payloadSize(r) + 1;
    const count = r.uintLessThan(u32, 24);
    switch (kind) {
        .garbage => {
            try out.resize(gpa, r.uintLessThan(usize, 512));
            r.bytes(out.items);
            max = if (r.boolean()) std.math.maxInt(u32) else 1 << 16;
        },
        else => {
            var i: u32 = 0;
            while (i < count) : (i += 1) try appendFrame(gpa, out, r, @min(payloadSize(r), max));
            if (kind == .oversize) {
                try out.appendSlice(
                    gpa,
                    &framing.encodeHeader(
                        max + 1 + r.uintLessThan(u32, std.math.maxInt(u32) - max),
                    ),
                );
                try out.appendSlice(gpa, "after the bad header");
            }
            if (kind == .truncated and out.items.len > 0) {
                out.shrinkRetainingCapacity(r.uintLessThan(usize, out.items.len));
            }
        },
    }
    return max;
}

/// Feed `stream` in random pieces, like the context's read loop does.
fn feedInPieces(
    gpa: Allocator,
    dec: *framing.Decoder,
    stream: []const u8,
    max: u32,
    r: std.Random,
    sink: *CheckSink,
) framing.FeedError!void {
    var off: usize = 0;
    while (off < stream.len) {
        const piece = 1 + r.uintLessThan(usize, if (r.boolean()) 8 else 70_000);
        const n = @min(piece, stream.len - off);
        if (r.boolean()) try dec.growForRead(gpa);
        if (dec.readTarget()) |target| {
            const k = @min(n, target.len);
            @memcpy(target[0..k], stream[off .. off + k]);
            dec.commitRead(k);
            off += k;
            try dec.feed(gpa, &.{}, max, sink);
        } else {
            try dec.feed(gpa, stream[off .. off + n], max, sink);
            off += n;
        }
    }
}

fn oneIteration(gpa: Allocator, r: std.Random, stats: *Stats) !bool {
    const kind: StreamShape = @fromBackingInt(@intCast(r.uintLessThan(u8, 4)));
    var stream: std.ArrayList(u8) = .empty;
    defer stream.deinit(gpa);
    const max = try buildStream(gpa, &stream, r, kind);

    var exp = try reference(gpa, stream.items, max);
    defer exp.frames.deinit(gpa);

    var dec: framing.Decoder = .{};
    defer dec.deinit(gpa);
    var sink: CheckSink = .{ .want = exp.frames.items };
    var got_too_large: ?u32 = null;
    feedInPieces(gpa, &dec, stream.items, max, r, &sink) catch |err| switch (err) {
        error.FrameTooLarge => got_too_large = dec.too_large,
        error.Stopped => {},
        error.OutOfMemory => return err,
    };

    stats.iterations += 1;
    stats.by_kind[@backingInt(kind)] += 1;
    stats.frames += sink.next;
    stats.bytes += stream.items.len;
    if (got_too_large != null) stats.too_large += 1;
    if (got_too_large == null and dec.hasPartial()) stats.partial += 1;

    const ok = !sink.mismatch and sink.next == exp.frames.items.len and
        got_too_large == exp.too_large and
        (exp.too_large != null or dec.hasPartial() == (exp.leftover > 0));
    if (!ok) {
        std.debug.print("MISMATCH kind={t} max={d} stream={d} bytes: " ++
            "got {d} frames (mismatch={}), want {d}; too_large got {?d} want {?d}; " ++
            "partial {} leftover {d}\n", .{
            kind,          max,           stream.items.len,
            sink.next,     sink.mismatch, exp.frames.items.len,
            got_too_large, exp.too_large, dec.hasPartial(),
            exp.leftover,
        });
    }
    return ok;
}

pub fn main(init: std.process.Init.Minimal) !u8 {
    var args = init.args.iterate();
    _ = args.skip();
    const iterations = if (args.next()) |a| try std.fmt.parseInt(u64, a, 10) else 100_000;
    const seed = if (args.next()) |a| try std.fmt.parseInt(u64, a, 10) else 1;

    var debug_allocator: std.heap.DebugAllocator(.{}) = .init;
    const gpa = debug_allocator.allocator();
    var prng = std.Random.DefaultPrng.init(seed);
    const r = prng.random();

    var stats: Stats = .{};
    var failures: u64 = 0;
    var i: u64 = 0;
    while (i < iterations) : (i += 1) {
        if (!try oneIteration(gpa, r, &stats)) failures += 1;
    }
    const leaked = debug_allocator.deinit() == .leak;
    std.debug.print(
        "zig decoder fuzz: seed {d}, {d} streams (frames {d}, oversize {d}, truncated {d}, " ++
            "garbage {d}), {d} frames checked, {d} bytes, {d} refused as too large, " ++
            "{d} ended mid-frame; {d} mismatches, leak: {}\n",
        .{
            seed,
            stats.iterations,
            stats.by_kind[0],
            stats.by_kind[1],
            stats.by_kind[2],
            stats.by_kind[3],
            stats.frames,
            stats.bytes,
            stats.too_large,
            stats.partial,
            failures,
            leaked,
        },
    );
    return if (failures == 0 and !leaked) 0 else 1;
}
