"""Ending an example service cleanly on SIGINT/SIGTERM, whichever backend waits.

Shared by the example services (run as scripts, they find this file next to
them, like kv_messages.py).
"""

from __future__ import annotations

import os
import signal

import pyipc


def stop_fd(ctx: pyipc.Context) -> int:
    """A pipe that becomes readable on SIGINT/SIGTERM, watched by ctx (EXTERNAL).

    Python's signal wakeup fd writes a byte to it the moment a signal arrives, so
    the event loop wakes up at once; the service sees an EXTERNAL event on the
    returned fd and leaves its loop.
    """
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    signal.set_wakeup_fd(write_end)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    ctx.add_external(read_end)
    return read_end
