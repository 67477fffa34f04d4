"""results.json's ``forward`` part of a variant: the store-and-forward ledger, read back from the upstream and the
outbox file. Defined here with the results model's config (not its base class) so bench.results.model can import
it without a cycle."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ForwardResult(BaseModel):
    """Store-and-forward: sent = filtered + dropped + delivered + in_outbox + lost (lost = named + unexplained)."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    strategy: str
    """naive (delete before the upstream's answer) or outbox (delete after acknowledgement, retry, keys)."""
    sent: int
    """Readings handed to the pipeline (the generated stream, in process)."""
    filtered: int
    """Distinct seqs the filter rejected, read back from the outbox file's ``rejected`` table."""
    dropped: int
    """Distinct seqs the full outbox dropped by its overflow policy (``dropped`` table)."""
    delivered: int
    """Distinct seqs stored upstream."""
    duplicates: int
    """Seqs stored upstream more than once."""
    deduplicated: int
    """Records the upstream recognised by their idempotency key and did not store again (retries after a lost
    acknowledgement, or after a timeout)."""
    in_outbox: int
    """Seqs still in the outbox when the run ended (not delivered yet, not lost)."""
    lost: int
    """sent - filtered - dropped - delivered - in_outbox."""
    lost_by_fault: dict[str, int]
    """Lost seqs named by the upstream fault they were in flight during (500 answers by the upstream's own log;
    ``down`` by send time inside the outage); the rest are ``unexplained``."""
    unexplained: int
    """Lost seqs no fault explains. Fails the run, whatever the strategy."""
    expected_loss: bool
    """The strategy is the baseline whose losses under faults are the point (naive): named losses do not fail it.
    For outbox, any loss or duplicate fails the run."""
    out_of_order: int
    """Records stored upstream before an earlier seq of the same machine (per-machine order broken)."""
    requests: int
    """Requests the sender made."""
    retries: int
    """Requests that re-sent a batch after a failure (outbox only)."""
    failed_requests: dict[str, int]
    """Failed requests by kind, as the sender saw them: refused, http_5xx, no_answer."""
    acks_lost: int
    """Requests the upstream stored and then closed without answering (the lost_ack fault)."""
    lost_sample: list[int] = []
    """Up to 20 lost seqs."""
