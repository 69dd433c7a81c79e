"""Medians, the markdown table and the ratios the targets are stated in."""

from __future__ import annotations

import statistics
from typing import Dict, List, Optional, Tuple

from .cases import BUSY_POLL_US, Case, System
from .metrics import Metric, fmt, metrics_of

#: (case, system, metric) -> the values of every repeat.
Samples = Dict[Tuple[str, str, str], List[float]]


def median(samples: Samples, case: str, system: str, metric: str) -> Optional[float]:
    values = samples.get((case, system, metric))
    return statistics.median(values) if values else None


def table(cases: List[Case], systems: List[System], samples: Samples,
          failures: Dict[Tuple[str, str], str]) -> str:
    """Markdown: one row per metric, one column per system, medians."""
    head = "| case | unit | " + " | ".join(s.title for s in systems) + " |"
    rows = [head, "|" + "---|" * (len(systems) + 2)]
    for case in cases:
        for m in metrics_of(case):
            cells = [_cell(case, s, m, samples, failures) for s in systems]
            arrow = "higher is better" if m.higher_is_better else "lower is better"
            rows.append(f"| {m.label} | {m.unit} ({arrow}) | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _cell(case: Case, system: System, m: Metric, samples: Samples,
          failures: Dict[Tuple[str, str], str]) -> str:
    if case.kind not in system.kinds:
        return "–"
    if system.why_not:
        return "not installed" if "not installed" in system.why_not else "n/a"
    value = median(samples, case.key, system.key, m.key)
    if value is None:
        return "failed" if (case.key, system.key) in failures else "–"
    return fmt(value)


def _ratio(samples: Samples, case: str, a: str, b: str, metric: str) -> Optional[float]:
    x, y = median(samples, case, a, metric), median(samples, case, b, metric)
    return x / y if x is not None and y else None


def targets(samples: Samples) -> List[Tuple[str, Optional[float], str, bool]]:
    """(what, measured, goal, met) for every target of the native backend."""
    out = []

    def add(what: str, value: Optional[float], goal: str, ok) -> None:
        out.append((what, value, goal, value is not None and ok(value)))

    _events_targets(samples, add)
    zmq = [v for v in (median(samples, "rtt", k, "rtt_us") for k in ("zmq_pair", "zmq_push"))
           if v is not None]
    # The default (busy_poll 0), then the opt-in that spends CPU on latency.
    for key, title in (("native", "native"), ("native_busy", f"native, busy_poll {BUSY_POLL_US} µs,")):
        nat = median(samples, "rtt", key, "rtt_us")
        if key == "native_busy" and nat is None:
            continue                            # not run: no row
        add(f"{title} round trip / raw socket", _ratio(samples, "rtt", key, "raw", "rtt_us"),
            "<= 1.15", lambda v: v <= 1.15)
        add(f"{title} round trip / pyzmq (faster of PAIR, PUSH/PULL)",
            nat / min(zmq) if zmq and nat else None, "<= 0.5", lambda v: v <= 0.5)
    add("native one-way 64 B (msg/s)", median(samples, "tp64", "native", "msgs"),
        ">= 1,500,000", lambda v: v >= 1.5e6)
    for case, title in (("tp64k", "64 KiB"), ("tp1m", "1 MiB")):
        add(f"native one-way {title} / C floor", _ratio(samples, case, "native", "c_floor", "mbs"),
            ">= 0.9", lambda v: v >= 0.9)
    add("native / pure one-way 64 B", _ratio(samples, "tp64", "native", "pure", "msgs"),
        ">= 3", lambda v: v >= 3)
    # pyipc.aio against asyncio's own Unix streams and zmq.asyncio (issue 18).
    add("pyipc.aio round trip / asyncio streams", _ratio(samples, "rtt", "aio", "aio_streams",
        "rtt_us"), "<= 0.8", lambda v: v <= 0.8)
    add("pyipc.aio one-way 64 B / asyncio streams",
        _ratio(samples, "tp64", "aio", "aio_streams", "msgs"), ">= 3", lambda v: v >= 3)
    add("pyipc.aio one-way 64 B / zmq.asyncio PAIR",
        _ratio(samples, "tp64", "aio", "zmq_asyncio", "msgs"), ">= 2", lambda v: v >= 2)
    among, alone = (median(samples, "scale10k", "native", m) for m in ("among_us", "alone_us"))
    add("native 10,000 idle clients: round trip among them / with none",
        among / alone if among is not None and alone else None, "<= 1.2", lambda v: v <= 1.2)
    add("native 10,000 idle clients: memory per idle connection (KiB)",
        median(samples, "scale10k", "native", "conn_kib"), "<= 2", lambda v: v <= 2)
    return out


def _events_targets(samples: Samples, add) -> None:
    """Issue 21's goals: the per-message event API, the default round trip's
    CPU, and busy_poll against a busy-polling C pair."""
    for other, title, goal in (("zmq_push", "pyzmq PUSH/PULL", 1.3), ("c_floor", "C floor", 1.0),
                               ("pure", "pure", 2.5)):
        add(f"native per-message events 64 B / {title}",
            _ratio(samples, "ev64", "native", other, "msgs"), f">= {goal}",
            lambda v, g=goal: v >= g)
    # The same ratios from CPU time: each side's CPU per message, the busier
    # side bounds the rate. Load from other work stretches the wall clock
    # figures above; it stretches these much less.
    for other, title, goal in (("zmq_push", "pyzmq PUSH/PULL", 1.3), ("c_floor", "C floor", 1.0),
                               ("pure", "pure", 2.5)):
        add(f"native per-message events 64 B / {title}, by the busier peer's CPU per message",
            _cpu_bound_ratio(samples, "ev64", "native", other), f">= {goal}",
            lambda v, g=goal: v >= g)
    for other, title, goal in (("c_floor", "C floor", 0.9), ("pure", "pure", 2.0)):
        add(f"native per-message events 64 KiB / {title}",
            _ratio(samples, "ev64k", "native", other, "mbs"), f">= {goal}",
            lambda v, g=goal: v >= g)
    add("native round trip: CPU of both peers / raw socket's",
        _ratio(samples, "rtt", "native", "raw", "cpu_us"), "<= 1.2", lambda v: v <= 1.2)
    add(f"native, busy_poll {BUSY_POLL_US} µs, round trip / busy-polling C pair",
        _ratio(samples, "rtt", "native_busy", "c_busy", "rtt_us"), "<= 1.3", lambda v: v <= 1.3)


def _cpu_bound_ratio(samples: Samples, case: str, a: str, b: str) -> Optional[float]:
    """How many times more messages `a` would move than `b` if each were
    bound by its busier peer's CPU per message."""
    def busier(system: str) -> Optional[float]:
        values = [median(samples, case, system, m) for m in ("client_ns", "server_ns")]
        return None if None in values else max(v for v in values if v is not None)
    x, y = busier(a), busier(b)
    return y / x if x and y is not None else None


def targets_markdown(samples: Samples) -> str:
    rows = ["| target | measured | goal | met |", "|---|---|---|---|"]
    for what, value, goal, ok in targets(samples):
        shown = "–" if value is None else (fmt(value) if value >= 10 else f"{value:.2f}")
        met = "not measured" if value is None else ("yes" if ok else "no")
        rows.append(f"| {what} | {shown} | {goal} | {met} |")
    return "\n".join(rows)
