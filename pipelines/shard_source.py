"""A Ray Data datasource for webdataset shards that survives bad shards and flaky storage.

Each read task streams its shards (S3 or local, through the project's S3 access point)
with bounded memory: 8 MB range reads, tar parsed as a stream, samples grouped by key.
Raw bytes only: decoding happens later, in `map_batches`.

Failure handling, per shard:
- a transient storage error (connection refused, timeout, 5xx) is retried by reopening
  the object at the current offset with exponential backoff, so no sample is lost;
- a shard that stays unreadable (a missing object after a few tries), or a tar that is truncated or corrupt, ends that
  shard: the samples read so far are kept and one row with `skip` = "unreadable_shard"
  or "truncated_tar" reports the rest.

Rows have a fixed schema per task: `key`, `url`, `index` (position in the shard),
`text` (raw bytes), `image` (the
generation image, or the edit target `output.jpg`), `source` (edit input, editing
only) and `skip` (empty, or the reason a row must be dropped).
"""

from __future__ import annotations

import io
import tarfile
import time

from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
READ_BLOCK_BYTES = 8 * 1024 * 1024


class ResilientReader(io.RawIOBase):
    """Sequential reads of one object; on a storage error, reopen at the offset and retry."""

    def __init__(self, open_file, name: str, attempts: int = 8, base_delay: float = 0.5, max_delay: float = 8.0,
                 missing_attempts: int = 4):  # fmt: skip
        self._open, self.name = open_file, name
        self.attempts, self.base_delay, self.max_delay = attempts, base_delay, max_delay
        self.missing_attempts = min(missing_attempts, attempts)
        self._file, self._pos = None, 0
        self.retries = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        delay = self.base_delay
        for attempt in range(self.attempts):
            try:
                if self._file is None:
                    self._file = self._open()
                    self._file.seek(self._pos)
                data = self._file.read(len(buffer))
                buffer[: len(data)] = data
                self._pos += len(data)
                return len(data)
            except PermissionError:
                raise  # permanent: retrying cannot help
            except OSError as e:
                # A shard the manifest lists but the store does not show (yet) is given a
                # few tries (a store coming back from an outage, replication lag), not all.
                self._file = None
                limit = self.missing_attempts if isinstance(e, FileNotFoundError) else self.attempts
                if attempt >= limit - 1:
                    raise
                self.retries += 1
                time.sleep(delay)
                delay = min(delay * 2, self.max_delay)
        return 0

    def close(self) -> None:
        self._file = None
        super().close()


def split_member(name: str) -> tuple[str, str]:
    """webdataset naming: `dir/key.ext.more` -> (`dir/key`, `ext.more`)."""
    head, _, base = name.rpartition("/")
    key, _, ext = base.partition(".")
    return (f"{head}/{key}" if head else key), ext.lower()


def iter_samples(stream, url: str):
    """Yield (key, {ext: bytes}) per sample, then ("", reason) if the tar breaks off."""
    key, members = None, {}
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                k, ext = split_member(info.name)
                if k != key and key is not None:
                    yield key, members
                    members = {}
                key = k
                members[ext] = tar.extractfile(info).read()
    except (tarfile.TarError, EOFError, OSError) as e:
        # The sample being read may be cut off: it goes with the unreadable rest of the shard.
        yield "", "unreadable_shard" if isinstance(e, OSError) else "truncated_tar"
        return
    if key is not None:
        yield key, members


def sample_row(key: str, url: str, index: int, members: dict[str, bytes], task: str) -> dict:
    row = {"key": key, "url": url, "index": index, "text": members.get("txt"), "skip": ""}
    if task == "editing":
        row["image"], row["source"] = members.get("output.jpg"), members.get("input.jpg")
    else:
        row["image"] = next((members[e] for e in IMAGE_EXTS if e in members), None)
    return row


def error_row(url: str, reason: str, task: str) -> dict:
    row = {"key": "", "url": url, "index": -1, "text": None, "image": None, "skip": reason}
    if task == "editing":
        row["source"] = None
    return row


def read_shard(fs, path: str, url: str, task: str, attempts: int = 8, stats: dict | None = None, done=()):
    """Rows of one shard (see the module doc); never raises for storage or tar errors.

    `index` is the sample's position in the shard; samples whose index is in `done`
    (consumed before a resume) are passed over. `stats["storage_retries"]` counts the
    reads that were retried after a storage error."""
    reader = ResilientReader(lambda: fs.open_input_file(path), url, attempts=attempts)
    try:
        stream = io.BufferedReader(reader, buffer_size=READ_BLOCK_BYTES)
        for index, (key, members) in enumerate(iter_samples(stream, url)):
            if not key:
                yield error_row(url, members, task)
            elif index not in done:
                yield sample_row(key, url, index, members, task)
    except OSError:  # could not even open it
        yield error_row(url, "unreadable_shard", task)
    finally:
        if stats is not None and reader.retries:
            stats["storage_retries"] = stats.get("storage_retries", 0) + reader.retries
        reader.close()


def _schema(task: str):
    import pyarrow as pa

    fields = [("key", pa.string()), ("url", pa.string()), ("index", pa.int32()), ("text", pa.binary()),
              ("skip", pa.string()), ("image", pa.binary())]  # fmt: skip
    if task == "editing":
        fields.append(("source", pa.binary()))
    return pa.schema(fields)


class ShardDatasource(Datasource):
    """Ray Data read tasks over a list of shard URIs (one task per contiguous group of shards).

    `done` ({url: Intervals}) holds samples consumed before a resume: they are passed over."""

    def __init__(self, uris: list[str], task: str, s3, rows_per_block: int = 16, attempts: int = 8, counter=None,
                 done: dict | None = None):  # fmt: skip
        if task not in ("generation", "editing"):
            raise ValueError(f"task must be 'generation' or 'editing', got {task!r}")
        self.uris, self.task, self.s3 = list(uris), task, s3
        self.rows_per_block, self.attempts, self.counter = rows_per_block, attempts, counter
        self.done = done or {}

    def estimate_inmemory_data_size(self):
        return None

    def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
        n = max(1, min(parallelism if parallelism > 0 else len(self.uris), len(self.uris)))
        bounds = [len(self.uris) * i // n for i in range(n + 1)]
        groups = [self.uris[a:b] for a, b in zip(bounds, bounds[1:])]
        meta = lambda g: BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=tuple(g))  # noqa: E731
        return [ReadTask(self._reader(g), meta(g), schema=_schema(self.task)) for g in groups]

    def _reader(self, uris: list[str]):
        s3, task, rows_per_block, attempts, counter = self.s3, self.task, self.rows_per_block, self.attempts, self.counter
        done = {u: self.done[u] for u in uris if u in self.done}

        def read():
            import pyarrow as pa

            schema = _schema(task)
            rows: list[dict] = []
            for uri in uris:
                fs, path = s3.resolve(uri)
                stats: dict = {}
                for row in read_shard(fs, path, uri, task, attempts, stats, done.get(uri, ())):
                    rows.append(row)
                    if len(rows) >= rows_per_block:
                        yield pa.Table.from_pylist(rows, schema=schema)
                        rows = []
                if stats and counter is not None:
                    counter.add.remote(stats)
            if rows:
                yield pa.Table.from_pylist(rows, schema=schema)

        return read
