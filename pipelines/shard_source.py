"""A Ray Data datasource for webdataset shards that survives bad shards and flaky storage.

Each read task streams its shards (S3 or local, through the project's S3 access point)
with bounded memory: 4 MB range reads, tar parsed as a stream, samples grouped by key.
Raw bytes only: decoding happens later, in `map_batches`.

Failure handling, per shard:
- a transient storage error (connection refused, timeout, 5xx) is retried by reopening
  the object at the current offset with exponential backoff, so no sample is lost;
- a shard that stays unreadable (a missing object after a few tries), or a tar that is truncated or corrupt, ends that
  shard: the samples read so far are kept and one row with `skip` = "unreadable_shard"
  or "truncated_tar" reports the rest;
- access denied (a refused or unknown key, a policy that excludes the object) is not bad
  data: after a few tries (the SDK may have refreshed its credentials meanwhile) the read
  task fails with `StorageAccessError`.
Each shard's end, whole or early with the samples it lost and its error, and any access
denied go to the run's ledger (`pipelines.budget`), which stops a run past its budget.

Rows have a fixed schema per task: `key`, `url`, `index` (position in the shard),
`epoch` (of the source, as the datasource read it), `text` (raw bytes), `image` (the
generation image, or the edit target `output.jpg`), `source` (edit input, editing
only) and `skip` (empty, or the reason a row must be dropped).
"""

from __future__ import annotations

import io
import tarfile
import time

from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata

from pipelines.order import Order, interleave_width, read_plan, shard_groups, shard_order
from unilip.errors import UserError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
READ_BLOCK_BYTES = 4 * 1024 * 1024  # per open shard; a read task opens up to data.shard_interleave


# How the AWS C++ SDK (pyarrow) names a refused request; boto3's codes are the CamelCase forms.
ACCESS_ERRORS = (
    "ACCESS_DENIED",
    "INVALID_ACCESS_KEY_ID",
    "SIGNATURE_DOES_NOT_MATCH",
    "EXPIRED_TOKEN",
    "INVALID_CLIENT_TOKEN_ID",
    "UNRECOGNIZED_CLIENT",
    "HTTP status 401",
    "HTTP status 403",
)


class StorageAccessError(UserError):
    """A read refused by the store: credentials or permissions, never bad data."""


def access_denied(e: OSError) -> bool:
    return isinstance(e, PermissionError) or any(code in str(e) for code in ACCESS_ERRORS)


class ResilientReader(io.RawIOBase):
    """Sequential reads of one object; on a storage error, reopen at the offset and retry.
    `open_file(fresh)`: the object opened; `fresh` after a refused read, for an opener that
    then resolves the credentials anew."""

    def __init__(
        self,
        open_file,
        name: str,
        attempts: int = 8,
        base_delay: float = 0.5,
        max_delay: float = 8.0,
        missing_attempts: int = 4,
        access_attempts: int = 3,
    ):
        self._open, self.name = open_file, name
        self.attempts, self.base_delay, self.max_delay = attempts, base_delay, max_delay
        self.missing_attempts = min(missing_attempts, attempts)
        self.access_attempts = min(access_attempts, attempts)
        self._file, self._pos, self._fresh = None, 0, False
        self.retries, self.error = 0, ""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        delay = self.base_delay
        for attempt in range(self.attempts):
            try:
                if self._file is None:
                    self._file = self._open(self._fresh)
                    self._file.seek(self._pos)
                    self._fresh = False
                data = self._file.read(len(buffer))
                buffer[: len(data)] = data
                self._pos += len(data)
                return len(data)
            except OSError as e:
                # A shard the manifest lists but the store does not show (yet) is given a
                # few tries (a store coming back from an outage, replication lag), not all;
                # so is a refused read (credentials the SDK refreshes meanwhile).
                self._file, self.error = None, str(e)
                denied = self._fresh = access_denied(e)
                limit = (
                    self.access_attempts
                    if denied
                    else self.missing_attempts
                    if isinstance(e, FileNotFoundError)
                    else self.attempts
                )
                if attempt >= limit - 1:
                    if denied:
                        raise StorageAccessError(f"reading {self.name}: {e}") from e
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
    """Yield (key, {ext: bytes}) per sample, then ("", (reason, error)) if the tar breaks off."""
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
        yield "", ("unreadable_shard" if isinstance(e, OSError) else "truncated_tar", str(e) or type(e).__name__)
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


def read_shard(
    fs,
    path: str,
    url: str,
    task: str,
    attempts: int = 8,
    stats: dict | None = None,
    done=(),
    refresh=None,
):
    """Rows of one shard (see the module doc); never raises for storage or tar errors, only
    `StorageAccessError` for a refused read.

    `index` is the sample's position in the shard; samples whose index is in `done`
    (consumed before a resume) are passed over. `stats["storage_retries"]` counts the
    reads that were retried after a storage error; a shard that breaks off leaves its
    error and the samples it had read before in `stats["ended"]`. `refresh()`: a new
    filesystem, asked for after a refused read (its SDK fetches the keys anew: the ones
    cached may have been revoked before their announced expiry)."""
    current = [fs]

    def open_file(fresh: bool):
        if fresh and refresh is not None:
            current[0] = refresh()
        return current[0].open_input_file(path)

    reader = ResilientReader(open_file, url, attempts=attempts)
    try:
        stream = io.BufferedReader(reader, buffer_size=READ_BLOCK_BYTES)
        for index, (key, members) in enumerate(iter_samples(stream, url)):
            if not key:
                reason, error = members
                if stats is not None:
                    stats["ended"] = (error, index)
                yield error_row(url, reason, task)
            elif index not in done:
                yield sample_row(key, url, index, members, task)
    except OSError as e:  # could not even open it
        if stats is not None:
            stats["ended"] = (str(e), 0)
        yield error_row(url, "unreadable_shard", task)
    finally:
        if stats is not None and reader.retries:
            stats["storage_retries"] = stats.get("storage_retries", 0) + reader.retries
        reader.close()


def _schema(task: str):
    import pyarrow as pa

    fields = [
        ("key", pa.string()),
        ("url", pa.string()),
        ("index", pa.int32()),
        ("epoch", pa.int32()),
        ("text", pa.binary()),
        ("skip", pa.string()),
        ("image", pa.binary()),
    ]
    if task == "editing":
        fields.append(("source", pa.binary()))
    return pa.schema(fields)


class ShardDatasource(Datasource):
    """Ray Data read tasks over a source's shards in the epoch's order (`pipelines.order`):
    the shards permuted per epoch, each read task reading `order.interleave` of them
    interleaved, its samples emitted through a shuffle window of `order.window`.

    The epoch is `first_epoch` plus the times Ray has re-executed this dataset (one
    execution per epoch: streaming_split's coordinator re-runs it, as does iterating it
    again); every row carries it, and the trainer checks it against its own count.
    `done` ({url: Intervals}) holds samples consumed before a resume: they are passed
    over, the order of the rest unchanged; shards consumed whole are not opened.

    Memory per active read task: up to `order.interleave` open shards with a
    READ_BLOCK_BYTES buffer each, plus at most `order.window` raw (undecoded) samples."""

    def __init__(
        self,
        shards: list[tuple[str, int]],
        task: str,
        s3,
        source: str,
        order: Order = Order(),
        first_epoch: int = 0,
        rows_per_block: int = 16,
        attempts: int = 8,
        counter=None,
        done: dict | None = None,
    ):
        if task not in ("generation", "editing"):
            raise ValueError(f"task must be 'generation' or 'editing', got {task!r}")
        self.shards, self.task, self.s3, self.source = list(shards), task, s3, source
        self.order, self.first_epoch = order, first_epoch
        self.rows_per_block, self.attempts, self.counter = rows_per_block, attempts, counter
        self.done = done or {}

    def estimate_inmemory_data_size(self):
        return None

    def epoch(self, data_context) -> int:
        return self.first_epoch + (data_context._execution_idx if data_context is not None else 0)

    def groups(self, epoch: int) -> list[tuple[int, list[tuple[str, int]]]]:
        """The epoch's read tasks: (index, group of (url, samples)), leaving out groups
        consumed whole before a resume (the indices, which seed each group, stay put)."""
        o = self.order
        perm = shard_order(o.seed, self.source, epoch, len(self.shards), o.shuffle)
        groups = [
            [self.shards[i] for i in g] for g in shard_groups(perm, interleave_width(o.interleave, len(self.shards)))
        ]
        return [
            (k, g) for k, g in enumerate(groups) if not all(u in self.done and self.done[u].covers(n) for u, n in g)
        ]

    def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
        epoch = self.epoch(data_context)

        def meta(g):
            return BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=tuple(u for u, _ in g))

        return [ReadTask(self._reader(g, epoch, k), meta(g), schema=_schema(self.task)) for k, g in self.groups(epoch)]

    def _reader(self, group: list[tuple[str, int]], epoch: int, k: int):
        s3, task, rows_per_block, attempts, counter = (
            self.s3,
            self.task,
            self.rows_per_block,
            self.attempts,
            self.counter,
        )
        order, source = self.order, self.source
        done = {u: self.done[u] for u, _ in group if u in self.done}

        def read():
            import pyarrow as pa

            schema = _schema(task)
            shard_of, index_of = read_plan(
                order.seed, source, epoch, k, [n for _, n in group], order.window, order.shuffle
            )
            streams: list = [None] * len(group)
            waiting: list[dict[int, dict]] = [{} for _ in group]  # read, not yet emitted: at most a window
            ended = [False] * len(group)
            stats: dict = {}
            rows: list[dict] = []

            def report(what: str, *args):  # to the run's ledger, without waiting for it
                if counter is not None:
                    getattr(counter, what).remote(*args)

            def emit(row):
                row["epoch"] = epoch
                rows.append(row)

            def advance(j: int, i: int) -> dict | None:
                """Shard j front to back until its sample i; None if the shard ends first."""
                url, n = group[j]
                if streams[j] is None:
                    fs, path = s3.resolve(url)
                    fresh = lambda: s3.refreshed().resolve(url)[0]  # noqa: E731
                    streams[j] = read_shard(fs, path, url, task, attempts, stats, done.get(url, ()), fresh)
                for r in streams[j]:
                    if r["index"] < 0:  # the shard broke off: report it once; its rest is gone
                        emit(r)
                        error, read = stats.pop("ended", ("", 0))
                        report("shard", source, epoch, url, r["skip"], n - read, error)
                        break
                    if r["index"] == i:
                        if i == n - 1:
                            streams[j].close()  # the shard's last sample: let its buffers go
                            report("shard", source, epoch, url, None)
                        return r
                    waiting[j][r["index"]] = r
                ended[j] = True
                return None

            for j, i in zip(shard_of.tolist(), index_of.tolist()):
                if i in done.get(group[j][0], ()):
                    continue
                row = waiting[j].pop(i, None)
                if row is None and not ended[j]:
                    try:
                        row = advance(j, i)
                    except StorageAccessError as e:
                        report("deny", source, str(e))
                        raise
                if row is not None:
                    emit(row)
                if len(rows) >= rows_per_block:
                    yield pa.Table.from_pylist(rows, schema=schema)
                    rows = []
            for stream in streams:
                if stream is not None:
                    stream.close()  # reports its storage retries into `stats`
            if stats:
                report("add", stats)
            if rows:
                yield pa.Table.from_pylist(rows, schema=schema)

        return read
