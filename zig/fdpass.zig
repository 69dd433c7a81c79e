//! Passing file descriptors over a Unix socket (SCM_RIGHTS), as libIPC's ipcd
//! does: the fd travels with a short raw (unframed) payload, e.g. "ok".

const std = @import("std");
const c = std.c;
const sys = @import("sys.zig");

pub const Error = error{ SendFailed, ReceiveFailed, BufferTooSmall };

fn cmsgAlign(n: usize) usize {
    return std.mem.alignForward(usize, n, c.cmsg_align);
}
const cmsg_data_offset = cmsgAlign(@sizeOf(c.cmsghdr));
/// CMSG_SPACE(sizeof(int)): room for one fd.
const control_space = cmsg_data_offset + cmsgAlign(@sizeOf(c_int));
/// Fds receiveFd makes room for: one is used, the others a peer may add are
/// closed (fds beyond the room are discarded by the kernel).
const max_received_fds = 8;
/// CMSG_SPACE of max_received_fds fds.
const receive_space = cmsg_data_offset + cmsgAlign(max_received_fds * @sizeOf(c_int));

fn Control(comptime space: usize) type {
    return extern struct {
        bytes: [space]u8 align(@alignOf(c.cmsghdr)),
    };
}

/// Send `fd_to_pass` with `payload` (one byte NUL when empty: an fd needs at
/// least one byte of data to travel on a stream socket). Blocks until sent.
pub fn sendFd(sock: i32, fd_to_pass: i32, payload: []const u8) Error!void {
    const data: []const u8 = if (payload.len == 0) "\x00" else payload;
    var control: Control(control_space) = .{ .bytes = @splat(0) };
    const hdr: *c.cmsghdr = @ptrCast(&control.bytes);
    hdr.len = @intCast(cmsg_data_offset + @sizeOf(c_int));
    hdr.level = c.SOL.SOCKET;
    hdr.type = c.SCM.RIGHTS;
    std.mem.writeInt(
        c_int,
        control.bytes[cmsg_data_offset..][0..@sizeOf(c_int)],
        fd_to_pass,
        .native,
    );
    var iov = [1]std.posix.iovec_const{.{ .base = data.ptr, .len = data.len }};
    var msg = std.mem.zeroes(c.msghdr_const);
    msg.iov = &iov;
    msg.iovlen = 1;
    msg.control = &control.bytes;
    msg.controllen = @intCast(control_space);
    var sent: usize = while (true) {
        const n = c.sendmsg(sock, &msg, sys.send_flags);
        if (n >= 0) break @intCast(n);
        switch (c.errno(n)) {
            .INTR => continue,
            .AGAIN => sys.waitFd(sock, sys.POLLOUT),
            else => return error.SendFailed,
        }
    };
    // The fd went with the first bytes; the rest of a long payload follows.
    while (sent < data.len) {
        const rest = [1]std.posix.iovec_const{.{
            .base = data[sent..].ptr,
            .len = data.len - sent,
        }};
        switch (sys.writeSome(sock, &rest, true, .yes)) {
            .done => |k| sent += k,
            .would_block => sys.waitFd(sock, sys.POLLOUT),
            .interrupted => {}, // not an interruptible call: go on
            .eof, .failed => return error.SendFailed,
        }
    }
}

/// Receive one message and the fd sent with it (-1 when none came), blocking.
/// `buf` gets the payload; returns its length. A stream socket keeps no
/// boundaries: a payload longer than `buf` gives its first bytes, the rest
/// comes with the next call (libipc.h says so). An empty `buf` is refused
/// (BufferTooSmall) before anything is read: no byte, no fd is taken.
/// Only the first fd is kept: any other fd that came with it is closed, so a
/// peer cannot make us leak fds by sending several.
pub fn receiveFd(sock: i32, buf: []u8, received: *i32) Error!usize {
    received.* = -1;
    if (buf.len == 0) return error.BufferTooSmall;
    const target: []u8 = buf;
    var control: Control(receive_space) = .{ .bytes = @splat(0) };
    var iov = [1]std.posix.iovec{.{ .base = target.ptr, .len = target.len }};
    var msg = std.mem.zeroes(c.msghdr);
    msg.iov = &iov;
    msg.iovlen = 1;
    msg.control = &control.bytes;
    msg.controllen = @intCast(receive_space);
    const flags: u32 = if (@hasDecl(c.MSG, "CMSG_CLOEXEC")) c.MSG.CMSG_CLOEXEC else 0;
    const n: usize = while (true) {
        const rc = c.recvmsg(sock, &msg, flags);
        if (rc >= 0) break @intCast(rc);
        switch (c.errno(rc)) {
            .INTR => continue,
            .AGAIN => sys.waitFd(sock, sys.POLLIN),
            else => return error.ReceiveFailed,
        }
    };
    received.* = keepFirstFd(
        control.bytes[0..@min(@as(usize, @intCast(msg.controllen)), receive_space)],
    );
    if (received.* >= 0 and flags == 0) _ = c.fcntl(
        received.*,
        c.F.SETFD,
        @as(c_int, c.FD_CLOEXEC),
    );
    return n;
}

/// The first fd of every SCM_RIGHTS message in `control` (-1 when none);
/// every other fd in it is closed.
fn keepFirstFd(control: []align(@alignOf(c.cmsghdr)) const u8) i32 {
    var kept: i32 = -1;
    var at: usize = 0;
    while (at + cmsg_data_offset <= control.len) {
        const hdr: *const c.cmsghdr = @ptrCast(@alignCast(control[at..].ptr));
        const len: usize = @intCast(hdr.len);
        if (len < cmsg_data_offset or at + len > control.len) break;
        if (hdr.level == c.SOL.SOCKET and hdr.type == c.SCM.RIGHTS) {
            var data = control[at + cmsg_data_offset .. at + len];
            while (data.len >= @sizeOf(c_int)) : (data = data[@sizeOf(c_int)..]) {
                const fd = std.mem.readInt(c_int, data[0..@sizeOf(c_int)], .native);
                if (kept < 0) kept = fd else sys.closeFd(fd);
            }
        }
        at += cmsgAlign(len);
    }
    return kept;
}

test "an fd travels over a socketpair with its payload" {
    var fds: [2]c.fd_t = undefined;
    try std.testing.expectEqual(@as(c_int, 0), c.socketpair(c.AF.UNIX, c.SOCK.STREAM, 0, &fds));
    defer _ = c.close(fds[0]);
    defer _ = c.close(fds[1]);
    var pipe: [2]c.fd_t = undefined;
    try std.testing.expectEqual(@as(c_int, 0), c.pipe(&pipe));
    defer _ = c.close(pipe[0]);
    try sendFd(fds[0], pipe[1], "ok");
    _ = c.close(pipe[1]);
    var buf: [16]u8 = undefined;
    var got: i32 = -1;
    const n = try receiveFd(fds[1], &buf, &got);
    try std.testing.expectEqualStrings("ok", buf[0..n]);
    try std.testing.expect(got >= 0);
    defer _ = c.close(got);
    // The received fd is the pipe's write end: what we write comes out.
    try std.testing.expectEqual(@as(isize, 3), c.write(got, "abc", 3));
    try std.testing.expectEqual(@as(isize, 3), c.read(pipe[0], &buf, 3));
    try std.testing.expectEqualStrings("abc", buf[0..3]);
}

/// Test helper: send `fds` together with "ok" in one SCM_RIGHTS message.
fn sendFdsForTest(sock: i32, fds: []const c_int) !void {
    var control: Control(receive_space) = .{ .bytes = @splat(0) };
    const hdr: *c.cmsghdr = @ptrCast(&control.bytes);
    hdr.len = @intCast(cmsg_data_offset + fds.len * @sizeOf(c_int));
    hdr.level = c.SOL.SOCKET;
    hdr.type = c.SCM.RIGHTS;
    @memcpy(
        control.bytes[cmsg_data_offset..][0 .. fds.len * @sizeOf(c_int)],
        std.mem.sliceAsBytes(fds),
    );
    var iov = [1]std.posix.iovec_const{.{ .base = "ok", .len = 2 }};
    var msg = std.mem.zeroes(c.msghdr_const);
    msg.iov = &iov;
    msg.iovlen = 1;
    msg.control = &control.bytes;
    msg.controllen = @intCast(cmsg_data_offset + cmsgAlign(fds.len * @sizeOf(c_int)));
    try std.testing.expectEqual(@as(isize, 2), c.sendmsg(sock, &msg, 0));
}

test "receiveFd keeps the first fd and closes the others that came with it" {
    var fds: [2]c.fd_t = undefined;
    try std.testing.expectEqual(@as(c_int, 0), c.socketpair(c.AF.UNIX, c.SOCK.STREAM, 0, &fds));
    defer _ = c.close(fds[0]);
    defer _ = c.close(fds[1]);
    var pipe: [2]c.fd_t = undefined;
    try std.testing.expectEqual(@as(c_int, 0), c.pipe(&pipe));
    defer _ = c.close(pipe[0]);
    try std.testing.expect(sys.setNonblocking(pipe[0], true));
    // The first fd is the pipe's read end, then its write end twice.
    try sendFdsForTest(fds[0], &.{ pipe[0], pipe[1], pipe[1] });
    _ = c.close(pipe[1]);
    var buf: [16]u8 = undefined;
    var got: i32 = -1;
    const n = try receiveFd(fds[1], &buf, &got);
    try std.testing.expectEqualStrings("ok", buf[0..n]);
    try std.testing.expect(got >= 0);
    defer _ = c.close(got);
    // No copy of the write end is left open: the read end sees EOF at once.
    try std.testing.expectEqual(@as(isize, 0), c.read(pipe[0], &buf, 1));
}

test "isConnectedStream: only a connected Unix or TCP stream socket" {
    var pair: [2]c.fd_t = undefined;
    try std.testing.expectEqual(@as(c_int, 0), c.socketpair(c.AF.UNIX, c.SOCK.STREAM, 0, &pair));
    defer _ = c.close(pair[0]);
    defer _ = c.close(pair[1]);
    try std.testing.expect(sys.isConnectedStream(pair[0]));
    var dgram: [2]c.fd_t = undefined;
    try std.testing.expectEqual(@as(c_int, 0), c.socketpair(c.AF.UNIX, c.SOCK.DGRAM, 0, &dgram));
    defer _ = c.close(dgram[0]);
    defer _ = c.close(dgram[1]);
    try std.testing.expect(!sys.isConnectedStream(dgram[0]));
    const lone = c.socket(c.AF.UNIX, c.SOCK.STREAM, 0);
    try std.testing.expect(lone >= 0);
    defer _ = c.close(lone);
    try std.testing.expect(!sys.isConnectedStream(lone));
    var pipe: [2]c.fd_t = undefined;
    try std.testing.expectEqual(@as(c_int, 0), c.pipe(&pipe));
    defer _ = c.close(pipe[0]);
    defer _ = c.close(pipe[1]);
    try std.testing.expect(!sys.isConnectedStream(pipe[0]));
    try std.testing.expect(!sys.isConnectedStream(-1));
    const tcp = c.socket(c.AF.INET, c.SOCK.STREAM, 0);
    try std.testing.expect(tcp >= 0);
    defer _ = c.close(tcp);
    try std.testing.expect(!sys.isConnectedStream(tcp)); // not connected
}
