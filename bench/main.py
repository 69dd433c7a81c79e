"""``pyipc bench``: every case for every system, interleaved repeats, medians.

Repeat r runs every (case, system) pair once before repeat r+1 starts, so slow
drifts of the machine's load spread over all systems alike. Progress goes to
stderr; the markdown table (medians) and the targets go to stdout.
"""

from __future__ import annotations

import argparse
import platform
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

from pyipc.cli import add_bench_arguments

from . import metrics, report, runner
from .cases import CASES, Case, System, systems
from .progress import Progress


def _selected(args: argparse.Namespace) -> Tuple[List[Case], List[System]]:
    cases = [c for c in CASES if not args.cases or c.key in args.cases]
    chosen = [s for s in systems() if not args.systems or s.key in args.systems]
    chosen = [s for s in chosen if any(c.kind in s.kinds for c in cases)]
    return cases, chosen


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; print the table; 0 when every run worked."""
    cases, chosen = _selected(args)
    repeats = args.repeats or (1 if args.quick else 3)
    plan = [(r, c, s) for r in range(repeats) for c in cases for s in chosen
            if c.kind in s.kinds and not s.why_not]
    for s in chosen:
        if s.why_not:
            print(f"bench: {s.title}: {s.why_not}", file=sys.stderr)
    samples: report.Samples = {}
    failures: Dict[Tuple[str, str], str] = {}
    progress = Progress(len(plan))
    for r, case, system in plan:
        label = f"{case.title} · {system.title} · repeat {r + 1}/{repeats}"
        progress.begin(label)
        try:
            values = metrics.derive(case, runner.run(system, case, case.n(args.quick), args.placement))
        except (runner.PeerFailed, KeyError, ValueError) as e:
            failures[(case.key, system.key)] = str(e)
            progress.end(f"{label}: FAILED: {e}")
            continue
        for k, v in values.items():
            samples.setdefault((case.key, system.key, k), []).append(v)
        progress.end(f"{label}: {metrics.headline(case, values)}")
    progress.finish()
    print(_header(repeats, args.quick, args.placement))
    print()
    print(report.table(cases, chosen, samples, failures))
    print()
    print(report.targets_markdown(samples))
    for (c, s), why in failures.items():
        print(f"\nfailed: {c} on {s}: {why}")
    return 1 if failures else 0


def _header(repeats: int, quick: bool, placement: str) -> str:
    server_cpu, client_cpu = runner.cpus_for(placement)
    where = ("peers not pinned" if server_cpu is None else
             f"server on CPU {server_cpu}, client on CPU {client_cpu}")
    return (f"pyipc bench{' --quick' if quick else ''}: median of {repeats} interleaved "
            f"run(s); {where}; {os.cpu_count()} CPU(s), {platform.machine()}, "
            f"Python {platform.python_version()}, {platform.system()} {platform.release()}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="bench", description=__doc__.split("\n\n")[0])
    add_bench_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
