"""Errors of the simulators.

Hierarchy::

    SimulatorError          a fake server or publisher cannot do its job
    └── BrokerStartError    the embedded broker did not start (says why)
"""

from __future__ import annotations


class SimulatorError(Exception):
    """A fake server or publisher cannot do its job."""


class BrokerStartError(SimulatorError):
    """The embedded broker did not start."""
