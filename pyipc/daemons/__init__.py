"""pyipc's networking daemons (libIPC's idea: networking is done by dedicated
services; other programs think every communication is local).

Each daemon is a class built on pyipc's own Context and switching, and a
`pyipc` subcommand. `Daemon` (in _runtime) is what they share: the loop, the
clean stop on SIGTERM/SIGINT, logging, systemd socket activation and readiness.
"""

from ._runtime import Daemon

__all__ = ["Daemon"]
