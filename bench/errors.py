"""Errors the bench reports to its user.

Hierarchy::

    BenchError               anything the CLI prints as "bench: error: ..." (no traceback)
    ├── ScenarioError        a scenario file is wrong: names file, field path, expected value (exit 2)
    ├── UsageError           a command-line value is wrong (exit 2)
    ├── ServiceError         a broker or server cannot be reached or started (exit 1)
    ├── RunFailed            the run finished but failed its checks, e.g. ledger (exit 1)
    └── Inconclusive         a gate could not judge: too little data, or the wrong code ran (exit 3)

Errors from pipeline, simulators and libraries are mapped to these in the runner.
"""

from __future__ import annotations


class BenchError(Exception):
    """Base of everything the CLI reports without a traceback."""

    exit_code = 1


class ScenarioError(BenchError):
    """A scenario file is invalid."""

    exit_code = 2


class UsageError(BenchError):
    """A command-line value is invalid."""

    exit_code = 2


class ServiceError(BenchError):
    """A broker or server could not be reached or started."""


class RunFailed(BenchError):
    """The run completed but did not pass its checks."""


class Inconclusive(BenchError):
    """A gate or comparison could not reach a verdict (too few replicates, unjudgeable metrics, or the two
    sides turned out not to be the code they claim): neither passed nor failed (exit 3)."""

    exit_code = 3
