"""Where training is in its data: the samples consumed so far in each source's epoch.

Ray Data's iterators cannot resume mid-epoch (ray#37633), so training records every
sample it trains on as (shard url, index in shard), and each checkpoint stores the union
over all workers. A resumed run builds each source's rest-of-epoch dataset without those
samples (`ShardDatasource(done=...)`): nothing consumed before the checkpoint is read
again, nothing unconsumed is dropped, and the rest keeps the epoch's order (the order
is a function of the seed and the manifest: `pipelines.order`). Granularity: one sample.

In memory, a source's epoch is a bitmap over the manifest's samples (one byte each:
36 MB for 36M samples), whatever order they come in; the workers' bitmaps are merged with
one all-reduce (max) per checkpoint. Stored, each shard is its consumed [start, stop)
runs, or its bitmap (packed, base64) when the runs would be longer: a finished shard is
one pair, and a shuffled epoch, consumed group by group, stays a few hundred KB.
"""

from __future__ import annotations

import base64
import bisect

import numpy as np

from unilip.errors import UserError


class Intervals:
    """A set of non-negative ints as sorted, disjoint [start, stop) runs."""

    def __init__(self, runs=()):
        self.starts: list[int] = []
        self.stops: list[int] = []
        for a, b in sorted(runs):
            if self.stops and a <= self.stops[-1]:
                self.stops[-1] = max(self.stops[-1], b)
            else:
                self.starts.append(a)
                self.stops.append(b)

    def __contains__(self, i: int) -> bool:
        k = bisect.bisect_right(self.starts, i) - 1
        return k >= 0 and i < self.stops[k]

    def __len__(self) -> int:
        return sum(b - a for a, b in zip(self.starts, self.stops))

    def covers(self, n: int) -> bool:
        """True if every index in [0, n) is in the set."""
        return n == 0 or (len(self.starts) == 1 and self.starts[0] == 0 and self.stops[0] >= n)

    def runs(self) -> list[list[int]]:
        return [[a, b] for a, b in zip(self.starts, self.stops)]


def _runs(bits: np.ndarray) -> np.ndarray:
    """(k, 2) [start, stop) runs of the set entries of a 0/1 array."""
    edges = np.diff(np.concatenate([[0], bits.astype(np.int8), [0]]))
    return np.stack([np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)], axis=1)


class Position:
    """Per source: its epoch and which samples of it that epoch has trained on.

    `layout`: each source's shards, [(url, samples), ...] in manifest order."""

    def __init__(self, layout: dict[str, list[tuple[str, int]]], state: dict | None = None):
        self.layout = layout
        self.sizes = {src: dict(shards) for src, shards in layout.items()}
        self.offsets = {
            src: dict(zip([u for u, _ in shards], np.cumsum([0] + [n for _, n in shards[:-1]]).tolist()))
            for src, shards in layout.items()
        }
        self.bits = {src: np.zeros(sum(n for _, n in shards), dtype=np.uint8) for src, shards in layout.items()}
        self.epochs = {src: 0 for src in layout}
        state = state or {}
        for src, epoch in state.get("epochs", {}).items():
            if src in self.epochs:
                self.epochs[src] = epoch
        for src, shards in state.get("done", {}).items():
            for url, entry in shards.items():
                if src not in self.offsets or url not in self.offsets[src]:
                    raise UserError(
                        f"the data position names {url} of {src}, which the source's manifest does not list"
                    )
                part = self._part(src, url)
                if isinstance(entry, dict):  # a packed bitmap
                    part[:] = np.unpackbits(np.frombuffer(base64.b64decode(entry["bits"]), np.uint8))[: len(part)]
                else:
                    for a, b in entry:
                        part[a:b] = 1

    def _part(self, source: str, url: str) -> np.ndarray:
        off = self.offsets[source][url]
        return self.bits[source][off : off + self.sizes[source][url]]

    def consume(self, source: str, epoch: int, urls, indices) -> None:
        """Record samples trained on. A later epoch of `source` starts its record afresh."""
        if epoch != self.epochs[source]:
            self.epochs[source] = epoch
            self.bits[source][:] = 0
        offsets = self.offsets[source]
        self.bits[source][
            np.fromiter((offsets[u] for u in urls), np.int64, len(urls)) + np.asarray(indices, np.int64)
        ] = 1

    def absorb(self, other: Position) -> None:
        """The union with another worker's position: per source, the later epoch's record."""
        for src in self.bits:
            if other.epochs[src] > self.epochs[src]:
                self.epochs[src], self.bits[src] = other.epochs[src], other.bits[src].copy()
            elif other.epochs[src] == self.epochs[src]:
                np.maximum(self.bits[src], other.bits[src], out=self.bits[src])

    def merge_workers(self, device=None) -> None:
        """`absorb` over every worker, in place on each (a collective: all of them call it)."""
        import torch
        import torch.distributed as dist

        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return
        names = sorted(self.bits)
        epochs = torch.tensor([self.epochs[s] for s in names], dtype=torch.int64, device=device)
        dist.all_reduce(epochs, op=dist.ReduceOp.MAX)
        for src, epoch in zip(names, epochs.tolist()):
            if epoch > self.epochs[src]:  # this worker has not begun the epoch the others are in
                self.epochs[src] = epoch
                self.bits[src][:] = 0
            bits = torch.from_numpy(self.bits[src]).to(device)
            dist.all_reduce(bits, op=dist.ReduceOp.MAX)
            self.bits[src] = bits.cpu().numpy()

    def done(self, source: str) -> dict[str, Intervals]:
        """Samples consumed in the source's current epoch, per shard (what a resume leaves out)."""
        out = {}
        for url, _n in self.layout[source]:
            part = self._part(source, url)
            if part.any():
                out[url] = Intervals(_runs(part).tolist())
        return out

    def consumed(self, source: str) -> int:
        return int(self.bits[source].sum())

    def state(self) -> dict:
        done = {}
        for src, shards in self.layout.items():
            mine = {}
            for url, n in shards:
                part = self._part(src, url)
                if not part.any():
                    continue
                runs = _runs(part)
                # runs cost ~2 numbers each, a packed bitmap n / 8 bytes: keep the smaller
                mine[url] = (
                    runs.tolist() if len(runs) * 16 <= n else {"bits": base64.b64encode(np.packbits(part)).decode()}
                )
            if mine:
                done[src] = mine
        return {"epochs": dict(self.epochs), "done": done}
