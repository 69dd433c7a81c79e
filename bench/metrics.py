"""Turn a run's raw result into named metrics, and describe each metric."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

from .cases import CASES, Case


@dataclass(frozen=True)
class Metric:
    """One row of the table."""

    case: str
    key: str
    label: str
    unit: str
    higher_is_better: bool


def metrics_of(case: Case) -> List[Metric]:
    """The rows a case produces."""
    if case.kind == "rtt":
        return [Metric(case.key, "rtt_us", case.title, "µs", False),
                Metric(case.key, "cpu_us", f"{case.title}: CPU of both peers", "µs", False)]
    if case.kind == "events":
        # CPU per message of each peer: what bounds the rate on a machine
        # whose load takes the wall clock figure apart (issue 21).
        cpu = [Metric(case.key, "client_ns", f"{case.title}: sender's CPU per message", "ns",
                      False),
               Metric(case.key, "server_ns", f"{case.title}: receiver's CPU per message", "ns",
                      False)]
        rate = "msgs" if case.size <= 1024 else "mbs"
        return [Metric(case.key, rate, case.title, "msg/s" if rate == "msgs" else "MB/s",
                       True)] + cpu
    if case.kind == "oneway":
        if case.size <= 1024:
            return [Metric(case.key, "msgs", case.title, "msg/s", True)]
        return [Metric(case.key, "mbs", case.title, "MB/s", True)]
    t = case.title
    return [Metric(case.key, "accept_ms", f"{t}: time to accept all", "ms", False),
            Metric(case.key, "alone_us", f"{t}: round trip, no idle client", "µs", False),
            Metric(case.key, "among_us", f"{t}: round trip among them", "µs", False),
            Metric(case.key, "conn_kib", f"{t}: memory per idle connection", "KiB", False)]


ALL_METRICS: List[Metric] = [m for c in CASES for m in metrics_of(c)]


def derive(case: Case, raw: dict) -> Dict[str, float]:
    """The metrics of one run of ``case`` from the client's result."""
    n = raw["n"]
    if case.kind == "rtt":
        out = {"rtt_us": raw["seconds"] / n * 1e6}
        if "cpu" in raw and "server_cpu" in raw:     # Python clients report their CPU
            out["cpu_us"] = (raw["cpu"] + raw["server_cpu"]) / n * 1e6
        return out
    if case.kind in ("oneway", "events"):
        out = {"msgs": n / raw["seconds"]} if case.size <= 1024 else \
            {"mbs": n * case.size / raw["seconds"] / 1e6}
        if case.kind == "events" and "cpu" in raw and "server_cpu" in raw:
            out["client_ns"] = raw["cpu"] / n * 1e9
            out["server_ns"] = raw["server_cpu"] / n * 1e9
        return out
    return {"accept_ms": raw["accept_s"] * 1e3, "alone_us": raw["latency_alone"] * 1e6,
            "among_us": raw["latency_among"] * 1e6, "conn_kib": raw["rss_per_conn"] / 1024}


def headline(case: Case, values: Dict[str, float]) -> str:
    """A short text of one run's result, for the progress line."""
    return ", ".join(f"{k}={fmt(v)}" for k, v in values.items())


def fmt(value: float) -> str:
    """A number with about three significant digits, thousands separated."""
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"
