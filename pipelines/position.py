"""Where training is in its data: the samples consumed so far in each source's epoch.

Ray Data's iterators cannot resume mid-epoch (ray#37633), so training records every
sample it trains on as (shard url, index in shard) and checkpoints the union over all
workers. A resumed run builds each source's rest-of-epoch dataset without those samples
(`ShardDatasource(done=...)`): nothing consumed before the checkpoint is read again and
nothing unconsumed is dropped. Granularity: one sample.

Consumption is contiguous within a shard in practice (blocks are read in order), so an
index set is stored as sorted, merged [start, stop) intervals: a finished shard is one
pair, whatever its size.
"""

from __future__ import annotations

import bisect
from collections import defaultdict


class Intervals:
    """A set of non-negative ints as sorted, disjoint [start, stop) runs."""

    def __init__(self, runs=()):
        self.starts: list[int] = []
        self.stops: list[int] = []
        for a, b in sorted(runs):
            self._append(a, b)

    def _append(self, a: int, b: int) -> None:
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

    @classmethod
    def of(cls, indices) -> Intervals:
        return cls((i, i + 1) for i in indices)

    def union(self, other: Intervals) -> Intervals:
        return Intervals(self.runs() + other.runs())


class Position:
    """Per source: completed epochs and the samples consumed in the current one."""

    def __init__(self, state: dict | None = None):
        state = state or {}
        self.epochs: dict[str, int] = dict(state.get("epochs", {}))
        self.done: dict[str, dict[str, Intervals]] = {
            src: {url: Intervals(runs) for url, runs in shards.items()} for src, shards in state.get("done", {}).items()
        }
        self._pending: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))

    def consume(self, source: str, epoch: int, urls, indices) -> None:
        """Record samples trained on. A later epoch of `source` starts its record afresh."""
        if epoch != self.epochs.get(source, 0):
            self.epochs[source] = epoch
            self.done.pop(source, None)
            self._pending.pop(source, None)
        for url, i in zip(urls, indices):
            self._pending[source][url].append(int(i))

    def flush(self) -> None:
        for source, shards in self._pending.items():
            mine = self.done.setdefault(source, {})
            for url, indices in shards.items():
                mine[url] = mine.get(url, Intervals()).union(Intervals.of(indices))
        self._pending.clear()

    def state(self) -> dict:
        self.flush()
        return {
            "epochs": dict(self.epochs),
            "done": {src: {url: iv.runs() for url, iv in shards.items()} for src, shards in self.done.items()},
        }

    @classmethod
    def merged(cls, states: list[dict]) -> Position:
        """The union of every worker's position (workers of a run share each source's epoch)."""
        out = cls()
        for state in states:
            for src, epoch in state["epochs"].items():
                if epoch > out.epochs.get(src, -1):
                    out.epochs[src] = epoch
                    out.done.pop(src, None)
            for src, shards in state["done"].items():
                if state["epochs"].get(src, 0) != out.epochs.get(src, 0):
                    continue  # a worker still on an older epoch: nothing it recorded is current
                mine = out.done.setdefault(src, {})
                for url, runs in shards.items():
                    mine[url] = mine.get(url, Intervals()).union(Intervals(runs))
        return out

    def consumed(self, source: str) -> int:
        self.flush()
        return sum(len(iv) for iv in self.done.get(source, {}).values())
