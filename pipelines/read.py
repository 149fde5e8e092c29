"""Reading webdataset sources with Ray Data, from S3 or a local directory.

    ds = source_dataset("s3://bucket/blip3o/pretrain-long", "generation", s3, resolution=448)

The shard list comes from the source's manifest.json. Read tasks stream raw bytes
(`ShardDatasource`, no decoding); `map_batches` decodes (`SampleDecoder`), drops bad
samples and counts them. Nothing is written to local disk.
"""

from __future__ import annotations

from pipelines.shards import join, read_manifest
from unilip.s3 import S3Access



def configure_data_context(object_store_budget: int | None = None, preserve_order: bool = True) -> None:
    """Ray Data settings for ingest: a fixed order (a seed fixes the sample order) and a
    cap on the bytes in flight (None: Ray Data's own budget, a share of the object store)."""
    import ray.data

    options = ray.data.DataContext.get_current().execution_options
    if object_store_budget is not None:
        options.resource_limits = options.resource_limits.copy(object_store_memory=object_store_budget)
    options.preserve_order = preserve_order


def shard_uris(uri: str, s3: S3Access) -> list[str]:
    """The shards of a source, in manifest order."""
    return [join(uri, shard.path) for shard in read_manifest(uri, s3).shards]


def raw_dataset(uri: str, task: str, s3: S3Access, counter=None):
    """Raw rows (key, url, text, image[, source], skip) that survive bad shards and storage faults."""
    import ray.data

    from pipelines.shard_source import ShardDatasource

    uris = shard_uris(uri, s3)
    return ray.data.read_datasource(ShardDatasource(uris, task, s3, counter=counter), override_num_blocks=len(uris))


def source_dataset(uri: str, task: str, s3: S3Access, resolution: int, counter=None,
                   batch_size: int = 32, concurrency: int | None = None):  # fmt: skip
    """Decoded rows (key, prompt, image[, source]) of one source; bad samples dropped and counted
    by reason in `counter` (a SkipCounter), which also counts `storage_retries`."""
    from pipelines.decode import SampleDecoder

    return raw_dataset(uri, task, s3, counter).map_batches(
        SampleDecoder(task, resolution, counter), batch_size=batch_size, batch_format="numpy", concurrency=concurrency
    )
