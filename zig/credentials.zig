//! Peer credentials of a Unix socket: SO_PEERCRED on Linux (pid, uid, gid);
//! getpeereid on the BSDs and macOS (pid unknown: -1).

const std = @import("std");
const builtin = @import("builtin");
const c = std.c;

pub const Credentials = struct { pid: i32, uid: u32, gid: u32 };

const ucred = extern struct { pid: i32, uid: u32, gid: u32 };

extern "c" fn getpeereid(fd: c_int, uid: *c.uid_t, gid: *c.gid_t) c_int;

/// What peer() found: the credentials, the errno of a failed call, or a
/// socket that is not a Unix one (a TCP connection has no peer credentials).
pub const PeerResult = union(enum) { ok: Credentials, failed: c.E, not_unix };

/// The credentials of the process at the other end of socket `fd`.
pub fn peer(fd: i32) PeerResult {
    // Linux answers SO_PEERCRED on a TCP socket too, with "nobody" (0, -1,
    // -1): that is no answer, so the family is asked first.
    var addr: c.sockaddr.storage = undefined;
    var addr_len: c.socklen_t = @sizeOf(c.sockaddr.storage);
    if (c.getsockname(fd, @ptrCast(&addr), &addr_len) != 0)
        return .{ .failed = c.errno(@as(c_int, -1)) };
    if (addr.family != c.AF.UNIX) return .not_unix;
    if (builtin.os.tag == .linux) {
        var cred: ucred = undefined;
        var len: c.socklen_t = @sizeOf(ucred);
        if (c.getsockopt(fd, c.SOL.SOCKET, std.os.linux.SO.PEERCRED, &cred, &len) != 0)
            return .{ .failed = c.errno(@as(c_int, -1)) };
        return .{ .ok = .{ .pid = cred.pid, .uid = cred.uid, .gid = cred.gid } };
    } else {
        var uid: c.uid_t = undefined;
        var gid: c.gid_t = undefined;
        if (getpeereid(fd, &uid, &gid) != 0) return .{ .failed = c.errno(@as(c_int, -1)) };
        return .{ .ok = .{ .pid = -1, .uid = @intCast(uid), .gid = @intCast(gid) } };
    }
}

test "credentials of a socketpair peer are our own" {
    var fds: [2]c.fd_t = undefined;
    try std.testing.expectEqual(@as(c_int, 0), c.socketpair(c.AF.UNIX, c.SOCK.STREAM, 0, &fds));
    defer _ = c.close(fds[0]);
    defer _ = c.close(fds[1]);
    const r = peer(fds[0]);
    try std.testing.expect(r == .ok);
    try std.testing.expectEqual(c.getuid(), r.ok.uid);
    try std.testing.expectEqual(c.getgid(), r.ok.gid);
    if (builtin.os.tag == .linux) try std.testing.expectEqual(c.getpid(), r.ok.pid);
    try std.testing.expect(peer(-1) == .failed);
}

test "a TCP connection has no peer credentials" {
    const lst = c.socket(c.AF.INET, c.SOCK.STREAM, 0);
    try std.testing.expect(lst >= 0);
    defer _ = c.close(lst);
    var addr: c.sockaddr.in = .{ .port = 0, .addr = std.mem.nativeToBig(u32, 0x7f000001) };
    var len: c.socklen_t = @sizeOf(c.sockaddr.in);
    try std.testing.expectEqual(@as(c_int, 0), c.bind(lst, @ptrCast(&addr), len));
    try std.testing.expectEqual(@as(c_int, 0), c.listen(lst, 1));
    try std.testing.expectEqual(@as(c_int, 0), c.getsockname(lst, @ptrCast(&addr), &len));
    const client = c.socket(c.AF.INET, c.SOCK.STREAM, 0);
    try std.testing.expect(client >= 0);
    defer _ = c.close(client);
    try std.testing.expectEqual(@as(c_int, 0), c.connect(client, @ptrCast(&addr), len));
    try std.testing.expect(peer(client) == .not_unix);
}
