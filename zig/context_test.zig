//! Socket tests of the context over real Unix sockets, each in a fresh
//! temporary run dir (removed afterwards). Server and client are two contexts
//! in the same thread unless a test needs a blocking peer (then a thread).

const std = @import("std");
const c = std.c;
const testing = std.testing;
const context = @import("context.zig");
const Context = context.Context;
const sys = @import("sys.zig");
const framing = @import("framing.zig");
const events_mod = @import("events.zig");
const EventType = @import("events.zig").EventType;
const switching = @import("switching.zig");
const copy_max = @import("gather.zig").copy_max;

const gpa = testing.allocator;

extern "c" fn setenv(name: [*:0]const u8, value: [*:0]const u8, overwrite: c_int) c_int;
extern "c" fn unsetenv(name: [*:0]const u8) c_int;

/// A run dir under /tmp with a unique name; deinit removes it and its files.
const TmpRun = struct {
    buf: [96]u8 = undefined,
    len: usize = 0,

    var counter: u32 = 0;

    fn init() TmpRun {
        var t: TmpRun = .{};
        counter += 1;
        const p = sys.printZ(
            &t.buf,
            "/tmp/pyipc-zig-test-{d}-{d}-{d}",
            .{ c.getpid(), counter, sys.nowMs() },
        ) catch unreachable;
        t.len = p.len;
        return t;
    }

    fn path(self: *const TmpRun) [:0]const u8 {
        return self.buf[0..self.len :0];
    }

    fn deinit(self: *const TmpRun) void {
        if (c.opendir(self.path().ptr)) |dir| {
            defer _ = c.closedir(dir);
            while (c.readdir(dir)) |ent| {
                const name = std.mem.sliceTo(&ent.name, 0);
                if (std.mem.eql(u8, name, ".") or std.mem.eql(u8, name, "..")) continue;
                var buf: [200]u8 = undefined;
                const full = sys.printZ(&buf, "{s}/{s}", .{ self.path(), name }) catch continue;
                _ = c.unlink(full.ptr);
            }
        }
        _ = c.rmdir(self.path().ptr);
    }

    fn newContext(self: *const TmpRun) !*Context {
        const ctx = try Context.create(gpa);
        errdefer ctx.destroy();
        try ctx.setRundir(self.path());
        ctx.setTimer(5000); // a hung test fails with a TIMER instead of hanging
        return ctx;
    }
};

/// A copy of one event (its payload copied, so it outlives the queue entry).
const Ev = struct {
    kind: EventType,
    fd: i32,
    index: i64,
    data: std.ArrayList(u8) = .empty,

    fn deinit(self: *Ev) void {
        self.data.deinit(gpa);
    }
};

fn nextEvent(ctx: *Context) !Ev {
    ctx.events.releaseLent(gpa);
    try ctx.wait(false);
    const ev = ctx.events.peek().?;
    var out: Ev = .{ .kind = ev.kind, .fd = ev.fd, .index = ev.index };
    errdefer out.deinit();
    try out.data.appendSlice(gpa, ev.data);
    try ctx.events.pop(gpa, false);
    return out;
}

fn expectEvent(ctx: *Context, kind: EventType, fd: i32, data: ?[]const u8) !Ev {
    var ev = try nextEvent(ctx);
    errdefer {
        std.debug.print("got {s} fd={d} data={s}\n", .{ @tagName(ev.kind), ev.fd, ev.data.items });
        ev.deinit();
    }
    try testing.expectEqual(kind, ev.kind);
    if (fd != -2) try testing.expectEqual(fd, ev.fd);
    if (data) |d| try testing.expectEqualStrings(d, ev.data.items);
    return ev;
}

fn expectOnly(ctx: *Context, kind: EventType, fd: i32, data: ?[]const u8) !void {
    var ev = try expectEvent(ctx, kind, fd, data);
    ev.deinit();
}

/// A server context with service `name`, a client context connected to it,
/// and the server side of that connection (after its CONNECTION event).
const Pair = struct {
    run: TmpRun,
    server: *Context,
    client: *Context,
    service_fd: i32,
    client_fd: i32,
    server_fd: i32,

    fn init(name: []const u8) !Pair {
        var p: Pair = undefined;
        p.run = TmpRun.init();
        errdefer p.run.deinit();
        p.server = try p.run.newContext();
        errdefer p.server.destroy();
        p.client = try p.run.newContext();
        errdefer p.client.destroy();
        p.service_fd = try p.server.serviceInit(name);
        p.client_fd = try p.client.connectService(name);
        var ev = try expectEvent(p.server, .connection, -2, null);
        defer ev.deinit();
        p.server_fd = ev.fd;
        return p;
    }

    fn deinit(self: *Pair) void {
        self.client.destroy();
        self.server.destroy();
        self.run.deinit();
    }
};

/// A connected pair of Unix stream sockets (blocking); the caller closes both.
fn unixSocketPair() ![2]c.fd_t {
    var pair: [2]c.fd_t = undefined;
    try testing.expectEqual(@as(c_int, 0), c.socketpair(c.AF.UNIX, c.SOCK.STREAM, 0, &pair));
    return pair;
}

fn sendRaw(fd: i32, bytes: []const u8) !void {
    var off: usize = 0;
    while (off < bytes.len) {
        const n = c.send(fd, bytes[off..].ptr, bytes.len - off, sys.send_flags);
        if (n < 0) {
            if (c.errno(n) == .AGAIN) {
                sys.waitFd(fd, sys.POLLOUT);
                continue;
            }
            return error.SendFailed;
        }
        off += @intCast(n);
    }
}

fn readMessage(ctx: *Context, fd: i32, buf: []u8) ![]u8 {
    var len: usize = 0;
    try ctx.readFd(fd, buf, &len);
    return buf[0..len];
}

test "connect, exchange messages both ways, disconnection" {
    var p = try Pair.init("pong");
    defer p.deinit();
    try p.client.write(p.client_fd, "hello");
    try expectOnly(p.server, .message_rx, p.server_fd, "hello");
    try p.server.write(p.server_fd, "world");
    var buf: [64]u8 = undefined;
    try testing.expectEqualStrings("world", try readMessage(p.client, p.client_fd, &buf));
    try p.client.close(p.client_fd);
    try expectOnly(p.server, .disconnection, p.server_fd, null);
    try testing.expect(p.server.table.get(p.server_fd) == null);
}

test "framing over a socket: header split, payload apart, empty messages, many per read" {
    var p = try Pair.init("frames");
    defer p.deinit();
    const h = framing.encodeHeader(5);
    try sendRaw(p.client_fd, h[0..1]);
    try sendRaw(p.client_fd, h[1..4]);
    try testing.expectEqual(@as(usize, 0), p.server.events.live);
    p.server.setTimer(50);
    try expectOnly(p.server, .timer, -1, null); // an incomplete frame is no event, no drop
    p.server.setTimer(5000);
    try sendRaw(p.client_fd, "abcde");
    try expectOnly(p.server, .message_rx, p.server_fd, "abcde");
    // Many frames (empty ones too) in one send: all delivered, in order.
    var stream: std.ArrayList(u8) = .empty;
    defer stream.deinit(gpa);
    const payloads = [_][]const u8{ "", "one", "", "two", "three", "" };
    for (payloads) |pl| {
        try stream.appendSlice(gpa, &framing.encodeHeader(@intCast(pl.len)));
        try stream.appendSlice(gpa, pl);
    }
    try sendRaw(p.client_fd, stream.items);
    for (payloads) |pl| try expectOnly(p.server, .message_rx, p.server_fd, pl);
}

test "write: frames around copy_max (one buffer up to it, two parts past it) arrive whole" {
    var p = try Pair.init("one-buffer");
    defer p.deinit();
    const at_edge: [copy_max]u8 = @splat('e');
    const past_edge: [copy_max + 1]u8 = @splat('p');
    const sizes = [_][]const u8{ "", "x", at_edge[0 .. copy_max - 1], &at_edge, &past_edge };
    for (sizes) |payload| {
        try p.client.write(p.client_fd, payload);
        try expectOnly(p.server, .message_rx, p.server_fd, payload);
    }
}

fn floodSender(run: *const TmpRun, count: u32, result: *anyerror!void) void {
    result.* = floodSend(run, count);
}

fn floodSend(run: *const TmpRun, count: u32) !void {
    const ctx = try run.newContext();
    defer ctx.destroy();
    const fd = try ctx.connectService("flood");
    var msg: [8]u8 = undefined;
    for (0..count) |i| {
        std.mem.writeInt(u32, msg[0..4], @intCast(i), .big);
        @memcpy(msg[4..], "data");
        try ctx.write(fd, &msg);
    }
}

test "a large frame that arrives whole in one read: the event takes the scratch buffer" {
    var p = try Pair.init("scratch");
    defer p.deinit();
    // Two large frames and a small one in one send: the large ones keep the
    // scratch buffer (one chunk, shared), the small one is copied from it.
    const big: [events_mod.chunk_size + 10]u8 = @splat('b');
    var stream: std.ArrayList(u8) = .empty;
    defer stream.deinit(gpa);
    const payloads = [_][]const u8{ &big, "small", big[0 .. big.len - 1] };
    for (payloads) |pl| {
        try stream.appendSlice(gpa, &framing.encodeHeader(@intCast(pl.len)));
        try stream.appendSlice(gpa, pl);
    }
    try sendRaw(p.client_fd, stream.items);
    var first = try expectEvent(p.server, .message_rx, p.server_fd, &big);
    first.deinit();
    try testing.expect(p.server.scratch == null); // handed over, not copied
    for (payloads[1..]) |pl| try expectOnly(p.server, .message_rx, p.server_fd, pl);
    // The next read works from a buffer again (the spare the first became).
    try sendRaw(p.client_fd, stream.items);
    for (payloads) |pl| try expectOnly(p.server, .message_rx, p.server_fd, pl);
    try testing.expect(p.server.events.spare != null or p.server.scratch != null);
}

test "a flood of 200,000 messages is delivered whole and in order" {
    var run = TmpRun.init();
    defer run.deinit();
    const server = try run.newContext();
    defer server.destroy();
    _ = try server.serviceInit("flood");
    const count: u32 = 200_000;
    var result: anyerror!void = {};
    const thread = try std.Thread.spawn(.{}, floodSender, .{ &run, count, &result });
    var next: u32 = 0;
    var disconnected = false;
    while (!disconnected) {
        var ev = try nextEvent(server);
        defer ev.deinit();
        switch (ev.kind) {
            .connection => {},
            .message_rx => {
                try testing.expectEqual(@as(usize, 8), ev.data.items.len);
                try testing.expectEqual(next, std.mem.readInt(u32, ev.data.items[0..4], .big));
                next += 1;
            },
            .disconnection => disconnected = true,
            else => return error.UnexpectedEvent,
        }
    }
    thread.join();
    try result;
    try testing.expectEqual(count, next);
}

test "an oversize announcement: earlier messages, then ERROR, then DISCONNECTION" {
    var p = try Pair.init("big");
    defer p.deinit();
    try p.server.setLimits(
        .{ .max_message_size = 1000, .max_queue_size = 1004, .max_connections = 10 },
    );
    var stream: [4 + 2 + 4]u8 = undefined;
    @memcpy(stream[0..4], &framing.encodeHeader(2));
    @memcpy(stream[4..6], "ok");
    @memcpy(stream[6..10], &framing.encodeHeader(1001));
    try sendRaw(p.client_fd, &stream);
    try expectOnly(p.server, .message_rx, p.server_fd, "ok");
    try expectOnly(
        p.server,
        .err,
        p.server_fd,
        "message of 1001 bytes exceeds max_message_size (1000)",
    );
    try expectOnly(p.server, .disconnection, p.server_fd, null);
    try testing.expect(p.server.table.get(p.server_fd) == null);
}

test "max_message_size is accepted exactly; one byte more is refused on send" {
    var p = try Pair.init("edge");
    defer p.deinit();
    const limits: context.Limits = .{
        .max_message_size = 100_000,
        .max_queue_size = 100_004,
        .max_connections = 10,
    };
    try p.server.setLimits(limits);
    try p.client.setLimits(limits);
    const msg = try gpa.alloc(u8, 100_001);
    defer gpa.free(msg);
    for (msg, 0..) |*b, i| b.* = @truncate(i *% 7);
    try p.client.write(p.client_fd, msg[0..100_000]);
    var ev = try expectEvent(p.server, .message_rx, p.server_fd, null);
    defer ev.deinit();
    try testing.expectEqualSlices(u8, msg[0..100_000], ev.data.items);
    try testing.expectError(error.MessageTooLarge, p.client.write(p.client_fd, msg));
    try testing.expectEqualStrings(
        "message of 100001 bytes exceeds max_message_size (100000)",
        p.client.last.text(),
    );
    try testing.expectError(error.MessageTooLarge, p.client.schedule(p.client_fd, msg));
}

test "the send queue bound: exactly max_queue_size is accepted, past it QueueFull" {
    var p = try Pair.init("queue");
    defer p.deinit();
    try p.client.setLimits(
        .{ .max_message_size = 100, .max_queue_size = 208, .max_connections = 10 },
    );
    const msg: [100]u8 = @splat('q');
    try p.client.schedule(p.client_fd, &msg);
    try p.client.schedule(p.client_fd, &msg);
    try testing.expectError(error.QueueFull, p.client.schedule(p.client_fd, ""));
    var buf: [128]u8 = undefined;
    const want = try std.fmt.bufPrint(
        &buf,
        "send queue of fd {d} is full (208 bytes queued, max_queue_size 208)",
        .{p.client_fd},
    );
    try testing.expectEqualStrings(want, p.client.last.text());
    try expectOnly(p.client, .message_tx, p.client_fd, null);
    try expectOnly(p.client, .message_tx, p.client_fd, null);
    try expectOnly(p.server, .message_rx, p.server_fd, &msg);
    try expectOnly(p.server, .message_rx, p.server_fd, &msg);
    try p.client.schedule(p.client_fd, ""); // drained: room again
}

test "a second service of the same name is busy; the first is untouched" {
    var p = try Pair.init("busy");
    defer p.deinit();
    const other = try p.run.newContext();
    defer other.destroy();
    try testing.expectError(error.ServiceBusy, other.serviceInit("busy"));
    var buf: [200]u8 = undefined;
    try testing.expectEqualStrings(
        try std.fmt.bufPrint(&buf, "service busy is already running in {s}", .{p.run.path()}),
        other.last.text(),
    );
    try testing.expectError(error.ServiceBusy, p.server.serviceInit("busy"));
    // The running service still accepts clients.
    _ = try other.connectService("busy");
    try expectOnly(p.server, .connection, -2, null);
}

test "a stale socket is replaced; a closed service can be re-created" {
    var run = TmpRun.init();
    defer run.deinit();
    const ctx = try run.newContext();
    defer ctx.destroy();
    const fd1 = try ctx.serviceInit("again");
    try ctx.close(fd1);
    var buf: [200]u8 = undefined;
    const path = try sys.printZ(&buf, "{s}/again", .{run.path()});
    try testing.expect(sys.lstatMode(path.ptr) == .failed); // socket file removed
    // A stale socket file: bound by a socket that is gone, no lock holder.
    const s = c.socket(c.AF.UNIX, c.SOCK.STREAM, 0);
    var addr = std.mem.zeroes(c.sockaddr.un);
    addr.family = c.AF.UNIX;
    @memcpy(addr.path[0..path.len], path);
    try testing.expectEqual(@as(c_int, 0), c.bind(s, @ptrCast(&addr), @sizeOf(c.sockaddr.un)));
    sys.closeFd(s);
    try testing.expectError(error.ServiceNotFound, ctx.connectService("again"));
    const fd2 = try ctx.serviceInit("again");
    _ = try ctx.connectService("again");
    try expectOnly(ctx, .connection, -2, null);
    try ctx.close(fd2);
    _ = try ctx.serviceInit("again");
}

test "a new connection takes the lowest free index" {
    var p = try Pair.init("slots");
    defer p.deinit();
    // server: service = 0, first client = 1.
    try testing.expectEqual(@as(u32, 0), p.server.table.get(p.service_fd).?.index);
    try testing.expectEqual(@as(u32, 1), p.server.table.get(p.server_fd).?.index);
    _ = try p.client.connectService("slots");
    var ev2 = try expectEvent(p.server, .connection, -2, null);
    defer ev2.deinit();
    try testing.expectEqual(@as(i64, 2), ev2.index);
    _ = try p.client.connectService("slots");
    var ev3 = try expectEvent(p.server, .connection, -2, null);
    defer ev3.deinit();
    try testing.expectEqual(@as(i64, 3), ev3.index);
    try p.server.close(p.server_fd);
    try p.server.close(ev2.fd);
    _ = try p.client.connectService("slots");
    var ev4 = try expectEvent(p.server, .connection, -2, null);
    defer ev4.deinit();
    try testing.expectEqual(@as(i64, 1), ev4.index);
}

test "peer credentials are those of this process" {
    var p = try Pair.init("creds");
    defer p.deinit();
    const cred = try p.server.peerCredentials(p.server_fd);
    try testing.expectEqual(c.getuid(), cred.uid);
    try testing.expectEqual(c.getgid(), cred.gid);
    try testing.expectEqual(c.getpid(), cred.pid);
    try testing.expectError(error.UnknownFd, p.server.peerCredentials(p.service_fd));
    var buf: [64]u8 = undefined;
    try testing.expectEqualStrings(
        try std.fmt.bufPrint(&buf, "fd {d} is not a connection", .{p.service_fd}),
        p.server.last.text(),
    );
}

test "switching forwards both ways; one side ending closes both" {
    var p = try Pair.init("sw");
    defer p.deinit();
    const b_client = try p.client.connectService("sw");
    var evb = try expectEvent(p.server, .connection, -2, null);
    defer evb.deinit();
    const sa = p.server_fd;
    const sb = evb.fd;
    try testing.expectError(error.Generic, switching.add(p.server, sa, sa));
    try switching.add(p.server, sa, sb);
    try testing.expectError(error.Generic, switching.add(p.server, sa, sb));
    try p.client.write(p.client_fd, "to b");
    try expectOnly(p.server, .switch_rx, sa, "to b");
    try expectOnly(p.server, .switch_tx, sb, null);
    var buf: [64]u8 = undefined;
    try testing.expectEqualStrings("to b", try readMessage(p.client, b_client, &buf));
    try p.client.write(b_client, "");
    try expectOnly(p.server, .switch_rx, sb, "");
    try expectOnly(p.server, .switch_tx, sa, null);
    try testing.expectEqualStrings("", try readMessage(p.client, p.client_fd, &buf));
    try p.client.close(p.client_fd);
    try expectOnly(p.server, .disconnection, sa, null);
    try expectOnly(p.server, .disconnection, sb, null);
}

var out_seen: [64]u8 = undefined;
var out_len: usize = 0;

fn testOut(dest: c_int, payload: [*]const u8, mlen: u32) callconv(.c) c_int {
    _ = dest;
    @memcpy(out_seen[0..mlen], payload[0..mlen]);
    out_len = mlen;
    return 0;
}

/// Reads raw bytes (a foreign protocol with no framing) as one unit.
fn testIn(orig: c_int, payload: [*]u8, mlen: *u32) callconv(.c) c_int {
    const n = c.read(orig, payload, mlen.*);
    if (n <= 0) return 2; // FD_CLOSING
    mlen.* = @intCast(n);
    return 0;
}

/// A socketpair whose first end p.server watches, with callbacks `in` and
/// `out`, switched with p's connection; the second end is the caller's.
fn switchedPair(p: *Pair, in: switching.InCallback, out: switching.OutCallback) ![2]c.fd_t {
    const pair = try unixSocketPair();
    errdefer sys.closeFd(pair[1]);
    try p.server.addExternal(pair[0]);
    try switching.setCallbacks(p.server, pair[0], in, out);
    try switching.add(p.server, p.server_fd, pair[0]);
    return pair;
}

test "switch callbacks: custom in and out" {
    var p = try Pair.init("cb");
    defer p.deinit();
    var pair = try switchedPair(&p, testIn, testOut);
    defer sys.closeFd(pair[1]);
    // framed in from the client, custom out to the external side
    try p.client.write(p.client_fd, "framed");
    try expectOnly(p.server, .switch_rx, p.server_fd, "framed");
    try expectOnly(p.server, .switch_tx, pair[0], null);
    try testing.expectEqualStrings("framed", out_seen[0..out_len]);
    // raw in from the external side, framed out to the client
    try sendRaw(pair[1], "raw bytes");
    try expectOnly(p.server, .switch_rx, pair[0], "raw bytes");
    try expectOnly(p.server, .switch_tx, p.server_fd, null);
    var buf: [64]u8 = undefined;
    try testing.expectEqualStrings("raw bytes", try readMessage(p.client, p.client_fd, &buf));
    sys.closeFd(pair[1]);
    pair[1] = -1;
    try expectOnly(p.server, .disconnection, pair[0], null);
    try expectOnly(p.server, .disconnection, p.server_fd, null);
}

/// The context limitsIn tries to change the limits of, and what it got.
var limits_ctx: ?*Context = null;
var limits_refused: bool = false;

/// An `in` callback that tries to change the context's limits (which would
/// free the buffer it fills) before it returns what it read.
fn limitsIn(orig: c_int, payload: [*]u8, mlen: *u32) callconv(.c) c_int {
    const ctx = limits_ctx.?;
    limits_refused = if (ctx.setLimits(.{ .max_message_size = 1 << 20 })) false else |_| true;
    return testIn(orig, payload, mlen);
}

test "the limits cannot change inside a switch callback (its buffer would be freed)" {
    var p = try Pair.init("cblim");
    defer p.deinit();
    const pair = try switchedPair(&p, limitsIn, testOut);
    defer sys.closeFd(pair[1]);
    limits_ctx = p.server;
    defer limits_ctx = null;
    try sendRaw(pair[1], "raw bytes");
    try expectOnly(p.server, .switch_rx, pair[0], "raw bytes");
    try testing.expect(limits_refused);
    try testing.expectEqualStrings(
        "the limits cannot change inside a switch callback",
        p.server.last.text(),
    );
    try expectOnly(p.server, .switch_tx, p.server_fd, null); // (the next round writes it)
    var buf: [64]u8 = undefined;
    try testing.expectEqualStrings("raw bytes", try readMessage(p.client, p.client_fd, &buf));
    try p.server.setLimits(.{ .max_message_size = 1 << 20 }); // outside: taken
}

fn fakeIpcd(ipcd: *Context, result: *anyerror!void) void {
    result.* = serveIpcd(ipcd);
}

/// ipcd's part: read "NAME;NETWORK", connect to NAME, pass the fd with "ok".
fn serveIpcd(ipcd: *Context) !void {
    var conn = try expectEvent(ipcd, .connection, -2, null);
    defer conn.deinit();
    var req = try expectEvent(ipcd, .message_rx, conn.fd, "target;somewhere");
    defer req.deinit();
    const fd = try ipcd.connectService("target");
    try @import("fdpass.zig").sendFd(conn.fd, fd, "ok");
    try ipcd.close(fd);
}

test "connect through ipcd when IPC_NETWORK is set (fd passing)" {
    var run = TmpRun.init();
    defer run.deinit();
    const server = try run.newContext();
    defer server.destroy();
    const client = try run.newContext();
    defer client.destroy();
    _ = try server.serviceInit("target");
    _ = setenv("IPC_NETWORK", "somewhere", 1);
    defer _ = unsetenv("IPC_NETWORK");
    try testing.expectError(error.ServiceNotFound, client.connect("target"));
    var buf: [200]u8 = undefined;
    try testing.expectEqualStrings(
        try std.fmt.bufPrint(
            &buf,
            "IPC_NETWORK is set but ipcd is not running (no service ipc in {s})",
            .{run.path()},
        ),
        client.last.text(),
    );
    const ipcd = try run.newContext();
    defer ipcd.destroy();
    _ = try ipcd.serviceInit("ipc");
    var result: anyerror!void = {};
    const thread = try std.Thread.spawn(.{}, fakeIpcd, .{ ipcd, &result });
    const fd = client.connect("target");
    thread.join();
    try result;
    const cfd = try fd;
    try testing.expectEqual(@as(usize, 1), client.table.count()); // ipcd's connection is gone
    var ev = try expectEvent(server, .connection, -2, null);
    defer ev.deinit();
    try client.write(cfd, "via ipcd");
    try expectOnly(server, .message_rx, ev.fd, "via ipcd");
}

test "connect through ipcd: a request over max_message_size is that error" {
    var run = TmpRun.init();
    defer run.deinit();
    const client = try run.newContext();
    defer client.destroy();
    try client.setLimits(.{ .max_message_size = 10, .max_queue_size = 14, .max_connections = 8 });
    _ = setenv("IPC_NETWORK", "somewhere", 1);
    defer _ = unsetenv("IPC_NETWORK");
    try testing.expectError(error.MessageTooLarge, client.connect("target"));
    try testing.expectEqualStrings(
        "message of 16 bytes exceeds max_message_size (10)",
        client.last.text(),
    );
    try testing.expectEqual(@as(usize, 0), client.table.count()); // ipcd never asked
    // (no ipcd runs: the request is refused before it is looked for)
    try testing.expectError(error.InvalidName, client.connect("caf\xe9"));
    try testing.expectEqualStrings(
        "service name is not valid UTF-8: ipcd cannot be asked for it",
        client.last.text(),
    );
}

/// An ipcd at its bounds: it answers a refusal at once and closes, without
/// reading the request.
fn refusingIpcd(ipcd: *Context, result: *anyerror!void) void {
    result.* = refuseOne(ipcd);
}

fn refuseOne(ipcd: *Context) !void {
    var conn = try expectEvent(ipcd, .connection, -2, null);
    defer conn.deinit();
    const answer = "ne busy ipcd is full";
    try testing.expectEqual(@as(isize, answer.len), c.write(conn.fd, answer, answer.len));
    try ipcd.close(conn.fd);
}

test "connect through ipcd: a refusal sent before ipcd closed on the request is read" {
    var run = TmpRun.init();
    defer run.deinit();
    const ipcd = try run.newContext();
    defer ipcd.destroy();
    _ = try ipcd.serviceInit("ipc");
    const client = try run.newContext();
    defer client.destroy();
    // A request larger than the socket's buffer: its write fails (EPIPE)
    // once ipcd has closed, with the answer waiting to be read.
    const network = try testing.allocator.allocSentinel(u8, 4 << 20, 0);
    defer testing.allocator.free(network);
    @memset(network, 'x');
    _ = setenv("IPC_NETWORK", network.ptr, 1);
    defer _ = unsetenv("IPC_NETWORK");
    var result: anyerror!void = {};
    const thread = try std.Thread.spawn(.{}, refusingIpcd, .{ ipcd, &result });
    const fd = client.connect("target");
    thread.join();
    try result;
    try testing.expectError(error.Network, fd);
    try testing.expectEqualStrings(
        "ipcd could not connect to service target (busy): ipcd is full",
        client.last.text(),
    );
}

test "read_fd: pending message first, a small buffer keeps the message" {
    var p = try Pair.init("rd");
    defer p.deinit();
    try p.client.write(p.client_fd, "first");
    try p.client.write(p.client_fd, "second message");
    var small: [3]u8 = undefined;
    var len: usize = 0;
    try testing.expectError(error.BufferTooSmall, p.server.readFd(p.server_fd, &small, &len));
    try testing.expectEqual(@as(usize, 5), len);
    var buf: [64]u8 = undefined;
    try testing.expectEqualStrings("first", try readMessage(p.server, p.server_fd, &buf));
    try testing.expectEqualStrings("second message", try readMessage(p.server, p.server_fd, &buf));
    try p.client.close(p.client_fd);
    try testing.expectError(error.ConnectionClosed, readMessage(p.server, p.server_fd, &buf));
    try expectOnly(p.server, .disconnection, p.server_fd, null);
}

test "peer closing mid-message, and with scheduled messages unsent" {
    var p = try Pair.init("mid");
    defer p.deinit();
    try sendRaw(p.client_fd, &framing.encodeHeader(10));
    try sendRaw(p.client_fd, "abc");
    try p.client.close(p.client_fd);
    try expectOnly(
        p.server,
        .err,
        p.server_fd,
        "peer closed the connection in the middle of a message",
    );
    try expectOnly(p.server, .disconnection, p.server_fd, null);
}

test "errors: unknown fd, nothing to wait for, timer, connection limit" {
    var run = TmpRun.init();
    defer run.deinit();
    const ctx = try run.newContext();
    defer ctx.destroy();
    try testing.expectError(error.UnknownFd, ctx.write(12345, "x"));
    try testing.expectEqualStrings("fd 12345 is not managed by this context", ctx.last.text());
    try testing.expectError(error.ServiceNotFound, ctx.connectService("nobody"));
    ctx.setTimer(-1);
    try testing.expectError(error.Generic, ctx.wait(false));
    try testing.expectEqualStrings("nothing to wait for: no fd and no timer", ctx.last.text());
    // A zero-timeout call cannot hang: nothing is ready, as with idle fds.
    ctx.setCallTimeout(0);
    try testing.expectError(error.Timeout, ctx.wait(false));
    ctx.setCallTimeout(-1);
    ctx.setTimer(10);
    try expectOnly(ctx, .timer, -1, null);
    try ctx.setLimits(.{ .max_connections = 1 });
    const svc = try ctx.serviceInit("lim");
    try testing.expectError(error.ConnectionLimit, ctx.connectService("lim"));
    try testing.expectEqualStrings("too many connections (max_connections 1)", ctx.last.text());
    // A client of a full service is refused; the service gets an ERROR.
    const other = try run.newContext();
    defer other.destroy();
    _ = try other.connectService("lim");
    try expectOnly(ctx, .err, svc, "connection refused: max_connections (1) reached");
    try testing.expectError(error.InvalidName, ctx.serviceInit("a/b"));
    try testing.expectError(error.UnknownFd, ctx.addExternal(9999));
}

test "a failed flush (peer gone) first delivers what the peer sent" {
    var p = try Pair.init("epipe");
    defer p.deinit();
    try p.client.write(p.client_fd, "bye");
    try p.client.close(p.client_fd);
    try p.server.schedule(p.server_fd, "never read");
    try expectOnly(p.server, .message_rx, p.server_fd, "bye");
    try expectOnly(
        p.server,
        .err,
        p.server_fd,
        "peer closed the connection with 1 scheduled message(s) unsent",
    );
    try expectOnly(p.server, .disconnection, p.server_fd, null);
}

fn backPressureSender(run: *const TmpRun, count: u32, result: *anyerror!void) void {
    result.* = backPressureSend(run, count);
}

fn backPressureSend(run: *const TmpRun, count: u32) !void {
    const ctx = try run.newContext();
    defer ctx.destroy();
    const fd = try ctx.connectService("bp");
    var msg: [1000]u8 = @splat('m');
    for (0..count) |i| {
        std.mem.writeInt(u32, msg[0..4], @intCast(i), .big);
        try ctx.write(fd, &msg);
    }
    // Wait for the far end to have everything: it closes when done.
    var buf: [8]u8 = undefined;
    _ = readMessage(ctx, fd, &buf) catch {};
}

test "switch back-pressure: a slow reader bounds the queue, nothing is lost" {
    var run = TmpRun.init();
    defer run.deinit();
    const server = try run.newContext();
    defer server.destroy();
    const limits: context.Limits = .{
        .max_message_size = 1000,
        .max_queue_size = 4004,
        .max_connections = 10,
    };
    try server.setLimits(limits);
    _ = try server.serviceInit("bp");
    const reader = try run.newContext();
    defer reader.destroy();
    const b_fd = try reader.connectService("bp");
    var evb = try expectEvent(server, .connection, -2, null);
    defer evb.deinit();
    const count: u32 = 3000; // 3 MB: far more than the socket buffers hold
    var result: anyerror!void = {};
    const thread = try std.Thread.spawn(.{}, backPressureSender, .{ &run, count, &result });
    defer thread.join();
    var eva = try expectEvent(server, .connection, -2, null);
    defer eva.deinit();
    try switching.add(server, eva.fd, evb.fd);
    const sb = server.table.get(evb.fd).?;
    const bound = limits.max_queue_size + context.read_budget + limits.max_message_size + 4;
    // Phase 1: the reader does not read. The server must not buffer it all.
    server.setTimer(20);
    for (0..50) |_| {
        server.events.releaseLent(gpa);
        try server.wait(false);
        server.events.clear(gpa);
        try testing.expect(sb.queue.queuedBytes() <= bound);
    }
    // Phase 2: the reader reads everything, in order.
    reader.setTimer(0);
    var got: u32 = 0;
    var rounds: usize = 0;
    while (got < count) : (rounds += 1) {
        try testing.expect(rounds < 100_000);
        server.events.releaseLent(gpa);
        try server.wait(false);
        server.events.clear(gpa);
        try testing.expect(sb.queue.queuedBytes() <= bound);
        while (true) {
            var ev = try nextEvent(reader);
            defer ev.deinit();
            if (ev.kind == .timer) break;
            try testing.expectEqual(EventType.message_rx, ev.kind);
            try testing.expectEqual(got, std.mem.readInt(u32, ev.data.items[0..4], .big));
            got += 1;
        }
    }
    try reader.close(b_fd);
    for (0..20) |_| { // let the server see the reader go, so the sender ends
        server.events.releaseLent(gpa);
        try server.wait(false);
        server.events.clear(gpa);
    }
    try result;
}

/// Counts the bytes currently allocated through it (tests only).
const Counting = struct {
    parent: std.mem.Allocator,
    live: usize = 0,

    fn allocator(self: *Counting) std.mem.Allocator {
        return .{
            .ptr = self,
            .vtable = &.{ .alloc = alloc, .resize = resize, .remap = remap, .free = free },
        };
    }
    fn alloc(p: *anyopaque, len: usize, a: std.mem.Alignment, ra: usize) ?[*]u8 {
        const self: *Counting = @ptrCast(@alignCast(p));
        const r = self.parent.rawAlloc(len, a, ra) orelse return null;
        self.live += len;
        return r;
    }
    fn resize(p: *anyopaque, m: []u8, a: std.mem.Alignment, n: usize, ra: usize) bool {
        const self: *Counting = @ptrCast(@alignCast(p));
        if (!self.parent.rawResize(m, a, n, ra)) return false;
        self.live = self.live - m.len + n;
        return true;
    }
    fn remap(p: *anyopaque, m: []u8, a: std.mem.Alignment, n: usize, ra: usize) ?[*]u8 {
        const self: *Counting = @ptrCast(@alignCast(p));
        const r = self.parent.rawRemap(m, a, n, ra) orelse return null;
        self.live = self.live - m.len + n;
        return r;
    }
    fn free(p: *anyopaque, m: []u8, a: std.mem.Alignment, ra: usize) void {
        const self: *Counting = @ptrCast(@alignCast(p));
        self.parent.rawFree(m, a, ra);
        self.live -= m.len;
    }
};

test "an idle connection costs the core well under 2 KiB" {
    var run = TmpRun.init();
    defer run.deinit();
    var counting: Counting = .{ .parent = gpa };
    const server = try Context.create(counting.allocator());
    defer server.destroy();
    try server.setRundir(run.path());
    server.setTimer(5000);
    _ = try server.serviceInit("idle");
    const clients = try run.newContext();
    defer clients.destroy();
    // Warm up (scratch buffer, event chunk), then measure 500 more connections.
    _ = try clients.connectService("idle");
    try expectOnly(server, .connection, -2, null);
    try clients.write(clients.table.slots.items[0].?.fd, "warm");
    try expectOnly(server, .message_rx, -2, "warm");
    const before = counting.live;
    const n = 500;
    for (0..n) |_| _ = try clients.connectService("idle");
    var seen: usize = 0;
    while (seen < n) : (seen += 1) try expectOnly(server, .connection, -2, null);
    const per_conn = (counting.live - before) / n;
    // About 300 bytes here: the record, its table entries, no buffers.
    try testing.expect(per_conn <= 2048);
}

test "external fds: EXTERNAL while readable; close drops pending events; close_all restarts slots" {
    var p = try Pair.init("ext");
    defer p.deinit();
    const pair = try unixSocketPair();
    defer sys.closeFd(pair[1]);
    try p.server.addExternal(pair[0]);
    try testing.expectError(error.Generic, p.server.addExternal(pair[0]));
    try testing.expectError(error.UnknownFd, p.server.write(pair[0], "x"));
    try sendRaw(pair[1], "ping");
    try expectOnly(p.server, .external, pair[0], null);
    try expectOnly(p.server, .external, pair[0], null); // still readable: reported again
    try p.client.write(p.client_fd, "dropped");
    try p.client.write(p.client_fd, "dropped too");
    p.server.events.releaseLent(gpa);
    try p.server.wait(false);
    try p.server.close(p.server_fd);
    var it = p.server.events.iterFd(p.server_fd);
    try testing.expect(it.next() == null);
    p.server.closeAll();
    try testing.expectEqual(@as(usize, 0), p.server.events.live);
    try testing.expectEqual(@as(usize, 0), p.server.table.count());
    const svc = try p.server.serviceInit("ext2");
    try testing.expectEqual(@as(u32, 0), p.server.table.get(svc).?.index);
}

test "pause_reading: a paused connection is not read; resumed, its messages come in order" {
    var p = try Pair.init("paused");
    defer p.deinit();
    try p.server.pauseReading(p.server_fd, true);
    try testing.expect(!p.server.table.get(p.server_fd).?.registered.read);
    try p.client.write(p.client_fd, "one");
    try p.client.write(p.client_fd, "two");
    // Nothing is read meanwhile: a zero-timeout wait finds nothing.
    p.server.setCallTimeout(0);
    try testing.expectError(error.Timeout, p.server.wait(false));
    p.server.setCallTimeout(-1);
    try p.server.pauseReading(p.server_fd, false);
    try expectOnly(p.server, .message_rx, p.server_fd, "one");
    try expectOnly(p.server, .message_rx, p.server_fd, "two");
    const svc = p.server.table.get(p.server_fd).?;
    try testing.expect(svc.registered.read);
    try testing.expectError(error.UnknownFd, p.server.pauseReading(12345, true));
    var it = p.server.table.by_fd.valueIterator();
    while (it.next()) |conn| {
        if (conn.*.role != .service) continue;
        try testing.expectError(error.UnknownFd, p.server.pauseReading(conn.*.fd, true));
        try testing.expectEqualStrings(
            try std.fmt.bufPrint(&name_buf, "fd {d} is not a connection", .{conn.*.fd}),
            p.server.last.text(),
        );
    }
}

var name_buf: [64]u8 = undefined;

test "read_fd meeting an oversize announcement: MessageTooLarge, then DISCONNECTION" {
    var p = try Pair.init("rdbig");
    defer p.deinit();
    try p.server.setLimits(
        .{ .max_message_size = 10, .max_queue_size = 14, .max_connections = 10 },
    );
    try sendRaw(p.client_fd, &framing.encodeHeader(11));
    var buf: [16]u8 = undefined;
    try testing.expectError(error.MessageTooLarge, readMessage(p.server, p.server_fd, &buf));
    try testing.expectEqualStrings(
        "message of 11 bytes exceeds max_message_size (10)",
        p.server.last.text(),
    );
    try expectOnly(p.server, .disconnection, p.server_fd, null);
    try testing.expectError(error.ConnectionClosed, readMessage(p.server, p.server_fd, &buf));
}

test "an ended connection's fd number stays taken until the next round" {
    var p = try Pair.init("reuse");
    defer p.deinit();
    try p.client.write(p.client_fd, "last words");
    p.client.close(p.client_fd) catch unreachable;
    try expectOnly(p.server, .message_rx, p.server_fd, "last words");
    try expectOnly(p.server, .disconnection, p.server_fd, null);
    // Handling the old peer's events: its fd is still open (no new
    // connection can get the number) and sends to it fail cleanly.
    try testing.expect(sys.isOpen(p.server_fd));
    try testing.expectError(error.ConnectionClosed, p.server.write(p.server_fd, "reply"));
    try testing.expectError(error.ConnectionClosed, p.server.schedule(p.server_fd, "reply"));
    // The next round frees the number (a new client may get it) and the
    // new connection works.
    const second = try p.client.connectService("reuse");
    var ev = try expectEvent(p.server, .connection, -2, null);
    defer ev.deinit();
    try p.server.write(ev.fd, "welcome");
    var buf: [16]u8 = undefined;
    try testing.expectEqualStrings("welcome", try readMessage(p.client, second, &buf));
}

test "closing one side of a switch closes both, with no event" {
    var p = try Pair.init("swc");
    defer p.deinit();
    _ = try p.client.connectService("swc");
    var evb = try expectEvent(p.server, .connection, -2, null);
    defer evb.deinit();
    try switching.add(p.server, p.server_fd, evb.fd);
    try p.server.close(evb.fd);
    try testing.expectEqual(@as(usize, 1), p.server.table.count()); // the service only
    p.server.setTimer(20);
    try expectOnly(p.server, .timer, -1, null);
}

test "a switch side that ends: what it sent still reaches the other side, then that one closes" {
    var p = try Pair.init("swlast");
    defer p.deinit();
    const b_client = try p.client.connectService("swlast");
    var evb = try expectEvent(p.server, .connection, -2, null);
    defer evb.deinit();
    const sa = p.server_fd;
    const sb = evb.fd;
    try switching.add(p.server, sa, sb);
    try p.client.write(p.client_fd, "last words");
    try p.client.close(p.client_fd);
    try expectOnly(p.server, .switch_rx, sa, "last words");
    // The read that brought them was short (drained), so the EOF is seen by
    // the next round, after the round's flush has written them to sb.
    try expectOnly(p.server, .switch_tx, sb, null);
    try expectOnly(p.server, .disconnection, sa, null);
    try expectOnly(p.server, .disconnection, sb, null);
    var buf: [64]u8 = undefined;
    try testing.expectEqualStrings("last words", try readMessage(p.client, b_client, &buf));
    try testing.expectError(error.ConnectionClosed, readMessage(p.client, b_client, &buf));
}

test "another thread's wakeup ends a wait with no event; a plain wait goes on" {
    var p = try Pair.init("wake");
    defer p.deinit();
    p.server.setTimer(10_000);
    const waker = try std.Thread.spawn(
        .{},
        @import("wakeup.zig").Wakeup.signal,
        .{&p.server.wakeup},
    );
    const start = sys.nowMs();
    try p.server.wait(true);
    waker.join();
    try testing.expect(sys.nowMs() - start < 5_000);
    try testing.expectEqual(@as(usize, 0), p.server.events.live);
    // wait(false) does not stop for a wake-up: it returns with the message.
    p.server.wakeup.signal();
    try p.client.write(p.client_fd, "after");
    try expectOnly(p.server, .message_rx, p.server_fd, "after");
}

/// A patterned payload large enough for read_into's direct path, and a
/// buffer of its size to read it into.
const DirectIo = struct {
    data: []u8,
    out: []u8,

    fn init() !DirectIo {
        const data = try gpa.alloc(u8, framing.direct_read_min + 7);
        errdefer gpa.free(data);
        for (data, 0..) |*b, i| b.* = @truncate(i *% 31);
        return .{ .data = data, .out = try gpa.alloc(u8, data.len) };
    }

    fn deinit(self: DirectIo) void {
        gpa.free(self.out);
        gpa.free(self.data);
    }
};

test "read_into: a large frame is read straight into the buffer, however much of it came before" {
    var p = try Pair.init("into");
    defer p.deinit();
    const io = try DirectIo.init();
    defer io.deinit();
    const big, const out = .{ io.data, io.out };
    const h = framing.encodeHeader(@intCast(big.len));
    // Nothing of it read before (the decoder has no byte), then 2 bytes of
    // the header, then the header and 5 bytes of the payload.
    for ([_]usize{ 0, 2, 9 }) |before| {
        var frame: std.ArrayList(u8) = .empty;
        defer frame.deinit(gpa);
        try frame.appendSlice(gpa, &h);
        try frame.appendSlice(gpa, big);
        try sendRaw(p.server_fd, frame.items[0..before]);
        if (before > 0) {
            p.client.setTimer(0);
            try expectOnly(p.client, .timer, -1, null); // the loop reads the part: no event
            p.client.setTimer(5000);
        }
        try sendRaw(p.server_fd, frame.items[before..]);
        var len: usize = 0;
        try p.client.readInto(p.client_fd, out, &len);
        try testing.expectEqualSlices(u8, big, out[0..len]);
    }
}

/// CPU time of the calling thread, in nanoseconds.
fn threadCpuNs() i64 {
    var ts: c.timespec = undefined;
    _ = c.clock_gettime(c.CLOCK.THREAD_CPUTIME_ID, &ts);
    return @as(i64, @intCast(ts.sec)) * std.time.ns_per_s + @as(i64, @intCast(ts.nsec));
}

/// A thread's send of one frame. On failure it shuts fd's sending side, so
/// that the reader fails at EOF instead of waiting forever.
fn sendFrame(fd: i32, payload: []const u8) void {
    const h = framing.encodeHeader(@intCast(payload.len));
    sendRaw(fd, &h) catch return shutWrite(fd);
    sendRaw(fd, payload) catch return shutWrite(fd);
}

fn shutWrite(fd: i32) void {
    _ = c.shutdown(fd, c.SHUT.WR);
}

test "busy_poll: bounded; a spinning wait delivers messages, wake-ups and its timer" {
    var p = try Pair.init("spin");
    defer p.deinit();
    try testing.expectError(error.Generic, p.server.setBusyPoll(context.max_busy_poll_us + 1));
    try testing.expectEqualStrings("busy_poll must be at most 10000 us", p.server.last.text());
    try testing.expectEqual(@as(u32, 0), p.server.busy_poll_us);
    try p.server.setBusyPoll(context.max_busy_poll_us);
    // Already there, and sent by another thread while the wait may be spinning.
    try p.client.write(p.client_fd, "before");
    try expectOnly(p.server, .message_rx, p.server_fd, "before");
    const sender = try std.Thread.spawn(.{}, sendFrame, .{ p.client_fd, "during" });
    try expectOnly(p.server, .message_rx, p.server_fd, "during");
    sender.join();
    // A wake-up ends a spinning wait(true) with no event.
    p.server.wakeup.signal();
    try p.server.wait(true);
    try testing.expectEqual(@as(usize, 0), p.server.events.live);
    // A timer shorter than busy_poll ends the spin: far less CPU than 10 ms.
    p.server.setTimer(1);
    const cpu0 = threadCpuNs();
    try expectOnly(p.server, .timer, -1, null);
    try testing.expect(threadCpuNs() - cpu0 < 5 * std.time.ns_per_ms);
    // A timer longer than busy_poll: the wait sleeps after the spin, and the
    // TIMER comes no earlier than the timer says.
    try p.server.setBusyPoll(1000);
    p.server.setTimer(30);
    const start = sys.nowNs();
    try expectOnly(p.server, .timer, -1, null);
    try testing.expect(sys.nowNs() - start >= 30 * std.time.ns_per_ms);
}

test "busy_poll: read and a direct read_into spin, then wait in the kernel" {
    var p = try Pair.init("spinread");
    defer p.deinit();
    const io = try DirectIo.init();
    defer io.deinit();
    const big, const out = .{ io.data, io.out };
    var small: [16]u8 = undefined;
    // 1 us: the thread's send nearly always comes after the spin (the
    // kernel's wait); 10 ms: it nearly always comes during the spin. Either
    // way the message must come whole. A message already there is found by
    // the first read that does not wait.
    for ([_]u32{ 1, context.max_busy_poll_us }) |us| {
        try p.client.setBusyPoll(us);
        try sendRaw(p.server_fd, &framing.encodeHeader(5));
        try sendRaw(p.server_fd, "there");
        try testing.expectEqualStrings("there", try readMessage(p.client, p.client_fd, &small));
        const sender = try std.Thread.spawn(.{}, sendFrame, .{ p.server_fd, "ping" });
        try testing.expectEqualStrings("ping", try readMessage(p.client, p.client_fd, &small));
        sender.join();
        const big_sender = try std.Thread.spawn(.{}, sendFrame, .{ p.server_fd, big });
        var len: usize = 0;
        try p.client.readInto(p.client_fd, out, &len);
        big_sender.join();
        try testing.expectEqualSlices(u8, big, out[0..len]);
    }
}

test "the context's own fds are refused as externals and connections" {
    var run = TmpRun.init();
    defer run.deinit();
    const ctx = try run.newContext();
    defer ctx.destroy();
    _ = try ctx.serviceInit("own"); // opens the spare fd
    const outer = try ctx.contextFd(); // makes the readiness fds
    const r = ctx.readiness.?;
    const own = [_]i32{ ctx.poller.fileno().?, ctx.wakeup.read_fd, ctx.wakeup.write_fd, ctx.spare_fd, outer, r.flag.read_fd, r.flag.write_fd, r.timer_fd };
    for (own) |fd| {
        if (fd < 0) continue; // the timerfd is Linux's
        try testing.expectError(error.Generic, ctx.addExternal(fd));
        try testing.expect(std.mem.endsWith(u8, ctx.last.text(), " is the context's own (its poller, wake-up pipe or spare fd)"));
        try testing.expectError(error.Generic, ctx.addConnection(fd));
    }
    try testing.expectEqual(@as(usize, 1), ctx.table.count()); // the service only
}

test "addConnection: one end of a socketpair becomes a connection; others are refused" {
    var run = TmpRun.init();
    defer run.deinit();
    const ctx = try run.newContext();
    defer ctx.destroy();
    const pair = try unixSocketPair();
    defer sys.closeFd(pair[1]);
    try ctx.addConnection(pair[0]); // the context owns pair[0] from now on
    try testing.expectError(error.Generic, ctx.addConnection(pair[0]));
    try testing.expect(std.mem.endsWith(u8, ctx.last.text(), " is already managed by this context"));
    sendFrame(pair[1], "hello");
    var buf: [64]u8 = undefined;
    try testing.expectEqualStrings("hello", try readMessage(ctx, pair[0], &buf));
    try ctx.write(pair[0], "back");
    var raw: [16]u8 = undefined;
    try testing.expectEqual(@as(isize, 8), c.read(pair[1], &raw, raw.len));
    try testing.expectEqualStrings("back", raw[4..8]);
    // A pipe is not a connected Unix or TCP stream socket: refused, left open.
    var pipe: [2]c.fd_t = undefined;
    try testing.expectEqual(@as(c_int, 0), c.pipe(&pipe));
    defer sys.closeFd(pipe[0]);
    defer sys.closeFd(pipe[1]);
    try testing.expectError(error.Generic, ctx.addConnection(pipe[0]));
    try testing.expect(std.mem.endsWith(u8, ctx.last.text(), "is not a connected Unix or TCP stream socket"));
    try testing.expect(sys.isOpen(pipe[0]));
}

test "linger: a readable external fd is reported once, then watched again after it" {
    const ctx = try Context.create(gpa);
    defer ctx.destroy();
    var pipe: [2]c.fd_t = undefined;
    try testing.expectEqual(@as(c_int, 0), c.pipe(&pipe));
    defer sys.closeFd(pipe[1]);
    try ctx.addExternal(pipe[0]); // the context owns the read end
    try testing.expectEqual(@as(isize, 1), c.write(pipe[1], "x", 1));
    const pair = try unixSocketPair();
    defer sys.closeFd(pair[1]); // never read: the linger runs to its deadline
    try ctx.addConnection(pair[0]);
    const big = try gpa.alloc(u8, 4 << 20);
    defer gpa.free(big);
    @memset(big, 'b');
    try ctx.schedule(pair[0], big);
    try testing.expectError(error.Timeout, ctx.linger(pair[0], 100 * std.time.ns_per_ms));
    // Each pass of the linger's loop reported it again (hundreds of
    // thousands of EXTERNAL in 100 ms, and a spinning CPU).
    try testing.expectEqual(@as(usize, 1), ctx.pendingEvents());
    try testing.expectEqual(EventType.external, ctx.firstEvent().?.kind);
    const conn = ctx.table.get(pipe[0]).?;
    try testing.expect(!conn.muted and conn.registered.read);
}

test "out of memory while a read is decoded: the connection ends, no hole in its stream" {
    var failing = std.testing.FailingAllocator.init(gpa, .{});
    const ctx = try Context.create(failing.allocator());
    defer ctx.destroy();
    const pair = try unixSocketPair();
    defer sys.closeFd(pair[1]);
    try ctx.addConnection(pair[0]);
    // A first message through: the buffers every read uses are there.
    const warm = framing.encodeHeader(4) ++ "warm".*;
    try testing.expectEqual(@as(isize, warm.len), c.write(pair[1], &warm, warm.len));
    try expectOnly(ctx, .message_rx, pair[0], "warm");
    // Four messages of 30,000 bytes in one read: more than one chunk of the
    // event queue holds, so queuing them needs memory.
    var frames: [4 * (4 + 30_000)]u8 = undefined;
    for (0..4) |i| {
        const at = i * (4 + 30_000);
        frames[at..][0..4].* = framing.encodeHeader(30_000);
        @memset(frames[at + 4 ..][0..30_000], 'a' + @as(u8, @intCast(i)));
    }
    try testing.expectEqual(@as(isize, frames.len), c.write(pair[1], &frames, frames.len));
    // Every allocation from here fails: the decoded messages cannot be queued.
    failing.fail_index = failing.alloc_index;
    const result = ctx.wait(false);
    failing.fail_index = std.math.maxInt(usize);
    try testing.expectError(error.OutOfMemory, result);
    // Kept, the connection would decode what comes next after a hole (the
    // frames of that read were lost): it is ended instead.
    try testing.expect(ctx.table.get(pair[0]) == null);
}

test "linger with no time left still makes one attempt: linger(fd, 0) sends what fits" {
    const ctx = try Context.create(gpa);
    defer ctx.destroy();
    const pair = try unixSocketPair();
    defer sys.closeFd(pair[1]);
    try ctx.addConnection(pair[0]);
    try ctx.schedule(pair[0], "hello");
    // It timed out before its first flush: nothing was sent.
    try ctx.linger(pair[0], 0);
    const q = try ctx.queuedMessages(pair[0]);
    try testing.expectEqual(@as(usize, 0), q.count);
    var buf: [16]u8 = undefined;
    try testing.expectEqual(@as(isize, 9), c.read(pair[1], &buf, buf.len));
    try testing.expectEqualStrings("hello", buf[4..9]);
    // What does not fit: one attempt, then Timeout (not a wait).
    const big = try gpa.alloc(u8, 4 << 20);
    defer gpa.free(big);
    @memset(big, 'b');
    try ctx.schedule(pair[0], big);
    try testing.expectError(error.Timeout, ctx.linger(pair[0], 0));
}

/// A service whose listen backlog is full (a hung or overloaded service): a
/// listener with backlog 0 that never accepts, and the clients that fill it.
const FullService = struct {
    listen_fd: i32,
    fillers: [8]i32 = undefined,
    n: usize = 0,

    fn init(run: *const TmpRun, name: []const u8) !FullService {
        _ = c.mkdir(run.path().ptr, 0o700);
        var buf: [200]u8 = undefined;
        const path = try sys.printZ(&buf, "{s}/{s}", .{ run.path(), name });
        const fd = c.socket(c.AF.UNIX, c.SOCK.STREAM | c.SOCK.CLOEXEC, 0);
        try testing.expect(fd >= 0);
        var self: FullService = .{ .listen_fd = fd };
        errdefer self.deinit();
        const addr = sys.unixAddress(path);
        try testing.expectEqual(@as(c_int, 0), c.bind(fd, @ptrCast(&addr), @sizeOf(c.sockaddr.un)));
        try testing.expectEqual(@as(c_int, 0), c.listen(fd, 0));
        while (self.n < self.fillers.len) {
            const s = c.socket(c.AF.UNIX, c.SOCK.STREAM | c.SOCK.CLOEXEC | c.SOCK.NONBLOCK, 0);
            try testing.expect(s >= 0);
            if (c.connect(s, @ptrCast(&addr), @sizeOf(c.sockaddr.un)) != 0) {
                sys.closeFd(s);
                try testing.expectEqual(c.E.AGAIN, sys.errno(@as(c_int, -1)));
                return self; // full
            }
            self.fillers[self.n] = s;
            self.n += 1;
        }
        return error.BacklogNeverFull;
    }

    fn deinit(self: *FullService) void {
        for (self.fillers[0..self.n]) |s| sys.closeFd(s);
        sys.closeFd(self.listen_fd);
    }
};

test "connect to a service whose backlog is full: the call timeout bounds it" {
    var run = TmpRun.init();
    defer run.deinit();
    var full = try FullService.init(&run, "full");
    defer full.deinit();
    const ctx = try run.newContext();
    defer ctx.destroy();
    // It waited for ever (the kernel holds connect() while the backlog is full).
    ctx.setCallTimeout(200 * std.time.ns_per_ms);
    const start = sys.nowNs();
    try testing.expectError(error.Timeout, ctx.connectService("full"));
    try testing.expect(sys.nowNs() - start < 5 * std.time.ns_per_s);
    try testing.expectEqualStrings("connect to service full timed out", ctx.last.text());
    ctx.setCallTimeout(0); // one attempt
    try testing.expectError(error.Timeout, ctx.connectService("full"));
    try testing.expectEqual(@as(usize, 0), ctx.table.count());
}

/// After `delay_ms`, take one client off a full service's backlog (room for
/// one connect that waited); the service never answers it.
fn acceptOneLater(full: *FullService, delay_ms: i32) void {
    var none: [0]c.pollfd = .{};
    _ = c.poll(&none, 0, delay_ms); // a sleep
    const fd = c.accept(full.listen_fd, null, null);
    if (fd >= 0) sys.closeFd(fd);
}

test "connect through ipcd: one call timeout bounds the connect to ipcd and the exchange" {
    var run = TmpRun.init();
    defer run.deinit();
    // An ipcd slow to accept, then silent.
    var full = try FullService.init(&run, "ipc");
    defer full.deinit();
    const ctx = try run.newContext();
    defer ctx.destroy();
    _ = setenv("IPC_NETWORK", "somewhere", 1);
    defer _ = unsetenv("IPC_NETWORK");
    ctx.setCallTimeout(1500 * std.time.ns_per_ms);
    const thread = try std.Thread.spawn(.{}, acceptOneLater, .{ &full, 1000 });
    defer thread.join();
    const start = sys.nowNs();
    try testing.expectError(error.Timeout, ctx.connect("target"));
    // Each step had a deadline of its own: 1 s to connect, then 1.5 s more.
    try testing.expect(sys.nowNs() - start < 2200 * std.time.ns_per_ms);
    try testing.expectEqualStrings("connect to service target timed out", ctx.last.text());
    try testing.expectEqual(@as(usize, 0), ctx.table.count());
}

const itimerval = extern struct { interval: c.timeval, value: c.timeval };
extern "c" fn setitimer(which: c_int, new: *const itimerval, old: ?*itimerval) c_int;

fn ignoreSignal(_: c.SIG) callconv(.c) void {}

/// A SIGALRM in 50 ms, with a handler that returns (no SA_RESTART).
fn alarmSoon() !void {
    const it: itimerval = .{
        .interval = .{ .sec = 0, .usec = 0 },
        .value = .{ .sec = 0, .usec = 50_000 },
    };
    try testing.expectEqual(@as(c_int, 0), setitimer(0, &it, null));
}

test "a signal during a connect to a full service never gives an unconnected fd" {
    var run = TmpRun.init();
    defer run.deinit();
    var full = try FullService.init(&run, "full");
    defer full.deinit();
    var act = std.mem.zeroes(c.Sigaction);
    act.handler = .{ .handler = ignoreSignal };
    var saved: c.Sigaction = undefined;
    try testing.expectEqual(@as(c_int, 0), c.sigaction(c.SIG.ALRM, &act, &saved));
    defer _ = c.sigaction(c.SIG.ALRM, &saved, null);
    const ctx = try run.newContext();
    defer ctx.destroy();
    // Not interruptible (C, libIPC's way): the connect goes on after the
    // signal, until the call timeout. It returned an fd that was not
    // connected (Linux gives an interrupted Unix connect up).
    ctx.setCallTimeout(300 * std.time.ns_per_ms);
    try alarmSoon();
    try testing.expectError(error.Timeout, ctx.connectService("full"));
    // Interruptible (the Python binding, which resumes it): Interrupted.
    ctx.interruptible = true;
    ctx.setCallTimeout(5 * std.time.ns_per_s);
    try alarmSoon();
    try testing.expectError(error.Interrupted, ctx.connectService("full"));
    try testing.expectEqualStrings("connect to service full was interrupted by a signal", ctx.last.text());
    try testing.expectEqual(@as(usize, 0), ctx.table.count());
}

test "an ended connection keeps its index until the next round: a client accepted meanwhile gets another" {
    var p = try Pair.init("slotkeep");
    defer p.deinit();
    const a_index = p.server.table.get(p.server_fd).?.index;
    // A announces a frame over every limit (it is dropped), then B connects:
    // one round of the server drops A and accepts B.
    const bad = framing.encodeHeader(0xFFFF_FFFF);
    try sendRaw(p.client_fd, &bad);
    const b_client = try p.client.connectService("slotkeep");
    _ = b_client;
    var b_fd: i32 = -1;
    var b_index: i64 = -1;
    var a_events: usize = 0;
    while (b_fd < 0 or a_events < 2) {
        var ev = try nextEvent(p.server);
        defer ev.deinit();
        switch (ev.kind) {
            .connection => {
                b_fd = ev.fd;
                b_index = ev.index;
            },
            .err, .disconnection => {
                try testing.expectEqual(p.server_fd, ev.fd);
                try testing.expectEqual(@as(i64, a_index), ev.index);
                a_events += 1;
            },
            else => return error.UnexpectedEvent,
        }
    }
    // B took A's slot in the same round: libIPC's ipc_close(ctx, index) on
    // A's ERROR closed B instead.
    try testing.expect(b_index != a_index);
    try testing.expectEqual(p.server_fd, try p.server.fdAtIndex(a_index));
    try p.server.close(try p.server.fdAtIndex(a_index));
    try testing.expect(p.server.table.get(b_fd) != null);
    try testing.expectError(error.UnknownFd, p.server.fdAtIndex(a_index));
    // Released: the next client takes it.
    _ = try p.client.connectService("slotkeep");
    var ev = try expectEvent(p.server, .connection, -2, null);
    defer ev.deinit();
    try testing.expectEqual(@as(i64, a_index), ev.index);
}

test "a paused connection with a queued write sees its peer's end only once resumed" {
    var p = try Pair.init("pausehup");
    defer p.deinit();
    try p.server.pauseReading(p.server_fd, true);
    const big = try gpa.alloc(u8, 4 << 20); // more than the socket takes: stays queued
    defer gpa.free(big);
    @memset(big, 'b');
    try p.server.schedule(p.server_fd, big);
    try p.client.write(p.client_fd, "one");
    try p.client.close(p.client_fd);
    // The hang-up is there at once; with write interest the poller reports
    // it, and the paused fd was read (MESSAGE_RX, ERROR, DISCONNECTION).
    p.server.setCallTimeout(0);
    for (0..3) |_| {
        p.server.events.releaseLent(gpa);
        try testing.expectError(error.Timeout, p.server.wait(false));
        try testing.expectEqual(@as(usize, 0), p.server.pendingEvents());
    }
    p.server.setCallTimeout(-1);
    try p.server.pauseReading(p.server_fd, false);
    try expectOnly(p.server, .message_rx, p.server_fd, "one");
    try expectOnly(p.server, .err, p.server_fd, "peer closed the connection with 1 scheduled message(s) unsent");
    try expectOnly(p.server, .disconnection, p.server_fd, null);
}

test "C ABI: ipc_context_set_limits refuses max_queue_size 2^63 with its own text" {
    const abi = @import("exports.zig");
    const errors = @import("errors.zig");
    var handle: ?*anyopaque = null;
    try testing.expectEqual(@as(c_int, 0), abi.ipc_context_init(&handle));
    defer abi.ipc_context_deinit(&handle);
    try testing.expectEqual(@as(c_int, 0), abi.ipc_context_set_limits(handle, 1, (1 << 63) - 1, 1));
    try testing.expectEqual(errors.code(error.Generic), abi.ipc_context_set_limits(handle, 1, 1 << 63, 1));
    try testing.expectEqualStrings(
        "max_queue_size must be at most 9223372036854775807",
        std.mem.span(abi.ipc_last_error(handle)),
    );
    try testing.expectEqual(errors.code(error.Generic), abi.ipc_context_set_limits(handle, 100, 103, 1));
    try testing.expectEqualStrings(
        "max_queue_size must be at least max_message_size + 4",
        std.mem.span(abi.ipc_last_error(handle)),
    );
}

test "dropSharedInChild: a forked child's copies of locks and sockets become /dev/null, externals stay" {
    var p = try Pair.init("forkdrop");
    defer p.deinit();
    const pair = try unixSocketPair();
    defer sys.closeFd(pair[1]);
    try p.server.addExternal(pair[0]);
    const lock_fd = p.server.table.get(p.service_fd).?.lock_fd;
    try testing.expect(lock_fd >= 0);

    // In the process that made the context: nothing happens.
    p.server.dropSharedInChild();
    try testing.expect(sys.isSocket(p.server_fd));

    // As in a forked child (another pid): every fd of ours but the external
    // one now refers to /dev/null; here, where they were the only references,
    // the connection ends for its peer and the service name is free.
    p.server.owner_pid = c.getpid() +% 1;
    p.server.dropSharedInChild();
    for ([_]i32{ lock_fd, p.service_fd, p.server_fd }) |fd| {
        try testing.expect(!sys.isSocket(fd));
        try testing.expect(c.fcntl(fd, c.F.GETFD) == c.FD_CLOEXEC);
    }
    try testing.expect(sys.isSocket(pair[0]));
    try expectOnly(p.client, .disconnection, p.client_fd, null);
    const other = try p.run.newContext();
    defer other.destroy();
    _ = try other.serviceInit("forkdrop");
    p.server.closeAll(); // the numbers were kept: closed as before
    try testing.expect(!sys.isOpen(p.server_fd));
    try testing.expect(sys.isOpen(pair[1]));
}
