//! Builds pyipc's Zig core: libipc as a shared library (what cffi loads) and
//! a static one (for C programs), the header, and the unit tests.
//!
//!   python -m ziglang build -Doptimize=ReleaseFast    -> zig-out/lib/libipc.so, libipc.a
//!   python -m ziglang build test --summary all        -> unit + socket tests
//!   python -m ziglang build test -Dtest-filter=TEXT   -> only tests named with TEXT
//!   python -m ziglang build -Dtarget=x86_64-freebsd   -> cross-compile
//!   python -m ziglang build fuzz -Doptimize=ReleaseSafe -- N SEED
//!                                                     -> randomised decoder test
const std = @import("std");

pub fn build(b: *std.Build) void {
    const target = b.standardTargetOptions(.{});
    const optimize = b.standardOptimizeOption(.{});

    // The readiness backend: by default chosen from the target OS (epoll on
    // Linux, kqueue on the BSDs and macOS, else poll); -Dpoller=poll runs the
    // whole test suite over the portable fallback.
    const poller = b.option(enum { auto, poll }, "poller", "Readiness backend (auto or poll)") orelse .auto;
    const options = b.addOptions();
    options.addOption(bool, "force_poll", poller == .poll);

    const mod = b.createModule(.{
        .root_source_file = b.path("zig/root.zig"),
        .target = target,
        .optimize = optimize,
        .link_libc = true,
    });
    mod.addOptions("build_options", options);

    const shared = b.addLibrary(.{ .name = "ipc", .linkage = .dynamic, .root_module = mod });
    b.installArtifact(shared);

    const static_mod = b.createModule(.{
        .root_source_file = b.path("zig/root.zig"),
        .target = target,
        .optimize = optimize,
        .link_libc = true,
        .pic = true,
    });
    static_mod.addOptions("build_options", options);
    const static = b.addLibrary(.{ .name = "ipc", .linkage = .static, .root_module = static_mod });
    b.installArtifact(static);

    b.getInstallStep().dependOn(&b.addInstallFile(b.path("zig/libipc.h"), "include/libipc.h").step);

    // -Dtest-filter=TEXT runs only the tests whose names contain TEXT.
    const test_filter = b.option([]const u8, "test-filter", "Run only the tests whose names contain this text");
    const tests = b.addTest(.{
        .root_module = mod,
        .filters = if (test_filter) |f| &.{f} else &.{},
    });
    const run_tests = b.addRunArtifact(tests);
    b.step("test", "Run the unit and socket tests").dependOn(&run_tests.step);

    // A long randomised run of the frame decoder against a reference parser
    // (ci/fuzz runs it); arguments after `--` are the iteration count and seed.
    const fuzz_exe = b.addExecutable(.{
        .name = "fuzz-framing",
        .root_module = b.createModule(.{
            .root_source_file = b.path("zig/fuzz_framing.zig"),
            .target = target,
            .optimize = optimize,
        }),
    });
    const run_fuzz = b.addRunArtifact(fuzz_exe);
    run_fuzz.addPassthruArgs();
    b.step("fuzz", "Randomised frame decoder test against a reference parser").dependOn(&run_fuzz.step);
}
