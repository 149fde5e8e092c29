"""The order in which a source's samples are read in an epoch: a pure function of the
data seed, the source's name, the epoch and the manifest, recomputed (never stored).

    order = shard_order(seed, "blip3o-long", epoch, n_shards)     # a permutation per epoch
    for k, group in enumerate(shard_groups(order, interleave)):    # one read task each
        plan = read_plan(seed, "blip3o-long", epoch, k, sizes_of(group), window)

1. Shards: a seeded permutation, new each epoch.
2. Each read task takes `interleave` consecutive shards of that permutation and reads
   them interleaved: the sequence of which shard supplies the next sample is a uniformly
   random interleaving of the shards (each shard still read front to back, as a tar
   stream must be).
3. A tumbling window of `window` samples of that interleaved sequence is emitted in a
   random order: a sample moves at most `window` places, and at most `window` raw
   samples wait in a read task.

The plan is computed from the manifest's sample counts, before any data is read, so the
same seed, epoch and manifest always give the same order; a resumed epoch emits the same
order with the consumed samples left out. `shuffle: false` keeps the manifest order.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Order:
    """How a source is ordered (`data.seed`, `data.shuffle`, `data.shard_interleave`, `data.shuffle_buffer`)."""

    seed: int = 0
    shuffle: bool = True
    interleave: int = 16
    window: int = 1000

    @classmethod
    def of(cls, cfg) -> Order:
        return cls(cfg.seed, cfg.shuffle, cfg.shard_interleave, cfg.shuffle_buffer)


def keyed_rng(seed: int, *keys: int | str) -> np.random.Generator:
    """A generator that is a function of the seed and the keys, the same in every process
    (str keys through crc32: Python's hash() differs between processes)."""
    return np.random.default_rng([seed, *(zlib.crc32(k.encode()) if isinstance(k, str) else int(k) for k in keys)])


def shard_order(seed: int, source: str, epoch: int, n: int, shuffle: bool = True) -> np.ndarray:
    """The shards' reading order in `epoch` (indices into the manifest)."""
    return keyed_rng(seed, source, epoch).permutation(n) if shuffle else np.arange(n)


def interleave_width(requested: int, n: int) -> int:
    """Shards per read task: at most a quarter of the source's, so an epoch keeps a few tasks."""
    return max(1, min(requested, n // 4))


def shard_groups(order: np.ndarray, width: int) -> list[np.ndarray]:
    return [order[i : i + width] for i in range(0, len(order), width)]


def read_plan(
    seed: int, source: str, epoch: int, group: int, sizes: list[int], window: int, shuffle: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """(shard position in the group, sample index in that shard) of every sample of a read
    task, in emission order. Without shuffle: each shard in turn, front to back."""
    shards = np.repeat(np.arange(len(sizes)), sizes)
    if shuffle:
        rng = keyed_rng(seed, source, epoch, group)
        shards = rng.permutation(shards)  # a uniformly random interleaving of the shards
    # each shard's samples in index order along the interleaving
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    by_shard = np.argsort(shards, kind="stable")
    index = np.empty(len(shards), dtype=np.int64)
    index[by_shard] = np.arange(len(shards)) - np.repeat(starts, sizes)
    if shuffle and window > 1:
        emit = (
            np.concatenate(
                [start + rng.permutation(min(window, len(shards) - start)) for start in range(0, len(shards), window)]
            )
            if len(shards)
            else shards
        )
        shards, index = shards[emit], index[emit]
    return shards, index


def manifest_digest(shards: list[tuple[str, int]]) -> str:
    """A manifest's identity for resuming: its shards and sample counts, in order."""
    return hashlib.sha256("".join(f"{path}:{samples}\n" for path, samples in shards).encode()).hexdigest()
