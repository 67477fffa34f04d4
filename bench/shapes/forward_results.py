"""results.json's ``forward`` part of a variant: the store-and-forward ledger, read back from the upstream and the
outbox file. Its base comes from bench.results.base, so bench.results.model can import it without a cycle."""

from __future__ import annotations

from bench.results.base import ResultsModel


class ForwardResult(ResultsModel):
    """Store-and-forward: sent = filtered + dropped + delivered + in_outbox + lost (lost = named + unexplained).

    Fields added after schema 12 have defaults, so older results.json files still load."""

    strategy: str
    """naive (delete before the upstream's answer), retry (delete after acknowledgement, retry, no key), outbox
    (retry with idempotency keys); ``external`` for a pipeline run as a process (``forward.external``)."""
    external: bool = False
    """A pipeline run as its own process: its storage is not visible, so ``in_outbox`` is None and ``filtered``
    is judged by truth label."""
    sent: int
    """Readings handed to the pipeline (the generated stream, in process)."""
    filtered: int
    """Distinct seqs the filter rejected, read back from the outbox file's ``rejected`` table; external: seqs
    whose truth label a filter should refuse (a non-finite or missing number) that were not delivered."""
    dropped: int
    """Distinct seqs the outbox dropped by its overflow policy or a full disk (``dropped`` table)."""
    dropped_by_reason: dict[str, int] = {}
    """``outbox_full_drop_newest``, ``outbox_full_drop_oldest``, ``disk_full``."""
    delivered: int
    """Distinct seqs stored upstream."""
    passed_bad: int | None = None
    """External: delivered seqs whose truth label a filter should have refused."""
    duplicates: int
    """Seqs stored upstream more than once."""
    duplicates_by_fault: dict[str, int] = {}
    """Duplicates named by evidence: stored in a request whose acknowledgement was withheld (lost_ack) or
    answered in over half the timeout (slow), or stored before a kill and again after the restart (kill)."""
    unexplained_duplicates: int | None = None
    expected_duplicates: bool = False
    """A baseline whose named duplicates are its point (retry has no idempotency key): they do not fail the run."""
    deduplicated: int
    """Records the upstream recognised by their idempotency key and did not store again (retries after a lost
    acknowledgement, or after a timeout)."""
    in_outbox: int | None
    """Seqs still in the outbox when the run ended (not delivered yet, not lost); None for an external pipeline."""
    lost: int
    """sent - filtered - dropped - delivered - in_outbox."""
    lost_by_fault: dict[str, int]
    """Lost seqs named by the fault they were in flight during (500 answers by the upstream's own log; ``down``
    by send time inside the outage; ``kill``: handed to the process in the second before it was killed); the rest
    are ``unexplained``."""
    unexplained: int
    """Lost seqs no fault explains. Fails the run, whatever the strategy."""
    expected_loss: bool
    """The strategy is the baseline whose losses under faults are the point (naive): named losses do not fail it.
    For outbox, any loss or duplicate fails the run."""
    out_of_order: int
    """Records stored upstream before an earlier seq of the same machine (per-machine order broken)."""
    requests: int
    """Requests the sender made."""
    retries: int | None
    """Requests that re-sent a batch after a failure (retry and outbox); None for an external pipeline."""
    failed_requests: dict[str, int]
    """Failed requests by kind, as the sender saw them: refused, http_5xx, no_answer, delete_failed."""
    acks_lost: int
    """Requests the upstream stored and then closed without answering (the lost_ack fault)."""
    lost_sample: list[int] = []
    """Up to 20 lost seqs."""
    kills: int | None = None
    """External: times the process was SIGKILLed and started again (``kill`` faults)."""
    held_during_kill: int | None = None
    """External: readings due while the process was dead, held by the bench and written once it was back (not
    the pipeline's loss; their latency includes the wait)."""
    resent_after_kill: int | None = None
    """External: readings written before a kill but unread in the pipe after it (the pipeline never took them),
    written again to the restarted process."""
    not_written: int | None = None
    """External: readings the bench could not write because the process had exited (counted lost)."""
    exit_codes: list[int | None] = []
    """External: each run's exit code (negative: the signal that ended it; -9 for each kill)."""
    usage: dict[str, float] | None = None
    """External: its process tree's CPU seconds and peak RSS (MB) while it served."""
