//! ipcd's answer to a connect request: a raw "ok" with the fd (libIPC), or
//! pyipc's refusal "ne <code> <text>" (no fd), which the caller raises as an
//! error carrying the reason. The pure backend's twin is
//! pyipc/_pure/fdpass.py (take_ipcd_answer): same parsing, same texts.

const std = @import("std");
const errors = @import("errors.zig");

/// Bytes of a refusal (code and text, after "ne ") kept at most (the rest is
/// cut): a reason is a line for a human, and it must fit the context's
/// last-error text.
pub const max_reason = 400;

pub const Refusal = struct {
    /// The code word: norule, noservice, nodaemon, unreachable, refused, tls,
    /// timeout, busy (another word from a newer ipcd is kept as given).
    code: []const u8,
    /// The human text after the code (maybe empty), one line at most.
    text: []const u8,

    /// The error a client raises for it: no such service for norule and
    /// noservice, a network failure for every other code.
    pub fn err(self: Refusal) errors.Error {
        if (std.mem.eql(u8, self.code, "norule") or std.mem.eql(u8, self.code, "noservice"))
            return error.ServiceNotFound;
        return error.Network;
    }
};

/// The refusal in `answer`, or null when it is not one ("ok", empty, other).
pub fn refusal(answer: []const u8) ?Refusal {
    if (!std.mem.startsWith(u8, answer, "ne ")) return null;
    const rest = cutUtf8(firstLine(answer[3..]), max_reason);
    const space = std.mem.indexOfScalar(u8, rest, ' ') orelse rest.len;
    if (space == 0) return null;
    const text = if (space < rest.len) rest[space + 1 ..] else "";
    return .{ .code = rest[0..space], .text = text };
}

/// `s` cut to `max` bytes at most, not inside a UTF-8 character: a cut one
/// would be shown as U+FFFD (pyipc's daemons cut their answers the same way,
/// _netwire.cut_answer; a foreign ipcd may not).
fn cutUtf8(s: []const u8, max: usize) []const u8 {
    if (s.len <= max) return s;
    var end = max;
    // Back over the continuation bytes (10xxxxxx) of the character the cut
    // falls in, to its first byte (a character has at most 3 of them).
    while (end > max -| 3 and s[end] & 0xC0 == 0x80) end -= 1;
    return s[0..end];
}

/// `s` up to its first NUL, CR or LF: a reason is one line of text.
fn firstLine(s: []const u8) []const u8 {
    const end = std.mem.indexOfAny(u8, s, "\x00\r\n") orelse s.len;
    return s[0..end];
}

const testing = std.testing;

test "a refusal's code and text" {
    const r = refusal("ne unreachable tcp://10.0.0.2:9000: Connection refused").?;
    try testing.expectEqualStrings("unreachable", r.code);
    try testing.expectEqualStrings("tcp://10.0.0.2:9000: Connection refused", r.text);
    try testing.expectEqual(error.Network, r.err());
    try testing.expectEqual(error.ServiceNotFound, refusal("ne norule x").?.err());
    try testing.expectEqual(error.ServiceNotFound, refusal("ne noservice").?.err());
}

test "what is not a refusal" {
    try testing.expect(refusal("ok") == null);
    try testing.expect(refusal("") == null);
    try testing.expect(refusal("ne ") == null);
    try testing.expect(refusal("ne  x") == null);
    try testing.expect(refusal("no thanks") == null);
}

test "a refusal's text is one line, bounded" {
    try testing.expectEqualStrings("a", refusal("ne busy a\nb").?.text);
    try testing.expectEqualStrings("a", refusal("ne busy a\x00b").?.text);
    var long: [8 + max_reason + 10]u8 = undefined;
    @memcpy(long[0..8], "ne busy ");
    @memset(long[8..], 'x');
    try testing.expectEqual(@as(usize, max_reason - 5), refusal(&long).?.text.len);
}

test "a refusal is not cut inside a UTF-8 character" {
    var long: [8 + max_reason + 10]u8 = undefined;
    @memcpy(long[0..8], "ne busy ");
    @memset(long[8..], 'x');
    // "€" (3 bytes) over the cut at max_reason: left out whole.
    const at = 3 + max_reason - 1;
    @memcpy(long[at .. at + 3], "\xe2\x82\xac");
    const text = refusal(&long).?.text;
    try testing.expectEqual(@as(usize, max_reason - 5 - 1), text.len);
    try testing.expect(std.unicode.utf8ValidateSlice(text));
    // Ending at the cut exactly: kept.
    @memset(long[8..], 'x');
    @memcpy(long[3 + max_reason - 3 .. 3 + max_reason], "\xe2\x82\xac");
    try testing.expect(std.mem.endsWith(u8, refusal(&long).?.text, "\xe2\x82\xac"));
    try testing.expectEqualStrings("ab", cutUtf8("ab\xc3\xa9", 3));
    try testing.expectEqualStrings("ab\xc3\xa9", cutUtf8("ab\xc3\xa9", 4));
    try testing.expectEqualStrings("a", cutUtf8("a\xf0\x9f\x98\x80", 4));
}
