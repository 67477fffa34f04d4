"""``bench gate`` and ``bench compare``: regression verdicts from paired replicates."""
