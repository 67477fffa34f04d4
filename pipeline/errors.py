"""Errors raised by the pipeline.

Hierarchy::

    PipelineError            anything the pipeline reports to its user
    ├── ConfigError          a configuration file or value is wrong (names file, field, expected)
    ├── SourceError          the source cannot connect or subscribe (names the broker)
    └── SinkError            a sink cannot write (names the path or URL)

Low-level exceptions (paho, pyarrow, OS errors) are mapped to these at the
boundary so that a user sees what to fix, not a traceback.
"""

from __future__ import annotations


class PipelineError(Exception):
    """Base of every error the pipeline reports to its user."""


class ConfigError(PipelineError):
    """A configuration file or value is wrong."""


class SourceError(PipelineError):
    """A source cannot connect, authenticate or subscribe."""


class SinkError(PipelineError):
    """A sink cannot write its output."""
