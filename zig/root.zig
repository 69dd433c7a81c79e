//! pyipc's Zig core: libIPC's model behind a C ABI (zig/libipc.h).
//! This root pulls in the C exports and every file's tests.
//!
//!   errors.zig       error set, IPC_E_* codes, last-error text
//!   sys.zig          thin libc layer (EINTR/EAGAIN-safe I/O, lstat, time)
//!   framing.zig      incremental frame decoder, header encoding
//!   send_queue.zig   per-connection outgoing frames (bounded, coalesced)
//!   gather.zig       write_many's frames: small ones copied into one iovec
//!   events.zig       pending events and the memory their payloads live in
//!   conn_table.zig   connections by fd (O(1)) and by lowest free slot
//!   poller*.zig      epoll / kqueue / poll, chosen at compile time
//!   rundir.zig       run dir, names, NAME.lock, service sockets
//!   credentials.zig  peer credentials
//!   fdpass.zig       SCM_RIGHTS (ipcd)
//!   wakeup.zig       the pipe another thread uses to end a wait (ipc_wakeup)
//!   switching.zig    forwarding between switched fds, callbacks
//!   context.zig      the context and its event loop
//!   exports.zig      the C ABI

comptime {
    _ = @import("exports.zig");
}

test {
    _ = @import("errors.zig");
    _ = @import("sys.zig");
    _ = @import("framing.zig");
    _ = @import("send_queue.zig");
    _ = @import("gather.zig");
    _ = @import("events.zig");
    _ = @import("conn_table.zig");
    _ = @import("poller/api.zig");
    _ = @import("rundir.zig");
    _ = @import("credentials.zig");
    _ = @import("fdpass.zig");
    _ = @import("wakeup.zig");
    _ = @import("context.zig");
    _ = @import("exports.zig");
    _ = @import("abi_test.zig");
}
