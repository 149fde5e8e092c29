"""Data benchmarks.

    unilip bench data --src s3://unilip/bench/generation [--resolution 448] [--inflight-mb 96]
    unilip bench data --ingest --src s3://unilip/bench/generation [--micro-batch 32] [--step-s 0.2]

Decode (the default): S3 -> decoded, resized, normalised tensors, Ray pipeline vs a plain
loop. Both paths read the same shards through the same S3 access point and decode with
the same function (PIL, draft mode for JPEG, squash-resized to the resolution), then
normalise for InternVL into torch tensors (the training collate's function). The
plain loop is one process; the Ray pipeline is `source_dataset` consumed with
`iter_batches`, in manifest order and in the shipped shuffled order (`data.shuffle`,
`shard_interleave`, `shuffle_buffer` defaults), two passes each in ABBA order. Prints
images/s of each, their ratios, images/s per core, and the peak memory of each:
proportional set size (PSS, shared pages counted once) of this process and, for Ray, of
the private Ray it starts (GCS, raylet, object store, workers), sampled every 0.2 s on a
pass of its own in a Ray started afresh (the sampling is not free, so the timed passes
run without it; and the object store's pages a pass touches stay counted after it).

Ingest (`--ingest`): what the training worker itself spends on its data, without a
model. The source is decoded once into the object store (decode capacity to spare), then
read as a training worker reads it: a `streaming_split` (what Ray Train's
`get_dataset_shard` hands a worker) -> `worker_mixer` -> `prepared` -> `to_device` (uint8;
normalisation runs on the device), against a simulated step of `--step-s` seconds (a
sleep: a GPU step leaves the host free). Side by side, two passes each in ABBA order:
the step's path as it was (Ray re-batches blocks to the micro batch; the micro batch is
made on the step's path) and as shipped (whole blocks; `data.worker_prefetch` micro
batches prepared ahead in a thread). Prints the consumer's CPU per image (this process,
all its threads: Ray's fetching included) and the wait per micro batch.
"""

from __future__ import annotations

import contextlib
import gc
import os
import threading
import time
from collections import Counter

import numpy as np

from unilip.config import DataConfig
from unilip.errors import UserError


class PeakRSS:
    """Samples the summed PSS of this process (and, with `ray=True`, of the Ray processes it
    started: its private Ray's GCS, raylet, object store and workers)."""

    def __init__(self, ray: bool = False, interval: float = 0.2):
        import psutil

        self.psutil, self.ray, self.interval = psutil, ray, interval
        self.peak, self._stop = 0, threading.Event()

    def _sample(self) -> int:
        # PSS, not RSS: the object store's shared pages are counted once, not once per process.
        me = self.psutil.Process()
        total = me.memory_full_info().pss
        if self.ray:
            for p in me.children(recursive=True):
                try:
                    total += p.memory_full_info().pss
                except (self.psutil.NoSuchProcess, self.psutil.AccessDenied):
                    pass
        return total

    def __enter__(self):
        def loop():
            while not self._stop.is_set():
                self.peak = max(self.peak, self._sample())
                time.sleep(self.interval)

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._sample())


def _normalise(images: np.ndarray):
    import torch

    from unilip.encoder import pixel_values_from_uint8

    return pixel_values_from_uint8(torch.from_numpy(images))


def plain_loop(uris: list[str], task: str, s3, resolution: int) -> int:
    """One process: read each shard, decode every image, normalise in batches of 32."""
    from pipelines.decode import BadSample, decode_image
    from pipelines.shard_source import read_shard

    images, count = [], 0
    for uri in uris:
        fs, path = s3.resolve(uri)
        for row in read_shard(fs, path, uri, task):
            for col in ("source", "image"):
                if row.get(col):
                    try:
                        images.append(decode_image(row[col], resolution))
                    except BadSample:
                        continue
            if len(images) >= 32:
                count += len(_normalise(np.stack(images)))
                images = []
    if images:
        count += len(_normalise(np.stack(images)))
    return count


def ray_pipeline(src: str, task: str, s3, resolution: int, order) -> int:
    from pipelines.read import source_dataset

    count = 0
    for batch in source_dataset(src, task, s3, resolution, order=order, source="bench").iter_batches(
        batch_size=32, batch_format="numpy"
    ):
        count += len(_normalise(batch["image"]))
        if "source" in batch:
            count += len(_normalise(batch["source"]))
    return count


@contextlib.contextmanager
def private_ray(inflight_mb: int | None):
    """A Ray of this process's own on 127.0.0.1, started afresh: the object store's pages a
    pass touches stay counted after it, so each memory figure gets a new one."""
    from cluster.connect import pin_ray_to_loopback, quiet_ray_data
    from pipelines.read import configure_data_context

    pin_ray_to_loopback()
    import ray

    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    quiet_ray_data()
    configure_data_context(inflight_mb)
    try:
        yield
    finally:
        ray.shutdown()


def run_bench(src: str, s3, resolution: int = 448, inflight_mb: int | None = DataConfig.inflight_mb, log=print) -> dict:
    from pipelines.order import Order
    from pipelines.read import shard_uris
    from pipelines.shards import read_manifest

    task = read_manifest(src, s3).task
    uris = shard_uris(src, s3)
    cores = os.cpu_count() or 1
    shuffled, plain_order = Order.of(DataConfig()), Order(shuffle=False)

    def timed(run) -> tuple[int, float]:
        t0 = time.perf_counter()
        n = run()
        return n, time.perf_counter() - t0

    def peak(run, ray: bool) -> int:
        """Peak memory on a pass of its own: sampling every Ray process costs a good part of a core."""
        with PeakRSS(ray=ray) as rss:
            run()
        return rss.peak

    plain_loop(uris[:1], task, s3, resolution)  # warm-up: imports and first calls are not throughput
    n_plain, plain_s = timed(lambda: plain_loop(uris, task, s3, resolution))
    plain_rss = peak(lambda: plain_loop(uris, task, s3, resolution), ray=False)
    runs = {
        "manifest order": lambda: ray_pipeline(src, task, s3, resolution, plain_order),
        "shuffled": lambda: ray_pipeline(src, task, s3, resolution, shuffled),
    }
    seconds, images = {k: 0.0 for k in runs}, {k: 0 for k in runs}
    with private_ray(inflight_mb):
        runs["manifest order"]()  # warm-up: worker start-up is not throughput
        for name in ("manifest order", "shuffled", "shuffled", "manifest order"):  # ABBA: drift cancels
            n, t = timed(runs[name])
            images[name] += n
            seconds[name] += t
    rss = {}
    for name, run in runs.items():
        with private_ray(inflight_mb):
            rss[name] = peak(run, ray=True)
    rate = {name: images[name] / seconds[name] for name in runs}
    result = {
        "images": n_plain,
        "plain_images_per_s": n_plain / plain_s,
        "ray_images_per_s": rate["manifest order"],
        "shuffled_images_per_s": rate["shuffled"],
        "ratio": rate["manifest order"] / (n_plain / plain_s),
        "shuffled_ratio": rate["shuffled"] / rate["manifest order"],
        "plain_per_core": n_plain / plain_s,
        "ray_per_core": rate["manifest order"] / cores,
        "plain_peak_rss_mb": plain_rss / 2**20,
        "ray_peak_rss_mb": rss["manifest order"] / 2**20,
        "shuffled_peak_rss_mb": rss["shuffled"] / 2**20,
        "cores": cores,
    }
    if any(images[name] != 2 * n_plain for name in runs):
        raise RuntimeError(f"the paths decoded different numbers of images: {images} vs {n_plain} per pass")
    budget = "Ray Data default" if inflight_mb is None else f"{inflight_mb} MB"
    log(f"[bench] {src}: {n_plain} images at {resolution} px, {cores} cores, in-flight budget {budget}")
    log(
        f"[bench] plain loop   {result['plain_images_per_s']:7.1f} images/s  ({result['plain_per_core']:.1f}/core, 1 core)  peak memory {result['plain_peak_rss_mb']:.0f} MB"
    )
    log(
        f"[bench] Ray pipeline {result['ray_images_per_s']:7.1f} images/s  ({result['ray_per_core']:.1f}/core)  peak memory {result['ray_peak_rss_mb']:.0f} MB (PSS, driver + Ray processes), manifest order"
    )
    log(
        f"[bench] Ray shuffled {result['shuffled_images_per_s']:7.1f} images/s  peak memory {result['shuffled_peak_rss_mb']:.0f} MB "
        f"(interleave {shuffled.interleave}, window {shuffled.window}; two passes each, ABBA)"
    )
    log(
        f"[bench] ratio Ray / plain: {result['ratio']:.2f}x; shuffled / manifest order: {result['shuffled_ratio']:.2f}x"
    )
    return result


INGEST_PATHS = {  # name -> (whole blocks, micro batches prepared ahead)
    "re-batched, on the step's path": (False, 0),
    "whole blocks, prepared ahead": (True, DataConfig.worker_prefetch),
}


def ingest_pass(
    dataset,
    task: str,
    micro_batch: int,
    steps: int,
    step_s: float,
    whole_blocks: bool,
    prefetch: int,
    device,
    warmup: int = 5,
) -> dict:
    """`steps` simulated training steps of one worker over its split of `dataset`, after
    `warmup` steps: images, the process's CPU seconds and wall seconds, and the wait for each micro batch."""
    import torch

    from pipelines.ingest import SourceSpec, worker_mixer
    from pipelines.mix import StepData, prepared, to_device

    split = dataset.streaming_split(1, equal=True)[0]
    specs = {"bench": SourceSpec(task, 1.0, 0, [], "")}
    mixer = worker_mixer(
        specs,
        {"bench": split},
        micro_batch,
        "single_task",
        0,
        whole_blocks=whole_blocks,
        pin_memory=device.type == "cuda",
    )
    batches = prepared(mixer, 1, prefetch)
    waits, images = [], 0
    for i in range(warmup + steps):
        if i == warmup:
            cpu, wall = time.process_time(), time.perf_counter()
        asked = time.perf_counter()
        data = StepData(batches, 1, device, to_device)  # the training loop's own step input
        (batch,) = data
        if device.type == "cuda":
            torch.cuda.current_stream().synchronize()  # on the device: what the step needs
        if i >= warmup:
            waits.append(time.perf_counter() - asked)
            images += len(batch["image"]) + len(batch["source"])
        time.sleep(step_s)  # the step: the host is free while the device computes
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    batches.close()  # its threads would go on polling through the next pass
    return {"images": images, "cpu_s": cpu, "wall_s": wall, "waits": waits}


def settle(before: set, timeout: float = 30.0) -> None:
    """Wait for the threads started since `before` (the closed iterators' threads, Ray
    Data's among them) to end: one still inside Ray as Ray shuts down ends the process."""
    gc.collect()  # Ray Data's block prefetchers stop when their iterators are collected
    deadline = time.monotonic() + timeout
    for thread in set(threading.enumerate()) - before:
        thread.join(max(0.0, deadline - time.monotonic()))


def run_ingest_bench(
    src: str,
    s3,
    resolution: int = 448,
    micro_batch: int = 32,
    step_s: float = 0.2,
    steps: int = 40,
    inflight_mb: int | None = DataConfig.inflight_mb,
    device=None,
    log=print,
) -> dict:
    import torch

    from pipelines.read import source_dataset
    from pipelines.shards import read_manifest

    if micro_batch < 1 or steps < 1 or step_s < 0:
        raise UserError(
            f"--micro-batch and --steps must be >= 1 and --step-s >= 0, got {micro_batch}, {steps}, {step_s}"
        )
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    task = read_manifest(src, s3).task
    runs = {"as fast as it comes": (0.0, 5 * steps), f"at a {step_s} s step": (step_s, steps)}
    totals = {(path, run): Counter() for path in INGEST_PATHS for run in runs}
    waits = {key: [] for key in totals}
    with private_ray(inflight_mb):
        ours = set(threading.enumerate())
        t0 = time.perf_counter()
        # rows of a datasource name their epoch; this decoded copy serves every pass
        dataset = source_dataset(src, task, s3, resolution, source="bench").drop_columns(["epoch"]).materialize()
        log(
            f"[bench] {src}: {dataset.count()} {task} rows decoded to {resolution} px into the object store in "
            f"{time.perf_counter() - t0:.1f} s ({dataset.num_blocks()} blocks); the worker's path on {device.type}, "
            f"micro batch {micro_batch}, two passes per path (ABBA)"
        )
        names = list(INGEST_PATHS)
        for path in (names[0], names[1], names[1], names[0]):  # ABBA: drift cancels
            for run, (seconds, n) in runs.items():
                one = ingest_pass(dataset, task, micro_batch, n, seconds, *INGEST_PATHS[path], device)
                totals[path, run].update({k: one[k] for k in ("images", "cpu_s", "wall_s")})
                waits[path, run] += one["waits"]
        settle(ours)
    out = {}
    for (path, run), t in totals.items():
        w = np.array(waits[path, run])
        out.setdefault(path, {})[run] = {
            "cpu_ms_per_image": 1000 * t["cpu_s"] / t["images"],
            "images_per_s": t["images"] / t["wall_s"],
            "wait_ms": 1000 * float(w.mean()),
            "wait_p90_ms": 1000 * float(np.percentile(w, 90)),
            "wait_share": float(w.sum() / t["wall_s"]),
        }
    for path in names:
        log(f"[bench] {path}:")
        for run, o in out[path].items():
            log(
                f"[bench]   {run:22s} consumer CPU {o['cpu_ms_per_image']:.3f} ms/image  {o['images_per_s']:7.1f} images/s  "
                f"wait per micro batch {o['wait_ms']:6.1f} ms (p90 {o['wait_p90_ms']:.1f}), {100 * o['wait_share']:4.1f}% of the time"
            )
    (fast, stepped), before, after = runs, out[names[0]], out[names[1]]
    log(
        f"[bench] {names[1]} vs {names[0]}: consumer CPU "
        f"{before[fast]['cpu_ms_per_image'] / after[fast]['cpu_ms_per_image']:.2f}x less; wait {stepped} "
        f"{before[stepped]['wait_ms'] / max(after[stepped]['wait_ms'], 1e-6):.1f}x less"
    )
    return out
