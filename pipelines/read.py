"""Reading webdataset sources with Ray Data, from S3 or a local directory.

    ds = source_dataset("s3://bucket/blip3o/pretrain-long", "generation", s3, resolution=448, order=Order(seed=0))

The shard list comes from the source's manifest.json. Read tasks stream raw bytes in
the epoch's shuffled order (`ShardDatasource`, `pipelines.order`; no decoding);
`map_batches` decodes (`SampleDecoder`), drops bad samples and counts them. Nothing is
written to local disk.
"""

from __future__ import annotations

from pipelines.order import Order
from pipelines.shards import join, read_manifest
from unilip.config import DataConfig
from unilip.s3 import S3Access

# Ray Data merges the tables a task yields into blocks of up to this size (128 MB by
# default): a read task interleaving 16 shards would hand over its whole output as one
# block, and its decoder one more, each past the in-flight budget on its own.
BLOCK_BYTES = 8 * 2**20


def configure_data_context(inflight_mb: int | None = DataConfig.inflight_mb, preserve_order: bool = True) -> None:
    """Ray Data settings for ingest: blocks in the order the read plan emits them (with
    the seed, the order of samples is fixed), blocks of at most BLOCK_BYTES, and a cap on
    the object-store bytes in flight (None: Ray Data's own share of the store)."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.target_max_block_size = BLOCK_BYTES
    options = context.execution_options
    if inflight_mb is not None:
        options.resource_limits = options.resource_limits.copy(object_store_memory=inflight_mb * 2**20)
    options.preserve_order = preserve_order


def shard_uris(uri: str, s3: S3Access) -> list[str]:
    """The shards of a source, in manifest order."""
    return [join(uri, shard.path) for shard in read_manifest(uri, s3).shards]


def raw_dataset(
    uri: str,
    task: str,
    s3: S3Access,
    counter=None,
    done: dict | None = None,
    order: Order = Order(),
    source: str | None = None,
    first_epoch: int = 0,
):
    """Raw rows (key, url, index, epoch, text, image[, source], skip) that survive bad
    shards and storage faults, in the order of `order` from `first_epoch` on (one epoch per
    execution; `source` names the source in the order's seed, default the uri). `done`
    ({url: Intervals}): samples already consumed in `first_epoch`, left out."""
    import ray.data

    from pipelines.shard_source import ShardDatasource

    shards = [(join(uri, s.path), s.samples) for s in read_manifest(uri, s3).shards]
    datasource = ShardDatasource(shards, task, s3, source or uri, order, first_epoch, counter=counter, done=done)
    return ray.data.read_datasource(datasource, override_num_blocks=max(1, len(datasource.groups(first_epoch))))


def source_dataset(
    uri: str,
    task: str,
    s3: S3Access,
    resolution: int,
    counter=None,
    batch_size: int = 32,
    concurrency: int | None = None,
    done: dict | None = None,
    preprocess: str = "squash",
    order: Order = Order(),
    source: str | None = None,
    first_epoch: int = 0,
):
    """Decoded rows (key, url, index, epoch, prompt, image[, source]) of one source, framed
    by `preprocess` (random crops seeded by `order.seed` and the epoch); bad samples
    dropped and counted by reason, source and epoch in `counter` (the run's ledger,
    `pipelines.budget`), which also hears of every shard's end and counts `storage_retries`. `done`, `order`, `source`, `first_epoch`: see `raw_dataset`."""
    from pipelines.decode import SampleDecoder

    return raw_dataset(uri, task, s3, counter, done, order, source, first_epoch).map_batches(
        SampleDecoder(task, resolution, counter, preprocess, order.seed, source or uri),
        batch_size=batch_size,
        batch_format="numpy",
        concurrency=concurrency,
    )
