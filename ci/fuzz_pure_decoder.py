"""Coverage-guided fuzzing of the pure backend's frame decoder with atheris.

Each input is turned into (limit, cut points, stream): the stream is fed to a
FrameDecoder in the pieces the cut points give, and the result is compared with
a one-shot reference parser of the whole stream: the same payloads in order,
FrameTooLarge exactly where the reference meets an oversize header (with the
same size), a partial frame kept exactly when bytes are left over. Any
difference raises, which atheris reports as a crash with the input saved
(libFuzzer's own summary, "Done N runs", says how much ran).

    python ci/fuzz_pure_decoder.py -max_total_time=60 [corpus_dir]
"""

from __future__ import annotations

import struct
import sys

import atheris

with atheris.instrument_imports():
    from pyipc._pure.framing import FrameDecoder, FrameTooLarge

def reference(stream: bytes, limit: int) -> tuple[list[bytes], int | None, int]:
    """(payloads, oversize announcement or None, bytes left over)."""
    frames = []
    off = 0
    while len(stream) - off >= 4:
        (size,) = struct.unpack_from(">I", stream, off)
        if size > limit:
            return frames, size, 0
        if len(stream) - off - 4 < size:
            break
        frames.append(stream[off + 4:off + 4 + size])
        off += 4 + size
    return frames, None, len(stream) - off


def split_input(data: bytes) -> tuple[int, list[int], bytes]:
    """Decode a fuzzer input into a limit, cut points and the stream."""
    fdp = atheris.FuzzedDataProvider(data)
    limit = fdp.PickValueInList([0, 1, 5, 255, 4096, 1 << 16, (1 << 32) - 1])
    cuts = sorted(fdp.ConsumeIntListInRange(fdp.ConsumeIntInRange(0, 16), 0, 4096))
    return limit, cuts, fdp.ConsumeBytes(fdp.remaining_bytes())


def test_one_input(data: bytes) -> None:
    limit, cuts, stream = split_input(data)
    want, want_too_large, leftover = reference(stream, limit)
    decoder = FrameDecoder(limit)
    got: list[bytes] = []
    got_too_large = None
    bounds = [0] + [c for c in cuts if c < len(stream)] + [len(stream)]
    try:
        for start, end in zip(bounds, bounds[1:]):
            decoder.feed(memoryview(stream)[start:end], got)
    except FrameTooLarge as exc:
        got_too_large = exc.size
    if got != want or got_too_large != want_too_large:
        raise AssertionError(f"decoder gave {len(got)} frames / too_large={got_too_large}, "
                             f"reference {len(want)} / {want_too_large}")
    if want_too_large is None:
        if decoder.partial != (leftover > 0):
            raise AssertionError(f"partial={decoder.partial} with {leftover} bytes left over")


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
