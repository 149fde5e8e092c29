"""Task-balanced mixing of data sources across the training workers.

Each source is its own Ray Dataset; every worker gets its split of each (Ray Train's
`get_dataset_shard`, i.e. `streaming_split(n, equal=True)`). The sampling weight of a
source is its `proportion`, or else

    weight(source) = multiplier x source size (samples in its manifest)

so in generation stage 2 (generation x1 on 36M, editing x10 on 1.5M) about 2 in 3
samples are generation, and in stage 3 (editing x3) about 1 in 2.

`StepSchedule` decides, for every optimizer step, what each worker's micro batches hold. It
is computed identically on every worker (one seeded RNG, the same arithmetic), so no
worker needs to ask another. In `single_task` mode (the release's
DistributedTaskTypeBatchSampler) each micro batch is one task and the step mixes them:
- per step, each task gets floor(share x slots) micro batches, and one more for the
  tasks owed the most (credits), so every step is within one micro batch of the target
  and the running ratio stays within a micro batch of it;
- a task's micro batches go to the workers that have had the fewest of it, and inside a
  micro batch each source gets its share of rows by the same credit rule.
So every worker consumes every source at the same rate, within about a micro batch at
any time: the streaming splits, which hand out equal rows and start each epoch with a
barrier over all workers, stay in step. `lockstep` gives every worker the same task at
each micro step; `mixed` mixes all sources inside every micro batch.

Each source's rows reach the mixer through a prefetch thread that reads a few micro
batches' rows ahead and moves to the next epoch as soon as the split ends. The split's
epoch barrier then waits in those threads, never in the training loop: when one worker needs
the next epoch, every other worker is within the read-ahead of the end of its split, so
its thread reaches the barrier too, while its training loop runs on what it buffered.
Nothing waits at an epoch boundary while another worker waits in a collective.

Why not Ray Data's own mixing (Ray 2.60 has `Dataset.mix(weights=...)`): it interleaves
whole blocks into one stream and ends when the shortest or the longest source ends, so
a small source cannot cycle through its epochs while a large one runs (editing x10 in
stage 2), a worker's split of the mix cannot be one task per micro batch, and the
epoch of each source, which the exact resume needs, is no longer known. `union`
concatenates.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from unilip.config import ConfigError
from unilip.errors import UserError


class EmptyEpoch(UserError):
    """A source's epoch without a single sample: its shards unreadable or all bad (the run's
    ledger, `pipelines.budget`, says which)."""


@dataclass
class MixSource:
    name: str
    task: str  # generation | editing
    weight: float  # proportion, or multiplier x size
    batches: Callable[[int], Iterator[dict]]  # epoch -> that epoch's numpy batches from this source
    prefetch: int = 0  # rows read ahead in a thread (0: read in the caller)


def effective_weights(sources: list, sizes: dict[str, int]) -> dict[str, float]:
    """Each source's sampling weight: its `proportion`, or multiplier x size."""
    given = [s.proportion is not None for s in sources]
    if any(given) and not all(given):
        missing = [s.name for s in sources if s.proportion is None]
        raise ConfigError(f"give every source a proportion, or none: {', '.join(missing)} has none")
    weights = {s.name: s.proportion if s.proportion is not None else s.multiplier * sizes[s.name] for s in sources}
    if not weights or sum(weights.values()) <= 0 or min(weights.values()) < 0:
        raise ConfigError(f"sources need non-negative weights with a positive total, got {weights}")
    return weights


def apportion(shares: dict[str, float], n: int, credit: dict[str, float], rng: random.Random) -> dict[str, int]:
    """Split `n` among keys by `shares` (summing to 1): floor(share x n) each, then one more
    for the keys owed the most (`credit`, updated in place, plus a little seeded jitter)."""
    counts = {k: math.floor(shares[k] * n) for k in shares}
    for k in shares:
        credit[k] += shares[k] * n - counts[k]
    for k in sorted(shares, key=lambda k: credit[k] + rng.uniform(0, 0.25), reverse=True)[: n - sum(counts.values())]:
        counts[k] += 1
        credit[k] -= 1.0
    return counts


class StepSchedule:
    """The contents of every worker's micro batches, step by step (see the module doc).

    `next_step()` returns, per micro step and per rank, {source: rows}."""

    def __init__(
        self,
        sources: list[MixSource],
        micro_batch: int,
        world: int = 1,
        accumulation: int = 1,
        mode: str = "single_task",
        seed: int = 0,
    ):
        if mode not in ("single_task", "lockstep", "mixed"):
            raise ValueError(f"batch mode must be 'single_task', 'lockstep' or 'mixed', got {mode!r}")
        if micro_batch < 1 or world < 1 or accumulation < 1:
            raise ValueError(
                f"micro_batch, world and accumulation must be >= 1, got {micro_batch}, {world}, {accumulation}"
            )
        self.micro_batch, self.world, self.accumulation, self.mode = micro_batch, world, accumulation, mode
        total = sum(s.weight for s in sources)
        self.task_of = {s.name: s.task for s in sources}
        self.tasks = sorted({s.task for s in sources})
        self.task_share = {t: sum(s.weight for s in sources if s.task == t) / total for t in self.tasks}
        # the rows of a micro batch: over a task's sources, or over all of them (mixed)
        groups = {t: [s for s in sources if s.task == t] for t in self.tasks} if mode != "mixed" else {"*": sources}
        self.row_share = {g: {s.name: s.weight / sum(x.weight for x in ss) for s in ss} for g, ss in groups.items()}
        self.rng = random.Random(seed)
        self.task_credit = {t: 0.0 for t in self.tasks}
        self.rank_tasks = [Counter() for _ in range(world)]  # micro batches of each task per rank
        self.row_credit = [{g: {n: 0.0 for n in shares} for g, shares in self.row_share.items()} for _ in range(world)]

    def _slot_tasks(self) -> list[list[str]]:
        """tasks[a][r]: the task of rank r's micro batch a in this step."""
        W, A = self.world, self.accumulation
        if self.mode == "mixed":
            return [["*"] * W for _ in range(A)]
        if self.mode == "lockstep":
            picks = [apportion(self.task_share, 1, self.task_credit, self.rng) for _ in range(A)]
            return [[max(c, key=c.get)] * W for c in picks]
        counts = apportion(self.task_share, W * A, self.task_credit, self.rng)
        free = [A] * W
        given: list[list[str]] = [[] for _ in range(W)]
        *smaller, largest = sorted(self.tasks, key=lambda t: (counts[t], t))
        for t in smaller:  # each to the ranks that have had the fewest of it
            for _ in range(counts[t]):
                r = min((r for r in range(W) if free[r]), key=lambda r: (self.rank_tasks[r][t], self.rng.random()))
                given[r].append(t)
                free[r] -= 1
        for r in range(W):  # the largest task fills what is left
            given[r] += [largest] * free[r]
            self.rng.shuffle(given[r])  # which micro step holds which task does not matter to the balance
            for t in given[r]:
                self.rank_tasks[r][t] += 1
        return [[given[r][a] for r in range(W)] for a in range(A)]

    def next_step(self) -> list[list[dict[str, int]]]:
        out = []
        for row in self._slot_tasks():
            out.append(
                [
                    {
                        n: c
                        for n, c in apportion(
                            self.row_share[t], self.micro_batch, self.row_credit[r][t], self.rng
                        ).items()
                        if c
                    }
                    for r, t in enumerate(row)
                ]
            )
        return out

    def state(self) -> dict:
        version, internal, gauss = self.rng.getstate()
        return {
            "rng": [version, list(internal), gauss],
            "task_credit": dict(self.task_credit),
            "world": self.world,
            "accumulation": self.accumulation,
            "rank_tasks": [dict(c) for c in self.rank_tasks],
            "row_credit": [{g: dict(credit) for g, credit in r.items()} for r in self.row_credit],
        }

    def load_state(self, state: dict) -> None:
        """Continue a schedule; the per-rank balance only when the workers are as before."""
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.task_credit.update(state["task_credit"])
        if (state["world"], state["accumulation"]) == (self.world, self.accumulation):
            self.rank_tasks = [Counter(c) for c in state["rank_tasks"]]
            self.row_credit = [{g: dict(credit) for g, credit in r.items()} for r in state["row_credit"]]


def epoch_stream(source: MixSource, first_epoch: int, rest: bool = False) -> Iterator[tuple[int, dict]]:
    """(epoch, batch) of one source without end, epoch after epoch. The guard: rows that
    say which epoch the datasource read them in must be in this one. `rest`: the first
    epoch is a resumed epoch's rest, which may hold nothing for this worker (the checkpoint
    came at the epoch's end, or only samples the decoder skips were left)."""
    epoch = first_epoch
    while True:
        rows = 0
        for batch in source.batches(epoch):
            if len(batch["key"]):
                if "epoch" in batch and (batch["epoch"] != epoch).any():
                    raise RuntimeError(
                        f"data source {source.name!r}: the datasource read epoch "
                        f"{int(batch['epoch'][batch['epoch'] != epoch][0])} while training is in epoch {epoch}: "
                        f"Ray executed the dataset out of step with the trainer's epochs"
                    )
                rows += len(batch["key"])
                yield epoch, batch
        if not rows and not rest:
            raise EmptyEpoch(f"data source {source.name!r} yields no samples in epoch {epoch}")
        epoch, rest = epoch + 1, False


class ReadAhead:
    """An iterator over `stream`, which a daemon thread consumes ahead of the caller until
    it holds at least `depth` (items, or the sum of `size(item)`), from construction on
    (every split starts its first epoch at once); its errors re-raised here."""

    _DONE = object()

    def __init__(self, stream: Iterator, depth: int, name: str, size: Callable[[object], int] = lambda item: 1):
        self._items: deque = deque()
        self._held, self._depth, self._size, self._closed = 0, depth, size, False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, args=(stream,), name=f"read-ahead-{name}", daemon=True)
        self._thread.start()

    def _put(self, item, size: int = 0) -> None:
        with self._changed:
            self._items.append((item, size))
            self._held += size
            self._changed.notify_all()

    def _run(self, stream: Iterator) -> None:
        try:
            for item in stream:
                self._put(item, self._size(item))
                with self._changed:
                    self._changed.wait_for(lambda: self._held < self._depth or self._closed)
                    if self._closed:
                        break
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self._put(e)
        close(stream)  # in this thread: a generator is closed where it runs
        self._put(self._DONE)

    def close(self, timeout: float = 30.0) -> None:
        """Stop reading ahead and close the stream; wait (up to `timeout`) for the thread,
        which ends once it holds its next item."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        self._thread.join(timeout)

    def __iter__(self):
        return self

    def __next__(self):
        with self._changed:
            self._changed.wait_for(lambda: self._items)
            item, size = self._items.popleft()
            self._held -= size
            self._changed.notify_all()
        if item is self._DONE:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item


def close(stream) -> None:
    """Close an iterator that can be closed (a generator, a ReadAhead): its threads and the
    Ray Data iterators under it stop."""
    if hasattr(stream, "close"):
        stream.close()


class _Cursor:
    """Rows of one source, across epochs, with the epoch of each row."""

    def __init__(self, source: MixSource, first_epoch: int = 0, rest: bool = False):
        self.source, self.epoch = source, first_epoch
        stream = epoch_stream(source, first_epoch, rest)
        rows = lambda item: len(item[1]["key"])  # noqa: E731 - (epoch, batch)
        self._stream = ReadAhead(stream, source.prefetch, source.name, rows) if source.prefetch else stream
        self._batch, self._pos = None, 0

    def take(self, n: int) -> list[tuple[dict, int]]:
        """The next `n` rows as (views into the batches they arrived in, epoch) pieces: the
        mixer copies each row once, into the micro batch."""
        pieces = []
        while n:
            if self._batch is None or self._pos >= len(self._batch["key"]):
                self.epoch, self._batch = next(self._stream)
                self._pos = 0
            k = min(n, len(self._batch["key"]) - self._pos)
            pieces.append(({c: v[self._pos : self._pos + k] for c, v in self._batch.items()}, self.epoch))
            self._pos += k
            n -= k
        return pieces

    def close(self) -> None:
        close(self._stream)


IMAGES = ("image", "source")  # the columns of a micro batch that are images


class TaskMixer:
    """One worker's micro batches under the shared `StepSchedule`: rows key, prompt, task,
    image, and where each row came from: url and index in its shard, origin (the
    source's name) and epoch (of that source); `source` holds the input image of each
    editing row, in row order (none for generation rows). Images are (B, H, W, 3) uint8
    torch tensors, each row copied once from the block Ray Data delivered into them
    (into pinned memory with `pin_memory`, so that the copy to a GPU runs behind the
    host). Call `next_batch` `accumulation` times per optimizer step."""

    def __init__(
        self,
        sources: list[MixSource],
        batch_size: int,
        mode: str = "single_task",
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        accumulation: int = 1,
        epochs: dict[str, int] | None = None,
        pin_memory: bool = False,
    ):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside a world of {world}")
        self.sources = {s.name: s for s in sources}
        self.schedule = StepSchedule(sources, batch_size, world, accumulation, mode, seed)
        self.rank, self.pin_memory = rank, pin_memory
        # `epochs` (a resume): each source starts with its interrupted epoch's rest
        self.cursors = {s.name: _Cursor(s, (epochs or {}).get(s.name, 0), epochs is not None) for s in sources}
        self._pending: list[dict[str, int]] = []

    def next_batch(self) -> dict:
        if not self._pending:
            self._pending = [slots[self.rank] for slots in self.schedule.next_step()]
        rows = self._pending.pop(0)
        pieces = []  # (source, views, epoch), in a fixed order: the batch layout depends on the schedule only
        for name in self.sources:
            if rows.get(name):
                pieces += [(self.sources[name], part, epoch) for part, epoch in self.cursors[name].take(rows[name])]
        sizes = [len(part["key"]) for _, part, _ in pieces]
        batch = {c: np.concatenate([part[c] for _, part, _ in pieces]) for c in ("key", "prompt", "url", "index")}
        batch["task"] = np.repeat(np.array([s.task for s, _, _ in pieces], dtype=object), sizes)
        batch["origin"] = np.repeat(np.array([s.name for s, _, _ in pieces], dtype=object), sizes)
        batch["epoch"] = np.repeat(np.array([epoch for _, _, epoch in pieces], dtype=np.int64), sizes)
        batch["image"] = self._images([part["image"] for _, part, _ in pieces])
        batch["source"] = self._images(
            [part["source"] for s, part, _ in pieces if s.task == "editing"], like=batch["image"]
        )
        return batch

    def _images(self, parts: list[np.ndarray], like=None):
        """One uint8 tensor of `parts`, stacked, each copied once (an empty one shaped as `like` for none)."""
        import torch

        shape = (sum(len(p) for p in parts), *(parts[0].shape[1:] if parts else like.shape[1:]))
        out = torch.empty(shape, dtype=torch.uint8, pin_memory=self.pin_memory)
        if parts:
            np.concatenate(parts, out=out.numpy())
        return out

    def __iter__(self):
        while True:
            yield self.next_batch()

    def close(self) -> None:
        for cursor in self.cursors.values():
            cursor.close()

    def state(self) -> dict:
        """What a resume needs to continue the schedule (the same on every worker), a copy of
        it as of now. Epochs and the samples consumed in them are the data position's
        (`pipelines.position`)."""
        return {"schedule": self.schedule.state()}

    def load_state(self, state: dict) -> None:
        self.schedule.load_state(state["schedule"] if "schedule" in state else state["plan"])  # "plan": before 2026-12


def prepared(mixer: TaskMixer, accumulation: int, depth: int) -> Iterator[tuple[dict, dict | None]]:
    """The mixer's micro batches, up to `depth` of them prepared ahead in a thread (0: in
    the caller), each step's last one with the mixer's state after that step: a
    checkpoint saves the state of the last step trained, which the mixer itself, ahead of
    training, no longer has. `close()` it to stop every thread under it."""
    if depth < 0:
        raise ConfigError(f"data.worker_prefetch must be >= 0 micro batches, got {depth}")

    def steps():
        try:
            while True:
                for i in range(accumulation):
                    batch = mixer.next_batch()
                    yield batch, mixer.state() if i == accumulation - 1 else None
        finally:  # closed (`close`): so are the mixer's reading threads
            mixer.close()

    return ReadAhead(steps(), depth, "micro-batches") if depth else steps()


class StepData:
    """One step's micro batches from `prepared`, taken from the reader by `fetch` before
    the step starts (so that a failing data plane stops every worker at the same step
    boundary instead of one of them mid-step), each moved onto the device by `move`
    (`collate` in training, `to_device` in the ingest benchmark) as the step asks for it.
    Afterwards: the raw batches (`consumed`), the mixer's state after the step, the time
    spent waiting for them and the host's time moving them."""

    def __init__(self, micro_batches, accumulation: int, device, move: Callable[[dict, object], dict]):
        self.micro_batches, self.accumulation, self.device, self.move = micro_batches, accumulation, device, move
        self.fetched: list[tuple[dict, dict | None]] = []
        self.consumed, self.mixer_state, self.wait_s, self.host_s = [], None, 0.0, 0.0

    def __len__(self) -> int:
        return self.accumulation

    def fetch(self) -> Exception | None:
        """The step's raw micro batches, now; the reader's failure returned, not raised."""
        asked = time.perf_counter()
        try:
            while len(self.fetched) < self.accumulation:
                self.fetched.append(next(self.micro_batches))
        except Exception as e:  # noqa: BLE001 - the caller decides what it means
            return e
        finally:
            self.wait_s += time.perf_counter() - asked
        return None

    def __iter__(self):
        if (error := self.fetch()) is not None:
            raise error
        for raw, state in self.fetched:
            moved = time.perf_counter()
            batch = self.move(raw, self.device)
            self.host_s += time.perf_counter() - moved
            self.consumed.append(raw)
            if state is not None:  # the step's last micro batch
                self.mixer_state = state
            yield batch


def to_device(batch: dict, device=None) -> dict:
    """A mixer batch's images on `device`, still uint8 (a quarter of the bytes of float):
    from pinned memory a copy to a GPU runs behind the host instead of blocking it."""
    import torch

    cuda = device is not None and torch.device(device).type == "cuda"

    def move(images):
        images = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images))
        if cuda and not images.is_pinned():
            images = images.pin_memory()
        return images.to(device, non_blocking=cuda)

    return batch | {c: move(batch[c]) for c in IMAGES if c in batch}


def collate(batch: dict, device=None) -> dict:
    """A mixer batch -> the step's input: key, prompt, task as lists; fp32 InternVL-normalised
    pixel values (B, 3, H, W), normalised on `device`, of the images and of the editing rows'
    inputs (`source_pixel_values`, in row order; the model casts them to its own dtype)."""
    from unilip.encoder import pixel_values_from_uint8

    moved = to_device(batch, device)
    out = {
        "key": list(batch["key"]),
        "prompt": list(batch["prompt"]),
        "task": list(batch["task"]),
        "pixel_values": pixel_values_from_uint8(moved["image"]),
    }
    if "source" in moved:
        out["source_pixel_values"] = pixel_values_from_uint8(moved["source"])
    return out
