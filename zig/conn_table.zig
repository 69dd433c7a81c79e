//! The connection table: every fd a context manages, found by fd in O(1), and
//! numbered by slot. A new entry takes the LOWEST free slot (a min-heap of
//! freed slots), which is the `index` events report; it is stable for the
//! entry's lifetime and reused after it is closed, like libIPC's.
//!
//! A connection record is small (no fixed buffers): its decoder and send queue
//! hold memory only while a message is partly received or queued.

const std = @import("std");
const assert = std.debug.assert;
const Allocator = std.mem.Allocator;
const framing = @import("framing.zig");
const SendQueue = @import("send_queue.zig").SendQueue;
const Interest = @import("poller/api.zig").Interest;
const switching = @import("switching.zig");
const SocketFile = @import("rundir.zig").SocketFile;

/// What a managed fd is to the context.
pub const Role = enum(u8) {
    /// A listening socket of ours (service_init).
    service,
    /// A connection (accepted, connected, or received from ipcd).
    connection,
    /// A foreign fd (add_external): reported, not read, unless switched.
    external,
};

pub const Conn = struct {
    fd: i32,
    role: Role,
    index: u32 = 0,
    /// False once closed; the record itself lives until the end of the call
    /// (see Table.reap) so code holding a pointer can check this.
    alive: bool = true,
    /// Sockets are written with MSG_NOSIGNAL; a pipe (external) with writev.
    is_socket: bool = true,
    /// A write failed with EPIPE: further writes report ConnectionClosed.
    write_closed: bool = false,
    /// Its switch peer ended: not read any more, closed (DISCONNECTION) once
    /// what was forwarded to it is written.
    closing: bool = false,
    /// Its reads are paused by the caller (ipc_pause_reading): not watched
    /// for input until resumed, so its peer's writes wait in the kernel.
    read_paused: bool = false,
    /// An external fd reported readable (EXTERNAL) during a linger: not
    /// watched for input until the linger ends. A linger never reads it, so
    /// it would stay readable and each pass of the linger's loop would
    /// report it again at once (a spinning CPU, an EXTERNAL per pass).
    muted: bool = false,
    /// Its `in` callback is being called to the end after a failed write
    /// (switching.drainIn): not started again from inside.
    draining: bool = false,
    /// What the poller watches it for.
    registered: Interest = .{},
    /// Position in the context's list of fds with queued frames, or null.
    dirty_pos: ?u32 = null,
    /// The other side of a switch, or null.
    peer: ?*Conn = null,
    cb_in: ?switching.InCallback = null,
    cb_out: ?switching.OutCallback = null,
    /// Its `in` callback returned MORE and is due again: the fd is in the
    /// context's switch_state.more (switching.zig).
    more_pending: bool = false,
    /// The round its `in` callback last ran in (one batch of MORE a round).
    more_round: u64 = 0,
    decoder: framing.Decoder = .{},
    queue: SendQueue = .{},
    /// Services: socket file (removed on close while still ours) and
    /// NAME.lock fd (kept locked).
    service_file: ?*SocketFile = null,
    lock_fd: i32 = -1,

    fn freeBuffers(self: *Conn, gpa: Allocator) void {
        self.decoder.deinit(gpa);
        self.queue.deinit(gpa);
        if (self.service_file) |f| f.destroy(gpa);
        self.service_file = null;
    }
};

pub const Table = struct {
    by_fd: std.AutoHashMapUnmanaged(i32, *Conn) = .empty,
    slots: std.ArrayList(?*Conn) = .empty,
    /// Min-heap of free slot numbers below slots.len.
    free: std.ArrayList(u32) = .empty,
    /// Records removed during this call, destroyed by reap().
    dead: std.ArrayList(*Conn) = .empty,

    pub fn deinit(self: *Table, gpa: Allocator) void {
        assert(self.by_fd.count() == 0);
        self.reap(gpa);
        self.by_fd.deinit(gpa);
        self.slots.deinit(gpa);
        self.free.deinit(gpa);
        self.dead.deinit(gpa);
    }

    pub fn count(self: *const Table) usize {
        return self.by_fd.count();
    }

    pub fn get(self: *const Table, fd: i32) ?*Conn {
        return self.by_fd.get(fd);
    }

    pub fn atSlot(self: *const Table, index: usize) ?*Conn {
        if (index >= self.slots.items.len) return null;
        return self.slots.items[index];
    }

    /// Create a record for `fd` in the lowest free slot. The fd must not be in
    /// the table. Nothing is changed on failure.
    pub fn add(self: *Table, gpa: Allocator, fd: i32, role: Role) Allocator.Error!*Conn {
        assert(self.by_fd.get(fd) == null);
        const conn = try gpa.create(Conn);
        errdefer gpa.destroy(conn);
        try self.by_fd.ensureUnusedCapacity(gpa, 1);
        try self.slots.ensureUnusedCapacity(gpa, 1);
        try self.dead.ensureTotalCapacity(gpa, self.dead.items.len + self.by_fd.count() + 1);
        const index: u32 = if (self.free.items.len > 0) self.popFree() else blk: {
            self.slots.appendAssumeCapacity(null);
            break :blk @intCast(self.slots.items.len - 1);
        };
        conn.* = .{ .fd = fd, .role = role, .index = index };
        self.slots.items[index] = conn;
        self.by_fd.putAssumeCapacityNoClobber(fd, conn);
        return conn;
    }

    /// Take conn out of the table (its slot becomes free, unless
    /// `keep_slot`: then releaseSlot frees it later). The record stays
    /// readable until reap(); the caller closes the fd.
    pub fn remove(self: *Table, gpa: Allocator, conn: *Conn, keep_slot: bool) void {
        assert(conn.alive);
        conn.alive = false;
        assert(self.by_fd.remove(conn.fd));
        self.slots.items[conn.index] = null;
        // Capacity was reserved by add (free has room: see pushFree's fallback).
        if (!keep_slot) self.pushFree(gpa, conn.index);
        self.dead.appendAssumeCapacity(conn);
    }

    /// Free a slot that remove() kept.
    pub fn releaseSlot(self: *Table, gpa: Allocator, index: u32) void {
        assert(index < self.slots.items.len and self.slots.items[index] == null);
        self.pushFree(gpa, index);
    }

    /// Destroy the records removed since the last reap.
    pub fn reap(self: *Table, gpa: Allocator) void {
        for (self.dead.items) |conn| {
            conn.freeBuffers(gpa);
            gpa.destroy(conn);
        }
        self.dead.clearRetainingCapacity();
    }

    /// Forget every slot number (after close_all: indices start at 0 again).
    pub fn resetSlots(self: *Table) void {
        assert(self.by_fd.count() == 0);
        self.slots.clearRetainingCapacity();
        self.free.clearRetainingCapacity();
    }

    fn pushFree(self: *Table, gpa: Allocator, index: u32) void {
        // If the heap cannot grow, losing a slot number only wastes one slot.
        self.free.append(gpa, index) catch return;
        var i = self.free.items.len - 1;
        const h = self.free.items;
        while (i > 0) {
            const parent = (i - 1) / 2;
            if (h[parent] <= h[i]) break;
            std.mem.swap(u32, &h[parent], &h[i]);
            i = parent;
        }
    }

    fn popFree(self: *Table) u32 {
        const h = self.free.items;
        const top = h[0];
        h[0] = h[h.len - 1];
        self.free.items.len -= 1;
        const n = self.free.items.len;
        var i: usize = 0;
        while (true) {
            const l = 2 * i + 1;
            if (l >= n) break;
            const r = l + 1;
            const m = if (r < n and h[r] < h[l]) r else l;
            if (h[i] <= h[m]) break;
            std.mem.swap(u32, &h[i], &h[m]);
            i = m;
        }
        return top;
    }

    pub fn iterator(self: *const Table) std.AutoHashMapUnmanaged(i32, *Conn).ValueIterator {
        return self.by_fd.valueIterator();
    }
};

// ---------------------------------------------------------------- tests

const testing = std.testing;

test "a new entry takes the lowest free slot" {
    const gpa = testing.allocator;
    var t: Table = .{};
    defer t.deinit(gpa);
    var conns: [5]*Conn = undefined;
    for (&conns, 0..) |*c, i| {
        c.* = try t.add(gpa, @intCast(100 + i), .connection);
        try testing.expectEqual(@as(u32, @intCast(i)), c.*.index);
    }
    t.remove(gpa, conns[3], false);
    t.remove(gpa, conns[1], false);
    t.reap(gpa);
    const a = try t.add(gpa, 200, .connection);
    try testing.expectEqual(@as(u32, 1), a.index);
    const b = try t.add(gpa, 201, .connection);
    try testing.expectEqual(@as(u32, 3), b.index);
    const c = try t.add(gpa, 202, .connection);
    try testing.expectEqual(@as(u32, 5), c.index);
    try testing.expectEqual(a, t.get(200).?);
    try testing.expectEqual(b, t.atSlot(3).?);
    try testing.expectEqual(@as(usize, 6), t.count());
    for ([_]*Conn{ conns[0], conns[2], conns[4], a, b, c }) |x| t.remove(gpa, x, false);
}

test "a record stays readable until reap" {
    const gpa = testing.allocator;
    var t: Table = .{};
    defer t.deinit(gpa);
    const x = try t.add(gpa, 7, .external);
    t.remove(gpa, x, false);
    try testing.expect(!x.alive);
    try testing.expect(t.get(7) == null);
    t.reap(gpa);
}

test "an idle connection record is small" {
    try testing.expect(@sizeOf(Conn) <= 256);
}

test "a kept slot is not reused until released" {
    const gpa = testing.allocator;
    var t: Table = .{};
    defer t.deinit(gpa);
    const x = try t.add(gpa, 7, .connection);
    t.remove(gpa, x, true);
    const y = try t.add(gpa, 8, .connection);
    try testing.expectEqual(@as(u32, 1), y.index);
    t.releaseSlot(gpa, 0);
    const z = try t.add(gpa, 9, .connection);
    try testing.expectEqual(@as(u32, 0), z.index);
    t.remove(gpa, y, false);
    t.remove(gpa, z, false);
}
