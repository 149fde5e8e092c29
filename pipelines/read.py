"""Reading webdataset shards with Ray Data, from S3 or a local directory.

The shard list comes from the source's manifest.json; bytes stay undecoded in the read
tasks (decoder=None), so decoding can run in `map_batches` where it scales.
"""

from __future__ import annotations

from pipelines.shards import join, read_manifest
from unilip.s3 import S3Access


def shard_uris(uri: str, s3: S3Access) -> list[str]:
    """The shards of a source, in manifest order."""
    return [join(uri, shard.path) for shard in read_manifest(uri, s3).shards]


def read_shards(uri: str, s3: S3Access):
    """A Ray Dataset of raw samples: `__key__` plus one bytes column per member extension."""
    import ray.data

    fs, _ = s3.resolve(uri)
    paths = [s3.resolve(u)[1] for u in shard_uris(uri, s3)]
    return ray.data.read_webdataset(paths, filesystem=fs, decoder=None)
