const std = @import("std");
pub fn build(b: *std.Build) void {
    const target = b.standardTargetOptions(.{});
    const optimize = b.standardOptimizeOption(.{});
    const mod = b.createModule(.{
        .root_source_file = b.path("zig/root.zig"),
        .target = target, .optimize = optimize, .link_libc = true,
    });
    const lib = b.addLibrary(.{ .name = "ipc", .linkage = .dynamic, .root_module = mod });
    b.installArtifact(lib);
    const tests = b.addTest(.{ .root_module = mod });
    b.step("test", "Run unit tests").dependOn(&b.addRunArtifact(tests).step);
}
