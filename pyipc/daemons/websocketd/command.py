"""`pyipc websocketd`: the command line of the WebSocketd class."""

from __future__ import annotations

import argparse
import ssl
import sys
from typing import Any, Optional

from ..._types import DEFAULT_MAX_MESSAGE_SIZE
from .._sockets import MAX_DEAD_PEER_TIMEOUT
from .._tls_options import load_tls_file
from .._timers import MAX_TIMEOUT
from .options import (DEFAULT_CONNECT_TIMEOUT, DEFAULT_DEAD_PEER_TIMEOUT,
                      DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_MAX_BUFFER, DEFAULT_MAX_HANDSHAKES,
                      DEFAULT_MAX_WEBSOCKETS, DEFAULT_PORT, Options, parse_list)


def add_command(subparsers: Any) -> None:
    """Add `websocketd` to the `pyipc` command's subcommands."""
    p = subparsers.add_parser(
        "websocketd", help="serve pyipc services to WebSocket clients (browsers)",
        description="Accept WebSocket connections at ws://HOST:PORT/NAME and switch each "
                    "with the local service NAME (one WebSocket message = one pyipc "
                    "message). Serves /pyipc.js and /chat.html too, and the ws scheme for "
                    "ipcd (rules such as 'pong ws://HOST:PORT/pong'). Stops cleanly on "
                    "SIGTERM/SIGINT; supports systemd socket activation and readiness.")
    # --rundir and --backend are pyipc's own options (pyipc --rundir DIR websocketd).
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; '::' or 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help=f"TCP port (default {DEFAULT_PORT})")
    p.add_argument("--expose", action="append", default=[], metavar="NAME[,NAME...]",
                   help="services reachable as /NAME (none by default)")
    p.add_argument("--origin", action="append", default=[], metavar="ORIGIN[,ORIGIN...]",
                   help="browser origins allowed besides this host's own pages, e.g. "
                        "https://app.example.com; '*' allows any")
    p.add_argument("--cert", help="certificate chain (PEM) for wss://")
    p.add_argument("--key", help="private key (PEM) of --cert (default: in --cert)")
    p.add_argument("--client-ca", metavar="FILE",
                   help="wss:// with mutual TLS: clients must present a certificate from "
                        "this CA bundle (PEM)")
    p.add_argument("--max-message-size", type=int, default=DEFAULT_MAX_MESSAGE_SIZE,
                   metavar="BYTES", help="largest message, as the services' own "
                   f"(default {DEFAULT_MAX_MESSAGE_SIZE}); a larger one closes with 1009")
    p.add_argument("--max-buffer", type=int, default=DEFAULT_MAX_BUFFER, metavar="BYTES",
                   help="bytes queued toward a slow side before the other is no longer "
                        f"read (default {DEFAULT_MAX_BUFFER}, at least max-message-size+4)")
    p.add_argument("--handshake-timeout", type=float, default=DEFAULT_HANDSHAKE_TIMEOUT,
                   metavar="SECONDS", help="time a client has to send its request "
                   f"(default {DEFAULT_HANDSHAKE_TIMEOUT:g}, at most {MAX_TIMEOUT:g})")
    p.add_argument("--max-handshakes", type=int, default=DEFAULT_MAX_HANDSHAKES,
                   metavar="N", help="connections in their handshake at once "
                   f"(default {DEFAULT_MAX_HANDSHAKES})")
    p.add_argument("--max-handshakes-per-host", type=int, default=None, metavar="N",
                   help="connections in their handshake at once from one peer (an IPv4 "
                        "address, an IPv6 /64; default: half of --max-handshakes)")
    p.add_argument("--max-websockets", type=int, default=DEFAULT_MAX_WEBSOCKETS,
                   metavar="N", help="WebSockets open at once; more are answered 503 "
                   f"(default {DEFAULT_MAX_WEBSOCKETS})")
    p.add_argument("--dead-peer-timeout", type=float, default=DEFAULT_DEAD_PEER_TIMEOUT,
                   metavar="SECONDS", help="a client that vanished (cut link, host down) "
                   f"is noticed within about this time (default "
                   f"{DEFAULT_DEAD_PEER_TIMEOUT:g}; 0: never; at most {MAX_DEAD_PEER_TIMEOUT})")
    p.add_argument("--connect-timeout", type=float, default=DEFAULT_CONNECT_TIMEOUT,
                   metavar="SECONDS", help="time a dial for ipcd (a ws:// rule) has to "
                   f"connect and get the remote's answer (default {DEFAULT_CONNECT_TIMEOUT:g}, "
                   f"at most {MAX_TIMEOUT:g})")
    p.add_argument("--no-dial", dest="dial", action="store_false",
                   help="do not serve the ws and wss schemes for ipcd (the services 'ws' and "
                        "'wss' in the run dir), e.g. for a second websocketd in the same "
                        "run dir")
    p.add_argument("--dial-ca", metavar="FILE",
                   help="wss:// dials: verify the remote's certificate against this CA "
                        "bundle (PEM; default: the system's trust store)")
    p.add_argument("--dial-cert", metavar="FILE",
                   help="wss:// dials: our certificate chain (PEM), for a remote that asks "
                        "for one (mutual TLS)")
    p.add_argument("--dial-key", metavar="FILE",
                   help="private key (PEM) of --dial-cert (default: in --dial-cert)")
    p.set_defaults(func=run_command)


def ssl_context(cert: Optional[str], key: Optional[str],
                client_ca: Optional[str] = None) -> Optional[ssl.SSLContext]:
    """The server SSLContext of --cert/--key (None without --cert), asking
    clients for a certificate from --client-ca when given."""
    if cert is None:
        if key is not None or client_ca is not None:
            raise ValueError("--key and --client-ca need --cert")
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    load_tls_file("--cert/--key", cert, lambda: context.load_cert_chain(cert, key))
    if client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        load_tls_file("--client-ca", client_ca, lambda: context.load_verify_locations(client_ca))
    return context


def dial_ssl_context(ca: Optional[str], cert: Optional[str],
                     key: Optional[str]) -> ssl.SSLContext:
    """The client SSLContext of wss:// dials: the remote's certificate and
    host name always verified, against --dial-ca or the system's trust store;
    our certificate presented when we have one."""
    if key is not None and cert is None:
        raise ValueError("--dial-key needs --dial-cert")
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if ca is not None:
        load_tls_file("--dial-ca", ca, lambda: context.load_verify_locations(ca))
    if cert is not None:
        load_tls_file("--dial-cert/--dial-key", cert, lambda: context.load_cert_chain(cert, key))
    return context


def run_command(args: argparse.Namespace) -> int:
    """Build the daemon from the options and serve until SIGTERM/SIGINT.
    Exit 2 for a bad option value or certificate file (as tcpd and tlsd),
    1 when serving fails (a port in use, a pyipc error)."""
    from ... import IPCError
    try:
        from .daemon import WebSocketd
    except ImportError as e:
        raise SystemExit(f"pyipc websocketd needs the websocket extra "
                         f"(pip install 'pyipc-zig[websocket]'): {e}") from None
    try:
        options = Options(expose=frozenset(parse_list(",".join(args.expose))),
                          host=args.host, port=args.port,
                          origins=frozenset(parse_list(",".join(args.origin))),
                          max_message_size=args.max_message_size,
                          max_buffer=args.max_buffer,
                          handshake_timeout=args.handshake_timeout,
                          max_handshakes=args.max_handshakes,
                          max_handshakes_per_host=args.max_handshakes_per_host,
                          max_websockets=args.max_websockets,
                          dead_peer_timeout=args.dead_peer_timeout,
                          dial=args.dial, connect_timeout=args.connect_timeout,
                          ssl_context=ssl_context(args.cert, args.key, args.client_ca),
                          dial_ssl_context=dial_ssl_context(args.dial_ca, args.dial_cert,
                                                            args.dial_key))
        daemon = WebSocketd(options, rundir=args.rundir, backend=args.backend)
    except ValueError as e:             # a bad option, a missing or bad certificate file
        print(f"pyipc websocketd: {e}", file=sys.stderr)
        return 2
    except (OSError, IPCError) as e:
        raise SystemExit(f"pyipc websocketd: {e}") from None
    try:
        daemon.run()
    except (ValueError, OSError, IPCError) as e:
        raise SystemExit(f"pyipc websocketd: {e}") from None
    return 0
