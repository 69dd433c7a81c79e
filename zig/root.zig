export fn ipc_dummy() callconv(.c) c_int { return 0; }
test "x" {}
