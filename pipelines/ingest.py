"""Training ingest: a recipe's data sources as Ray Datasets, and each worker's mixed batches.

Driver side (`TorchTrainer(datasets=...)` gives every worker its `streaming_split` of each):

    data = build_sources(recipe.data, s3)          # {name: Dataset}, weights, tasks, counter

For a resumable run, `dataset_factories` gives two datasets per source, built afresh each
time Ray Train (re)starts the workers: `NAME` (whole epochs) and `NAME.rest` (what the
latest checkpoint's epoch has not consumed yet; see `pipelines.position`).

Worker side:

    mixer = worker_mixer(plan, {n: get_dataset_shard(n) for n in plan}, batch_size=16, mode="single_task",
                         seed=0, rank=rank, world=world, accumulation=1,
                         rest={n: get_dataset_shard(n + ".rest") for n in plan},
                         state=mixer_state_from_checkpoint, epochs=position.epochs)
    for batch in mixer: batch = collate(batch) ...

Nothing is materialised: each source streams shard by shard from S3 for every epoch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from pipelines.decode import skip_counter
from pipelines.mix import MixSource, TaskMixer, effective_weights
from pipelines.position import Position
from pipelines.read import configure_data_context, source_dataset
from pipelines.shards import read_manifest
from unilip.config import DataConfig
from unilip.s3 import S3Access

REST = ".rest"


@dataclass
class SourcePlan:
    task: str
    weight: float
    samples: int


@dataclass
class Sources:
    datasets: dict  # name -> ray.data.Dataset of decoded rows
    plan: dict[str, SourcePlan]
    counter: object  # SkipCounter actor: bad samples by reason

    def ratios(self) -> dict[str, float]:
        """Target share of samples per task."""
        total = sum(p.weight for p in self.plan.values())
        out: dict[str, float] = {}
        for p in self.plan.values():
            out[p.task] = out.get(p.task, 0.0) + p.weight / total
        return out


def plan_sources(cfg: DataConfig, s3: S3Access) -> dict[str, SourcePlan]:
    """Each source's task, effective sampling weight and size, from the manifests."""
    if not cfg.sources:
        raise ValueError("the recipe lists no data sources")
    manifests = {s.name: read_manifest(s.uri, s3) for s in cfg.sources}
    for s in cfg.sources:
        if manifests[s.name].task != s.task:
            raise ValueError(f"source {s.name!r} is declared {s.task} but {s.uri} holds {manifests[s.name].task} shards")
    weights = effective_weights(cfg.sources, {n: m.samples for n, m in manifests.items()})
    return {s.name: SourcePlan(s.task, weights[s.name], manifests[s.name].samples) for s in cfg.sources}


def build_sources(cfg: DataConfig, s3: S3Access, counter_name: str | None = None) -> Sources:
    """One decoded, streaming Dataset per source, with its effective sampling weight."""
    configure_data_context(cfg.inflight_mb)  # bounded memory; deterministic order under a seed
    plan = plan_sources(cfg, s3)
    counter = skip_counter(counter_name)
    datasets = {s.name: _dataset(cfg, s3, s, counter, None) for s in cfg.sources}
    return Sources(datasets, plan, counter)


def dataset_factories(cfg: DataConfig, s3: S3Access, counter, position: Callable[[], Position]) -> dict[str, Callable]:
    """Ray Train dataset callables: NAME and NAME.rest per source. `position()` returns the
    data position of the checkpoint the workers will resume from (empty for a new run)."""

    def whole(src):
        return lambda: _dataset(cfg, s3, src, counter, None)

    def rest(src):
        return lambda: _dataset(cfg, s3, src, counter, position().done.get(src.name, {}))

    out = {}
    for src in cfg.sources:
        out[src.name], out[src.name + REST] = whole(src), rest(src)
    return out


def _dataset(cfg: DataConfig, s3: S3Access, src, counter, done):
    configure_data_context(cfg.inflight_mb)  # runs where Ray Train builds the datasets
    return source_dataset(src.uri, src.task, s3, cfg.resolution, counter, done=done, preprocess=cfg.preprocess, seed=cfg.seed)


def worker_mixer(plan: dict[str, SourcePlan], iterators: dict, batch_size: int, mode: str, seed: int,
                 rank: int = 0, world: int = 1, accumulation: int = 1, rest: dict | None = None,
                 state: dict | None = None, epochs: dict[str, int] | None = None, prefetch_batches: int = 2) -> TaskMixer:  # fmt: skip
    """This worker's TaskMixer over its split iterators (DataIterator per source). With
    `rest` and `state` (a resume), each source first finishes its interrupted epoch (its
    number in `epochs`) from `rest`.

    Each source is read `accumulation + 2` micro batches ahead in a thread: more than any
    worker's lead over another in a source (at most one step's rows, `StepPlan`), so the
    split's start-of-epoch barrier is met in the reading threads (see `pipelines.mix`).
    Memory: that many decoded micro batches per source per worker."""

    def epoch_factory(name):
        first = [rest[name]] if rest and state else []

        def next_epoch():
            it = first.pop() if first else iterators[name]
            return iter(it.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=prefetch_batches))

        return next_epoch

    sources = [MixSource(name, p.task, p.weight, epoch_factory(name), prefetch=accumulation + 2) for name, p in plan.items()]
    mixer = TaskMixer(sources, batch_size, mode, seed, rank, world, accumulation, epochs if state else None)
    if state:
        mixer.load_state(state)
    return mixer
