//! The C ABI's numbers and layouts against libipc.h itself: the header,
//! translated to Zig by the build (`libipc_h`, see build.zig: Zig 0.17 has no
//! @cImport), must agree with every Zig definition of them, so a drift on
//! either side fails `zig build test`. Checked: enum event_types
//! (events.EventType), enum cb_event_types (switching.CbResult), enum
//! ipc_error_codes (errors.Code), struct ipc_event (exports.IpcEvent: size,
//! alignment, each field's offset and size), and every function the header
//! declares (exported, same number of parameters, each of the same size).

const std = @import("std");
const h = @import("libipc_h");
const events = @import("events.zig");
const errors = @import("errors.zig");
const switching = @import("switching.zig");
const exports = @import("exports.zig");

const header_text = @embedFile("libipc.h");

/// How many enumerators `enum <name> { ... }` has in the header text.
fn enumeratorCount(comptime name: []const u8) usize {
    @setEvalBranchQuota(200_000);
    const start = std.mem.indexOf(u8, header_text, "enum " ++ name ++ " {").?;
    const end = std.mem.indexOfScalarPos(u8, header_text, start, '}').?;
    return std.mem.count(u8, header_text[start..end], "=");
}

/// The C name of a Zig enumerator: `prefix` ++ its name in upper case.
fn cName(comptime prefix: []const u8, comptime zig_name: []const u8) []const u8 {
    comptime var upper: [zig_name.len]u8 = undefined;
    inline for (zig_name, 0..) |ch, i| upper[i] = std.ascii.toUpper(ch);
    const final = upper;
    return prefix ++ &final;
}

/// Every enumerator of `E` (named as `cNameOf` says) has the header's value,
/// and the header's enum `c_enum` has no other.
fn expectEnum(comptime E: type, comptime c_enum: []const u8, comptime cNameOf: anytype) !void {
    const info = @typeInfo(E).@"enum";
    try std.testing.expectEqual(enumeratorCount(c_enum), info.field_names.len);
    inline for (info.field_names, info.field_values) |name, value| {
        const c_name = comptime cNameOf(name);
        if (!@hasDecl(h, c_name)) {
            std.debug.print("libipc.h has no {s} (for {s}.{s})\n", .{ c_name, @typeName(E), name });
            return error.TestUnexpectedResult;
        }
        try std.testing.expectEqual(@as(i64, @field(h, c_name)), @as(i64, value));
    }
}

fn eventName(comptime name: []const u8) []const u8 {
    return if (std.mem.eql(u8, name, "err")) "ERROR" else cName("", name);
}

fn cbName(comptime name: []const u8) []const u8 {
    return "CB_" ++ eventName(name);
}

fn codeName(comptime name: []const u8) []const u8 {
    return if (std.mem.eql(u8, name, "ok")) "IPC_OK" else cName("IPC_E_", name);
}

test "event types, callback results and error codes are the header's" {
    try expectEnum(events.EventType, "event_types", eventName);
    try expectEnum(switching.CbResult, "cb_event_types", cbName);
    try expectEnum(errors.Code, "ipc_error_codes", codeName);
}

test "every error of the library has its own code" {
    const all = @typeInfo(errors.Error).error_set.error_names.?;
    var seen: [all.len]c_int = undefined;
    inline for (all, 0..) |name, i| {
        const code = errors.code(@field(errors.Error, name));
        try std.testing.expect(code < 0);
        try std.testing.expect(std.mem.indexOfScalar(c_int, seen[0..i], code) == null);
        seen[i] = code;
    }
}

test "struct ipc_event has the header's layout" {
    const C = h.struct_ipc_event;
    const Z = exports.IpcEvent;
    try std.testing.expectEqual(@sizeOf(C), @sizeOf(Z));
    try std.testing.expectEqual(@alignOf(C), @alignOf(Z));
    const c_fields = @typeInfo(C).@"struct";
    const z_fields = @typeInfo(Z).@"struct";
    try std.testing.expectEqual(c_fields.field_names.len, z_fields.field_names.len);
    inline for (c_fields.field_names, c_fields.field_types) |name, T| {
        try std.testing.expectEqual(@offsetOf(C, name), @offsetOf(Z, name));
        try std.testing.expectEqual(@sizeOf(T), @sizeOf(@FieldType(Z, name)));
    }
}

test "every function of the header is exported with its parameters" {
    @setEvalBranchQuota(100_000);
    comptime var checked = 0;
    inline for (@typeInfo(h).@"struct".decl_names) |name| {
        if (comptime !std.mem.startsWith(u8, name, "ipc_")) continue;
        const CT = @TypeOf(@field(h, name));
        if (@typeInfo(CT) != .@"fn") continue;
        if (!@hasDecl(exports, name))
            @compileError("libipc.h declares " ++ name ++ ", exports.zig does not export it");
        const c_fn = @typeInfo(CT).@"fn";
        const z_fn = @typeInfo(@TypeOf(@field(exports, name))).@"fn";
        try std.testing.expectEqual(c_fn.param_types.len, z_fn.param_types.len);
        inline for (c_fn.param_types, z_fn.param_types) |a, b|
            try std.testing.expectEqual(@sizeOf(a.?), @sizeOf(b.?));
        try std.testing.expectEqual(@sizeOf(c_fn.return_type.?), @sizeOf(z_fn.return_type.?));
        checked += 1;
    }
    try std.testing.expectEqual(comptime functionCount(), checked);
}

/// How many functions the header declares (lines `<type> ipc_<name>(...`).
fn functionCount() usize {
    @setEvalBranchQuota(400_000);
    var n: usize = 0;
    var lines = std.mem.splitScalar(u8, header_text, '\n');
    while (lines.next()) |line| {
        if (line.len == 0 or line[0] == ' ' or line[0] == '*' or line[0] == '/') continue;
        const named = std.mem.indexOf(u8, line, " ipc_") != null or
            std.mem.indexOf(u8, line, "*ipc_") != null;
        if (named and std.mem.indexOfScalar(u8, line, '(') != null) n += 1;
    }
    return n;
}
