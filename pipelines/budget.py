"""The run's ledger of bad data, and its budget.

Every read and decode task reports what it could not use to one `SkipCounter` actor per
run: bad samples by reason (from `SampleDecoder`), each shard that ended early with the
samples it lost and its error (from the read tasks), storage retries, and access denied.
The trainer logs the counts and asks for a `verdict` at every step. The run stops (after a
checkpoint, so that fixing the cause and re-running resumes with nothing lost) when a
source, in one epoch:

- skipped more than `data.max_skip_fraction` of its samples (bad samples, and the unread
  rest of unreadable or truncated shards), or
- met `data.max_unreadable_shards` unreadable shards in a row (an outage past the read
  retries, a deleted prefix), or
- was denied access: never bad data, and never counted as such.

A bad sample within the budget is dropped and counted, as before.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from unilip.config import ConfigError, DataConfig
from unilip.errors import UserError

SHARD_REASONS = ("unreadable_shard", "truncated_tar")  # counted per shard; the samples lost come with the report
FIRST_ERRORS = 3  # per source, quoted in the stop message


class DataStopped(UserError):
    """The run stopped on its data (over the budget, or access denied), after a checkpoint."""


@dataclass(frozen=True)
class Budget:
    max_skip_fraction: float
    max_unreadable_shards: int

    @classmethod
    def of(cls, cfg: DataConfig) -> Budget:
        if not 0 <= cfg.max_skip_fraction <= 1:
            raise ConfigError(f"data.max_skip_fraction must be in [0, 1], got {cfg.max_skip_fraction}")
        if cfg.max_unreadable_shards < 1:
            raise ConfigError(f"data.max_unreadable_shards must be >= 1, got {cfg.max_unreadable_shards}")
        return cls(cfg.max_skip_fraction, cfg.max_unreadable_shards)


@dataclass
class EpochLedger:
    skipped: int = 0  # samples: bad ones, and the unread rest of shards that ended early
    unreadable_in_a_row: int = 0
    reasons: Counter = field(default_factory=Counter)


class DataLedger:
    """Bad data by source and epoch, judged against the budget (a plain class: the actor's state)."""

    def __init__(self):
        self.counts: Counter = Counter()  # by reason, all sources: what the trainer logs
        self.epochs: dict[tuple[str, int], EpochLedger] = {}
        self.errors: dict[str, list[str]] = {}
        self.denied: str | None = None
        self.budget: Budget | None = None
        self.sizes: dict[str, int] = {}

    def configure(self, budget: Budget, sizes: dict[str, int]) -> None:
        """The budget and each source's samples per epoch (from its manifest)."""
        self.budget, self.sizes = budget, dict(sizes)

    def _epoch(self, source: str, epoch: int) -> EpochLedger:
        return self.epochs.setdefault((source, int(epoch)), EpochLedger())

    def add(self, counts: dict, source: str | None = None, epoch: int | None = None) -> None:
        """Counts by reason: bad samples of `source` in `epoch` (decode tasks), or other
        counts that are not samples (`storage_retries`)."""
        self.counts.update(counts)
        if source is None:
            return
        ledger = self._epoch(source, epoch)
        for reason, n in counts.items():
            if reason not in SHARD_REASONS:
                ledger.skipped += n
                ledger.reasons[reason] += n

    def shard(self, source: str, epoch: int, url: str, reason: str | None, lost: int = 0, error: str = "") -> None:
        """A shard of `source` ended: whole (`reason` None) or early, losing `lost` samples."""
        ledger = self._epoch(source, epoch)
        if reason is None:
            ledger.unreadable_in_a_row = 0
            return
        ledger.skipped += lost
        ledger.reasons[reason] += 1
        ledger.unreadable_in_a_row += reason == "unreadable_shard"
        first = self.errors.setdefault(source, [])
        if len(first) < FIRST_ERRORS:
            first.append(f"{url}: {error or reason}")

    def deny(self, source: str, message: str) -> None:
        self.denied = self.denied or f"data source {source!r}: access denied: {message}"

    def get(self) -> dict:
        return dict(self.counts)

    def verdict(self) -> str | None:
        """None while the run may go on; otherwise why it must stop, naming the source, the
        counts by reason and the first errors."""
        if self.denied:
            return f"{self.denied.rstrip('.')}. Access is never bad data: grant it (or fix the credentials) and run the same command again to resume"
        if self.budget is None:
            return None
        for (source, epoch), ledger in sorted(self.epochs.items()):
            size = self.sizes.get(source, 0)
            why = None
            if ledger.skipped > self.budget.max_skip_fraction * size:
                why = (
                    f"{ledger.skipped} of its {size} samples skipped in epoch {epoch}, "
                    f"over data.max_skip_fraction={self.budget.max_skip_fraction:g}"
                )
            elif ledger.unreadable_in_a_row >= self.budget.max_unreadable_shards:
                why = (
                    f"{ledger.unreadable_in_a_row} unreadable shards in a row in epoch {epoch} "
                    f"(data.max_unreadable_shards={self.budget.max_unreadable_shards})"
                )
            if why:
                reasons = ", ".join(f"{r}: {n}" for r, n in sorted(ledger.reasons.items()))
                errors = "; ".join(self.errors.get(source, [])) or "none recorded"
                return (
                    f"data source {source!r} is over its bad-data budget: {why}. Skipped by reason: {reasons}. "
                    f"First errors: {errors}. Fix the data (or raise the budget) and run the same command again to resume"
                )
        return None


def skip_counter(name: str | None = None):
    """The run's `DataLedger` as a Ray actor (get_if_exists by name).

    It lives on the creating driver's node (the head for a job), so losing a worker node
    does not take it, and training that resumes on a replacement node can still report
    to it; should its node go anyway, Ray restarts it (the counts then start again)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    options = {"name": name, "get_if_exists": True} if name else {}
    actor = ray.remote(num_cpus=0)(DataLedger)
    return actor.options(scheduling_strategy=here, max_restarts=-1, max_task_retries=-1, **options).remote()
