"""The data order (pipelines/order.py) and the data position at the target scale."""

import json
import time

import numpy as np
import pytest

from pipelines.ingest import check_resume
from pipelines.order import interleave_width, read_plan, shard_groups, shard_order
from pipelines.position import Position
from unilip.errors import UserError


def test_shard_order_is_a_fresh_permutation_per_epoch_and_seed():
    a = shard_order(0, "blip3o-long", 0, 100)
    assert sorted(a) == list(range(100)) and np.array_equal(a, shard_order(0, "blip3o-long", 0, 100))
    for other in (
        shard_order(0, "blip3o-long", 1, 100),
        shard_order(1, "blip3o-long", 0, 100),
        shard_order(0, "journeydb", 0, 100),
    ):
        assert not np.array_equal(a, other)
        # Kendall's tau between the two orders: near 0, not a rotated copy
        ra, rb = np.argsort(a), np.argsort(other)
        concordant = np.sign(ra[:, None] - ra[None, :]) * np.sign(rb[:, None] - rb[None, :])
        assert abs(concordant.sum() / (100 * 99)) < 0.3
    assert np.array_equal(shard_order(0, "x", 3, 10, shuffle=False), np.arange(10))
    assert interleave_width(16, 3600) == 16 and interleave_width(16, 24) == 6 and interleave_width(16, 2) == 1
    assert [len(g) for g in shard_groups(np.arange(10), 4)] == [4, 4, 2]


def test_read_plan_reads_each_sample_once_within_a_window():
    sizes, window = [30, 5, 17, 8], 10
    shard, index = read_plan(7, "src", 2, 0, sizes, window)
    pairs = list(zip(shard.tolist(), index.tolist()))
    assert sorted(pairs) == [(j, i) for j, n in enumerate(sizes) for i in range(n)]  # each sample once
    # the interleaving reads each shard front to back; emission moves a sample less than a window
    read_shard, read_index = read_plan(7, "src", 2, 0, sizes, 1)
    read_at = {p: t for t, p in enumerate(zip(read_shard.tolist(), read_index.tolist()))}
    for j in range(len(sizes)):
        assert read_index[read_shard == j].tolist() == list(range(sizes[j]))
    assert max(abs(t - read_at[p]) for t, p in enumerate(pairs)) < window
    assert (shard[1:] != shard[:-1]).mean() > 0.4  # interleaved (about 0.66 here), not one shard after another
    assert pairs == list(zip(*(a.tolist() for a in read_plan(7, "src", 2, 0, sizes, window))))  # a pure function
    assert pairs != list(zip(*(a.tolist() for a in read_plan(7, "src", 3, 0, sizes, window))))  # another epoch
    plain = list(zip(*(a.tolist() for a in read_plan(7, "src", 2, 0, sizes, window, shuffle=False))))
    assert plain == [(j, i) for j, n in enumerate(sizes) for i in range(n)]  # manifest order


def test_resume_refuses_changed_manifests_and_warns_on_changed_order():
    saved = {
        "order": {"seed": 0, "shuffle": True, "shard_interleave": 16, "shuffle_buffer": 1000},
        "sources": {"a": {"shards": 2, "samples": 10, "manifest": "x"}},
    }
    assert check_resume(saved, saved) == [] and check_resume(None, saved) == []
    changed = json.loads(json.dumps(saved))
    changed["order"]["shuffle_buffer"] = 7
    (warning,) = check_resume(saved, changed)
    assert "shuffle_buffer 1000 -> 7" in warning
    changed["sources"]["a"] = {"shards": 3, "samples": 12, "manifest": "y"}
    with pytest.raises(UserError, match="source 'a' changed since the checkpoint .2 shards, 10 samples then; 3 shards"):
        check_resume(saved, changed)
    with pytest.raises(UserError, match="sources"):
        check_resume(saved, {**saved, "sources": {"b": saved["sources"]["a"]}})


def test_position_round_trip_and_its_two_encodings():
    layout = {"s": [("u0", 100), ("u1", 100), ("u2", 50)]}
    p = Position(layout)
    p.consume("s", 0, ["u0"] * 100, np.arange(100))  # a finished shard: one run
    p.consume("s", 0, ["u1"] * 50, np.arange(0, 100, 2))  # every other sample: cheaper as a bitmap
    p.consume("s", 0, ["u2", "u2"], [3, 4])
    state = json.loads(json.dumps(p.state()))
    assert (
        state["done"]["s"]["u0"] == [[0, 100]]
        and "bits" in state["done"]["s"]["u1"]
        and state["done"]["s"]["u2"] == [[3, 5]]
    )
    q = Position(layout, state)
    assert np.array_equal(q.bits["s"], p.bits["s"]) and q.consumed("s") == 152
    done = q.done("s")
    assert done["u0"].covers(100) and 2 in done["u1"] and 3 not in done["u1"] and set(done) == {"u0", "u1", "u2"}
    # a later epoch starts afresh; a merge keeps the later epoch's record
    r = Position(layout)
    r.consume("s", 1, ["u2"], [0])
    q.absorb(r)
    assert q.epochs["s"] == 1 and q.consumed("s") == 1
    with pytest.raises(UserError, match="does not list"):
        Position({"s": [("u9", 5)]}, state)


def test_data_position_stays_small_at_the_target_scale():
    """16 workers half-way through a 36M-sample source of 3,600 shards, in the shipped
    order (interleave 16, window 1,000): the samples each consumed, some still held back."""
    shards, per, workers, micro = 3600, 10_000, 16, 32
    layout = {"blip3o": [(f"s3://unilip-data/blip3o/pretrain-long/gen-{i:06d}.tar", per) for i in range(shards)]}
    urls = np.array([u for u, _ in layout["blip3o"]], dtype=object)
    order = shard_order(0, "blip3o", 0, shards)
    target, flat = shards * per // 2, []
    for k, group in enumerate(shard_groups(order, interleave_width(16, shards))):
        shard, index = read_plan(0, "blip3o", 0, k, [per] * len(group), 1000)
        flat.append(group[shard].astype(np.int64) * per + index)
        if sum(len(f) for f in flat) >= target:
            break
    flat = np.concatenate(flat)[:target]
    held = np.random.default_rng(0).choice(np.arange(target - 200_000, target), 20_000, replace=False)
    trained = np.setdiff1d(np.arange(target), held)  # emitted but not yet trained on: prefetch, buffers
    positions = [Position(layout) for _ in range(workers)]
    blocks = (
        trained.reshape(-1, micro)
        if len(trained) % micro == 0
        else trained[: len(trained) // micro * micro].reshape(-1, micro)
    )
    for rank in range(workers):  # blocks of rows go to the workers in turn
        mine = flat[blocks[rank::workers].ravel()]
        positions[rank].consume("blip3o", 0, urls[mine // per], mine % per)
    started = time.perf_counter()
    merged = positions[0]
    for other in positions[1:]:
        merged.absorb(other)  # what the checkpoint's all-reduce computes
    text = json.dumps(merged.state())
    elapsed = time.perf_counter() - started
    assert merged.consumed("blip3o") == len(blocks) * micro
    assert len(text) < 5_000_000 and elapsed < 2.0, (len(text), elapsed)
    print(f"data position: {len(text) / 1e6:.2f} MB JSON, merge and encode {elapsed:.2f} s")
