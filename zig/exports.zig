//! The C ABI: every function of libipc.h, exported. Each one converts its
//! arguments, calls the context, and turns an error into its IPC_E_* code
//! (the text stays available through ipc_last_error).

const std = @import("std");
const errors = @import("errors.zig");
const ctx_mod = @import("context.zig");
const Context = ctx_mod.Context;
const Error = errors.Error;
const fdpass = @import("fdpass.zig");
const events = @import("events.zig");
const switching = @import("switching.zig");

/// The C allocator in the library; the leak-checking one in tests.
const gpa = if (@import("builtin").is_test) std.testing.allocator else std.heap.c_allocator;

const IPC_OK = errors.ok;

/// struct ipc_event of libipc.h.
pub const IpcEvent = extern struct {
    type: i32,
    fd: i32,
    index: i64,
    message: ?[*]const u8,
    message_len: u32,
    @"error": ?[*:0]const u8,
};

comptime {
    // Every event type fits the C struct's field, every message size its length.
    std.debug.assert(@FieldType(IpcEvent, "type") == @typeInfo(events.EventType).@"enum".tag_type);
    const max_message = @FieldType(ctx_mod.Limits, "max_message_size");
    std.debug.assert(@bitSizeOf(@FieldType(IpcEvent, "message_len")) >= @bitSizeOf(max_message));
}

fn context(ptr: ?*anyopaque) ?*Context {
    return @ptrCast(@alignCast(ptr orelse return null));
}

/// Run `result` (an error union) to a return code, recording a text for
/// errors that have none yet (out of memory).
fn rc(ctx: *Context, result: anytype) c_int {
    if (result) |_| {
        return IPC_OK;
    } else |err| {
        ctx.last.ensureText(err);
        return errors.code(err);
    }
}

fn name(ptr: ?[*]const u8, len: u16) []const u8 {
    return if (ptr) |p| p[0..len] else "";
}

fn bytes(ptr: ?[*]const u8, len: usize) []const u8 {
    return if (ptr) |p| p[0..len] else "";
}

/// The caller's `len` bytes at `ptr`: a null pointer with a length is an
/// error (it was sent as an empty message, success reported).
fn payloadOf(ctx: *Context, ptr: ?[*]const u8, len: usize) Error![]const u8 {
    if (ptr == null and len > 0)
        return ctx.last.fail(error.Generic, "a payload pointer is null ({d} bytes)", .{len});
    return bytes(ptr, len);
}

// ------------------------------------------------------------ lifetime

pub export fn ipc_context_init(out: ?*?*anyopaque) callconv(.c) c_int {
    const slot = out orelse return errors.code(error.Generic);
    const ctx = Context.create(gpa) catch |err| return errors.code(err);
    slot.* = ctx;
    return IPC_OK;
}

pub export fn ipc_context_deinit(ptr: ?*?*anyopaque) callconv(.c) void {
    const slot = ptr orelse return;
    if (context(slot.*)) |ctx| {
        // Inside a switch callback the loop that called it still uses the
        // context: closed now, freed when that call returns (finishCall).
        if (ctx.callback_depth > 0) ctx.deinitInCallback() else ctx.destroy();
    }
    slot.* = null;
}

/// The end of a call that may run switch callbacks (the waits, linger):
/// a context that one of them deinitialised is freed now, and the call
/// returns IPC_E_GENERIC (there is no context left to ask why).
fn finishCall(ctx: *Context, code: c_int) c_int {
    if (!ctx.deinit_pending or ctx.callback_depth > 0) return code;
    ctx.destroy();
    return errors.code(error.Generic);
}

pub export fn ipc_last_error(ptr: ?*anyopaque) callconv(.c) [*:0]const u8 {
    const ctx = context(ptr) orelse return "no context";
    return ctx.last.text().ptr;
}

pub export fn ipc_context_set_rundir(
    ptr: ?*anyopaque,
    dir: ?[*]const u8,
    len: usize,
) callconv(.c) c_int {
    const ctx = context(ptr) orelse return errors.code(error.Generic);
    const path = payloadOf(ctx, dir, len) catch |err| return rc(ctx, @as(Error!void, err));
    return rc(ctx, ctx.setRundir(path));
}

pub export fn ipc_context_set_limits(
    ptr: ?*anyopaque,
    max_message_size: u32,
    max_queue_size: u64,
    max_connections: u32,
) callconv(.c) c_int {
    const ctx = context(ptr) orelse return errors.code(error.Generic);
    return rc(ctx, ctx.setLimits(.{
        .max_message_size = max_message_size,
        .max_queue_size = max_queue_size,
        .max_connections = max_connections,
    }));
}

pub export fn ipc_context_timer(ptr: ?*anyopaque, timer: c_int) callconv(.c) void {
    const ctx = context(ptr) orelse return;
    defer ctx.syncReadiness();
    ctx.setTimer(timer);
}

pub export fn ipc_context_busy_poll(ptr: ?*anyopaque, usec: u32) callconv(.c) c_int {
    const ctx = context(ptr) orelse return errors.code(error.Generic);
    return rc(ctx, ctx.setBusyPoll(usec));
}

/// A signal ends a blocking call with IPC_E_INTERRUPTED (on) instead of the
/// call going on waiting (off, the default: libIPC's behaviour).
pub export fn ipc_context_interruptible(ptr: ?*anyopaque, on: c_int) callconv(.c) void {
    const ctx = context(ptr) orelse return;
    ctx.interruptible = on != 0;
}

/// The timeout of every blocking call from now on, in microseconds; negative: none.
pub export fn ipc_context_call_timeout(ptr: ?*anyopaque, usec: i64) callconv(.c) void {
    const ctx = context(ptr) orelse return;
    ctx.setCallTimeout(if (usec < 0) -1 else usec *| std.time.ns_per_us);
}

// ------------------------------------------------------------ services and connections

fn openWith(
    ptr: ?*anyopaque,
    fd_out: ?*c_int,
    service: ?[*]const u8,
    len: u16,
    comptime op: anytype,
) c_int {
    const ctx = context(ptr) orelse return errors.code(error.Generic);
    const fd = op(ctx, name(service, len)) catch |err| return rc(ctx, @as(Error!void, err));
    if (fd_out) |o| o.* = fd;
    return IPC_OK;
}

pub export fn ipc_service_init(
    ptr: ?*anyopaque,
    fd_out: ?*c_int,
    service: ?[*]const u8,
    len: u16,
) callconv(.c) c_int {
    return openWith(ptr, fd_out, service, len, Context.serviceInit);
}

pub export fn ipc_connect_service(
    ptr: ?*anyopaque,
    fd_out: ?*c_int,
    service: ?[*]const u8,
    len: u16,
) callconv(.c) c_int {
    return openWith(ptr, fd_out, service, len, Context.connectService);
}

pub export fn ipc_connect(
    ptr: ?*anyopaque,
    fd_out: ?*c_int,
    service: ?[*]const u8,
    len: u16,
) callconv(.c) c_int {
    return openWith(ptr, fd_out, service, len, Context.connect);
}

pub export fn ipc_add_external(ptr: ?*anyopaque, fd: c_int) callconv(.c) c_int {
    const ctx = context(ptr) orelse return errors.code(error.Generic);
    defer ctx.syncReadiness();
    return rc(ctx, ctx.addExternal(fd));
}

/// pyipc addition: stop (on != 0) or resume watching fd for input
/// (Context.pauseReading): back-pressure toward its peer.
pub export fn ipc_pause_reading(ptr: ?*anyopaque, fd: c_int, on: c_int) callconv(.c) c_int {
    const ctx = context(ptr) orelse return errors.code(error.Generic);
    defer ctx.syncReadiness();
    return rc(ctx, ctx.pauseReading(fd, on != 0));
}

/// pyipc addition: manage fd, a connected Unix or TCP stream socket made
/// elsewhere, as a connection (Context.addConnection).
pub export fn ipc_add_connection(ptr: ?*anyopaque, fd: c_int) callconv(.c) c_int {
    const ctx = context(ptr) orelse return errors.code(error.Generic);
    defer ctx.syncReadiness();
    return rc(ctx, ctx.addConnection(fd));
}

pub export fn ipc_add_switch(ptr: ?*anyopaque, fd1: c_int, fd2: c_int) callconv(.c) c_int {
    const ctx = context(ptr) orelse return errors.code(error.Generic);
    defer ctx.syncReadiness();
    return rc(ctx, switching.add(ctx, fd1, fd2));
}

pub export fn ipc_set_switch_callbacks(
    ptr: ?*anyopaque,
    fd: c_int,
    in: ?switching.InCallback,
    out: ?switching.OutCallback,
) callconv(.c) c_int {
    const ctx = context(ptr) orelse return errors.code(error.Generic);
    return rc(ctx, switching.setCallbacks(ctx, fd, in, out));
}

// ------------------------------------------------------------ switching extension

/// pyipc addition: report SWITCH_RX/SWITCH_TX of switched pairs (on != 0,
/// the default) or not (switching.setEvents).
pub export fn ipc_context_switch_events(ptr: ?*anyopaque, on: c_int) callconv(.c) void {
    const ctx = context(ptr) orelse return;
    switching.setEvents(ctx, on != 0);
}

/// pyipc addition: queue raw bytes for switched fd `fd` (switching.send).
pub export fn ipc_switch_send(
    ptr: ?*anyopaque,
    fd: c_int,
    data: ?[*]const u8,
    len: usize,
) callconv(.c) c_int {
    const ctx = context(ptr) orelse return errors.code(error.Generic);
    defer ctx.syncReadiness();
    const raw = payloadOf(ctx, data, len) catch |err| return rc(ctx, @as(Error!void, err));
    return rc(ctx, switching.send(ctx, fd, raw));
}

/// pyipc addition: end the switch of fd (switching.end); `reason` NULL: none.
pub export fn ipc_switch_end(
    ptr: ?*anyopaque,
    fd: c_int,
    reason: ?[*]const u8,
    len: usize,
) callconv(.c) c_int {
    const ctx = context(ptr) orelse return errors.code(error.Generic);
    defer ctx.syncReadiness();
    const text: ?[]const u8 = if (reason) |r| r[0..len] else null;
    return rc(ctx, switching.end(ctx, fd, text));
}

pub export fn ipc_peer_credentials(
    ptr: ?*anyopaque,
    fd: c_int,
    pid: ?*i32,
    uid: ?*u32,
    gid: ?*u32,
) callconv(.c) c_int {
    const ctx = context(ptr) orelse return errors.code(error.Generic);
    const cred = ctx.peerCredentials(fd) catch |err| return rc(ctx, @as(Error!void, err));
    if (pid) |p| p.* = cred.pid;
    if (uid) |u| u.* = cred.uid;
    if (gid) |g| g.* = cred.gid;
    return IPC_OK;
}

// ------------------------------------------------------------ closing

pub export fn ipc_close_fd(ptr: ?*anyopaque, fd: c_int) callconv(.c) c_int {
    const ctx = context(ptr) orelse return errors.code(error.Generic);
    defer ctx.syncReadiness();
    return rc(ctx, ctx.close(fd));
}

pub export fn ipc_close(ptr: ?*anyopaque, index: usize) callconv(.c) c_int {
    const ctx = context(ptr) orelse return errors.code(error.Generic);
    defer ctx.syncReadiness();
    const fd = ctx.fdAtIndex(index) catch |err| return rc(ctx, @as(Error!void, err));
    return rc(ctx, ctx.close(fd));
}

/// What close(fd) would discard: fd's scheduled messages not yet completely
/// written, and its switch peer (closed with it) and that one's count
/// (*peer_fd = -1 when fd is not switched). pyipc logs them as a warning.
pub export fn ipc_queued_messages(
    ptr: ?*anyopaque,
    fd: c_int,
    count: ?*usize,
    peer_fd: ?*c_int,
    peer_count: ?*usize,
) callconv(.c) c_int {
    const ctx = context(ptr) orelse return errors.code(error.Generic);
    const queued = ctx.queuedMessages(fd) catch |err| return rc(ctx, @as(Error!void, err));
    if (count) |p| p.* = queued.count;
    if (peer_fd) |p| p.* = queued.peer_fd;
    if (peer_count) |p| p.* = queued.peer_count;
    return IPC_OK;
}

pub export fn ipc_write_count(ptr: ?*anyopaque) callconv(.c) usize {
    const ctx = context(ptr) orelse return 0;
    return ctx.write_count;
}

/// For a binding whose own calls can run between a stopped write and its
/// ipc_write_count (Python's signal handlers run as the write returns, and
/// may write): it takes the count before such a call and gives it back after.
pub export fn ipc_set_write_count(ptr: ?*anyopaque, count: usize) callconv(.c) void {
    const ctx = context(ptr) orelse return;
    ctx.write_count = count;
}

pub export fn ipc_linger(ptr: ?*anyopaque, fd: c_int, usec: i64) callconv(.c) c_int {
    const ctx = context(ptr) orelse return errors.code(error.Generic);
    return finishCall(ctx, linger(ctx, fd, usec));
}

fn linger(ctx: *Context, fd: c_int, usec: i64) c_int {
    defer ctx.syncReadiness();
    return rc(ctx, ctx.linger(fd, usec *| std.time.ns_per_us));
}

pub export fn ipc_scheduled_fds(
    ptr: ?*anyopaque,
    fds: ?[*]c_int,
    counts: ?[*]usize,
    capacity: usize,
) callconv(.c) usize {
    const ctx = context(ptr) orelse return 0;
    const n = if (fds != null and counts != null) capacity else 0;
    return ctx.scheduledFds(if (fds) |f| f[0..n] else &.{}, if (counts) |k| k[0..n] else &.{});
}

pub export fn ipc_after_fork_in_child(ptr: ?*anyopaque) callconv(.c) void {
    const ctx = context(ptr) orelse return;
    ctx.dropSharedInChild();
}

pub export fn ipc_close_all(ptr: ?*anyopaque) callconv(.c) c_int {
    const ctx = context(ptr) orelse return errors.code(error.Generic);
    ctx.closeAll();
    return IPC_OK;
}

// ------------------------------------------------------------ sending and receiving

pub export fn ipc_write(
    ptr: ?*anyopaque,
    fd: c_int,
    payload: ?[*]const u8,
    len: u32,
) callconv(.c) c_int {
    const ctx = context(ptr) orelse return errors.code(error.Generic);
    defer ctx.syncReadiness();
    const raw = payloadOf(ctx, payload, len) catch |err| return rc(ctx, @as(Error!void, err));
    return rc(ctx, ctx.write(fd, raw));
}

pub export fn ipc_schedule(
    ptr: ?*anyopaque,
    fd: c_int,
    payload: ?[*]const u8,
    len: u32,
) callconv(.c) c_int {
    const ctx = context(ptr) orelse return errors.code(error.Generic);
    const raw = payloadOf(ctx, payload, len) catch |err| return rc(ctx, @as(Error!void, err));
    return rc(ctx, ctx.schedule(fd, raw));
}

/// ipc_schedule() without a copy (pyipc extension): the core writes the
/// payload from the caller's memory, which must stay allocated and unchanged
/// until ipc_unpinned() returns `token` (the frame is written, or its
/// connection ended; ipc_context_deinit releases all).
pub export fn ipc_schedule_pinned(
    ptr: ?*anyopaque,
    fd: c_int,
    payload: ?[*]const u8,
    len: u32,
    token: u64,
) callconv(.c) c_int {
    const ctx = context(ptr) orelse return errors.code(error.Generic);
    const raw = payloadOf(ctx, payload, len) catch |err| return rc(ctx, @as(Error!void, err));
    return rc(ctx, ctx.schedulePinned(fd, raw, token));
}

/// Tokens of pinned payloads the core no longer reads, oldest first, at most
/// `capacity` of them into `tokens` (pyipc extension); returns how many.
pub export fn ipc_unpinned(ptr: ?*anyopaque, tokens: ?[*]u64, capacity: usize) callconv(.c) usize {
    const ctx = context(ptr) orelse return 0;
    const out = tokens orelse return 0;
    return ctx.takeUnpinned(out[0..capacity]);
}

/// write()'s checks of fd and of a `len`-byte payload, in its order; nothing
/// is written. For sizes uint32_t cannot carry: the failure says what
/// ipc_write() would (an unknown fd before the size).
pub export fn ipc_check_write(ptr: ?*anyopaque, fd: c_int, len: u64) callconv(.c) c_int {
    const ctx = context(ptr) orelse return errors.code(error.Generic);
    return rc(ctx, ctx.checkWrite(fd, len));
}

/// write() of `count` messages: their payloads back to back at `payloads`,
/// their sizes in `lengths`; gathered into few system calls.
pub export fn ipc_write_many(
    ptr: ?*anyopaque,
    fd: c_int,
    payloads: ?[*]const u8,
    lengths: ?[*]const u32,
    count: usize,
) callconv(.c) c_int {
    const ctx = context(ptr) orelse return errors.code(error.Generic);
    defer ctx.syncReadiness();
    if (lengths == null and count > 0) return rc(ctx, noPayloads(ctx));
    const lens: []const u32 = if (lengths) |l| l[0..count] else &.{};
    var total: usize = 0;
    for (lens) |len| total += len;
    if (payloads == null and total > 0) return rc(ctx, noPayloads(ctx));
    return rc(ctx, ctx.writeMany(fd, .{ .contiguous = bytes(payloads, total) }, lens));
}

/// ipc_write_many with one pointer per payload (payloads[i], lengths[i]
/// bytes), for payloads that are not back to back: large ones are then
/// written from where they are, not copied together first.
pub export fn ipc_write_many_ptrs(
    ptr: ?*anyopaque,
    fd: c_int,
    payloads: ?[*]const ?[*]const u8,
    lengths: ?[*]const u32,
    count: usize,
) callconv(.c) c_int {
    const ctx = context(ptr) orelse return errors.code(error.Generic);
    defer ctx.syncReadiness();
    if (lengths == null and count > 0) return rc(ctx, noPayloads(ctx));
    const lens: []const u32 = if (lengths) |l| l[0..count] else &.{};
    const ptrs = payloads orelse if (count == 0) return rc(
        ctx,
        ctx.writeMany(fd, .{ .each = &.{} }, lens),
    ) else return rc(ctx, noPayloads(ctx));
    for (ptrs[0..count], lens) |p, len| {
        if (p == null and len > 0) return rc(ctx, noPayloads(ctx));
    }
    return rc(ctx, ctx.writeMany(fd, .{ .each = ptrs[0..count] }, lens));
}

fn noPayloads(ctx: *Context) Error!void {
    return ctx.last.fail(error.Generic, "write_many: a payload or lengths pointer is null", .{});
}

/// The caller's buffer: `*buflen` bytes at `buffer` (none when either is null).
fn outBuffer(buffer: ?[*]u8, buflen: ?*usize) []u8 {
    const len = if (buflen) |l| l.* else 0;
    return if (buffer) |b| b[0..len] else &.{};
}

pub export fn ipc_read_fd(
    ptr: ?*anyopaque,
    fd: c_int,
    buffer: ?[*]u8,
    buflen: ?*usize,
) callconv(.c) c_int {
    const ctx = context(ptr) orelse return errors.code(error.Generic);
    defer ctx.syncReadiness();
    var len: usize = 0;
    const result = ctx.readFd(fd, outBuffer(buffer, buflen), &len);
    return readReturn(ctx, result, len, buflen);
}

/// A read's return code; *buflen = the message's size after it was read, or
/// when it did not fit (BufferTooSmall).
fn readReturn(ctx: *Context, result: Error!void, len: usize, buflen: ?*usize) c_int {
    if (buflen) |l| {
        if (result) |_| l.* = len else |err| if (err == error.BufferTooSmall) {
            l.* = len;
        }
    }
    return rc(ctx, result);
}

pub export fn ipc_read(
    ptr: ?*anyopaque,
    index: usize,
    buffer: ?[*]u8,
    buflen: ?*usize,
) callconv(.c) c_int {
    const ctx = context(ptr) orelse return errors.code(error.Generic);
    const fd = ctx.fdAtIndex(index) catch |err| return rc(ctx, @as(Error!void, err));
    return ipc_read_fd(ptr, fd, buffer, buflen);
}

/// Copies the messages read_many takes into the caller's buffer, back to
/// back, and their sizes into `lengths`. The first one that does not fit is
/// refused (and its size kept: the buffer a caller needs for it).
const MessageCopier = struct {
    buffer: []u8,
    lengths: []u32,
    used: usize = 0,
    n: usize = 0,
    refused: usize = 0,
    pub fn put(self: *MessageCopier, payload: []const u8) bool {
        if (self.n == self.lengths.len or payload.len > self.buffer.len - self.used) {
            self.refused = payload.len;
            return false;
        }
        @memcpy(self.buffer[self.used .. self.used + payload.len], payload);
        self.used += payload.len;
        self.lengths[self.n] = @intCast(payload.len);
        self.n += 1;
        return true;
    }
};

/// fd's next messages: at least one (blocks for it), at most `capacity`,
/// copied back to back into `buffer` (`*buflen` bytes), their sizes into
/// `lengths`. *count says how many. A first message larger than the buffer
/// stays queued: IPC_E_BUFFER_TOO_SMALL, *buflen = its size.
pub export fn ipc_read_many(
    ptr: ?*anyopaque,
    fd: c_int,
    buffer: ?[*]u8,
    buflen: ?*usize,
    lengths: ?[*]u32,
    capacity: usize,
    count: ?*usize,
) callconv(.c) c_int {
    const ctx = context(ptr) orelse return errors.code(error.Generic);
    defer ctx.syncReadiness();
    if (count) |n| n.* = 0;
    const out = outBuffer(buffer, buflen);
    if (out.len > std.math.maxInt(u32)) return rc(
        ctx,
        @as(Error!void, ctx.last.fail(error.Generic, "read_many: a buffer of 4 GiB or more", .{})),
    );
    var copier: MessageCopier = .{
        .buffer = out,
        .lengths = if (lengths) |l| l[0..capacity] else &.{},
    };
    const result = ctx.readMany(fd, copier.lengths.len, &copier);
    const n = result catch |err| return rc(ctx, @as(Error!void, err));
    if (n == 0) {
        if (buflen) |l| l.* = copier.refused;
        return rc(ctx, @as(Error!void, ctx.tooSmall(out.len, copier.refused)));
    }
    if (count) |p| p.* = n;
    return IPC_OK;
}

/// ipc_read_fd, except that a large message (64 KiB or more) that fits the
/// buffer is read from the socket straight into it, with no copy in between.
pub export fn ipc_read_into(
    ptr: ?*anyopaque,
    fd: c_int,
    buffer: ?[*]u8,
    buflen: ?*usize,
) callconv(.c) c_int {
    const ctx = context(ptr) orelse return errors.code(error.Generic);
    defer ctx.syncReadiness();
    var len: usize = 0;
    const result = ctx.readInto(fd, outBuffer(buffer, buflen), &len);
    return readReturn(ctx, result, len, buflen);
}

/// read() without a copy: fd's next message (blocks for it), lent: *message
/// points into memory the context owns, valid until the next wait or
/// ipc_read_lent call on it.
pub export fn ipc_read_lent(
    ptr: ?*anyopaque,
    fd: c_int,
    message: ?*?[*]const u8,
    len: ?*usize,
) callconv(.c) c_int {
    const ctx = context(ptr) orelse return errors.code(error.Generic);
    defer ctx.syncReadiness();
    // The message would be taken and never seen.
    if (message == null or len == null)
        return rc(ctx, @as(Error!void, ctx.last.fail(
            error.Generic,
            "read_lent: message or len is null",
            .{},
        )));
    const lent = ctx.readLent(fd) catch |err| return rc(ctx, @as(Error!void, err));
    message.?.* = lent.ptr;
    len.?.* = lent.len;
    return IPC_OK;
}

// ------------------------------------------------------------ the event loop

pub export fn ipc_wait_events(
    ptr: ?*anyopaque,
    out: ?[*]IpcEvent,
    capacity: usize,
    count: ?*usize,
) callconv(.c) c_int {
    const ctx = context(ptr) orelse return errors.code(error.Generic);
    return finishCall(ctx, waitEventsInto(ctx, out, capacity, count));
}

fn waitEventsInto(ctx: *Context, out: ?[*]IpcEvent, capacity: usize, count: ?*usize) c_int {
    defer ctx.syncReadiness();
    if (count) |n| n.* = 0;
    // Events copied out could not be counted: they would be lost.
    if (out != null and capacity > 0 and count == null)
        return rc(ctx, @as(Error!void, ctx.last.fail(error.Generic, "wait_events: count is null", .{})));
    ctx.beginWait(true) catch |err| return rc(ctx, @as(Error!void, err));
    const dest = out orelse return IPC_OK;
    var n: usize = 0;
    while (n < capacity) : (n += 1) {
        const ev = ctx.firstEvent() orelse break;
        dest[n] = toC(ev);
        ctx.popEvent(true) catch |err| return rc(ctx, @as(Error!void, err));
    }
    if (count) |p| p.* = n;
    return IPC_OK;
}

/// The one call any thread may make on a context: a wait in progress (or the
/// next one) in ipc_wait_events returns, with no event if none came.
pub export fn ipc_wakeup(ptr: ?*anyopaque) callconv(.c) c_int {
    const ctx = context(ptr) orelse return errors.code(error.Generic);
    ctx.wakeUp();
    return IPC_OK;
}

fn toC(ev: *const events.Event) IpcEvent {
    const has_payload = ev.kind == .message_rx or ev.kind == .switch_rx;
    return .{
        .type = @backingInt(ev.kind),
        .fd = ev.fd,
        .index = ev.index,
        .message = if (has_payload) ev.data.ptr else null,
        .message_len = if (has_payload) @intCast(ev.data.len) else 0,
        .@"error" = if (ev.kind == .err) @ptrCast(ev.data.ptr) else null,
    };
}

pub export fn ipc_pending_events(ptr: ?*anyopaque) callconv(.c) usize {
    const ctx = context(ptr) orelse return 0;
    return ctx.pendingEvents();
}

/// libIPC's one-event call: type, index and fd of the first event; its
/// payload (or, for ERROR, its text) copied into `buffer`. A buffer too small
/// gives IPC_E_BUFFER_TOO_SMALL with *buflen = the size needed, and the event
/// stays first in the queue.
pub export fn ipc_wait_event(
    ptr: ?*anyopaque,
    t: ?*u8,
    index: ?*usize,
    originfd: ?*c_int,
    buffer: ?[*]u8,
    buflen: ?*usize,
) callconv(.c) c_int {
    const ctx = context(ptr) orelse return errors.code(error.Generic);
    return finishCall(ctx, waitEvent(ctx, t, index, originfd, buffer, buflen));
}

fn waitEvent(
    ctx: *Context,
    t: ?*u8,
    index: ?*usize,
    originfd: ?*c_int,
    buffer: ?[*]u8,
    buflen: ?*usize,
) c_int {
    defer ctx.syncReadiness();
    ctx.beginWait(false) catch |err| return rc(ctx, @as(Error!void, err));
    const ev = ctx.firstEvent().?;
    if (t) |p| p.* = @intCast(@backingInt(ev.kind));
    if (index) |p| p.* = if (ev.index < 0) std.math.maxInt(usize) else @intCast(ev.index);
    if (originfd) |p| p.* = ev.fd;
    var len: usize = 0;
    const result = ctx.takeEventInto(outBuffer(buffer, buflen), &len);
    // Also when it did not fit: the size needed.
    if (buflen) |l| l.* = len;
    return rc(ctx, result);
}

/// One fd, readable (level-triggered) while ipc_wait_events() with a zero
/// call timeout would return something; the context owns it (closed by
/// ipc_close_all). Returns it, or a negative IPC_E_* code (the poll(2)
/// backend has none).
pub export fn ipc_context_fd(ptr: ?*anyopaque) callconv(.c) c_int {
    const ctx = context(ptr) orelse return errors.code(error.Generic);
    return ctx.contextFd() catch |err| rc(ctx, @as(Error!void, err));
}

// ------------------------------------------------------------ fd passing

pub export fn ipc_send_fd(
    sock: c_int,
    fd_to_pass: c_int,
    payload: ?[*]const u8,
    len: u32,
) callconv(.c) c_int {
    if (payload == null and len > 0) return errors.code(error.Generic);
    fdpass.sendFd(sock, fd_to_pass, bytes(payload, len)) catch return errors.code(error.Generic);
    return IPC_OK;
}

pub export fn ipc_receive_fd(
    sock: c_int,
    received: ?*c_int,
    buffer: ?[*]u8,
    buflen: ?*usize,
) callconv(.c) c_int {
    var fd: i32 = -1;
    const n = fdpass.receiveFd(sock, outBuffer(buffer, buflen), &fd) catch |err| {
        handOver(received, fd);
        return errors.code(
            if (err == error.BufferTooSmall) error.BufferTooSmall else error.Generic,
        );
    };
    handOver(received, fd);
    if (buflen) |l| l.* = n;
    return IPC_OK;
}

/// A received fd goes to the caller, or is closed when it gave no place for
/// it (NULL): it was left open, unknown to anyone.
fn handOver(received: ?*c_int, fd: i32) void {
    if (received) |r| {
        r.* = fd;
    } else if (fd >= 0) {
        sys.closeFd(fd);
    }
}

// ------------------------------------------------------------ errno

/// The errno of the OS error that caused the last failure on ctx (0 when no
/// OS error did, or ctx is null): Python's OSError.errno of the exception.
pub export fn ipc_last_errno(ptr: ?*anyopaque) callconv(.c) c_int {
    const ctx = context(ptr) orelse return 0;
    return ctx.last.errno;
}

// ------------------------------------------------------------ batched scheduling (issue 21)

/// ipc_schedule() of `count` messages in order, the i-th to fds[i], their
/// payloads back to back at `payloads` (sizes in `lengths`). Stops at the
/// first failure (its code and text); `done` (may be NULL) receives how many
/// were queued.
pub export fn ipc_schedule_many(
    ptr: ?*anyopaque,
    fds: ?[*]const c_int,
    payloads: ?[*]const u8,
    lengths: ?[*]const u32,
    count: usize,
    done: ?*usize,
) callconv(.c) c_int {
    const ctx = context(ptr) orelse return errors.code(error.Generic);
    var queued: usize = 0;
    defer if (done) |d| {
        d.* = queued;
    };
    if (count == 0) return IPC_OK;
    const lens = (lengths orelse return rc(ctx, noPayloads(ctx)))[0..count];
    const targets = (fds orelse return rc(ctx, noPayloads(ctx)))[0..count];
    var total: usize = 0;
    for (lens) |len| total += len;
    if (payloads == null and total > 0) return rc(ctx, noPayloads(ctx));
    return rc(ctx, ctx.scheduleMany(targets, bytes(payloads, total), lens, &queued));
}

/// ipc_schedule()'s checks of fd and of a `len`-byte payload, in its order,
/// but the queue bound; on success `room` (may be NULL) receives the bytes,
/// frame headers (4 each) included, fd's send queue takes before it is full.
pub export fn ipc_schedule_room(ptr: ?*anyopaque, fd: c_int, len: u64, room: ?*u64) callconv(.c) c_int {
    const ctx = context(ptr) orelse return errors.code(error.Generic);
    const left = ctx.scheduleRoom(fd, len) catch |err| return rc(ctx, @as(Error!void, err));
    if (room) |r| r.* = left;
    return IPC_OK;
}

/// Another thread's ipc_wakeup ends a blocking read of an interruptible
/// context (on, the default), or not (off: the read waits in the kernel,
/// quicker, and only a signal, the timeout or data ends it).
pub export fn ipc_context_read_wakeup(ptr: ?*anyopaque, on: c_int) callconv(.c) void {
    const ctx = context(ptr) orelse return;
    ctx.read_wakeup = on != 0;
}

// ---------------------------------------------------------------- tests

const testing = std.testing;
const sys = @import("sys.zig");

fn expectOk(code: c_int) !void {
    try testing.expectEqual(@as(c_int, 0), code);
}

/// A service context and a client context connected to it (as `service`),
/// in a fresh run dir under /tmp that deinit removes.
const TestPair = struct {
    dir_buf: [96]u8 = undefined,
    dir: [:0]const u8 = "",
    server: ?*anyopaque = null,
    client: ?*anyopaque = null,
    sfd: c_int = -1,
    cfd: c_int = -1,

    fn init(self: *TestPair, comptime service: []const u8) !void {
        self.dir = try sys.printZ(
            &self.dir_buf,
            "/tmp/pyipc-zig-" ++ service ++ "-{d}-{d}",
            .{ std.c.getpid(), sys.nowMs() },
        );
        try expectOk(ipc_context_init(&self.server));
        try expectOk(ipc_context_init(&self.client));
        for ([_]?*anyopaque{ self.server, self.client }) |ctx| {
            try expectOk(ipc_context_set_rundir(ctx, self.dir.ptr, self.dir.len));
            ipc_context_timer(ctx, 5000);
        }
        try expectOk(ipc_service_init(self.server, &self.sfd, service.ptr, service.len));
        try expectOk(ipc_connect_service(self.client, &self.cfd, service.ptr, service.len));
    }

    fn deinit(self: *TestPair, comptime service: []const u8) void {
        ipc_context_deinit(&self.client);
        ipc_context_deinit(&self.server);
        if (self.dir.len == 0) return;
        var b: [128]u8 = undefined;
        _ = std.c.unlink(
            (sys.printZ(&b, "{s}/" ++ service ++ ".lock", .{self.dir}) catch unreachable).ptr,
        );
        _ = std.c.rmdir(self.dir.ptr);
    }
};

test "C ABI: batches by pointer, pending events, small buffers, error texts" {
    var pair: TestPair = .{};
    try pair.init("capi");
    defer pair.deinit("capi");
    const server, const client, const cfd = .{ pair.server, pair.client, pair.cfd };
    try expectOk(ipc_write(client, cfd, "one", 3));
    try expectOk(ipc_write(client, cfd, "two", 3));

    // CONNECTION, then the two messages, one batch of capacity 1 at a time.
    var evs: [4]IpcEvent = undefined;
    var count: usize = 0;
    try expectOk(ipc_wait_events(server, &evs, 1, &count));
    try testing.expectEqual(@as(usize, 1), count);
    try testing.expectEqual(@as(i32, 1), evs[0].type);
    try testing.expectEqual(@as(i64, 1), evs[0].index);
    const conn_fd = evs[0].fd;
    var messages: [2][]const u8 = undefined;
    var got: usize = 0;
    while (got < 2) {
        try expectOk(ipc_wait_events(server, &evs, 4, &count));
        for (evs[0..count]) |ev| {
            try testing.expectEqual(@as(i32, 3), ev.type);
            try testing.expect(ev.@"error" == null);
            messages[got] = ev.message.?[0..ev.message_len];
            got += 1;
        }
    }
    // Payloads of the last batch stay valid across other (non-wait) calls.
    try expectOk(ipc_write(client, cfd, "a longer message", 16));
    try testing.expectEqualStrings("two", messages[1]);

    // ipc_wait_event: a buffer too small keeps the event and says the size.
    var t: u8 = 99;
    var index: usize = 0;
    var fd: c_int = -1;
    var buf: [32]u8 = undefined;
    var len: usize = 4;
    const too_small = @backingInt(errors.Code.buffer_too_small);
    try testing.expectEqual(too_small, ipc_wait_event(server, &t, &index, &fd, &buf, &len));
    try testing.expectEqual(@as(usize, 16), len);
    try testing.expectEqual(@backingInt(events.EventType.message_rx), t);
    len = buf.len;
    try expectOk(ipc_wait_event(server, &t, &index, &fd, &buf, &len));
    try testing.expectEqualStrings("a longer message", buf[0..len]);
    try testing.expectEqual(conn_fd, fd);
    try testing.expectEqual(@as(usize, 1), index);
    try testing.expectEqual(@as(usize, 0), ipc_pending_events(server));

    // Errors: code and text.
    try testing.expectEqual(@as(c_int, -9), ipc_write(server, 9999, "x", 1));
    try testing.expectEqualStrings(
        "fd 9999 is not managed by this context",
        std.mem.span(ipc_last_error(server)),
    );
    var no_fd: c_int = -1;
    try testing.expectEqual(@as(c_int, -4), ipc_service_init(server, &no_fd, "", 0));
    try testing.expectEqualStrings(
        "invalid service name: empty",
        std.mem.span(ipc_last_error(server)),
    );

    // An ERROR event carries its text as a C string.
    const raw = [_]u8{ 0xff, 0xff, 0xff, 0xff };
    try testing.expectEqual(@as(isize, 4), std.c.send(cfd, &raw, 4, 0));
    try expectOk(ipc_wait_events(server, &evs, 4, &count));
    try testing.expectEqual(@as(i32, 0), evs[0].type);
    try testing.expectEqualStrings(
        "message of 4294967295 bytes exceeds max_message_size (16777216)",
        std.mem.span(evs[0].@"error".?),
    );
    if (count < 2) try expectOk(ipc_wait_events(server, evs[1..], 3, &count));
    try testing.expectEqual(@as(i32, 2), evs[1].type);

    // read by index, close by index, and deinit clears the pointer.
    try expectOk(ipc_close_all(client));
    var other: ?*anyopaque = null;
    try expectOk(ipc_context_init(&other));
    ipc_context_deinit(&other);
    try testing.expect(other == null);
}

test "C ABI: write_many gathers frames, read_many copies them in order" {
    var pair: TestPair = .{};
    try pair.init("many");
    defer pair.deinit("many");
    const server, const client, const cfd = .{ pair.server, pair.client, pair.cfd };

    // 1,000 messages of 0 to 100 bytes (more than one gathered batch).
    const n = 1000;
    var lens: [n]u32 = undefined;
    var data: [n * 100]u8 = undefined;
    var total: usize = 0;
    for (&lens, 0..) |*len, i| {
        len.* = @intCast(i % 101);
        @memset(data[total .. total + len.*], @intCast(i % 251));
        total += len.*;
    }
    try expectOk(ipc_write_many(client, cfd, &data, &lens, n));
    try testing.expectEqual(@as(c_int, -1), ipc_write_many(client, cfd, null, &lens, n));
    // The same messages again, one pointer each.
    var ptrs: [n]?[*]const u8 = undefined;
    var at: usize = 0;
    for (&ptrs, lens) |*p, len| {
        p.* = if (len == 0) null else data[at..].ptr;
        at += len;
    }
    try expectOk(ipc_write_many_ptrs(client, cfd, &ptrs, &lens, n));
    ptrs[5] = null;
    try testing.expectEqual(@as(c_int, -1), ipc_write_many_ptrs(client, cfd, &ptrs, &lens, n));

    var evs: [1]IpcEvent = undefined;
    var count: usize = 0;
    try expectOk(
        ipc_wait_events(server, &evs, 1, &count),
    ); // CONNECTION; messages may wait in the core
    try testing.expectEqual(@as(i32, 1), evs[0].type);
    const conn_fd = evs[0].fd;
    var buf: [150]u8 = undefined;
    var sizes: [7]u32 = undefined;
    var len: usize = buf.len;
    try testing.expectEqual(
        @as(c_int, -1),
        ipc_read_many(server, conn_fd, &buf, &len, &sizes, 0, &count),
    );
    var got: usize = 0;
    var refused = false;
    while (got < 2 * n) {
        // Message 100 (100 bytes) does not fit 99 bytes: refused once, kept.
        const small = got == 100 and !refused;
        len = if (small) 99 else buf.len;
        const code = ipc_read_many(
            server,
            conn_fd,
            &buf,
            &len,
            &sizes,
            if (got < 100) @min(sizes.len, 100 - got) else sizes.len,
            &count,
        );
        if (small) {
            try testing.expectEqual(@backingInt(errors.Code.buffer_too_small), code);
            try testing.expectEqual(@as(usize, 100), len);
            refused = true;
            continue;
        }
        try expectOk(code);
        try testing.expect(count >= 1 and count <= sizes.len);
        var start: usize = 0;
        for (sizes[0..count]) |size| {
            const i = got % n;
            try testing.expectEqual(@as(usize, i % 101), size);
            for (buf[start .. start + size]) |byte| try testing.expectEqual(
                @as(u8, @intCast(i % 251)),
                byte,
            );
            start += size;
            got += 1;
        }
    }
    try testing.expect(refused);
    const last: [3000]u8 = @splat(42);
    try expectOk(ipc_write(client, cfd, @constCast(&last), last.len));
    var lent: ?[*]const u8 = null;
    var lent_len: usize = 0;
    try expectOk(ipc_read_lent(server, conn_fd, &lent, &lent_len));
    try testing.expectEqualSlices(u8, &last, lent.?[0..lent_len]);
    try expectOk(ipc_close_fd(client, cfd));
    len = buf.len;
    try testing.expectEqual(
        @as(c_int, -8),
        ipc_read_many(server, conn_fd, &buf, &len, &sizes, sizes.len, &count),
    );
    try testing.expectEqual(@as(usize, 0), count);
    try testing.expectEqual(
        @as(c_int, -8),
        ipc_read_lent(server, conn_fd, &lent, &lent_len),
    ); // ended: still closed
}

test "C ABI: check_write makes write's checks in its order and writes nothing" {
    var pair: TestPair = .{};
    try pair.init("check");
    defer pair.deinit("check");
    const over_4_gib: u64 = (1 << 32) + 1;
    // An unknown fd, then a service fd, come before the size.
    try testing.expectEqual(@as(c_int, -9), ipc_check_write(pair.client, 99999, over_4_gib));
    try testing.expectEqual(@as(c_int, -9), ipc_check_write(pair.server, pair.sfd, over_4_gib));
    try testing.expectEqual(@as(c_int, -6), ipc_check_write(pair.client, pair.cfd, over_4_gib));
    try testing.expectEqualStrings(
        "message of 4294967297 bytes exceeds max_message_size (16777216)",
        std.mem.span(ipc_last_error(pair.client)),
    );
    try expectOk(ipc_check_write(pair.client, pair.cfd, 16));
    // Nothing was written: the first message the server reads is the next one.
    try expectOk(ipc_write(pair.client, pair.cfd, @constCast("ok"), 2));
    var evs: [1]IpcEvent = undefined;
    var count: usize = 0;
    try expectOk(ipc_wait_events(pair.server, &evs, 1, &count)); // CONNECTION
    try testing.expectEqual(@as(i32, 1), evs[0].type);
    var buf: [8]u8 = undefined;
    var len: usize = buf.len;
    try expectOk(ipc_read_fd(pair.server, evs[0].fd, &buf, &len));
    try testing.expectEqualStrings("ok", buf[0..len]);
}

test "C ABI: busy_poll takes 0 to 10,000 us and refuses more with its text" {
    var pair: TestPair = .{};
    try pair.init("busy");
    defer pair.deinit("busy");
    try testing.expectEqual(@as(c_int, -1), ipc_context_busy_poll(pair.client, 10_001));
    try testing.expectEqualStrings(
        "busy_poll must be at most 10000 us",
        std.mem.span(ipc_last_error(pair.client)),
    );
    try testing.expectEqual(@as(c_int, -1), ipc_context_busy_poll(null, 0));
    try expectOk(ipc_context_busy_poll(pair.client, 10_000));
    try expectOk(ipc_context_busy_poll(pair.server, 50));
    // A spinning client and server still exchange a message.
    try expectOk(ipc_write(pair.client, pair.cfd, @constCast("spin"), 4));
    var evs: [2]IpcEvent = undefined;
    var count: usize = 0;
    var got_message = false;
    while (!got_message) {
        try expectOk(ipc_wait_events(pair.server, &evs, evs.len, &count));
        for (evs[0..count]) |ev| got_message = got_message or ev.type == 3;
    }
    try expectOk(ipc_context_busy_poll(pair.client, 0)); // off again
}

test "C ABI: last_errno is the OS error of the last failure, 0 for others" {
    var pair: TestPair = .{};
    try pair.init("errno");
    defer pair.deinit("errno");
    try testing.expectEqual(@as(c_int, 0), ipc_last_errno(null));
    try testing.expectEqual(@as(c_int, -9), ipc_close_fd(pair.client, 99999));
    try testing.expectEqual(@as(c_int, 0), ipc_last_errno(pair.client));
    // A stale socket (no listener): refused, ServiceNotFound with ECONNREFUSED.
    try expectOk(ipc_close_fd(pair.server, pair.sfd));
    var b: [128]u8 = undefined;
    const path = try sys.printZ(&b, "{s}/errno", .{pair.dir});
    const s = std.c.socket(std.c.AF.UNIX, std.c.SOCK.STREAM, 0);
    defer sys.closeFd(s);
    var addr = std.mem.zeroes(std.c.sockaddr.un);
    addr.family = std.c.AF.UNIX;
    @memcpy(addr.path[0..path.len], path);
    try testing.expectEqual(
        @as(c_int, 0),
        std.c.bind(s, @ptrCast(&addr), @sizeOf(std.c.sockaddr.un)),
    );
    defer _ = std.c.unlink(path.ptr);
    var fd: c_int = -1;
    try testing.expectEqual(@as(c_int, -3), ipc_connect_service(pair.client, &fd, "errno", 5));
    try testing.expectEqual(
        @as(c_int, @backingInt(std.c.E.CONNREFUSED)),
        ipc_last_errno(pair.client),
    );
}

fn fdReadable(fd: c_int, ms: i32) bool {
    var pfd = [1]std.c.pollfd{.{ .fd = fd, .events = std.c.POLL.IN, .revents = 0 }};
    return std.c.poll(&pfd, 1, ms) == 1;
}

/// Zero-timeout waits until one returns IPC_E_TIMEOUT (nothing ready); how
/// many events they returned.
fn drainEvents(ctx: ?*anyopaque, evs: []IpcEvent) !usize {
    ipc_context_call_timeout(ctx, 0);
    defer ipc_context_call_timeout(ctx, -1);
    var total: usize = 0;
    while (true) {
        var count: usize = 0;
        const code = ipc_wait_events(ctx, evs.ptr, evs.len, &count);
        if (code == @backingInt(errors.Code.timeout)) return total;
        try expectOk(code);
        total += count;
    }
}

test "C ABI: context_fd is readable while a zero-timeout wait has something" {
    var pair: TestPair = .{};
    try pair.init("ctxfd");
    defer pair.deinit("ctxfd");
    const server, const client, const cfd = .{ pair.server, pair.client, pair.cfd };
    const fd = ipc_context_fd(server);
    if (@import("build_options").force_poll) {
        try testing.expectEqual(@as(c_int, -1), fd);
        return testing.expectEqualStrings(
            "fileno() is not available with the poll(2) poller backend",
            std.mem.span(ipc_last_error(server)),
        );
    }
    try testing.expect(fd >= 0);
    try testing.expectEqual(fd, ipc_context_fd(server)); // stable
    ipc_context_timer(server, -1);
    var evs: [8]IpcEvent = undefined;
    // The connection.
    try testing.expect(fdReadable(fd, 2000));
    try testing.expectEqual(@as(usize, 1), try drainEvents(server, &evs));
    try testing.expect(!fdReadable(fd, 0));
    // Events left queued (capacity 1) keep it readable.
    try expectOk(ipc_write(client, cfd, "one", 3));
    try expectOk(ipc_write(client, cfd, "two", 3));
    try testing.expect(fdReadable(fd, 2000));
    var count: usize = 0;
    ipc_context_call_timeout(server, 0);
    try expectOk(ipc_wait_events(server, &evs, 1, &count));
    ipc_context_call_timeout(server, -1);
    if (ipc_pending_events(server) > 0) try testing.expect(fdReadable(fd, 0));
    _ = try drainEvents(server, &evs);
    try testing.expect(!fdReadable(fd, 0));
    // Scheduled data that can be written: readable, then MESSAGE_TX.
    const conn_fd = evs[0].fd;
    try expectOk(ipc_schedule(server, conn_fd, "reply", 5));
    try testing.expect(fdReadable(fd, 0));
    try testing.expectEqual(@as(usize, 1), try drainEvents(server, &evs));
    try testing.expectEqual(@as(i32, 4), evs[0].type);
    try testing.expect(!fdReadable(fd, 0));
    // A due timer.
    ipc_context_timer(server, 20);
    try testing.expect(!fdReadable(fd, 0));
    try testing.expect(fdReadable(fd, 2000));
    try testing.expectEqual(@as(usize, 1), try drainEvents(server, &evs));
    try testing.expectEqual(@as(i32, 5), evs[0].type);
    ipc_context_timer(server, -1);
    try testing.expect(!fdReadable(fd, 0));
    // close_all closes it.
    try expectOk(ipc_close_all(server));
    try testing.expect(std.c.fcntl(fd, std.c.F.GETFD) < 0);
}

test "C ABI: schedule_many queues in order, stops at the first failure; schedule_room" {
    var pair: TestPair = .{};
    try pair.init("schedmany");
    defer pair.deinit("schedmany");
    const server, const client, const cfd = .{ pair.server, pair.client, pair.cfd };
    var room: u64 = 0;
    try expectOk(ipc_schedule_room(client, cfd, 3, &room));
    const max_queue: u64 = 64 << 20;
    try testing.expectEqual(max_queue, room);
    // "a", "bc", "" to cfd; then a message to an unknown fd stops the batch.
    const fds = [_]c_int{ cfd, cfd, cfd, 9999, cfd };
    const lens = [_]u32{ 1, 2, 0, 1, 1 };
    var done: usize = 99;
    try testing.expectEqual(
        @as(c_int, errors.code(error.UnknownFd)),
        ipc_schedule_many(client, &fds, "abcxy", &lens, fds.len, &done),
    );
    try testing.expectEqual(@as(usize, 3), done);
    try testing.expectEqual(max_queue - 4 * 3 - 3, blk: {
        try expectOk(ipc_schedule_room(client, cfd, 1, &room));
        break :blk room;
    });
    try testing.expectEqual(
        @as(c_int, errors.code(error.UnknownFd)),
        ipc_schedule_room(client, 9999, 1, &room),
    );
    try testing.expectEqual(@as(c_int, errors.code(error.MessageTooLarge)), ipc_schedule_room(client, cfd, 1 << 40, null));
    // Nothing, and NULL arrays with nothing: fine; NULL payloads with bytes: refused.
    try expectOk(ipc_schedule_many(client, null, null, null, 0, &done));
    try testing.expectEqual(@as(usize, 0), done);
    try testing.expect(ipc_schedule_many(client, &fds, null, &lens, 2, null) < 0);
    // One MESSAGE_TX per queued message, and the server reads them in order.
    var evs: [8]IpcEvent = undefined;
    var tx: usize = 0;
    while (tx < 3) {
        var count: usize = 0;
        try expectOk(ipc_wait_events(client, &evs, evs.len, &count));
        for (evs[0..count]) |ev| {
            try testing.expectEqual(@as(i32, 4), ev.type);
            tx += 1;
        }
    }
    var got: [3][]const u8 = undefined;
    var buf: [3][8]u8 = undefined;
    var rx: usize = 0;
    while (rx < 3) {
        var count: usize = 0;
        try expectOk(ipc_wait_events(server, &evs, evs.len, &count));
        for (evs[0..count]) |ev| {
            if (ev.type != 3) continue;
            if (ev.message) |m| @memcpy(buf[rx][0..ev.message_len], m[0..ev.message_len]);
            got[rx] = buf[rx][0..ev.message_len];
            rx += 1;
        }
    }
    try testing.expectEqualStrings("a", got[0]);
    try testing.expectEqualStrings("bc", got[1]);
    try testing.expectEqualStrings("", got[2]);
}

test "C ABI: schedule_pinned writes from the caller's memory and hands every token back once" {
    var pair: TestPair = .{};
    try pair.init("pinned");
    defer pair.deinit("pinned");
    const server, const client, const cfd = .{ pair.server, pair.client, pair.cfd };
    const big = try gpa.alloc(u8, 32 * 1024);
    defer gpa.free(big);
    for (big, 0..) |*b, i| b.* = @truncate(i *% 7);
    var tokens: [8]u64 = undefined;
    try testing.expectEqual(@as(usize, 0), ipc_unpinned(client, &tokens, tokens.len));
    // Pinned, copied, pinned, an empty pinned one (released at once).
    try expectOk(ipc_schedule_pinned(client, cfd, big.ptr, @intCast(big.len), 1));
    try expectOk(ipc_schedule(client, cfd, "x", 1));
    try expectOk(ipc_schedule_pinned(client, cfd, big.ptr, @intCast(big.len), 2));
    try expectOk(ipc_schedule_pinned(client, cfd, big.ptr, 0, 3));
    try testing.expectEqual(@as(usize, 1), ipc_unpinned(client, &tokens, tokens.len));
    try testing.expectEqual(@as(u64, 3), tokens[0]);
    // The same checks as ipc_schedule: an unknown fd is refused, nothing pinned.
    try testing.expectEqual(
        @as(c_int, errors.code(error.UnknownFd)),
        ipc_schedule_pinned(client, 9999, big.ptr, @intCast(big.len), 4),
    );
    var evs: [8]IpcEvent = undefined;
    var tx: usize = 0;
    while (tx < 4) {
        var count: usize = 0;
        try expectOk(ipc_wait_events(client, &evs, evs.len, &count));
        for (evs[0..count]) |ev| {
            try testing.expectEqual(@as(i32, 4), ev.type);
            tx += 1;
        }
    }
    try testing.expectEqual(@as(usize, 2), ipc_unpinned(client, &tokens, tokens.len));
    try testing.expectEqual([2]u64{ 1, 2 }, tokens[0..2].*);
    // The server gets the four messages whole and in order.
    const want = [_][]const u8{ big, "x", big, "" };
    var rx: usize = 0;
    while (rx < want.len) {
        var count: usize = 0;
        try expectOk(ipc_wait_events(server, &evs, evs.len, &count));
        for (evs[0..count]) |ev| {
            if (ev.type != 3) continue;
            const got = if (ev.message) |m| m[0..ev.message_len] else "";
            try testing.expectEqualSlices(u8, want[rx], got);
            rx += 1;
        }
    }
    // A pin whose connection ends before it is written is handed back too:
    // closed here,
    try expectOk(ipc_schedule_pinned(client, cfd, big.ptr, @intCast(big.len), 5));
    try testing.expectEqual(@as(usize, 0), ipc_unpinned(client, &tokens, tokens.len));
    try expectOk(ipc_close_fd(client, cfd));
    try testing.expectEqual(@as(usize, 1), ipc_unpinned(client, &tokens, 1));
    try testing.expectEqual(@as(u64, 5), tokens[0]);
    // or ended by the peer with more queued than its socket takes,
    var fd2: c_int = -1;
    try expectOk(ipc_connect_service(client, &fd2, "pinned", 6));
    var count: usize = 0;
    var server_fd: i32 = -1;
    while (server_fd < 0) { // the server's CONNECTION (with cfd's DISCONNECTION)
        try expectOk(ipc_wait_events(server, &evs, evs.len, &count));
        for (evs[0..count]) |ev| if (ev.type == 1) {
            server_fd = ev.fd;
        };
    }
    for (0..64) |i| try expectOk(ipc_schedule_pinned(client, fd2, big.ptr, @intCast(big.len), 100 + i));
    try expectOk(ipc_close_fd(server, server_fd));
    var back: usize = 0;
    var ended = false;
    while (!ended) {
        try expectOk(ipc_wait_events(client, &evs, evs.len, &count));
        for (evs[0..count]) |ev| ended = ended or ev.type == 2;
    }
    while (true) { // 8 at a time, oldest first: 100, 101...
        const n = ipc_unpinned(client, &tokens, tokens.len);
        for (tokens[0..n], back..) |token, i| try testing.expectEqual(100 + i, token);
        back += n;
        if (n < tokens.len) break;
    }
    try testing.expectEqual(@as(usize, 64), back);
    // or still queued when the context is freed (testing.allocator: no leak).
    var fd3: c_int = -1;
    try expectOk(ipc_connect_service(client, &fd3, "pinned", 6));
    try expectOk(ipc_schedule_pinned(client, fd3, big.ptr, @intCast(big.len), 7));
}

test "C ABI: read_wakeup off: an interruptible context's read waits in the kernel" {
    var pair: TestPair = .{};
    try pair.init("readwake");
    defer pair.deinit("readwake");
    const client, const cfd = .{ pair.client, pair.cfd };
    ipc_context_interruptible(client, 1);
    ipc_context_read_wakeup(client, 0);
    var evs: [4]IpcEvent = undefined;
    var count: usize = 0;
    try expectOk(ipc_wait_events(pair.server, &evs, evs.len, &count)); // CONNECTION
    try expectOk(ipc_write(pair.server, evs[0].fd, "hi", 2));
    var buf: [8]u8 = undefined;
    var len: usize = buf.len;
    try expectOk(ipc_read_fd(client, cfd, &buf, &len));
    try testing.expectEqualStrings("hi", buf[0..len]);
    // A timeout still ends it.
    ipc_context_call_timeout(client, 20_000);
    len = buf.len;
    try testing.expectEqual(@as(c_int, errors.code(error.Timeout)), ipc_read_fd(client, cfd, &buf, &len));
    ipc_context_read_wakeup(client, 1);
}

test "C ABI: null pointers that would lose or fake data are refused, nothing taken" {
    var pair: TestPair = .{};
    try pair.init("nulls");
    defer pair.deinit("nulls");
    const server, const client, const cfd = .{ pair.server, pair.client, pair.cfd };
    const generic: c_int = errors.code(error.Generic);
    // A null payload with a length: refused, not sent as an empty message.
    try testing.expectEqual(generic, ipc_write(client, cfd, null, 5));
    try testing.expectEqualStrings(
        "a payload pointer is null (5 bytes)",
        std.mem.span(ipc_last_error(client)),
    );
    try testing.expectEqual(generic, ipc_schedule(client, cfd, null, 5));
    try testing.expectEqual(generic, ipc_schedule_pinned(client, cfd, null, 5, 1));
    try testing.expectEqual(generic, ipc_context_set_rundir(client, null, 5));
    try testing.expectEqual(generic, ipc_send_fd(-1, -1, null, 5));
    const lens = [_]u32{ 1, 1 };
    try testing.expectEqual(generic, ipc_write_many(client, cfd, "ab", null, 2));
    try testing.expectEqual(generic, ipc_write_many_ptrs(client, cfd, null, &lens, 2));
    // Events copied out with no count, or a message read with nowhere to
    // put it: refused before anything is taken.
    var evs: [4]IpcEvent = undefined;
    try testing.expectEqual(generic, ipc_wait_events(server, &evs, evs.len, null));
    var count: usize = 0;
    try expectOk(ipc_wait_events(server, &evs, evs.len, &count));
    try testing.expectEqual(@as(usize, 1), count); // the CONNECTION, still there
    try testing.expectEqual(@as(i32, 1), evs[0].type);
    try expectOk(ipc_write(server, evs[0].fd, "kept", 4));
    try testing.expectEqual(generic, ipc_read_lent(client, cfd, null, null));
    var buf: [8]u8 = undefined;
    var len: usize = buf.len;
    try expectOk(ipc_read_fd(client, cfd, &buf, &len));
    try testing.expectEqualStrings("kept", buf[0..len]);
    // linger of an fd the context does not manage says so.
    try testing.expectEqual(@as(c_int, errors.code(error.UnknownFd)), ipc_linger(client, 9999, 0));
    // receive_fd with no room reads nothing (no byte, no fd taken).
    var fd: c_int = 0;
    var none: usize = 0;
    try testing.expectEqual(
        @as(c_int, errors.code(error.BufferTooSmall)),
        ipc_receive_fd(cfd, &fd, null, &none),
    );
    try testing.expectEqual(@as(c_int, -1), fd);
}

test "C ABI: ipc_receive_fd with no place for the fd closes it" {
    var pair: [2]std.c.fd_t = undefined;
    try testing.expectEqual(@as(c_int, 0), std.c.socketpair(std.c.AF.UNIX, std.c.SOCK.STREAM, 0, &pair));
    defer sys.closeFd(pair[0]);
    defer sys.closeFd(pair[1]);
    // The lowest free fd number, before: a leaked fd would take it.
    const before = std.c.dup(0);
    sys.closeFd(before);
    try testing.expectEqual(IPC_OK, ipc_send_fd(pair[0], 0, "x", 1));
    var buf: [8]u8 = undefined;
    var len: usize = buf.len;
    try testing.expectEqual(IPC_OK, ipc_receive_fd(pair[1], null, &buf, &len));
    const after = std.c.dup(0);
    defer sys.closeFd(after);
    try testing.expectEqual(before, after);
}
