"""``python -m bench [hotplug] [tracker] [state] [storage] [migration]``: run the benchmarks (all by default)."""

from __future__ import annotations

import sys
import time

from . import hotplug, migration, state, storage, tracker
from .common import note

SECTIONS = {"hotplug": hotplug.run, "tracker": tracker.run, "state": state.run, "storage": storage.run,
            "migration": migration.run}


def main(argv: list[str]) -> int:
    wanted = argv or list(SECTIONS)
    unknown = [name for name in wanted if name not in SECTIONS]
    if unknown:
        print(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    for name in wanted:
        SECTIONS[name]()
    note(f"bench: done in {time.perf_counter() - start:.1f} s")
    return 0


sys.exit(main(sys.argv[1:]))
