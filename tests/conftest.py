"""Shared configuration of the fast tests: the Hypothesis budgets of the parser fuzz tests.

Two profiles, chosen with the environment variable ``KVMSLOTS_FUZZ_PROFILE``:

``ci`` (the default)
    a fixed number of examples per fuzz test, derandomized: every run tries the
    same inputs, so CI is reproducible and fast.
``fuzz``
    a large random budget for a long hunt, e.g.
    ``KVMSLOTS_FUZZ_PROFILE=fuzz python3 -m pytest -q tests/test_fuzz.py``.

The chosen profile is registered again as ``kvmslots-fuzz``; only ``tests/test_fuzz.py``
uses it (``settings(settings.get_profile("kvmslots-fuzz"))``).  Nothing is loaded as
Hypothesis' default, so the other property tests keep their own settings.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis.errors import InvalidArgument

FUZZ_PROFILE_ENV = "KVMSLOTS_FUZZ_PROFILE"
FUZZ_PROFILE_DEFAULT = "ci"
FUZZ_SETTINGS_PROFILE = "kvmslots-fuzz"

# Generated inputs are deliberately big (5000-digit numbers, deep nesting): not a health problem.
_BIG_INPUTS_OK = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example]

settings.register_profile(
    "ci",
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=_BIG_INPUTS_OK,
    # no "explain" phase: it re-runs a failure many times to comment the report, which would
    # double the time of a failing run; a shrunk example is enough to reproduce it.
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
)
settings.register_profile(
    "fuzz", max_examples=20_000, deadline=None, derandomize=False, suppress_health_check=_BIG_INPUTS_OK
)

_selected = os.environ.get(FUZZ_PROFILE_ENV, FUZZ_PROFILE_DEFAULT)
try:
    settings.register_profile(FUZZ_SETTINGS_PROFILE, settings.get_profile(_selected))
except InvalidArgument:
    raise pytest.UsageError(f"{FUZZ_PROFILE_ENV}={_selected!r}: the fuzz profiles are 'ci' and 'fuzz'") from None


def pytest_report_header() -> str:
    return f"kvmslots fuzz profile: {_selected} ({FUZZ_PROFILE_ENV})"


# The PostgreSQL server and the per-test state location (SQLite or PostgreSQL) of the contract suite.
from pgserver import pg_server, pg_url, state_location  # noqa: E402,F401
