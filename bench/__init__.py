"""Benchmarks of kvmslots: ``python -m bench`` (from the repository root).

Every measurement is printed as one JSON line with its median, p95, the
median of a baseline measured in the same run, and their ratio, so results
from different machines can be compared by ratio.  No test asserts on these.
"""
