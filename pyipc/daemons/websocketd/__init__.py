"""websocketd: browsers and WebSocket clients talk to pyipc services.

`pyipc websocketd --expose chat` accepts WebSocket connections (RFC 6455,
parsed by the `websockets` package's sans-I/O layer) at ws://HOST:PORT/NAME,
connects to the local service NAME and switches the two fds: one WebSocket
message is one pyipc message, both ways. It also serves a JavaScript client
(/pyipc.js) and the chat example's page (/chat.html), and the `ws` scheme for
ipcd (dialer.py). See docs/websocket.md.

Needs the `websocket` extra: pip install 'pyipc-zig[websocket]'.
"""

from __future__ import annotations

from typing import Any

from .command import add_command
from .options import Options

__all__ = ["WebSocketd", "Options", "add_command"]


def __getattr__(name: str) -> Any:
    # WebSocketd is imported on first use, so that `pyipc --help` (which
    # imports every daemon's add_command) works without the websocket extra.
    if name == "WebSocketd":
        from .daemon import WebSocketd
        return WebSocketd
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
