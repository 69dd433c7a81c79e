"""The daemons' `pyipc` subcommands, registered by pyipc.cli.

Each daemon module has `add_command(subparsers)`; the module is imported only
when the command line is parsed, so `import pyipc` never loads ssl or a
WebSocket library.
"""

from __future__ import annotations

import importlib
from typing import Any

#: Modules of pyipc.daemons that provide a subcommand, in --help order.
COMMAND_MODULES: list[str] = ["ipcd", "tcpd", "tlsd", "websocketd"]


def add_daemon_commands(subparsers: Any) -> None:
    """Add each daemon's subcommand to the `pyipc` parser."""
    for module in COMMAND_MODULES:
        importlib.import_module(f"pyipc.daemons.{module}").add_command(subparsers)
