#!/usr/bin/env python3
"""Check that pyipc wheels are what their names say.

    python ci/check_wheel.py [--header zig/libipc.h] [--no-auditwheel] WHEEL...

For each wheel, from its file name's tag (py3-none-PLATFORM, PLATFORM possibly
several tags joined by dots), and from the library it carries, parsed here with
struct (no readelf, no lief):

- the tag is py3-none-..., the WHEEL file says Root-Is-Purelib: false and lists
  exactly the tags of the file name;
- the wheel holds pyipc/libipc.h and exactly one library, libipc.so.0 (ELF, with
  SONAME libipc.so.0, libIPC's, next to libipc.so, the one-line linker script
  `INPUT(libipc.so.0)` that `-lipc` finds) or libipc.dylib (Mach-O), and no other
  native file;
- the binary's machine (ELF e_machine, Mach-O cputype) is the tag's architecture;
- the binary's OS is the tag's OS: EI_OSABI, the OS notes (.note.tag "FreeBSD",
  "NetBSD", "OpenBSD", "GNU" ABI tags), the C library it needs (DT_NEEDED: glibc
  libc.so.6, musl libc.musl-ARCH.so.1 (as on Alpine), FreeBSD libc.so.7 with FBSD_1.x symbol versions,
  NetBSD libc.so.12, OpenBSD libc.so.M.N; macOS libSystem) and, for macOS, the
  LC_BUILD_VERSION platform and minimum version (<= the tag's);
- manylinux_X_Y / manylinux2014: every GLIBC_x.y version required
  (.gnu.version_r) is <= X.Y; musllinux: no glibc version at all;
- the library needs nothing but the OS's own C runtime libraries;
- it exports (.dynsym, or the Mach-O symbol table) every function declared
  between CFFI-BEGIN and CFFI-END in libipc.h, and the header in the wheel is
  the repository's zig/libipc.h;
- for Linux tags, `auditwheel show` agrees (its tag is at least as compatible).

Exit status 0 when every check of every wheel passed; otherwise each failure is
printed as "FAIL wheel: what" and the status is 1.
"""

from __future__ import annotations

import argparse
import re
import shutil
import struct
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# ELF constants
EM_X86_64, EM_AARCH64 = 62, 183
ELFOSABI = {0: "SYSV", 2: "NetBSD", 3: "GNU/Linux", 9: "FreeBSD", 12: "OpenBSD"}
SHT_DYNSYM, SHT_DYNAMIC, SHT_NOTE, SHT_GNU_VERNEED = 11, 6, 7, 0x6FFFFFFE
DT_NEEDED, DT_SONAME = 1, 14

# The ELF library's file name (its SONAME) and the linker script -lipc finds.
ELF_LIBRARY, LINKER_SCRIPT = "libipc.so.0", "libipc.so"
LINKER_SCRIPT_TEXT = f"INPUT({ELF_LIBRARY})\n".encode()

# Mach-O constants
MH_MAGIC_64, FAT_MAGIC = 0xFEEDFACF, 0xCAFEBABE
CPU_TYPE_X86_64, CPU_TYPE_ARM64 = 0x01000007, 0x0100000C
MH_DYLIB = 6
LC_SYMTAB, LC_LOAD_DYLIB, LC_VERSION_MIN_MACOSX, LC_BUILD_VERSION = 0x2, 0xC, 0x24, 0x32
LC_DYLD_INFO_ONLY, LC_DYLD_EXPORTS_TRIE = 0x80000022, 0x80000033
PLATFORM_MACOS = 1

# What each OS's base system provides: a library may need these and nothing else.
ALLOWED_NEEDED = {
    "glibc": re.compile(r"(libc\.so\.6|libm\.so\.6|libpthread\.so\.0|libdl\.so\.2|librt\.so\.1"
                        r"|ld-linux-(x86-64|aarch64)\.so\.[12])$"),
    "musl": re.compile(r"(libc\.so|libc\.musl-(x86_64|aarch64)\.so\.1|ld-musl-(x86_64|aarch64)\.so\.1)$"),
    "freebsd": re.compile(r"(libc\.so\.7|libthr\.so\.3|libm\.so\.5|libgcc_s\.so\.1)$"),
    "netbsd": re.compile(r"(libc\.so\.12|libpthread\.so\.1|libm\.so\.0)$"),
    # Zig links OpenBSD's libc as plain "libc.so": its ld.so then takes the newest libc.so.M.N
    "openbsd": re.compile(r"(libc\.so(\.\d+\.\d+)?|libpthread\.so\.\d+\.\d+|libm\.so\.\d+\.\d+)$"),
    "macos": re.compile(r"/usr/lib/libSystem\.B\.dylib$"),
}


class CheckError(Exception):
    pass


@dataclass
class Expected:
    """What a platform tag promises about the binary."""
    tag: str
    os: str                    # linux, freebsd, netbsd, openbsd, macos
    arch: str                  # x86_64 or aarch64
    libc: str | None = None    # glibc, musl (Linux)
    glibc_max: tuple | None = None
    os_version: tuple | None = None


@dataclass
class Binary:
    """What the library says about itself."""
    fmt: str
    arch: str
    osabi: str = ""
    notes: list = field(default_factory=list)        # (name, type, desc bytes)
    needed: list = field(default_factory=list)
    soname: str | None = None
    verneed: dict = field(default_factory=dict)      # file -> [version names]
    exports: set = field(default_factory=set)
    imports: set = field(default_factory=set)        # undefined dynamic symbols
    macos_min: tuple | None = None
    macos_platform: int | None = None


ARCHES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64",
          "evbarm": "aarch64"}


def parse_platform_tag(tag: str) -> Expected:
    """The OS, architecture and limits that one platform tag promises."""
    m = re.fullmatch(r"manylinux_(\d+)_(\d+)_(x86_64|aarch64)", tag)
    if m:
        return Expected(tag, "linux", m[3], "glibc", (int(m[1]), int(m[2])))
    legacy = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}
    m = re.fullmatch(r"(manylinux1|manylinux2010|manylinux2014)_(x86_64|aarch64)", tag)
    if m:
        return Expected(tag, "linux", m[2], "glibc", legacy[m[1]])
    m = re.fullmatch(r"musllinux_(\d+)_(\d+)_(x86_64|aarch64)", tag)
    if m:
        return Expected(tag, "linux", m[3], "musl", os_version=(int(m[1]), int(m[2])))
    m = re.fullmatch(r"linux_(x86_64|aarch64)", tag)
    if m:
        return Expected(tag, "linux", m[1])
    m = re.fullmatch(r"(freebsd|netbsd|openbsd)_(\d+)_(\d+)(?:_[a-z0-9]+)*?_(amd64|arm64|aarch64|evbarm|x86_64)", tag)
    if m:
        return Expected(tag, m[1], ARCHES[m[4]], os_version=(int(m[2]), int(m[3])))
    m = re.fullmatch(r"macosx_(\d+)_(\d+)_(x86_64|arm64)", tag)
    if m:
        return Expected(tag, "macos", ARCHES[m[3]], os_version=(int(m[1]), int(m[2])))
    raise CheckError(f"platform tag {tag!r} is not one this checker knows "
                     "(manylinux, musllinux, linux, freebsd, netbsd, openbsd, macosx; x86_64/aarch64)")


# -- ELF -------------------------------------------------------------------------
def _cstr(blob: bytes, off: int) -> str:
    end = blob.index(b"\0", off)
    return blob[off:end].decode("utf-8", "replace")


def parse_elf(data: bytes) -> Binary:
    if data[:4] != b"\x7fELF":
        raise CheckError("not an ELF file")
    if data[4] != 2 or data[5] != 1:
        raise CheckError(f"ELF class {data[4]} / data encoding {data[5]}: expected 64-bit little-endian")
    osabi = data[7]
    (e_type, e_machine, _ver, _entry, _phoff, e_shoff, _flags, _ehsize, _phentsize, _phnum,
     e_shentsize, e_shnum, e_shstrndx) = struct.unpack_from("<HHIQQQIHHHHHH", data, 16)
    if e_type != 3:
        raise CheckError(f"ELF type {e_type}: expected ET_DYN (3), a shared library")
    arch = {EM_X86_64: "x86_64", EM_AARCH64: "aarch64"}.get(e_machine, f"e_machine={e_machine}")
    sections = []
    for i in range(e_shnum):
        sh = struct.unpack_from("<IIQQQQIIQQ", data, e_shoff + i * e_shentsize)
        sections.append(dict(name=sh[0], type=sh[1], offset=sh[4], size=sh[5], link=sh[6],
                             info=sh[7], entsize=sh[9]))
    shstr = sections[e_shstrndx]
    shstrtab = data[shstr["offset"]:shstr["offset"] + shstr["size"]]
    for s in sections:
        s["sname"] = _cstr(shstrtab, s["name"])

    def body(s: dict) -> bytes:
        return data[s["offset"]:s["offset"] + s["size"]]

    b = Binary("ELF", arch, osabi=ELFOSABI.get(osabi, str(osabi)))
    for s in sections:
        if s["type"] == SHT_DYNSYM:
            strtab = body(sections[s["link"]])
            raw = body(s)
            for off in range(0, len(raw), 24):
                st_name, st_info, st_other, st_shndx, _value, _size = struct.unpack_from("<IBBHQQ", raw, off)
                bind, typ, vis = st_info >> 4, st_info & 0xF, st_other & 0x3
                if st_shndx != 0 and bind in (1, 2) and typ == 2 and vis in (0, 3):
                    b.exports.add(_cstr(strtab, st_name))
                elif st_shndx == 0 and st_name:
                    b.imports.add(_cstr(strtab, st_name))
        elif s["type"] == SHT_DYNAMIC:
            strtab = body(sections[s["link"]])
            raw = body(s)
            for off in range(0, len(raw), 16):
                tag, val = struct.unpack_from("<qQ", raw, off)
                if tag == 0:
                    break
                if tag == DT_NEEDED:
                    b.needed.append(_cstr(strtab, val))
                elif tag == DT_SONAME:
                    b.soname = _cstr(strtab, val)
        elif s["type"] == SHT_GNU_VERNEED:
            strtab = body(sections[s["link"]])
            raw = body(s)
            off = 0
            for _ in range(s["info"]):  # sh_info: number of Verneed entries
                _v, cnt, vn_file, vn_aux, vn_next = struct.unpack_from("<HHIII", raw, off)
                names = []
                aux = off + vn_aux
                for _ in range(cnt):
                    _hash, _flags, _other, vna_name, vna_next = struct.unpack_from("<IHHII", raw, aux)
                    names.append(_cstr(strtab, vna_name))
                    aux += vna_next
                b.verneed[_cstr(strtab, vn_file)] = names
                if vn_next == 0:
                    break
                off += vn_next
        elif s["type"] == SHT_NOTE:
            raw = body(s)
            off = 0
            while off + 12 <= len(raw):
                namesz, descsz, ntype = struct.unpack_from("<III", raw, off)
                off += 12
                name = raw[off:off + namesz].rstrip(b"\0").decode("ascii", "replace")
                off += (namesz + 3) & ~3
                desc = raw[off:off + descsz]
                off += (descsz + 3) & ~3
                b.notes.append((name, ntype, desc))
    return b


# How each C library names its errno accessor: tells musl's and OpenBSD's
# libc.so apart (both are needed as plain "libc.so" by Zig-linked libraries).
ERRNO_ACCESSOR = {"glibc": "__errno_location", "musl": "__errno_location",
                  "freebsd": "__error", "netbsd": "__errno", "openbsd": "__errno"}


def elf_os(b: Binary) -> tuple[str, str, str]:
    """(os, libc, evidence) from the OS ABI byte, the notes, the C library needed
    and the C library's own symbols the binary imports."""
    needed = set(b.needed)
    clues = []
    note_os = {n for n, t, _ in b.notes if n in ("FreeBSD", "NetBSD", "OpenBSD") and t == 1}
    if b.osabi not in ("SYSV", "GNU/Linux"):
        clues.append(f"EI_OSABI {b.osabi}")
    if "libc.so.6" in needed:
        os_, libc = "linux", "glibc"
    elif "libc.so" in needed and "__errno" in b.imports:
        os_, libc = "openbsd", "openbsd"  # Zig links OpenBSD's libc unversioned
    elif "libc.so" in needed or any(re.fullmatch(r"libc\.musl-\w+\.so\.1", n) for n in needed):
        os_, libc = "linux", "musl"
    elif "libc.so.7" in needed:
        os_, libc = "freebsd", "freebsd"
    elif "libc.so.12" in needed:
        os_, libc = "netbsd", "netbsd"
    elif any(re.fullmatch(r"libc\.so\.\d+\.\d+", n) for n in needed):
        os_, libc = "openbsd", "openbsd"
    else:
        raise CheckError(f"cannot tell the OS: DT_NEEDED {sorted(needed)} names no known C library")
    clues.append("DT_NEEDED " + ", ".join(sorted(n for n in needed if n.startswith("libc."))))
    accessors = {a for a in ERRNO_ACCESSOR.values() if a in b.imports}
    if accessors and ERRNO_ACCESSOR[libc] not in accessors:
        raise CheckError(f"imports {sorted(accessors)}, not {libc}'s errno accessor {ERRNO_ACCESSOR[libc]}")
    if accessors:
        clues.append(f"imports {ERRNO_ACCESSOR[libc]}")
    expected_abi = {"linux": ("SYSV", "GNU/Linux"), "freebsd": ("SYSV", "FreeBSD"),
                    "netbsd": ("SYSV", "NetBSD"), "openbsd": ("SYSV", "OpenBSD")}[os_]
    if b.osabi not in expected_abi:
        raise CheckError(f"EI_OSABI is {b.osabi} but the library needs {libc}'s C library")
    for n in note_os:
        if n.lower() != os_:
            raise CheckError(f"ELF note says {n} but the library needs {libc}'s C library")
        clues.append(f"note {n}")
    if os_ == "freebsd":
        fbsd = [v for v in b.verneed.get("libc.so.7", []) if v.startswith("FBSD_")]
        if not fbsd and not note_os and b.osabi != "FreeBSD":
            raise CheckError("libc.so.7 needed but no FreeBSD OSABI, note or FBSD_x.y version")
        if fbsd:
            clues.append("FBSD_ versions " + ",".join(sorted(set(fbsd))))
    if os_ == "linux" and libc == "musl" and any(v.startswith("GLIBC_") for vs in b.verneed.values() for v in vs):
        raise CheckError("needs musl's libc.so but also GLIBC_ symbol versions")
    return os_, libc, "; ".join(clues)


# -- Mach-O ----------------------------------------------------------------------
def _uleb(data: bytes, off: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[off]
        off += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return result, off


def _export_trie(data: bytes, start: int, size: int) -> set:
    names = set()
    trie = data[start:start + size]
    stack = [(0, "")]
    seen = set()
    while stack:
        off, prefix = stack.pop()
        if off in seen or off >= len(trie):
            continue
        seen.add(off)
        info_len, p = _uleb(trie, off)
        if info_len:
            names.add(prefix)
        p += info_len
        nchildren = trie[p]
        p += 1
        for _ in range(nchildren):
            end = trie.index(b"\0", p)
            edge = trie[p:end].decode()
            child, p = _uleb(trie, end + 1)
            stack.append((child, prefix + edge))
    return names


def parse_macho(data: bytes) -> Binary:
    magic = struct.unpack_from("<I", data, 0)[0]
    if struct.unpack_from(">I", data, 0)[0] == FAT_MAGIC:
        raise CheckError("universal (fat) Mach-O: this project builds one architecture per wheel")
    if magic != MH_MAGIC_64:
        raise CheckError(f"Mach-O magic {magic:#x}: expected 64-bit little-endian {MH_MAGIC_64:#x}")
    cputype, _sub, filetype, ncmds, _sizeofcmds, _flags, _res = struct.unpack_from("<iiIIIII", data, 4)
    arch = {CPU_TYPE_X86_64: "x86_64", CPU_TYPE_ARM64: "aarch64"}.get(cputype & 0xFFFFFFFF, f"cputype={cputype:#x}")
    if filetype != MH_DYLIB:
        raise CheckError(f"Mach-O filetype {filetype}: expected MH_DYLIB (6)")
    b = Binary("Mach-O", arch)
    off = 32
    for _ in range(ncmds):
        cmd, cmdsize = struct.unpack_from("<II", data, off)
        if cmd == LC_BUILD_VERSION:
            platform, minos, _sdk = struct.unpack_from("<III", data, off + 8)
            b.macos_platform = platform
            b.macos_min = (minos >> 16, (minos >> 8) & 0xFF)
        elif cmd == LC_VERSION_MIN_MACOSX:
            version = struct.unpack_from("<I", data, off + 8)[0]
            b.macos_platform = PLATFORM_MACOS
            b.macos_min = (version >> 16, (version >> 8) & 0xFF)
        elif cmd == LC_LOAD_DYLIB:
            name_off = struct.unpack_from("<I", data, off + 8)[0]
            b.needed.append(_cstr(data[off:off + cmdsize] + b"\0", name_off))
        elif cmd == LC_SYMTAB:
            symoff, nsyms, stroff, strsize = struct.unpack_from("<IIII", data, off + 8)
            strtab = data[stroff:stroff + strsize]
            for i in range(nsyms):
                n_strx, n_type, _sect, _desc, _value = struct.unpack_from("<IBBHQ", data, symoff + 16 * i)
                if n_type & 0xE0 == 0 and n_type & 0x0E == 0x0E and n_type & 0x01:  # N_SECT | N_EXT
                    name = _cstr(strtab, n_strx)
                    b.exports.add(name[1:] if name.startswith("_") else name)
        elif cmd in (LC_DYLD_EXPORTS_TRIE, LC_DYLD_INFO_ONLY):
            if cmd == LC_DYLD_EXPORTS_TRIE:
                toff, tsize = struct.unpack_from("<II", data, off + 8)
            else:
                toff, tsize = struct.unpack_from("<II", data, off + 8 + 32)
            for name in _export_trie(data, toff, tsize):
                b.exports.add(name[1:] if name.startswith("_") else name)
        off += cmdsize
    return b


# -- the header ------------------------------------------------------------------
def declared_functions(header_text: str) -> list[str]:
    """Function names declared between the header's CFFI markers."""
    try:
        block = header_text.split("/* CFFI-BEGIN */", 1)[1].split("/* CFFI-END */", 1)[0]
    except IndexError:
        raise CheckError("libipc.h has no CFFI-BEGIN ... CFFI-END block") from None
    # drop comments (their words in parentheses are not calls), enum and struct
    # bodies, then every "NAME(" at the top level of a declaration
    block = re.sub(r"/\*.*?\*/|//[^\n]*", " ", block, flags=re.S)
    block = re.sub(r"\{[^{}]*\}", ";", block)
    names = []
    for decl in block.split(";"):
        m = re.search(r"\b([A-Za-z_]\w*)\s*\(", decl)
        if m:
            names.append(m[1])
    if not names:
        raise CheckError("no function declared in libipc.h's CFFI block")
    return names


# -- auditwheel --------------------------------------------------------------------
def auditwheel_tag(wheel: Path) -> str:
    exe = shutil.which("auditwheel") or str(Path(sys.executable).parent / "auditwheel")
    if not Path(exe).exists():
        raise CheckError("auditwheel is not installed (pip install auditwheel) or pass --no-auditwheel")
    run = subprocess.run([exe, "show", str(wheel)], capture_output=True, text=True)
    out = run.stdout + run.stderr
    m = re.search(r'following\s+platform tag:\s*"([^"]+)"', out)  # auditwheel 6.8 wraps the line
    if run.returncode != 0 or not m:
        raise CheckError(f"auditwheel show failed (exit {run.returncode}): {out.strip()[:800]}")
    return m[1]


def _linux_policy(tag: str) -> tuple[str, tuple]:
    m = re.fullmatch(r"(many|musl)linux_(\d+)_(\d+)_\w+", tag)
    if m:
        return m[1], (int(m[2]), int(m[3]))
    m = re.fullmatch(r"(manylinux1|manylinux2010|manylinux2014)_\w+", tag)
    if m:
        return "many", {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}[m[1]]
    return "linux", (99, 99)


# -- one wheel ---------------------------------------------------------------------
def check_wheel(wheel: Path, repo_header: Path | None, use_auditwheel: bool) -> list[str]:
    """Run every check; return the list of what passed (raises CheckError at the first failure)."""
    passed = []
    m = re.fullmatch(r"(?P<name>[^-]+)-(?P<ver>[^-]+)(-\d[^-]*)?-(?P<py>[^-]+)-(?P<abi>[^-]+)-(?P<plat>[^-]+)\.whl",
                     wheel.name)
    if not m:
        raise CheckError("file name is not NAME-VERSION-PY-ABI-PLATFORM.whl")
    if m["name"] != "pyipc_zig":
        raise CheckError(f"distribution is {m['name']!r}, not pyipc_zig (pyipc-zig)")
    if m["py"] != "py3" or m["abi"] != "none":
        raise CheckError(f"tag {m['py']}-{m['abi']}: expected py3-none (the library does not use the Python ABI)")
    plat_tags = m["plat"].split(".")
    expected = [parse_platform_tag(t) for t in plat_tags]
    if len({(e.os, e.arch, e.libc) for e in expected}) != 1:
        raise CheckError(f"platform tags {plat_tags} disagree on OS, architecture or C library")
    exp = expected[0]
    passed.append("name")

    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        wheelfile = [n for n in names if n.endswith(".dist-info/WHEEL")]
        if len(wheelfile) != 1:
            raise CheckError("no .dist-info/WHEEL file")
        meta = z.read(wheelfile[0]).decode()
        if "Root-Is-Purelib: false" not in meta:
            raise CheckError("WHEEL does not say Root-Is-Purelib: false")
        listed = sorted(re.findall(r"^Tag:\s*(\S+)", meta, re.M))
        wanted = sorted(f"py3-none-{t}" for t in plat_tags)
        if listed != wanted:
            raise CheckError(f"WHEEL lists tags {listed}, the file name says {wanted}")
        libs = sorted(n for n in names if re.search(r"\.(so|dylib|dll|pyd)(\.|$)", n))
        expected_lib = "pyipc/libipc.dylib" if exp.os == "macos" else f"pyipc/{ELF_LIBRARY}"
        expected_libs = [expected_lib] if exp.os == "macos" else sorted(
            [expected_lib, f"pyipc/{LINKER_SCRIPT}"])
        if libs != expected_libs:
            raise CheckError(f"native files {libs}: expected exactly {expected_libs}")
        if exp.os != "macos":
            script = z.read(f"pyipc/{LINKER_SCRIPT}")
            if script != LINKER_SCRIPT_TEXT:
                raise CheckError(f"pyipc/{LINKER_SCRIPT} is {script[:60]!r}, expected the "
                                 f"linker script {LINKER_SCRIPT_TEXT!r}")
        if "pyipc/libipc.h" not in names:
            raise CheckError("pyipc/libipc.h is missing (the cffi wrapper reads its declarations)")
        data = z.read(expected_lib)
        header = z.read("pyipc/libipc.h").decode()
    passed.append("contents")

    if repo_header is not None and repo_header.exists() and repo_header.read_text() != header:
        raise CheckError(f"pyipc/libipc.h in the wheel differs from {repo_header}")

    if exp.os == "macos":
        b = parse_macho(data)
    else:
        b = parse_elf(data)
    if b.arch != exp.arch:
        raise CheckError(f"{b.fmt} binary is for {b.arch}, the tag {exp.tag} says {exp.arch}")
    passed.append(f"arch {b.arch}")
    if exp.os != "macos":
        if b.soname != ELF_LIBRARY:
            raise CheckError(f"SONAME is {b.soname!r}, expected {ELF_LIBRARY!r} (libIPC's)")
        passed.append(f"soname {b.soname}")

    if exp.os == "macos":
        if b.macos_platform != PLATFORM_MACOS or b.macos_min is None:
            raise CheckError(f"no macOS LC_BUILD_VERSION / LC_VERSION_MIN_MACOSX (platform {b.macos_platform})")
        if b.macos_min > exp.os_version:
            raise CheckError(f"library needs macOS {b.macos_min[0]}.{b.macos_min[1]}, "
                             f"tag {exp.tag} promises {exp.os_version[0]}.{exp.os_version[1]}")
        if not any(n == "/usr/lib/libSystem.B.dylib" for n in b.needed):
            raise CheckError(f"does not link libSystem (LC_LOAD_DYLIB {b.needed})")
        passed.append(f"os macos>={b.macos_min[0]}.{b.macos_min[1]}")
        libc = "macos"
    else:
        os_, libc, evidence = elf_os(b)
        if os_ != exp.os or (exp.libc and libc != exp.libc):
            raise CheckError(f"binary is for {os_}/{libc} ({evidence}), the tag {exp.tag} says "
                             f"{exp.os}/{exp.libc or 'any libc'}")
        passed.append(f"os {os_ if os_ == libc else os_ + '/' + libc} ({evidence})")
        if exp.libc == "musl" and f"libc.musl-{b.arch}.so.1" not in b.needed:
            raise CheckError(f"a musllinux library must need libc.musl-{b.arch}.so.1 (Alpine's name, "
                             f"the one auditwheel's musllinux policy allows), not {b.needed}")
        if exp.libc == "glibc":
            versions = [v for vs in b.verneed.values() for v in vs if v.startswith("GLIBC_")]
            parsed = [tuple(int(x) for x in v[6:].split(".")[:2]) for v in versions]
            too_new = [v for v, p in zip(versions, parsed) if p > exp.glibc_max]
            if too_new:
                raise CheckError(f"needs {sorted(set(too_new))}, newer than glibc "
                                 f"{exp.glibc_max[0]}.{exp.glibc_max[1]} of {exp.tag}")
            newest = max(parsed) if parsed else (0, 0)
            passed.append(f"GLIBC<={exp.glibc_max[0]}.{exp.glibc_max[1]} (max {newest[0]}.{newest[1]})")

    extra = [n for n in b.needed if not ALLOWED_NEEDED[libc].search(n)]
    if extra:
        raise CheckError(f"needs libraries outside the OS's C runtime: {extra}")
    passed.append("needed")

    missing = [f for f in declared_functions(header) if f not in b.exports]
    if missing:
        raise CheckError(f"libipc.h declares {len(missing)} function(s) the library does not export: {missing}")
    passed.append(f"exports {len(declared_functions(header))}")

    if use_auditwheel and exp.os == "linux":
        aw = auditwheel_tag(wheel)
        kind, version = _linux_policy(aw)
        for e in expected:
            want_kind, want_version = _linux_policy(e.tag)
            if want_kind == "linux":
                continue
            if kind != want_kind or (want_kind == "many" and version > want_version) \
                    or not aw.endswith(e.arch):
                raise CheckError(f"auditwheel show says {aw}, the wheel claims {e.tag}")
        passed.append(f"auditwheel {aw}")
    return passed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("wheels", nargs="+", type=Path)
    ap.add_argument("--header", type=Path, default=ROOT / "zig" / "libipc.h",
                    help="the header the wheel's copy must equal (default: zig/libipc.h)")
    ap.add_argument("--no-auditwheel", action="store_true", help="skip `auditwheel show`")
    args = ap.parse_args(argv)
    failed = 0
    for wheel in args.wheels:
        try:
            if not wheel.is_file():
                raise CheckError("no such file")
            passed = check_wheel(wheel, args.header, not args.no_auditwheel)
            print(f"ok   {wheel.name}: " + ", ".join(passed))
        except (CheckError, struct.error, IndexError, ValueError, zipfile.BadZipFile) as e:
            failed += 1
            print(f"FAIL {wheel.name}: {e}", file=sys.stderr)
    if failed:
        print(f"check_wheel: {failed} of {len(args.wheels)} wheel(s) FAILED", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
