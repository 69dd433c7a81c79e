//! Peer credentials of a Unix socket: SO_PEERCRED on Linux (pid, uid, gid);
//! getpeereid on the BSDs and macOS (pid unknown: -1).

const std = @import("std");
const builtin = @import("builtin");
const c = std.c;

pub const Credentials = struct { pid: i32, uid: u32, gid: u32 };

const ucred = extern struct { pid: i32, uid: u32, gid: u32 };

extern "c" fn getpeereid(fd: c_int, uid: *c.uid_t, gid: *c.gid_t) c_int;

/// The credentials of the process at the other end of socket `fd`, or errno.
pub fn peer(fd: i32) union(enum) { ok: Credentials, failed: c.E } {
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
