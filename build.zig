//! Builds pyipc's Zig core: libipc as a shared library (what cffi loads) and
//! a static one (for C programs), the header, and the unit tests.
//!
//!   python -m ziglang build -Doptimize=ReleaseFast    -> zig-out/lib/libipc.so, libipc.a
//!   python -m ziglang build test --summary all        -> unit + socket tests, the ABI
//!                                                        check, the FreeBSD compile
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
    const poller = b.option(
        enum { auto, poll },
        "poller",
        "Readiness backend (auto or poll)",
    ) orelse
        .auto;
    const options = b.addOptions();
    options.addOption(bool, "force_poll", poller == .poll);

    // The shared library (the one the wheel ships) is stripped of debug info
    // in release builds. On ELF systems it is libipc.so.0.0.0, SONAME
    // libipc.so.0 (libIPC's), so a program linked against libIPC loads it.
    const release = optimize != .debug;
    const mod = coreModule(b, target, optimize, options, .{ .strip = release });
    const shared = b.addLibrary(.{
        .name = "ipc",
        .linkage = .dynamic,
        .root_module = mod,
        .version = if (target.result.os.tag.isDarwin()) null else .{
            .major = 0,
            .minor = 0,
            .patch = 0,
        },
    });
    b.installArtifact(shared);

    const static_mod = coreModule(b, target, optimize, options, .{ .pic = true });
    const static = b.addLibrary(.{ .name = "ipc", .linkage = .static, .root_module = static_mod });
    b.installArtifact(static);

    const header = b.path("zig/libipc.h");
    b.getInstallStep().dependOn(&b.addInstallFile(header, "include/libipc.h").step);

    // -Dtest-filter=TEXT runs only the tests whose names contain TEXT.
    const test_filter = b.option([]const u8, "test-filter", "Run only the tests named with this");
    const filters: []const []const u8 = if (test_filter) |f| &.{f} else &.{};
    const test_step = b.step("test", "Run the unit and socket tests");
    const tests = b.addTest(.{
        .root_module = testModule(b, target, optimize, options),
        .filters = filters,
    });
    test_step.dependOn(&b.addRunArtifact(tests).step);

    // The kqueue backend (and everything else) compiled for FreeBSD, not run:
    // a Linux host still builds every poller.
    const freebsd = b.resolveTargetQuery(.{ .cpu_arch = .x86_64, .os_tag = .freebsd });
    const freebsd_tests = b.addTest(.{
        .name = "test-freebsd",
        .root_module = testModule(b, freebsd, optimize, options),
        .filters = filters,
    });
    const freebsd_step = b.step("test-freebsd", "Compile the tests for x86_64-freebsd");
    // Emitted, so code generation and linking run too, not only analysis.
    _ = freebsd_tests.getEmittedBin();
    freebsd_step.dependOn(&freebsd_tests.step);
    test_step.dependOn(freebsd_step);

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
    b.step("fuzz", "Randomised frame decoder test against a reference parser")
        .dependOn(&run_fuzz.step);
}

const Variant = struct { pic: ?bool = null, strip: ?bool = null };

/// The core (zig/root.zig) for one target.
fn coreModule(
    b: *std.Build,
    target: std.Build.ResolvedTarget,
    optimize: std.builtin.OptimizeMode,
    options: *std.Build.Step.Options,
    variant: Variant,
) *std.Build.Module {
    const mod = b.createModule(.{
        .root_source_file = b.path("zig/root.zig"),
        .target = target,
        .optimize = optimize,
        .link_libc = true,
        .pic = variant.pic,
        .strip = variant.strip,
    });
    mod.addOptions("build_options", options);
    return mod;
}

/// The core for its tests, which also import libipc.h translated to Zig
/// (`libipc_h`, see zig/abi_test.zig). Zig 0.17 has no @cImport: the build
/// translates the header (addTranslateC), only for the tests, so building
/// the library for any target needs no C headers.
fn testModule(
    b: *std.Build,
    target: std.Build.ResolvedTarget,
    optimize: std.builtin.OptimizeMode,
    options: *std.Build.Step.Options,
) *std.Build.Module {
    const mod = coreModule(b, target, optimize, options, .{});
    const header = b.addTranslateC(.{
        .root_source_file = b.path("zig/libipc.h"),
        .target = target,
        .optimize = optimize,
    });
    mod.addImport("libipc_h", header.createModule());
    return mod;
}
