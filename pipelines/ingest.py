"""Training ingest: a recipe's data sources as Ray Datasets, and each worker's mixed batches.

Driver side (passed to a Ray Train `TorchTrainer(datasets=...)`, which gives every
worker its `streaming_split` of each):

    data = build_sources(recipe.data, s3)          # {name: Dataset}, weights, tasks, counter

Worker side:

    mixer = worker_mixer(data.plan, {n: ray.train.get_dataset_shard(n) for n in data.plan},
                         batch_size=16, mode="single_task", seed=0)
    for batch in mixer: batch = collate(batch) ...

Nothing is materialised: each source streams shard by shard from S3 for every epoch.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.decode import skip_counter
from pipelines.mix import MixSource, TaskMixer, effective_weights
from pipelines.read import configure_data_context, source_dataset
from pipelines.shards import read_manifest
from unilip.config import DataConfig
from unilip.s3 import S3Access


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


def build_sources(cfg: DataConfig, s3: S3Access, counter_name: str | None = None) -> Sources:
    """One decoded, streaming Dataset per source, with its effective sampling weight."""
    configure_data_context()  # deterministic order under a seed
    if not cfg.sources:
        raise ValueError("the recipe lists no data sources")
    manifests = {s.name: read_manifest(s.uri, s3) for s in cfg.sources}
    for s in cfg.sources:
        if manifests[s.name].task != s.task:
            raise ValueError(f"source {s.name!r} is declared {s.task} but {s.uri} holds {manifests[s.name].task} shards")
    weights = effective_weights(cfg.sources, {n: m.samples for n, m in manifests.items()})
    counter = skip_counter(counter_name)
    datasets = {s.name: source_dataset(s.uri, s.task, s3, cfg.resolution, counter) for s in cfg.sources}
    plan = {s.name: SourcePlan(s.task, weights[s.name], manifests[s.name].samples) for s in cfg.sources}
    return Sources(datasets, plan, counter)


def worker_mixer(plan: dict[str, SourcePlan], iterators: dict, batch_size: int, mode: str, seed: int,
                 read_batch_size: int = 32, prefetch_batches: int = 2) -> TaskMixer:  # fmt: skip
    """A TaskMixer over this worker's split iterators (DataIterator per source)."""

    def epochs(it):
        return lambda: iter(it.iter_batches(batch_size=read_batch_size, batch_format="numpy", prefetch_batches=prefetch_batches))

    sources = [MixSource(name, p.task, p.weight, epochs(iterators[name])) for name, p in plan.items()]
    return TaskMixer(sources, batch_size, mode, seed)
