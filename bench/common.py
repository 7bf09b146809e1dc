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


class SQLiteCommitFloor:
    """A bare ``BEGIN IMMEDIATE; INSERT; COMMIT`` on a SQLite file set up as kvmslots' store sets its own
    (WAL, ``synchronous=NORMAL``, one connection kept open as the store keeps its own): what one
    committed write costs at least on this machine, now.  :meth:`sample` times *rounds* of them."""

    def __init__(self, path: Any) -> None:
        import sqlite3

        self._conn = sqlite3.connect(path, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode = WAL")
        self._conn.execute("PRAGMA synchronous = NORMAL")
        self._conn.execute("CREATE TABLE IF NOT EXISTS floor (k INTEGER PRIMARY KEY, v TEXT NOT NULL)")

    def _one(self) -> None:
        self._conn.execute("BEGIN IMMEDIATE")
        self._conn.execute("INSERT INTO floor (v) VALUES (?)", ("x",))
        self._conn.execute("COMMIT")

    def sample(self, rounds: int) -> list[float]:
        return [timed(self._one) for _ in range(rounds)]

    def close(self) -> None:
        self._conn.close()


def sqlite_commit_floor(path: Any, rounds: int) -> list[float]:
    """*rounds* bare commits on a new connection to *path* (see :class:`SQLiteCommitFloor`)."""
    floor = SQLiteCommitFloor(path)
    try:
        return floor.sample(rounds)
    finally:
        floor.close()
