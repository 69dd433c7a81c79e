//! pyipc's Zig core: libIPC's model behind a C ABI (zig/libipc.h).
//! This root pulls in the C exports and every file's tests.
//!
//!   errors.zig         error set, IPC_E_* codes (errors.Code), last-error text
//!   sys.zig            thin libc layer: EINTR/EAGAIN-safe I/O, poll of one fd,
//!                      Unix socket calls (listen, connect, accept), lstat, time
//!   framing.zig        incremental frame decoder, header encoding
//!   send_queue.zig     per-connection outgoing frames (bounded, coalesced)
//!   gather.zig         write_many's frames: small ones copied into one iovec
//!   events.zig         pending events (EventType) and the memory their payloads live in
//!   conn_table.zig     connections by fd (O(1)) and by lowest free slot
//!   poller/api.zig     the poller API every backend has (checked at compile
//!                      time), its types, and the backend chosen for the target
//!   poller/epoll.zig, poller/kqueue.zig, poller/poll.zig   the backends
//!   rundir.zig         run dir, names, NAME.lock, service sockets
//!   credentials.zig    peer credentials
//!   fdpass.zig         SCM_RIGHTS (ipcd)
//!   ipcd_answer.zig    ipcd's refusal "ne CODE TEXT" and the error it means
//!   wakeup.zig         the pipe another thread uses to end a wait (ipc_wakeup)
//!   readiness.zig      ipc_context_fd: one fd readable while a zero-timeout wait has events
//!   blocking.zig       how a blocking call waits: timeout, signals, busy_poll
//!   switching.zig      all of switching: callback types, CbResult, pairing, forwarding
//!   context.zig        the context and its event loop (tests: context_test.zig)
//!   exports.zig        the C ABI: converts between C and Zig, calls the context
//!   abi_test.zig       libipc.h (translated by the build) against the Zig numbers,
//!                      IpcEvent's layout and the exports
//!   fuzz_framing.zig   `zig build fuzz`: the decoder against a reference parser

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
    _ = @import("ipcd_answer.zig");
    _ = @import("wakeup.zig");
    _ = @import("readiness.zig");
    _ = @import("blocking.zig");
    _ = @import("switching.zig");
    _ = @import("switching_test.zig");
    _ = @import("context.zig");
    _ = @import("exports.zig");
    _ = @import("abi_test.zig");
}
