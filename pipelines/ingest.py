"""Training ingest: a recipe's data sources as Ray Datasets, and each worker's mixed batches.

Driver side (`TorchTrainer(datasets=...)` gives every worker its `streaming_split` of each):

    data = build_sources(recipe.data, s3)          # {name: Dataset}, weights, tasks, counter

For a resumable run, `dataset_factories` gives two datasets per source, built afresh each
time Ray Train (re)starts the workers: `NAME` (whole epochs) and `NAME.rest` (what the
latest checkpoint's epoch has not consumed yet; see `pipelines.position`).

Worker side:

    mixer = worker_mixer(specs, {n: get_dataset_shard(n) for n in specs}, batch_size=16, mode="single_task",
                         seed=0, rank=rank, world=world, accumulation=1,
                         rest={n: get_dataset_shard(n + ".rest") for n in specs},
                         state=mixer_state_from_checkpoint, epochs=position.epochs)
    for batch in mixer: batch = collate(batch) ...

Nothing is materialised: each source streams shard by shard from S3 for every epoch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pipelines.budget import skip_counter
from pipelines.mix import MixSource, TaskMixer, effective_weights
from pipelines.order import Order, keyed_rng, manifest_digest
from pipelines.position import Position
from pipelines.read import configure_data_context, source_dataset
from pipelines.shards import join, read_manifest
from unilip.config import ConfigError, DataConfig
from unilip.errors import UserError
from unilip.s3 import S3Access

REST = ".rest"


@dataclass
class SourceSpec:
    task: str
    weight: float
    samples: int
    shards: list[list]  # [url, samples] per shard, in manifest order
    digest: str  # of the manifest, as a resume checks it (`pipelines.order.manifest_digest`)


@dataclass
class SourceDatasets:
    datasets: dict  # name -> ray.data.Dataset of decoded rows
    specs: dict[str, SourceSpec]
    counter: object  # SkipCounter actor: bad samples by reason

    def ratios(self) -> dict[str, float]:
        """Target share of samples per task."""
        total = sum(p.weight for p in self.specs.values())
        out: dict[str, float] = {}
        for p in self.specs.values():
            out[p.task] = out.get(p.task, 0.0) + p.weight / total
        return out


def source_specs(cfg: DataConfig, s3: S3Access) -> dict[str, SourceSpec]:
    """Each source's task, effective sampling weight, size and shards, from the manifests."""
    if not cfg.sources:
        raise ConfigError("the recipe lists no data sources")
    manifests = {s.name: read_manifest(s.uri, s3) for s in cfg.sources}
    for s in cfg.sources:
        if manifests[s.name].task != s.task:
            raise UserError(f"source {s.name!r} is declared {s.task} but {s.uri} holds {manifests[s.name].task} shards")
    weights = effective_weights(cfg.sources, {n: m.samples for n, m in manifests.items()})
    specs = {}
    for s in cfg.sources:
        shards = [[join(s.uri, sh.path), sh.samples] for sh in manifests[s.name].shards]
        specs[s.name] = SourceSpec(s.task, weights[s.name], manifests[s.name].samples, shards, manifest_digest(shards))
    return specs


def layout(specs: dict[str, SourceSpec]) -> dict[str, list[tuple[str, int]]]:
    """The sources' shards, as `Position` lays out its record."""
    return {name: [(u, n) for u, n in p.shards] for name, p in specs.items()}


def fingerprint(cfg: DataConfig, specs: dict[str, SourceSpec]) -> dict:
    """What a checkpoint's data position depends on: the manifests, and how they are ordered."""
    return {
        "order": {
            "seed": cfg.seed,
            "shuffle": cfg.shuffle,
            "shard_interleave": cfg.shard_interleave,
            "shuffle_buffer": cfg.shuffle_buffer,
        },
        "sources": {n: {"shards": len(p.shards), "samples": p.samples, "manifest": p.digest} for n, p in specs.items()},
    }


def check_resume(saved: dict | None, current: dict) -> list[str]:
    """Compare a checkpoint's data fingerprint with the recipe's now: an error if the
    sources or their manifests changed (the saved position names their samples), the
    warnings to print if only the order settings did (each sample still comes once)."""
    if not saved:
        return []
    before, now = saved["sources"], current["sources"]
    if set(before) != set(now):
        raise UserError(
            f"the checkpoint's sources ({', '.join(sorted(before))}) are not the recipe's "
            f"({', '.join(sorted(now))}): resume with the same sources, or start a new run (--run-name)"
        )
    for name in sorted(now):
        if before[name]["manifest"] != now[name]["manifest"]:
            raise UserError(
                f"source {name!r} changed since the checkpoint ({before[name]['shards']} shards, "
                f"{before[name]['samples']} samples then; {now[name]['shards']} shards, {now[name]['samples']} "
                f"samples now): the saved data position would not match it; resume with the data as it was, "
                f"or start a new run (--run-name)"
            )
    changed = [f"{k} {saved['order'][k]} -> {v}" for k, v in current["order"].items() if saved["order"].get(k) != v]
    if changed:
        return [
            f"the data order changed since the checkpoint ({', '.join(changed)}): every sample of the epoch "
            f"still comes once, in another order than the run's"
        ]
    return []


def build_sources(cfg: DataConfig, s3: S3Access, counter_name: str | None = None) -> SourceDatasets:
    """One decoded, streaming Dataset per source, with its effective sampling weight."""
    configure_data_context(cfg.inflight_mb)  # bounded memory; a fixed order under a seed
    specs = source_specs(cfg, s3)
    counter = skip_counter(counter_name)
    datasets = {s.name: _dataset(cfg, s3, s, counter) for s in cfg.sources}
    return SourceDatasets(datasets, specs, counter)


def dataset_factories(
    cfg: DataConfig, s3: S3Access, counter, position: Callable[[], Position | None]
) -> dict[str, Callable]:
    """Ray Train dataset callables: NAME and NAME.rest per source. `position()` returns the
    data position of the checkpoint the workers will resume from (None for a new run):
    NAME.rest is the rest of its epoch, NAME the epochs after it."""

    def whole(src):
        def build():
            p = position()
            return _dataset(cfg, s3, src, counter, first_epoch=p.epochs[src.name] + 1 if p else 0)

        return build

    def rest(src):
        def build():
            p = position()
            return _dataset(cfg, s3, src, counter, p.done(src.name) if p else None, p.epochs[src.name] if p else 0)

        return build

    out = {}
    for src in cfg.sources:
        out[src.name], out[src.name + REST] = whole(src), rest(src)
    return out


def _dataset(cfg: DataConfig, s3: S3Access, src, counter, done: dict | None = None, first_epoch: int = 0):
    configure_data_context(cfg.inflight_mb)  # runs where Ray Train builds the datasets
    return source_dataset(
        src.uri,
        src.task,
        s3,
        cfg.resolution,
        counter,
        done=done,
        preprocess=cfg.preprocess,
        order=Order.of(cfg),
        source=src.name,
        first_epoch=first_epoch,
    )


def worker_mixer(
    specs: dict[str, SourceSpec],
    iterators: dict,
    batch_size: int,
    mode: str,
    seed: int,
    rest: dict | None = None,
    state: dict | None = None,
    epochs: dict[str, int] | None = None,
    rank: int = 0,
    world: int = 1,
    accumulation: int = 1,
    local_shuffle: int = 0,
    prefetch_batches: int = 2,
    pin_memory: bool = False,
    whole_blocks: bool = True,
) -> TaskMixer:
    """This worker's TaskMixer over its split iterators (DataIterator per source). With
    `rest` and `state` (a resume), each source first finishes its interrupted epoch (its
    number in `epochs`) from `rest`. `local_shuffle` > 0: Ray Data's buffer of that many
    decoded rows per source on this worker, reseeded per epoch (`data.worker_shuffle_buffer`).

    Blocks arrive whole, as the arrays Ray Data holds (`whole_blocks`; a local shuffle
    re-batches them to `batch_size`): the mixer copies each row once, into its micro batch
    (`pin_memory`: pinned, for a GPU). Each source is read `accumulation + 2` micro batches'
    rows ahead in a thread: more than any worker's lead over another in a source (at most
    one step's rows, `StepSchedule`), so the split's start-of-epoch barrier is met in the
    reading threads (see `pipelines.mix`). Memory: about that many rows per source per worker."""

    def epoch_factory(name):
        first = [rest[name]] if rest and state else []

        def next_epoch(epoch: int):
            it = first.pop() if first else iterators[name]
            shuffle = (
                dict(
                    local_shuffle_buffer_size=local_shuffle,
                    local_shuffle_seed=int(keyed_rng(seed, name, epoch, rank).integers(2**32)),
                )
                if local_shuffle
                else {}
            )
            size = None if whole_blocks and not local_shuffle else batch_size
            return iter(
                it.iter_batches(batch_size=size, batch_format="numpy", prefetch_batches=prefetch_batches, **shuffle)
            )

        return next_epoch

    sources = [
        MixSource(name, p.task, p.weight, epoch_factory(name), prefetch=(accumulation + 2) * batch_size)
        for name, p in specs.items()
    ]
    mixer = TaskMixer(sources, batch_size, mode, seed, rank, world, accumulation, epochs if state else None, pin_memory)
    if state:
        mixer.load_state(state)
    return mixer
