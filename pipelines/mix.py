"""Task-balanced mixing of data sources on each training worker.

Each source is its own Ray Dataset; every worker gets its split of each (Ray Train's
`get_dataset_shard`, i.e. `streaming_split(n, equal=True)`). `TaskMixer` draws from the
per-source iterators with probability proportional to the effective weight

    weight(source) = multiplier x source size (samples in its manifest)

so in generation stage 2 (generation x1 on 36M, editing x10 on 1.5M) about 2 in 3
samples are generation, and in stage 3 (editing x3) about 1 in 2. A source that runs out
starts its next epoch (it cycles). Batches are single-task (the authors' release: each
batch all generation or all editing, the task drawn by its total weight) or mixed.

Why not Ray Data's own mixing: `union` concatenates, it does not interleave by weight,
and sources of different sizes must cycle independently. The draws come from a seeded
RNG that is the same on every worker, so all workers consume each source at the same
rate and reach its end together: the epochs of a streaming split stay in lockstep.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np


@dataclass
class MixSource:
    name: str
    task: str  # generation | editing
    weight: float  # multiplier x size
    batches: Callable[[], Iterator[dict]]  # a new epoch of numpy batches from this source


def effective_weights(sources: list, sizes: dict[str, int]) -> dict[str, float]:
    """multiplier x size per source (sources: SourceConfig-like with name, multiplier)."""
    weights = {s.name: s.multiplier * sizes[s.name] for s in sources}
    if not weights or sum(weights.values()) <= 0:
        raise ValueError(f"sources need a positive total weight, got {weights}")
    return weights


class _Cursor:
    """Rows of one source, batch by batch, across epochs."""

    def __init__(self, source: MixSource):
        self.source, self.epoch = source, 0
        self._it, self._batch, self._pos = source.batches(), None, 0

    def take(self, n: int) -> dict:
        parts, self.row_epochs = [], []
        while n:
            if self._batch is None or self._pos >= len(self._batch["key"]):
                self._batch, self._pos = self._next_batch(), 0
            k = min(n, len(self._batch["key"]) - self._pos)
            parts.append({c: v[self._pos : self._pos + k] for c, v in self._batch.items()})
            self.row_epochs += [self.epoch] * k
            self._pos += k
            n -= k
        return {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}

    def _next_batch(self) -> dict:
        for _ in range(2):  # at most one epoch change per call
            batch = next(self._it, None)
            if batch is not None and len(batch["key"]):
                return batch
            if batch is None:
                self.epoch += 1
                self._it = self.source.batches()
        raise RuntimeError(f"data source {self.source.name!r} yields no samples")


COLUMNS = ("key", "prompt", "task", "image", "source", "url", "index", "origin", "epoch")


class TaskMixer:
    """Yields batches of `batch_size` rows: key, prompt, task, image, source (zeros for
    generation), and where each row came from: url and index in its shard, origin (the
    source's name) and epoch (of that source)."""

    def __init__(self, sources: list[MixSource], batch_size: int, mode: str = "single_task", seed: int = 0):
        if mode not in ("single_task", "mixed"):
            raise ValueError(f"batch mode must be 'single_task' or 'mixed', got {mode!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.sources, self.batch_size, self.mode = sources, batch_size, mode
        self.rng = random.Random(seed)
        self.cursors = {s.name: _Cursor(s) for s in sources}
        self.tasks = sorted({s.task for s in sources})
        self.served: Counter = Counter()  # samples per task
        self.credit = {t: 0.0 for t in self.tasks}

    def _next_task(self) -> str:
        """The task of the next single-task batch: a jittered weighted round robin.

        Independent draws per batch would let the realised ratio wander by about
        1/sqrt(batches); credits keep it within a batch or two of the target at all times,
        and the seeded jitter keeps the order irregular."""
        total = sum(s.weight for s in self.sources)
        for t in self.tasks:
            self.credit[t] += sum(s.weight for s in self.sources if s.task == t) / total
        task = max(self.tasks, key=lambda t: self.credit[t] + self.rng.uniform(0, 0.5))
        self.credit[task] -= 1.0
        return task

    def _draw(self, candidates: list[MixSource], n: int) -> Counter:
        picks = self.rng.choices([s.name for s in candidates], weights=[s.weight for s in candidates], k=n)
        return Counter(picks)

    def next_batch(self) -> dict:
        candidates = self.sources
        if self.mode == "single_task":
            task = self._next_task()
            candidates = [s for s in self.sources if s.task == task]
        counts = self._draw(candidates, self.batch_size)
        parts = []
        for s in candidates:  # a fixed order: the batch layout depends on the seed only
            if counts[s.name]:
                cursor = self.cursors[s.name]
                part = cursor.take(counts[s.name])
                part["task"] = np.array([s.task] * counts[s.name], dtype=object)
                part["origin"] = np.array([s.name] * counts[s.name], dtype=object)
                part["epoch"] = np.array(cursor.row_epochs[-counts[s.name] :])
                if "source" not in part:
                    part["source"] = np.zeros_like(part["image"])
                parts.append(part)
                self.served[s.task] += counts[s.name]
        return {c: np.concatenate([p[c] for p in parts]) for c in COLUMNS}

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state(self) -> dict:
        """What a resume needs to continue the same sequence: RNG, credits, counts, epochs."""
        version, internal, gauss = self.rng.getstate()
        return {
            "rng": [version, list(internal), gauss],
            "credit": dict(self.credit),
            "served": dict(self.served),
            "epochs": {n: c.epoch for n, c in self.cursors.items()},
        }

    def load_state(self, state: dict) -> None:
        """Continue from `state`. Cursors start their epoch from scratch: the caller's
        epoch factories supply the rest of the interrupted epoch first."""
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.credit.update(state["credit"])
        self.served = Counter(state["served"])
        for name, epoch in state["epochs"].items():
            self.cursors[name].epoch = epoch


def collate(batch: dict, device=None, dtype=None) -> dict:
    """A mixer batch -> torch: InternVL-normalised pixel values (B, 3, H, W) for image and source."""
    import torch

    from unilip.encoder import pixel_values_from_uint8

    def pixels(array: np.ndarray):  # uint8 to the device first: a quarter of the bytes of float
        return pixel_values_from_uint8(torch.from_numpy(np.ascontiguousarray(array)).to(device)).to(dtype or torch.float32)

    return {
        "key": list(batch["key"]),
        "prompt": list(batch["prompt"]),
        "task": list(batch["task"]),
        "pixel_values": pixels(batch["image"]),
        "source_pixel_values": pixels(batch["source"]),
    }
