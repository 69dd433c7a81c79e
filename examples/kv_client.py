#!/usr/bin/env python3
"""kv_client: run requests against kv_service, one reply line each.

Operations are given in sequence on the command line::

    python examples/kv_client.py --rundir /tmp/run put colour blue get colour \\
        delete colour get colour dump

prints::

    put colour -> ok
    get colour -> 'blue'
    delete colour -> ok
    get colour -> error: no key 'colour'
    dump -> {}

Values are sent as str. Exit code: 0 when every reply was ok, 1 when one was not
(a missing key, say) or the service is not running, 2 for bad usage.
"""

from __future__ import annotations

import argparse
import sys
from typing import Iterator, List, Optional, Sequence, Tuple

import pyipc

from kv_messages import Delete, Dump, Get, Put, Reply, registry

#: Operation name -> number of arguments it takes.
ARITY = {"get": 1, "put": 2, "delete": 1, "dump": None}


def parse_ops(words: Sequence[str]) -> List[Tuple[str, object]]:
    """The (label, request) pairs of ``get K``, ``put K V``, ``delete K``, ``dump [PREFIX]``."""
    ops: List[Tuple[str, object]] = []
    it: Iterator[str] = iter(words)
    for word in it:
        if word not in ARITY:
            raise ValueError(f"unknown operation {word!r} (get, put, delete, dump)")
        try:
            if word == "get":
                key = next(it)
                ops.append((f"get {key}", Get(key)))
            elif word == "put":
                key, value = next(it), next(it)
                ops.append((f"put {key}", Put(key, value)))
            elif word == "delete":
                key = next(it)
                ops.append((f"delete {key}", Delete(key)))
        except StopIteration:
            raise ValueError(f"{word} needs {ARITY[word]} argument(s)") from None
        if word == "dump":
            ops.append(("dump", Dump()))
    return ops


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Send each request, print each reply; return the exit code."""
    p = argparse.ArgumentParser(description="client of the pyipc key-value service")
    p.add_argument("--rundir", help="run directory (default: env RUNDIR, else /tmp/.libipc-run)")
    p.add_argument("--backend", choices=["native", "pure"], help="pyipc backend")
    p.add_argument("--name", default="kv", help="service name (default: kv)")
    p.add_argument("ops", nargs="+", metavar="OP",
                   help="get KEY | put KEY VALUE | delete KEY | dump")
    args = p.parse_args(argv)
    try:
        ops = parse_ops(args.ops)
    except ValueError as e:
        p.error(str(e))
    all_ok = True
    try:
        with pyipc.Context(rundir=args.rundir, backend=args.backend) as ctx:
            fd = ctx.connect(args.name)
            for label, request in ops:
                ctx.write_typed(fd, request, registry)
                reply = ctx.read_typed(fd, registry)
                if not isinstance(reply, Reply):
                    print(f"{label} -> unexpected {type(reply).__name__}", flush=True)
                    all_ok = False
                elif not reply.ok:
                    print(f"{label} -> error: {reply.error}", flush=True)
                    all_ok = False
                elif reply.value is None:
                    print(f"{label} -> ok", flush=True)
                else:
                    print(f"{label} -> {reply.value!r}", flush=True)
    except (pyipc.IPCError, pyipc.TypedMessageError) as e:
        print(f"kv_client: {e}", file=sys.stderr)
        return 1
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
