"""Random and adversarial byte streams over a real socket, on both backends.

hypothesis builds a stream (valid frames, then anything: random bytes, a
header announcing up to 4 GiB-1, a cut frame), a small max_message_size and
cut points; a raw peer sends it in those pieces (each one consumed before the
next, see test_framing.Feeder) and closes. What the service reports must be
what a one-shot reference parser of the whole stream says: every complete
frame before a bad header, in order; then ERROR with the README's text when the
stream announces too much or ends inside a frame; then DISCONNECTION.
"""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyipc import EventType

from conftest import frame, wait_for
from test_framing import Feeder

MIDDLE = "peer closed the connection in the middle of a message"


def reference(stream: bytes, limit: int) -> tuple[list[bytes], str | None]:
    """The frames a decoder must deliver, and the ERROR text that must follow."""
    frames, off = [], 0
    while len(stream) - off >= 4:
        (size,) = struct.unpack_from(">I", stream, off)
        if size > limit:
            return frames, f"message of {size} bytes exceeds max_message_size ({limit})"
        if len(stream) - off - 4 < size:
            break
        frames.append(stream[off + 4:off + 4 + size])
        off += 4 + size
    return frames, (MIDDLE if off < len(stream) else None)


headers = st.one_of(st.integers(0, 300), st.integers(0, 2**32 - 1),
                    st.sampled_from([2**32 - 1, 2**31, 65536])).map(lambda n: struct.pack(">I", n))
tails = st.lists(st.one_of(st.binary(max_size=300), headers), max_size=6).map(b"".join)


@settings(max_examples=50, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(good=st.lists(st.binary(max_size=200), max_size=5), tail=tails,
       limit=st.integers(1, 300), data=st.data())
def test_any_stream_gives_what_the_reference_parser_says(ctx_factory, rundir, good, tail,
                                                         limit, data):
    stream = b"".join(frame(m) for m in good if len(m) <= limit) + tail
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(stream)), max_size=8),
                                label="cuts")))
    want_frames, want_error = reference(stream, limit)
    ctx = ctx_factory(max_message_size=limit)
    feeder = Feeder(ctx, rundir)
    try:
        start = 0
        for cut in cuts + [len(stream)]:
            if feeder.other:              # dropped already (a bad header): stop sending
                break
            feeder.send(stream[start:cut])
            start = cut
        feeder.close()
        if not any(ev.type == EventType.DISCONNECTION for ev in feeder.other):
            rest = wait_for(ctx, EventType.DISCONNECTION)
            feeder.received += [ev.message for ev in rest if ev.type == EventType.MESSAGE_RX]
            feeder.other += [ev for ev in rest if ev.type != EventType.MESSAGE_RX]
        assert feeder.received == want_frames
        expected = ([(EventType.ERROR, want_error)] if want_error else []) \
            + [(EventType.DISCONNECTION, None)]
        assert [(ev.type, ev.error) for ev in feeder.other] == expected
        assert all(ev.fd == feeder.fd for ev in feeder.other)
    finally:
        ctx.close_all()
