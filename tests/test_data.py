"""The data plane: bad samples, storage faults, decoding, task-balanced mixing, ingest."""

import io
import json
import socket
import tarfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.budget import skip_counter
from pipelines.decode import frame, sample_rng
from pipelines.ingest import build_sources, worker_mixer
from pipelines.mix import (
    EmptyEpoch,
    MixSource,
    ReadAhead,
    StepSchedule,
    TaskMixer,
    collate,
    effective_weights,
    prepared,
)
from pipelines.order import Order
from pipelines.position import Intervals
from pipelines.read import configure_data_context, raw_dataset, source_dataset
from pipelines.sample_data import build_sample_dataset, editing_sample, generation_sample
from pipelines.shards import Manifest, ShardInfo, ShardWriter, join
from tests.conftest import run_cli, run_inline
from unilip.config import DataConfig, SourceConfig
from unilip.errors import UserError
from unilip.s3 import s3_access


def _jpeg(size, color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


def _huge_png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (9000, 8000)).save(buf, format="PNG")  # 72 Mpx: over the bomb limit
    return buf.getvalue()


def _keys(ds) -> list[str]:
    return [k for batch in ds.iter_batches(batch_size=16, batch_format="numpy") for k in batch["key"]]


def test_bad_samples_are_skipped_counted_and_good_ones_delivered_once(stack, s3, ray_session):
    base = f"s3://{stack.bucket}/bad-data"
    good_gen, good_edit = [], []
    planted_gen = {
        "bad_image": [
            {"jpg": b"this is not a jpeg", "txt": b"a cat"},
            {"jpg": _jpeg((256, 256))[:400], "txt": b"a cut"},
        ],
        "missing_text": [{"jpg": _jpeg((128, 128))}],
        "empty_text": [{"jpg": _jpeg((128, 128)), "txt": b"  \n "}],
        "caption_too_long": [{"jpg": _jpeg((128, 128)), "txt": b"a very long caption " * 51}],  # 1,020 characters
        "bad_text": [{"jpg": _jpeg((128, 128)), "txt": b"\xff\xfe caption \xfa"}],
        "image_too_small": [{"jpg": _jpeg((8, 8)), "txt": b"tiny"}],
        "image_too_large": [{"png": _huge_png(), "txt": b"a bomb"}],
        "missing_image": [{"txt": b"no picture"}],
    }
    with ShardWriter(join(base, "gen"), s3, "gen", "generation", shard_size=6) as w:
        i = 0
        for _reason, samples in planted_gen.items():
            for members in samples:
                w.write(f"bad{i:04d}", members)
                w.write(f"good{i:04d}", {k: v for k, v in generation_sample(0, i, 96).items()})
                good_gen.append(f"good{i:04d}")
                i += 1
    planted_edit = {
        "missing_edit_input": [{"output.jpg": _jpeg((96, 96)), "txt": b"Make it red."}],
        "missing_image": [{"input.jpg": _jpeg((96, 96)), "txt": b"Make it blue."}],
    }
    with ShardWriter(join(base, "edit"), s3, "edit", "editing", shard_size=5) as w:
        for i, (_reason, samples) in enumerate(planted_edit.items()):
            w.write(f"bad{i:04d}", samples[0])
        for i in range(12):
            w.write(f"good{i:04d}", editing_sample(0, i, 96))
    # truncate the last edit shard in the middle of its 3rd sample; add a shard that does not exist
    manifest = Manifest.from_json(s3.get_bytes(join(base, "edit/manifest.json")).decode())
    last = join(base, f"edit/{manifest.shards[-1].path}")
    data = s3.get_bytes(last)
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        members = tf.getmembers()
        shard_keys = list(dict.fromkeys(m.name.split(".")[0] for m in members))
        third = next(m for m in members if m.name.startswith(shard_keys[2]))
    s3.put_bytes(last, data[: third.offset_data + 100])
    manifest.shards.append(ShardInfo("edit-999999.tar", 5))
    s3.put_bytes(join(base, "edit/manifest.json"), manifest.to_json().encode())
    good_edit = [f"good{i:04d}" for i in range(12)]
    lost = set(shard_keys[2:])  # the cut sample and everything after it in that shard
    good_edit = [k for k in good_edit if k not in lost]

    counter = skip_counter()
    gen = _keys(source_dataset(join(base, "gen"), "generation", s3, 64, counter))
    edit = _keys(source_dataset(join(base, "edit"), "editing", s3, 64, counter))
    assert sorted(gen) == sorted(good_gen) and len(gen) == len(set(gen))
    assert sorted(edit) == sorted(good_edit) and len(edit) == len(set(edit))
    time.sleep(0.5)  # the counter actor receives counts asynchronously
    counts = ray_session.get(counter.get.remote())
    expected = Counter({r: len(s) for r, s in planted_gen.items()}) + Counter(planted_edit.keys())
    expected.update({"truncated_tar": 1, "unreadable_shard": 1})
    assert counts.pop("storage_retries") == 3  # the missing shard gets a few tries before it is given up
    assert counts == dict(expected)


def test_decoded_pixels_match_a_reference_decode(stack, s3, ray_session):
    uri = f"s3://{stack.bucket}/pixels"
    build_sample_dataset(uri, s3, 6, 0, shard_size=6, size=1024, log=lambda m: None)
    rows = source_dataset(join(uri, "generation"), "generation", s3, 448).take_all()
    assert len(rows) == 6
    for row in rows:
        i = int(row["key"][3:])
        with Image.open(io.BytesIO(generation_sample(0, i, 1024)["jpg"])) as im:
            reference = np.asarray(frame(im.convert("RGB"), 448, "squash"), dtype=float)
        assert row["image"].shape == (448, 448, 3) and row["image"].dtype == np.uint8
        assert np.abs(row["image"].astype(float) - reference).mean() < 4.0  # draft-mode decode vs full decode
    # and the normalisation for InternVL on the worker side
    image = np.array(rows[0]["image"])
    batch = collate(
        {"key": np.array(["k"]), "prompt": np.array(["p"]), "task": np.array(["generation"]), "image": image[None]}
    )
    px = batch["pixel_values"]
    assert px.shape == (1, 3, 448, 448)
    expected = (image / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    assert np.allclose(px[0].numpy(), expected.transpose(2, 0, 1), atol=1e-5)


def test_reconstruction_crops_and_flips_are_seeded_per_sample_and_survive_a_resume(stack, s3, ray_session):
    uri = f"s3://{stack.bucket}/augment"
    build_sample_dataset(uri, s3, 12, 0, shard_size=6, size=320, log=lambda m: None)  # non-square crops of photos
    gen = join(uri, "generation")

    def rows(seed, done=None):
        ds = source_dataset(gen, "generation", s3, 112, preprocess="random_crop", order=Order(seed=seed), done=done)
        return {r["key"]: (r["url"], r["index"], r["image"]) for r in ds.take_all()}

    first = rows(seed=5)
    assert len(first) == 12
    # each image is the crop and flip of the original that (seed, url, index) draws
    for key, (url, index, image) in first.items():
        with Image.open(io.BytesIO(generation_sample(0, int(key[3:]), 320)["jpg"])) as im:
            im.draft("RGB", (112, 112))
            expected = np.asarray(frame(im.convert("RGB"), 112, "random_crop", sample_rng(5, url, index)))
        assert np.array_equal(image, expected), key
    # a resume reads the rest of the epoch with the same crops and flips
    url0 = first["gen00000000"][0]
    rest = rows(seed=5, done={url0: Intervals([(0, 4)])})
    assert set(rest) == set(first) - {f"gen{i:08d}" for i in range(4)}
    assert all(np.array_equal(rest[k][2], first[k][2]) for k in rest)
    other = rows(seed=6)
    assert sum(not np.array_equal(other[k][2], first[k][2]) for k in first) >= 6  # another seed, other crops


def test_every_epoch_and_seed_has_its_own_order_and_a_resume_keeps_it(stack, s3, ray_session):
    uri = f"s3://{stack.bucket}/order"
    build_sample_dataset(uri, s3, 48, 0, shard_size=2, size=64, log=lambda m: None)  # 24 shards
    gen = join(uri, "generation")
    configure_data_context(None)  # as training sets it: blocks in the read plan's order

    def epochs(order, n=1, first_epoch=0, done=None):
        ds = raw_dataset(gen, "generation", s3, order=order, source="gen", first_epoch=first_epoch, done=done)
        out = []
        for _ in range(n):  # each iteration is the next epoch
            rows = [
                (u, int(i), int(e))
                for b in ds.iter_batches(batch_format="numpy")
                for u, i, e in zip(b["url"], b["index"], b["epoch"])
            ]
            out.append(rows)
        return out

    def same_shard(rows):
        return np.mean([a[0] == b[0] for a, b in zip(rows, rows[1:])])

    first, second = epochs(Order(seed=0), n=2)
    assert [e for *_, e in first] == [0] * 48 and [e for *_, e in second] == [1] * 48
    assert sorted(r[:2] for r in first) == sorted(r[:2] for r in second) and len(set(first)) == 48  # each once
    assert [r[:2] for r in first] != [r[:2] for r in second]  # a new order each epoch
    assert epochs(Order(seed=0))[0] == first  # the same seed: the same order
    assert [r[:2] for r in epochs(Order(seed=1))[0]] != [r[:2] for r in first]
    plain = epochs(Order(shuffle=False))[0]
    assert same_shard(plain) > 0.45 and same_shard(first) <= 0.25, (same_shard(plain), same_shard(first))
    # a resume: the epoch's first 20 samples were trained on; the rest comes in the epoch's order
    done = {}
    for u, i, _ in first[:20]:
        done.setdefault(u, []).append((i, i + 1))
    rest = epochs(Order(seed=0), done={u: Intervals(r) for u, r in done.items()})[0]
    assert rest == first[20:]
    # a checkpoint at the epoch's end: its rest reads nothing, and says so without an error
    # (the mixer then goes on with the next epoch: test_a_resume_at_an_epochs_end_...)
    assert epochs(Order(seed=0), done={u: Intervals([(0, 2)]) for u, *_ in first})[0] == []


def test_framing_squash_center_and_random_crop():
    im = Image.new("RGB", (300, 100))
    im.paste((255, 0, 0), (0, 0, 100, 100))  # red left third, black elsewhere
    squash = np.asarray(frame(im, 56, "squash"))
    assert squash.shape == (56, 56, 3) and squash[:, :16, 0].mean() > 200 and squash[:, 24:, 0].mean() < 20
    center = np.asarray(frame(im, 56, "center_crop"))
    assert center[..., 0].mean() < 5  # the middle square is black
    lefts = [np.asarray(frame(im, 56, "random_crop", np.random.default_rng(i)))[..., 0].mean() for i in range(40)]
    assert min(lefts) < 5 and max(lefts) > 200  # crops range over the whole width
    half = Image.new("RGB", (100, 100))
    half.paste((255, 0, 0), (0, 0, 50, 100))  # square: only the flip varies
    flipped = [
        np.asarray(frame(half, 56, "random_crop", np.random.default_rng(i)))[:, :28, 0].mean() < 100 for i in range(40)
    ]
    assert 5 < sum(flipped) < 35  # about half the draws flip
    for size in ((96, 72), (72, 96), (97, 96), (50, 333)):  # upscaling, and spans of a pixel or none
        for i in range(20):
            assert frame(Image.new("RGB", size), 224, "random_crop", np.random.default_rng(i)).size == (224, 224)
    with pytest.raises(ValueError, match="preprocess must be one of"):
        frame(im, 56, "stretch")


def _fake_source(name, task, size, weight):
    def epoch(_):
        for start in range(0, size, 50):
            keys = np.array([f"{name}-{i}" for i in range(start, min(size, start + 50))], dtype=object)
            images = {"image": np.zeros((len(keys), 2, 2, 3), np.uint8)}
            if task == "editing":
                index = np.arange(start, start + len(keys))  # an input telling its row
                images["source"] = np.broadcast_to(
                    (index % 251).astype(np.uint8)[:, None, None, None], (len(keys), 2, 2, 3)
                )
            yield {
                "key": keys,
                "prompt": keys,
                "url": np.array([name] * len(keys), dtype=object),
                "index": np.arange(start, start + len(keys)),
            } | images

    return MixSource(name, task, weight, epoch)


@pytest.mark.parametrize(
    "sizes, multipliers",
    [
        (
            {"long": 27_200_000, "short": 4_770_000, "journeydb": 4_280_000, "edit": 1_500_000},
            {"edit": 10.0},
        ),  # stage 2
        ({"sft-60k": 60_000, "sharegpt": 46_000}, {"sharegpt": 3.0}),  # stage 3
    ],
)
@pytest.mark.parametrize("mode", ["single_task", "lockstep", "mixed"])
def test_realised_task_ratio_and_determinism(sizes, multipliers, mode):
    edit_names = {"edit", "sharegpt"}
    cfgs = [
        SourceConfig(n, f"s3://b/{n}", "editing" if n in edit_names else "generation", multipliers.get(n, 1.0))
        for n in sizes
    ]
    weights = effective_weights(cfgs, sizes)
    target = sum(w for n, w in weights.items() if n in edit_names) / sum(weights.values())

    def run(seed):
        # small in-memory sources (sizes only set the weights): they run out and cycle
        mixer = TaskMixer([_fake_source(c.name, c.task, 120, weights[c.name]) for c in cfgs], 16, mode, seed)
        batches = [mixer.next_batch() for _ in range(625)]  # 10,000 samples
        return mixer, batches

    mixer, batches = run(7)
    tasks = [t for b in batches for t in b["task"]]
    assert len(tasks) == 10_000
    assert abs(tasks.count("editing") / len(tasks) - target) < 0.02, (tasks.count("editing") / len(tasks), target)
    if mode != "mixed":
        assert all(len(set(b["task"])) == 1 for b in batches)
    # an input image for each editing row, in row order, and none for generation rows
    for b in batches:
        editing = b["task"] == "editing"
        assert b["source"][:, 0, 0, 0].tolist() == (b["index"][editing] % 251).tolist()
    assert all(b["image"].dtype == torch.uint8 and b["image"].shape == (16, 2, 2, 3) for b in batches)
    assert all(c.epoch > 0 for c in mixer.cursors.values())  # every source cycled
    again = [k for b in run(7)[1] for k in b["key"]]
    assert again == [k for b in batches for k in b["key"]]  # same seed -> same order
    assert again != [k for b in run(8)[1] for k in b["key"]]


@pytest.mark.parametrize("accumulation, micro", [(1, 32), (2, 16)])
def test_every_global_step_mixes_the_tasks_at_the_target_ratio(accumulation, micro):
    # 16 workers, generation : editing = 2 : 1 (proportions), the release's batching: each
    # worker's micro batch is one task, ranks draw different tasks
    world = 16
    sources = [
        MixSource(n, t, w, None)
        for n, t, w in (("long", "generation", 0.4), ("short", "generation", 0.2667), ("edit", "editing", 0.3333))
    ]
    plan = StepSchedule(sources, micro, world, accumulation, "single_task", seed=0)
    slots = world * accumulation
    share = {"generation": 0.6667, "editing": 0.3333}
    rows = np.zeros((world, len(sources)), dtype=int)
    served = Counter()
    for _ in range(1000):
        step = plan.next_step()
        count = Counter()
        for micro_step in step:
            assert len(micro_step) == world
            for rank, slot in enumerate(micro_step):
                tasks = {plan.task_of[n] for n in slot}
                assert len(tasks) == 1 and sum(slot.values()) == micro  # single-task micro batches
                count[tasks.pop()] += 1
                for j, s in enumerate(sources):
                    rows[rank, j] += slot.get(s.name, 0)
        for task, target in share.items():
            assert abs(count[task] - target * slots) <= 1, (count, task)  # within one micro batch, every step
        served += count
        # every worker is within one step's rows of every other in each source: what the
        # read-ahead covers (pipelines.ingest), so the splits' epoch barriers cannot deadlock
        assert (rows.max(axis=0) - rows.min(axis=0)).max() <= accumulation * micro + 2
    assert abs(served["editing"] / sum(served.values()) - 0.3333) < 0.02
    assert {plan.task_of[next(iter(slot))] for slot in step[0]} == set(share)  # one global step holds both tasks
    # the same seed gives every worker the same plan
    again = StepSchedule(sources, micro, world, accumulation, "single_task", seed=0)
    again.load_state(json.loads(json.dumps(plan.state())))
    assert again.next_step() == plan.next_step()


def test_proportions_and_multipliers_do_not_mix():
    cfgs = [SourceConfig("a", "s3://b/a", proportion=0.6), SourceConfig("b", "s3://b/b", proportion=0.4)]
    assert effective_weights(cfgs, {"a": 10, "b": 1000}) == {"a": 0.6, "b": 0.4}  # size does not matter
    with pytest.raises(UserError, match="give every source a proportion, or none: c has none"):
        effective_weights([*cfgs, SourceConfig("c", "s3://b/c")], {"a": 1, "b": 1, "c": 1})


def test_two_workers_mixing_tasks_cross_many_epochs_without_deadlock(stack, s3, ray_session):
    """Ranks draw different tasks each step and a gloo all-reduce follows every step, as in
    training; the 12-sample edit source turns over its epoch (a barrier over both splits)
    again and again. Nothing hangs, and every epoch of every source is seen exactly once."""
    uri = f"s3://{stack.bucket}/ingest"
    build_sample_dataset(uri, s3, 40, 12, shard_size=4, size=96, log=lambda m: None)
    cfg = DataConfig(
        resolution=56,
        sources=[
            SourceConfig("gen", join(uri, "generation"), "generation", 1.0),
            SourceConfig("edit", join(uri, "editing"), "editing", 3.0),
        ],
    )
    sources = build_sources(cfg, s3)
    assert sources.ratios()["editing"] == pytest.approx(36 / 76)
    splits = {name: ds.streaming_split(2, equal=True) for name, ds in sources.datasets.items()}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    @ray_session.remote(num_cpus=0)
    def train_like(rank, steps=30):
        import torch
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
        mixer = worker_mixer(
            sources.specs,
            {n: s[rank] for n, s in splits.items()},
            batch_size=2,
            mode="single_task",
            seed=3,
            rank=rank,
            world=2,
        )
        seen = []
        for _ in range(steps):
            b = mixer.next_batch()
            seen.append((b["task"][0], list(zip(b["origin"], b["epoch"].tolist(), b["key"]))))
            dist.all_reduce(torch.ones(1))  # the step's collective
        dist.destroy_process_group()
        return seen, mixer.state()

    (a, state_a), (b, state_b) = ray_session.get([train_like.remote(0), train_like.remote(1)], timeout=300)
    assert state_a == state_b  # one plan
    assert any(ta != tb for (ta, _), (tb, _) in zip(a, b))  # a global step holds both tasks
    rows = [row for seen in (a, b) for _, part in seen for row in part]
    by_epoch = {}
    for origin, epoch, key in rows:
        by_epoch.setdefault((origin, epoch), []).append(key)
    assert max(e for o, e in by_epoch if o == "edit") >= 3  # at least 3 epochs of the edit source
    for (origin, epoch), keys in by_epoch.items():
        assert len(keys) == len(set(keys)), (origin, epoch)  # no sample twice within an epoch
    finished = [(o, e) for o, e in by_epoch if (o, e + 1) in by_epoch]
    for origin, epoch in finished:  # a finished epoch covered its source (equal splits: 20 + 20, 6 + 6)
        assert len(by_epoch[origin, epoch]) == {"gen": 40, "edit": 12}[origin], (origin, epoch)


def test_the_worker_shuffle_buffer_reorders_each_epoch_and_keeps_every_sample_once(stack, s3, ray_session):
    uri = f"s3://{stack.bucket}/local-shuffle"
    build_sample_dataset(uri, s3, 16, 0, shard_size=4, size=64, log=lambda m: None)
    cfg = DataConfig(resolution=56, sources=[SourceConfig("gen", join(uri, "generation"), "generation", 1.0)])
    sources = build_sources(cfg, s3)

    def keys(local_shuffle, steps=8):  # two epochs of 16 samples
        split = sources.datasets["gen"].streaming_split(1, equal=True)[0]
        mixer = worker_mixer(
            sources.specs, {"gen": split}, batch_size=4, mode="single_task", seed=3, local_shuffle=local_shuffle
        )
        batches = [mixer.next_batch() for _ in range(steps)]
        mixer.close()
        return [[k for b in batches[e * 4 : (e + 1) * 4] for k in b["key"]] for e in (0, 1)]

    plain, shuffled = keys(0), keys(8)
    assert all(sorted(epoch) == sorted(plain[0]) and len(set(epoch)) == 16 for epoch in plain + shuffled)
    assert shuffled[0] != plain[0] and shuffled[1] != plain[1]  # reordered on the worker
    assert shuffled[0] != shuffled[1]  # reseeded per epoch
    assert keys(8) == shuffled  # the same seed: the same order


def in_shared_memory(array: np.ndarray) -> bool:
    """Whether `array`'s data lies in a shared-memory mapping of this process (the object store's)."""
    address = array.ctypes.data
    for line in open("/proc/self/maps"):
        span, _, offset, _, _, *path = line.split()
        lo, hi = (int(x, 16) for x in span.split("-"))
        if lo <= address < hi:
            return "/dev/shm/" in " ".join(path)
    return False


def test_blocks_reach_the_mixer_without_a_copy(stack, s3, ray_session):
    uri = f"s3://{stack.bucket}/zero-copy"
    build_sample_dataset(uri, s3, 16, 0, shard_size=4, size=64, log=lambda m: None)
    cfg = DataConfig(resolution=56, sources=[SourceConfig("gen", join(uri, "generation"), "generation", 1.0)])
    sources = build_sources(cfg, s3)

    def delivered(**kw):  # the array Ray Data handed the mixer for the rows it just took
        split = sources.datasets["gen"].streaming_split(1, equal=True)[0]
        mixer = worker_mixer(sources.specs, {"gen": split}, batch_size=4, mode="single_task", seed=3, **kw)
        batch = mixer.next_batch()
        block = mixer.cursors["gen"]._batch["image"]
        mixer.close()
        return block, batch

    block, batch = delivered()
    assert in_shared_memory(block) and not block.flags.writeable  # a view of the object store's block
    assert not in_shared_memory(batch["image"].numpy())  # the one copy: into the micro batch
    assert not in_shared_memory(delivered(local_shuffle=8)[0])  # re-batched by Ray: copied on the way


def test_storage_outage_mid_stream_loses_nothing(stack, s3, ray_session):
    uri = f"s3://{stack.bucket}/outage"
    build_sample_dataset(uri, s3, 48, 0, shard_size=4, size=512, log=lambda m: None)
    saved = {k: s3.get_bytes(k) for k in s3.list_keys(uri)}
    ds = source_dataset(join(uri, "generation"), "generation", s3, 56, concurrency=1)
    # A small object-store budget makes Ray Data read only as fast as we consume, so most
    # shards are still unread when the server goes down.
    limits = ray_session.data.DataContext.get_current().execution_options.resource_limits
    saved_limit = limits.object_store_memory
    ray_session.data.DataContext.get_current().execution_options.resource_limits = limits.copy(
        object_store_memory=300_000
    )
    port = stack.services()["s3"].port
    keys, events = [], []

    def outage():
        svc = stack.services()["s3"]
        stack._stop(svc)  # the S3 server is down ...
        events.append("down")
        time.sleep(3)
        stack.up(("s3",))  # ... and back on the same port; it is in-memory, so restore the objects
        assert stack.services()["s3"].port == port
        # The restarted server forgot its users and keys; the stack waits for the credentials
        # endpoint to set it up again with a new key, which a new client resolves.
        restore = stack.s3()
        for key, data in saved.items():
            restore.put_bytes(key, data)
        events.append("up")

    fault, arrivals = None, []
    with ThreadPoolExecutor(1) as pool:
        for batch in ds.iter_batches(batch_size=4, batch_format="numpy", prefetch_batches=0):
            keys += list(batch["key"])
            arrivals.append((time.monotonic(), list(events)))
            if fault is None:
                fault = pool.submit(outage)
                time.sleep(0.5)
        fault.result()  # the outage's own failure, if any, with its traceback
    for cached in ("client", "filesystem"):  # this process's clients resolve their keys anew
        s3.__dict__.pop(cached, None)
    ray_session.data.DataContext.get_current().execution_options.resource_limits = limits.copy(
        object_store_memory=saved_limit
    )
    assert events == ["down", "up"]
    assert sorted(keys) == [f"gen{i:08d}" for i in range(48)]  # nothing lost, nothing twice
    # reads were still under way: batches kept arriving after the server went down (the
    # restored objects come back one by one, and readers retry until theirs is there)
    assert sum(1 for _, seen in arrivals if "down" in seen) >= 3


def test_the_trainer_refuses_rows_of_another_epoch_than_its_own():
    def batches(epoch):  # a datasource that restarts at epoch 0 whatever the trainer expects
        yield {
            "key": np.array(["a", "b"], dtype=object),
            "prompt": np.array(["p", "p"], dtype=object),
            "image": np.zeros((2, 2, 2, 3), np.uint8),
            "url": np.array(["u", "u"], dtype=object),
            "index": np.arange(2),
            "epoch": np.zeros(2, np.int64),
        }

    mixer = TaskMixer([MixSource("gen", "generation", 1.0, batches)], 2)
    assert list(mixer.next_batch()["key"]) == ["a", "b"]  # epoch 0: as expected
    with pytest.raises(RuntimeError, match="'gen': the datasource read epoch 0 while training is in epoch 1"):
        mixer.next_batch()


def test_a_resume_at_an_epochs_end_goes_on_with_the_next_epoch():
    """A checkpoint taken as an epoch ends leaves its rest empty (so can a rest of skipped
    samples, or a worker's split of a short rest): the resumed worker goes on with the next
    epoch. A whole epoch without a sample is still refused."""

    def batches(epoch):  # epoch 0's rest holds nothing; later epochs two rows each
        if epoch == 0:
            return
        yield {
            "key": np.array([f"e{epoch}a", f"e{epoch}b"], dtype=object),
            "prompt": np.array(["p", "p"], dtype=object),
            "image": np.zeros((2, 2, 2, 3), np.uint8),
            "url": np.array(["u", "u"], dtype=object),
            "index": np.arange(2),
            "epoch": np.full(2, epoch, np.int64),
        }

    resumed = TaskMixer([MixSource("gen", "generation", 1.0, batches)], 2, epochs={"gen": 0})
    assert [list(resumed.next_batch()["key"]) for _ in range(2)] == [["e1a", "e1b"], ["e2a", "e2b"]]
    with pytest.raises(EmptyEpoch, match="'gen' yields no samples in epoch 0"):
        TaskMixer([MixSource("gen", "generation", 1.0, batches)], 2).next_batch()


def test_prepared_micro_batches_carry_the_state_of_the_step_they_end():
    """Micro batches made ahead in a thread are the ones made in the caller, and each step's
    last one carries the plan's state after that step (what a checkpoint after it saves),
    while the mixer's own state has run ahead."""

    def sources():  # each read ahead in a thread of its own too
        out = [_fake_source("gen", "generation", 120, 2.0), _fake_source("edit", "editing", 30, 1.0)]
        for source in out:
            source.prefetch = 8
        return out

    def run(depth, steps=12):
        mixer = TaskMixer(sources(), 4, "single_task", seed=5, accumulation=2)
        batches = prepared(mixer, accumulation=2, depth=depth)
        got = [next(batches) for _ in range(2 * steps)]
        time.sleep(0.2)  # the thread fills its read-ahead
        live = mixer.state()
        batches.close()
        return [b for b, _ in got], [state for _, state in got], live

    batches, states, _ = run(depth=0)
    before = set(threading.enumerate())
    ahead, ahead_states, live = run(depth=3)
    assert [list(b["key"]) for b in ahead] == [list(b["key"]) for b in batches]
    assert all(s is None for s in ahead_states[0::2]) and ahead_states == states  # one state per step, at its end
    assert live != ahead_states[-1]  # the mixer itself is steps ahead of what was handed out
    assert set(threading.enumerate()) <= before  # close() ended every thread it started
    # the state at the end of step 5 continues the plan as the uninterrupted run went on
    resumed = TaskMixer(sources(), 4, "single_task", seed=5, accumulation=2)
    resumed.load_state(ahead_states[9])
    assert [resumed.next_batch()["task"][0] for _ in range(4)] == [b["task"][0] for b in batches[10:14]]
    assert len({b["task"][0] for b in batches}) == 2  # both tasks in the plan


def test_read_ahead_holds_rows_not_batches():
    pulled = []

    def stream():
        for i in range(100):
            pulled.append(i)
            yield {"key": np.arange(3)}  # small blocks: 3 rows each

    ahead = ReadAhead(stream(), 10, "rows", size=lambda b: len(b["key"]))
    time.sleep(0.3)
    assert len(pulled) == 4  # 12 rows held: at least 10, and no more blocks than that takes
    next(ahead)
    time.sleep(0.3)
    assert len(pulled) == 5  # 9 rows held: one more block
    ahead.close()
    assert not ahead._thread.is_alive()


def test_data_bench_times_both_orders_side_by_side(tmp_path):
    build_sample_dataset(str(tmp_path), s3_access(), 24, 0, shard_size=2, size=96, log=lambda m: None)
    r = run_cli("bench", "data", "--src", str(tmp_path / "generation"), "--resolution", "56")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "24 images at 56 px" in r.stdout
    ratios = r.stdout.split("shuffled / manifest order:")[1].split("x")[0]
    assert float(ratios) > 0 and "Ray shuffled" in r.stdout, r.stdout


def test_data_bench_ingest_runs_the_workers_path_before_and_after(tmp_path):
    build_sample_dataset(str(tmp_path), s3_access(), 24, 0, shard_size=4, size=96, log=lambda m: None)
    r = run_cli(
        "bench",
        "data",
        "--ingest",
        "--src",
        str(tmp_path / "generation"),
        "--resolution",
        "56",
        "--micro-batch",
        "4",
        "--steps",
        "4",
        "--step-s",
        "0.05",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "24 generation rows decoded to 56 px" in r.stdout, r.stdout
    for path in ("re-batched, on the step's path:", "whole blocks, prepared ahead:"):
        block = r.stdout.split(path)[1].splitlines()[1:3]  # as fast as it comes, at the step
        figures = [float(line.split("consumer CPU")[1].split("ms/image")[0]) for line in block]
        assert len(figures) == 2 and all(f > 0 for f in figures), r.stdout
    assert "consumer CPU" in r.stdout.splitlines()[-1] and "x less" in r.stdout.splitlines()[-1]
    bad = run_inline("bench", "data", "--ingest", "--src", str(tmp_path / "generation"), "--micro-batch", "0")
    assert bad.returncode == 2 and "--micro-batch" in bad.stderr
