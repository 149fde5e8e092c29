"""Task-balanced mixing of data sources across the training workers.

Each source is its own Ray Dataset; every worker gets its split of each (Ray Train's
`get_dataset_shard`, i.e. `streaming_split(n, equal=True)`). The sampling weight of a
source is its `proportion`, or else

    weight(source) = multiplier x source size (samples in its manifest)

so in generation stage 2 (generation x1 on 36M, editing x10 on 1.5M) about 2 in 3
samples are generation, and in stage 3 (editing x3) about 1 in 2.

`StepPlan` decides, for every optimizer step, what each worker's micro batches hold. It
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

Each source's rows reach the mixer through a prefetch thread that reads ahead a few
batches and moves to the next epoch as soon as the split ends. The split's epoch
barrier then waits in those threads, never in the training loop: when one worker needs
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
import queue
import random
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np


@dataclass
class MixSource:
    name: str
    task: str  # generation | editing
    weight: float  # proportion, or multiplier x size
    batches: Callable[[int], Iterator[dict]]  # epoch -> that epoch's numpy batches from this source
    prefetch: int = 0  # batches read ahead in a thread (0: read in the caller)


def effective_weights(sources: list, sizes: dict[str, int]) -> dict[str, float]:
    """Each source's sampling weight: its `proportion`, or multiplier x size."""
    given = [s.proportion is not None for s in sources]
    if any(given) and not all(given):
        missing = [s.name for s in sources if s.proportion is None]
        raise ValueError(f"give every source a proportion, or none: {', '.join(missing)} has none")
    weights = {s.name: s.proportion if s.proportion is not None else s.multiplier * sizes[s.name] for s in sources}
    if not weights or sum(weights.values()) <= 0 or min(weights.values()) < 0:
        raise ValueError(f"sources need non-negative weights with a positive total, got {weights}")
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


class StepPlan:
    """The contents of every worker's micro batches, step by step (see the module doc).

    `next_step()` returns, per micro step and per rank, {source: rows}."""

    def __init__(self, sources: list[MixSource], micro_batch: int, world: int = 1, accumulation: int = 1,
                 mode: str = "single_task", seed: int = 0):  # fmt: skip
        if mode not in ("single_task", "lockstep", "mixed"):
            raise ValueError(f"batch mode must be 'single_task', 'lockstep' or 'mixed', got {mode!r}")
        if micro_batch < 1 or world < 1 or accumulation < 1:
            raise ValueError(f"micro_batch, world and accumulation must be >= 1, got {micro_batch}, {world}, {accumulation}")
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
            out.append([{n: c for n, c in apportion(self.row_share[t], self.micro_batch, self.row_credit[r][t], self.rng).items() if c}
                        for r, t in enumerate(row)])  # fmt: skip
        return out

    def state(self) -> dict:
        version, internal, gauss = self.rng.getstate()
        return {
            "rng": [version, list(internal), gauss], "task_credit": dict(self.task_credit),
            "world": self.world, "accumulation": self.accumulation,
            "rank_tasks": [dict(c) for c in self.rank_tasks], "row_credit": self.row_credit,
        }  # fmt: skip

    def load_state(self, state: dict) -> None:
        """Continue a plan; the per-rank balance only when the workers are as before."""
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.task_credit.update(state["task_credit"])
        if (state["world"], state["accumulation"]) == (self.world, self.accumulation):
            self.rank_tasks = [Counter(c) for c in state["rank_tasks"]]
            self.row_credit = state["row_credit"]


def epoch_stream(source: MixSource, first_epoch: int) -> Iterator[tuple[int, dict]]:
    """(epoch, batch) of one source without end, epoch after epoch. The guard: rows that
    say which epoch the datasource read them in must be in this one."""
    epoch = first_epoch
    while True:
        rows = 0
        for batch in source.batches(epoch):
            if len(batch["key"]):
                if "epoch" in batch and (batch["epoch"] != epoch).any():
                    raise RuntimeError(f"data source {source.name!r}: the datasource read epoch "
                                       f"{int(batch['epoch'][batch['epoch'] != epoch][0])} while training is in epoch {epoch}: "
                                       f"Ray executed the dataset out of step with the trainer's epochs")  # fmt: skip
                rows += len(batch["key"])
                yield epoch, batch
        if not rows:
            raise RuntimeError(f"data source {source.name!r} yields no samples")
        epoch += 1


class ReadAhead:
    """An iterator over `stream`, which a daemon thread consumes up to `depth` items ahead,
    from construction on (every split starts its first epoch at once); its errors re-raised here."""

    _DONE = object()

    def __init__(self, stream: Iterator, depth: int, name: str):
        self._items: queue.Queue = queue.Queue(maxsize=depth)
        threading.Thread(target=self._run, args=(stream,), name=f"read-ahead-{name}", daemon=True).start()

    def _run(self, stream: Iterator) -> None:
        try:
            for item in stream:
                self._items.put(item)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self._items.put(e)
        self._items.put(self._DONE)

    def __iter__(self):
        return self

    def __next__(self):
        item = self._items.get()
        if item is self._DONE:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item


class _Cursor:
    """Rows of one source, across epochs, with the epoch of each row."""

    def __init__(self, source: MixSource, first_epoch: int = 0):
        self.source, self.epoch = source, first_epoch
        stream = epoch_stream(source, first_epoch)
        self._stream = ReadAhead(stream, source.prefetch, source.name) if source.prefetch else stream
        self._batch, self._pos = None, 0

    def take(self, n: int) -> tuple[dict, np.ndarray]:
        parts, epochs = [], []
        while n:
            if self._batch is None or self._pos >= len(self._batch["key"]):
                self.epoch, self._batch = next(self._stream)
                self._pos = 0
            k = min(n, len(self._batch["key"]) - self._pos)
            parts.append({c: v[self._pos : self._pos + k] for c, v in self._batch.items()})
            epochs += [self.epoch] * k
            self._pos += k
            n -= k
        return {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}, np.array(epochs)


COLUMNS = ("key", "prompt", "task", "image", "source", "url", "index", "origin", "epoch")  # epoch: of its source


class TaskMixer:
    """One worker's micro batches under the shared `StepPlan`: rows key, prompt, task,
    image, source (zeros for generation), and where each row came from: url and index in
    its shard, origin (the source's name) and epoch (of that source). Call `next_batch`
    `accumulation` times per optimizer step."""

    def __init__(self, sources: list[MixSource], batch_size: int, mode: str = "single_task", seed: int = 0,
                 rank: int = 0, world: int = 1, accumulation: int = 1, epochs: dict[str, int] | None = None):  # fmt: skip
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside a world of {world}")
        self.sources = {s.name: s for s in sources}
        self.plan = StepPlan(sources, batch_size, world, accumulation, mode, seed)
        self.rank = rank
        self.cursors = {s.name: _Cursor(s, (epochs or {}).get(s.name, 0)) for s in sources}
        self._pending: list[dict[str, int]] = []

    def next_batch(self) -> dict:
        if not self._pending:
            self._pending = [slots[self.rank] for slots in self.plan.next_step()]
        rows = self._pending.pop(0)
        parts = []
        for name in self.sources:  # a fixed order: the batch layout depends on the plan only
            if rows.get(name):
                s, n = self.sources[name], rows[name]
                part, epochs = self.cursors[name].take(n)
                part["task"] = np.array([s.task] * n, dtype=object)
                part["origin"] = np.array([name] * n, dtype=object)
                part["epoch"] = epochs
                if "source" not in part:
                    part["source"] = np.zeros_like(part["image"])
                parts.append(part)
        return {c: np.concatenate([p[c] for p in parts]) for c in COLUMNS}

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state(self) -> dict:
        """What a resume needs to continue the plan (the same on every worker). Epochs and
        the samples consumed in them are the data position's (`pipelines.position`)."""
        return {"plan": self.plan.state()}

    def load_state(self, state: dict) -> None:
        self.plan.load_state(state["plan"])


def collate(batch: dict, device=None) -> dict:
    """A mixer batch -> torch: fp32 InternVL-normalised pixel values (B, 3, H, W) for image
    and source (the model casts them to its own dtype)."""
    import torch

    from unilip.encoder import pixel_values_from_uint8

    cuda = device is not None and torch.device(device).type == "cuda"

    def pixels(array: np.ndarray):  # uint8 to the device first: a quarter of the bytes of float
        images = torch.from_numpy(np.ascontiguousarray(array))
        if cuda:  # from pinned memory the copy runs behind the host instead of blocking it
            images = images.pin_memory()
        return pixel_values_from_uint8(images.to(device, non_blocking=cuda))

    return {
        "key": list(batch["key"]),
        "prompt": list(batch["prompt"]),
        "task": list(batch["task"]),
        "pixel_values": pixels(batch["image"]),
        "source_pixel_values": pixels(batch["source"]),
    }
