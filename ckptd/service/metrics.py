"""Prometheus text exposition (format 0.0.4), written by hand: counters, gauges and
histograms with labels, rendered to bytes by a pure function."""

from __future__ import annotations

import math
import threading
from bisect import bisect_left
from collections.abc import Iterable

Labels = tuple[tuple[str, str], ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt_labels(labels: Labels, extra: Labels = ()) -> str:
    items = labels + extra
    if not items:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in items) + "}"


def _fmt_value(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if float(v).is_integer() and abs(v) < 1e15:
        return str(int(v))
    return repr(float(v))


def _key(labels: dict[str, str]) -> Labels:
    # Counters are bumped on every snapshot round: skip the sort when there is nothing
    # to order (no label, or one).
    if len(labels) < 2:
        return tuple(labels.items())
    return tuple(sorted(labels.items()))


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str) -> None:
        self.name = name
        self.help = help_text

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]

    def samples(self) -> list[str]:
        raise NotImplementedError


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help_text: str) -> None:
        super().__init__(name, help_text)
        self.values: dict[Labels, float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        k = _key(labels)
        self.values[k] = self.values.get(k, 0.0) + amount

    def get(self, **labels: str) -> float:
        return self.values.get(_key(labels), 0.0)

    def samples(self) -> list[str]:
        vals = self.values or {(): 0.0}
        return [f"{self.name}{_fmt_labels(k)} {_fmt_value(v)}" for k, v in sorted(vals.items())]


class Gauge(Counter):
    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        self.values[_key(labels)] = value

    def add(self, amount: float, **labels: str) -> None:
        """Move the gauge up or down by `amount`."""
        k = _key(labels)
        self.values[k] = self.values.get(k, 0.0) + amount


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: Iterable[float]) -> None:
        super().__init__(name, help_text)
        self.buckets = sorted(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # last: +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def samples(self) -> list[str]:
        out: list[str] = []
        running = 0
        for bound, n in zip([*self.buckets, math.inf], self.counts, strict=True):
            running += n
            le = (("le", _fmt_value(bound)),)
            out.append(f"{self.name}_bucket{_fmt_labels((), le)} {running}")
        out.append(f"{self.name}_sum {_fmt_value(self.sum)}")
        out.append(f"{self.name}_count {self.count}")
        return out


class Metrics:
    """Everything the service exports. Capture workers update the per-round metrics
    under `lock`; render() takes it too, so a scrape sees whole rounds."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.snapshots = Counter("ckptd_snapshots_total", "Snapshots published, by kind.")
        self.failures = Counter(
            "ckptd_snapshot_failures_total", "Snapshot rounds that failed, by reason."
        )
        self.bytes_read = Counter(
            "ckptd_bytes_read_total", "Bytes of target memory read by snapshots."
        )
        self.bytes_stored = Counter(
            "ckptd_bytes_stored_total", "Compressed bytes written to the store by snapshots."
        )
        self.truncated = Counter(
            "ckptd_truncated_rounds_total",
            "Rounds stopped by the per-round byte cap (the rest goes in the next round).",
        )
        self.overruns = Counter(
            "ckptd_round_overruns_total", "Rounds that ran past their next scheduled start."
        )
        self.compactions = Counter(
            "ckptd_compactions_total", "Background compaction/retention runs, by result."
        )
        self.registered = Gauge("ckptd_registered_processes", "Processes registered.")
        self.in_flight = Gauge("ckptd_snapshots_in_flight", "Snapshots running now.")
        self.freeze_seconds = Histogram(
            "ckptd_freeze_seconds",
            "Time targets spent frozen per snapshot.",
            [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5],
        )
        self.round_seconds = Histogram(
            "ckptd_round_seconds",
            "Wall time of one snapshot round.",
            [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0],
        )

    def all(self) -> list[_Metric]:
        return [
            self.snapshots, self.failures, self.bytes_read, self.bytes_stored,
            self.truncated, self.overruns, self.compactions, self.registered,
            self.in_flight, self.freeze_seconds, self.round_seconds,
        ]

    def render(self) -> bytes:
        with self.lock:
            return render(self.all())


def render(metrics: Iterable[_Metric]) -> bytes:
    lines: list[str] = []
    for m in metrics:
        lines.extend(m.header())
        lines.extend(m.samples())
    return ("\n".join(lines) + "\n").encode()


CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
