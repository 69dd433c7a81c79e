//! pyipc's Zig core: libIPC's model behind a C ABI (zig/libipc.h).
//! This root pulls in the C exports and every file's tests.

comptime {
    _ = @import("exports.zig");
}

test {
    _ = @import("errors.zig");
    _ = @import("sys.zig");
    _ = @import("framing.zig");
    _ = @import("send_queue.zig");
    _ = @import("events.zig");
    _ = @import("conn_table.zig");
    _ = @import("poller.zig");
    _ = @import("rundir.zig");
    _ = @import("credentials.zig");
    _ = @import("fdpass.zig");
    _ = @import("context.zig");
}
