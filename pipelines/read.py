"""Reading webdataset sources with Ray Data, from S3 or a local directory.

    ds = source_dataset("s3://bucket/blip3o/pretrain-long", "generation", s3, resolution=448)

The shard list comes from the source's manifest.json. Read tasks stream raw bytes
(`ShardDatasource`, no decoding); `map_batches` decodes (`SampleDecoder`), drops bad
samples and counts them. Nothing is written to local disk.
"""

from __future__ import annotations

from pipelines.shards import join, read_manifest
from unilip.config import DataConfig
from unilip.s3 import S3Access


def configure_data_context(inflight_mb: int | None = DataConfig.inflight_mb, preserve_order: bool = True) -> None:
    """Ray Data settings for ingest: a fixed order (a seed fixes the sample order) and a
    cap on the object-store bytes in flight (None: Ray Data's own share of the store)."""
    import ray.data

    options = ray.data.DataContext.get_current().execution_options
    if inflight_mb is not None:
        options.resource_limits = options.resource_limits.copy(object_store_memory=inflight_mb * 2**20)
    options.preserve_order = preserve_order


def shard_uris(uri: str, s3: S3Access) -> list[str]:
    """The shards of a source, in manifest order."""
    return [join(uri, shard.path) for shard in read_manifest(uri, s3).shards]


def raw_dataset(uri: str, task: str, s3: S3Access, counter=None, done: dict | None = None):
    """Raw rows (key, url, index, text, image[, source], skip) that survive bad shards and
    storage faults. `done` ({url: Intervals}): samples already consumed this epoch, left out;
    shards consumed whole are not opened."""
    import ray.data

    from pipelines.shard_source import ShardDatasource

    done = done or {}
    shards = [(join(uri, s.path), s.samples) for s in read_manifest(uri, s3).shards]
    uris = [u for u, n in shards if not (u in done and done[u].covers(n))]
    source = ShardDatasource(uris, task, s3, counter=counter, done=done)
    return ray.data.read_datasource(source, override_num_blocks=max(1, len(uris)))


def source_dataset(uri: str, task: str, s3: S3Access, resolution: int, counter=None, batch_size: int = 32,
                   concurrency: int | None = None, done: dict | None = None, preprocess: str = "squash", seed: int = 0):  # fmt: skip
    """Decoded rows (key, url, index, prompt, image[, source]) of one source, framed by
    `preprocess` (random crops seeded by `seed`); bad samples dropped and counted by reason
    in `counter` (a SkipCounter), which also counts `storage_retries`. `done`: see `raw_dataset`."""
    from pipelines.decode import SampleDecoder

    return raw_dataset(uri, task, s3, counter, done).map_batches(
        SampleDecoder(task, resolution, counter, preprocess, seed), batch_size=batch_size, batch_format="numpy",
        concurrency=concurrency,
    )
