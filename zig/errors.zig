//! The library's one error set, its mapping to the IPC_E_* codes of libipc.h,
//! and the per-context text of the last failure (the same texts the pure-Python
//! backend puts in its exceptions, see README "Errors").

const std = @import("std");

/// Every failure a public operation can report. Each maps to one IPC_E_* code.
pub const Error = error{
    Generic,
    ServiceBusy,
    ServiceNotFound,
    InvalidName,
    RunDir,
    MessageTooLarge,
    QueueFull,
    ConnectionClosed,
    UnknownFd,
    ConnectionLimit,
    BufferTooSmall,
    OutOfMemory,
    /// A blocking call of an interruptible context was ended by a signal
    /// (nothing consumed, nothing half-written: call it again).
    Interrupted,
    /// A blocking call's timeout passed.
    Timeout,
    /// ipcd (or the network daemon it asked) could not connect: the reason
    /// is in the text.
    Network,
};

/// enum ipc_error_codes of libipc.h: IPC_OK and IPC_E_<NAME> as `ok` and
/// `<name>` (abi_test.zig checks the numbers against the header).
pub const Code = enum(c_int) {
    ok = 0,
    generic = -1,
    service_busy = -2,
    service_not_found = -3,
    invalid_name = -4,
    rundir = -5,
    message_too_large = -6,
    queue_full = -7,
    connection_closed = -8,
    unknown_fd = -9,
    connection_limit = -10,
    buffer_too_small = -11,
    no_memory = -12,
    interrupted = -13,
    timeout = -14,
    network = -15,
};

/// The C ABI code of an error.
pub fn code(err: Error) c_int {
    const c: Code = switch (err) {
        error.Generic => .generic,
        error.ServiceBusy => .service_busy,
        error.ServiceNotFound => .service_not_found,
        error.InvalidName => .invalid_name,
        error.RunDir => .rundir,
        error.MessageTooLarge => .message_too_large,
        error.QueueFull => .queue_full,
        error.ConnectionClosed => .connection_closed,
        error.UnknownFd => .unknown_fd,
        error.ConnectionLimit => .connection_limit,
        error.BufferTooSmall => .buffer_too_small,
        error.OutOfMemory => .no_memory,
        error.Interrupted => .interrupted,
        error.Timeout => .timeout,
        error.Network => .network,
    };
    return @backingInt(c);
}

/// IPC_OK as the C functions return it.
pub const ok: c_int = @backingInt(Code.ok);

extern "c" fn strerror(errnum: c_int) [*:0]const u8;

/// The C library's text for an errno value (what Python's os.strerror gives).
pub fn errText(e: std.c.E) []const u8 {
    return std.mem.span(strerror(@intCast(@backingInt(e))));
}

/// The NUL-terminated text of the last failure on a context, and the errno
/// of the OS error that caused it (0: none did). A fixed buffer: recording an
/// error never allocates, so it cannot fail itself.
pub const LastError = struct {
    buf: [1024]u8 = @splat(0),
    len: usize = 0,
    errno: c_int = 0,

    /// Record the text (truncated if it does not fit) and return `err`, so that
    /// callers can write `return ctx.last.fail(error.X, "...", .{...});`.
    pub fn fail(self: *LastError, err: Error, comptime fmt: []const u8, args: anytype) Error {
        self.record(fmt, args);
        return err;
    }

    /// Like fail, for a failure caused by the OS error `e` (kept as errno).
    pub fn failErrno(
        self: *LastError,
        err: Error,
        e: std.c.E,
        comptime fmt: []const u8,
        args: anytype,
    ) Error {
        self.record(fmt, args);
        self.errno = @intCast(@backingInt(e));
        return err;
    }

    /// Like fail, keeping the errno of the failure recorded before (a new
    /// text for the same cause).
    pub fn failKeepErrno(
        self: *LastError,
        err: Error,
        comptime fmt: []const u8,
        args: anytype,
    ) Error {
        const saved = self.errno;
        self.record(fmt, args);
        self.errno = saved;
        return err;
    }

    /// Record a text without an error value (see fail); no errno.
    pub fn record(self: *LastError, comptime fmt: []const u8, args: anytype) void {
        self.errno = 0;
        const room = self.buf[0 .. self.buf.len - 1];
        const written = std.fmt.bufPrint(room, fmt, args) catch room;
        self.len = written.len;
        self.buf[self.len] = 0;
    }

    /// Record a plain text (e.g. one built elsewhere) and return `err`.
    pub fn failText(self: *LastError, err: Error, msg: []const u8) Error {
        return self.fail(err, "{s}", .{msg});
    }

    /// failText for a failure caused by the OS error `e`.
    pub fn failTextErrno(self: *LastError, err: Error, e: std.c.E, msg: []const u8) Error {
        return self.failErrno(err, e, "{s}", .{msg});
    }

    pub fn text(self: *const LastError) [:0]const u8 {
        return self.buf[0..self.len :0];
    }

    /// Fill in a text for errors whose site did not record one (out of memory).
    pub fn ensureText(self: *LastError, err: Error) void {
        if (err == error.OutOfMemory) self.record("out of memory", .{});
    }
};

test "an OS failure keeps its errno; the next failure without one clears it" {
    var last: LastError = .{};
    const e = last.failErrno(
        error.Generic,
        .MFILE,
        "cannot connect to service {s}: {s}",
        .{ "x", errText(.MFILE) },
    );
    try std.testing.expectEqual(error.Generic, e);
    try std.testing.expectEqual(@as(c_int, @backingInt(std.c.E.MFILE)), last.errno);
    try std.testing.expectEqualStrings(
        "cannot connect to service x: Too many open files",
        last.text(),
    );
    try std.testing.expectEqual(
        error.UnknownFd,
        last.fail(error.UnknownFd, "fd {d} is not managed by this context", .{3}),
    );
    try std.testing.expectEqual(@as(c_int, 0), last.errno);
    try std.testing.expectEqual(
        error.Generic,
        last.failTextErrno(error.Generic, .PIPE, "write failed: Broken pipe"),
    );
    try std.testing.expectEqual(@as(c_int, @backingInt(std.c.E.PIPE)), last.errno);
}

test "last error text is formatted, NUL-terminated and truncated safely" {
    var last: LastError = .{};
    const e = last.fail(error.UnknownFd, "fd {d} is not managed by this context", .{7});
    try std.testing.expectEqual(error.UnknownFd, e);
    try std.testing.expectEqualStrings("fd 7 is not managed by this context", last.text());
    const long: [3000]u8 = @splat('x');
    last.record("{s}", .{&long});
    try std.testing.expectEqual(@as(usize, 1023), last.text().len);
    try std.testing.expectEqual(@as(u8, 0), last.buf[1023]);
}
