"""The run harness: session, system under test, sources, faults, accounting; ``bench run``."""
