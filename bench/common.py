"""Timing helpers and the JSON line every measurement prints."""

from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Any, Callable

RESULTS: list[dict[str, Any]] = []


def timed(work: Callable[[], Any]) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def p95(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]


def emit(name: str, samples: list[float], baseline: list[float] | float | None, *, unit: str = "ms",
         target: str | None = None, limit: float | None = None, **extra: Any) -> dict[str, Any]:
    """Print one measurement; *limit* is the ratio (or, with ``unit`` and no baseline, the value) to stay under."""
    scale = {"ms": 1e3, "us": 1e6, "s": 1.0}[unit]
    median = statistics.median(samples) * scale
    base = None
    if baseline is not None:
        base = (statistics.median(baseline) if isinstance(baseline, list) else baseline) * scale
    ratio = median / base if base else None
    line: dict[str, Any] = {
        "name": name,
        "unit": unit,
        "n": len(samples),
        "median": round(median, 4),
        "p95": round(p95(samples) * scale, 4),
        "baseline": None if base is None else round(base, 4),
        "ratio": None if ratio is None else round(ratio, 3),
    }
    if target is not None:
        line["target"] = target
        measured = ratio if "x" in target else median
        line["met"] = bool(limit is not None and measured is not None and measured <= limit)
    line.update(extra)
    RESULTS.append(line)
    print(json.dumps(line), flush=True)
    return line


def note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
