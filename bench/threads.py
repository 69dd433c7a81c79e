"""Contexts in different threads run in parallel (issue 18): 64 KiB messages
moved by one thread, then by two threads at once, each thread with its own
pair of contexts (a service and its client, both in that thread: write one
message, read it on the other end). No other process runs, so the only thing
that can keep two threads from using two CPUs is a call that holds the GIL.

    python -m bench.threads [--systems native pure raw] [--seconds 1.0] [--repeats 5]

Runs alternate (each system with 1 thread, then 2 threads, repeated); prints
the median aggregate throughput of each and their ratio (the goal for native
on two CPUs: at least 1.6). The raw system (a socket pair per thread, Python's
sendall/recv_into) shows what the machine gives threads that hold the GIL
only between system calls, and raw_procs (the same in two processes, no GIL
shared at all) what the machine gives two movers of 64 KiB: the ceiling.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import tempfile
import threading
import time
from typing import Dict, List, Tuple

import socket

import pyipc

SIZE = 64 * 1024


def _mover(backend: str, rundir: str, name: str, seconds: float,
           start: threading.Barrier, counts: List[int]) -> None:
    """Move SIZE-byte messages from a client to its service for `seconds`."""
    payload = bytes(range(256)) * (SIZE // 256)
    with pyipc.Context(rundir=rundir, backend=backend) as server, \
            pyipc.Context(rundir=rundir, backend=backend) as client:
        server.service_init(name)
        fd = client.connect_service(name)
        server_fd = server.wait_event(timeout=10).fd          # the CONNECTION
        buf = bytearray(SIZE)
        start.wait()
        moved = 0
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            for _ in range(16):
                client.write(fd, payload)
                server.read_into(server_fd, buf)
            moved += 16
        counts.append(moved)


def _raw_mover(backend: str, rundir: str, name: str, seconds: float,
               start: threading.Barrier, counts: List[int]) -> None:
    """The same with a raw socket pair (the peer: what the machine allows
    threads of Python that release the GIL in every send and recv)."""
    frame = bytes(4) + bytes(range(256)) * (SIZE // 256)
    buf = bytearray(len(frame))
    view = memoryview(buf)
    a, b = socket.socketpair()
    with a, b:
        start.wait()
        moved = 0
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            for _ in range(16):
                a.sendall(frame)
                got = 0
                while got < len(frame):
                    got += b.recv_into(view[got:])
            moved += 16
        counts.append(moved)


def _raw_process(seconds: float, start: "threading.Barrier",
                 counts: "multiprocessing.Queue[int]") -> None:
    """One raw mover in a process of its own: its count goes back by a queue."""
    moved: List[int] = []
    _raw_mover("raw", "", "", seconds, start, moved)
    counts.put(moved[0])


def run_processes(processes: int, seconds: float) -> float:
    """Aggregate messages per second of `processes` raw movers in processes."""
    mp = multiprocessing.get_context("fork")
    start, counts = mp.Barrier(processes), mp.Queue()
    workers = [mp.Process(target=_raw_process, args=(seconds, start, counts))
               for _ in range(processes)]
    for w in workers:
        w.start()
    total = sum(counts.get(timeout=seconds + 60) for _ in workers)
    for w in workers:
        w.join()
    return total / seconds


def run(backend: str, threads: int, seconds: float) -> float:
    """Aggregate messages per second of `threads` threads moving at once."""
    if backend == "raw_procs":
        return run_processes(threads, seconds)
    counts: List[int] = []
    start = threading.Barrier(threads)
    with tempfile.TemporaryDirectory() as rundir:
        mover = _raw_mover if backend == "raw" else _mover
        workers = [threading.Thread(target=mover, args=(backend, rundir, f"t{i}", seconds,
                                                         start, counts))
                   for i in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    if len(counts) != threads:
        raise SystemExit("a mover thread failed (see its traceback above)")
    return sum(counts) / seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--systems", nargs="+", default=["native", "pure", "raw", "raw_procs"],
                   choices=["native", "pure", "raw", "raw_procs"],
                   help="pyipc backends, raw (a socket pair per thread) and raw_procs "
                        "(a socket pair per process: the machine's ceiling)")
    p.add_argument("--seconds", type=float, default=1.0, help="length of each run")
    p.add_argument("--repeats", type=int, default=5, help="runs of each (interleaved)")
    args = p.parse_args()
    results: Dict[Tuple[str, int], List[float]] = {}
    for _ in range(args.repeats):
        for system in args.systems:
            for threads in (1, 2):
                results.setdefault((system, threads), []).append(
                    run(system, threads, args.seconds))
    mib = SIZE / (1 << 20)
    print(f"{os.cpu_count()} CPUs, 64 KiB messages, median of {args.repeats} "
          f"interleaved runs of {args.seconds:g} s")
    print("| system | 1 mover (msg/s) | 2 movers (msg/s) | 2 movers, MiB/s "
          "| two / one |\n|---|---|---|---|---|")
    for system in args.systems:
        m1 = statistics.median(results[(system, 1)])
        m2 = statistics.median(results[(system, 2)])
        print(f"| {system} | {m1:,.0f} | {m2:,.0f} | {m2 * mib:,.0f} | {m2 / m1:.2f} |")
    print("goal (native): two / one >= 1.6 on two CPUs; raw_procs is the ceiling "
          "(movers are threads, except in raw_procs)")


if __name__ == "__main__":
    main()
