"""The progress display on stderr: one line per run, rewritten in place on a tty."""

from __future__ import annotations

import sys
import time


class Progress:
    """Counts runs and shows which one is going, and how long the whole took."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.start = time.monotonic()
        self.tty = sys.stderr.isatty()

    def begin(self, text: str) -> None:
        """A run starts."""
        self._show(f"[{self.done + 1}/{self.total}] {text} ...", final=False)

    def end(self, text: str) -> None:
        """A run ended with ``text`` (its result, or why it failed)."""
        self.done += 1
        self._show(f"[{self.done}/{self.total}] {text}", final=True)

    def finish(self) -> None:
        self._show(f"{self.done} runs in {time.monotonic() - self.start:.0f} s", final=True)

    def _show(self, line: str, final: bool) -> None:
        if self.tty:
            sys.stderr.write("\r\033[K" + line + ("\n" if final else ""))
        elif final:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()
