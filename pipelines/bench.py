"""Data benchmark: S3 -> decoded, resized, normalised tensors, Ray pipeline vs a plain loop.

    unilip data bench --src s3://unilip/bench/generation [--resolution 448] [--inflight-mb 96]

Both paths read the same shards through the same S3 access point and decode with the
same function (PIL, draft mode for JPEG, squash-resized to the resolution),
then normalise for InternVL into torch tensors (the training collate's function). The
plain loop is one process; the Ray pipeline is `source_dataset` consumed with
`iter_batches`, in manifest order and in the shipped shuffled order (`data.shuffle`,
`shard_interleave`, `shuffle_buffer` defaults), two passes each in ABBA order. Prints
images/s of each, their ratios, images/s per core, and the peak memory of each:
proportional set size (PSS, shared pages counted once) of this process and, for Ray, of
the private Ray it starts (GCS, raylet, object store, workers), sampled every 0.2 s on a
pass of its own in a Ray started afresh (the sampling is not free, so the timed passes
run without it; and the object store's pages a pass touches stay counted after it).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time

import numpy as np

from unilip.config import DataConfig


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
    for batch in source_dataset(src, task, s3, resolution, order=order, source="bench").iter_batches(batch_size=32, batch_format="numpy"):
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
    runs = {"manifest order": lambda: ray_pipeline(src, task, s3, resolution, plain_order),
            "shuffled": lambda: ray_pipeline(src, task, s3, resolution, shuffled)}  # fmt: skip
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
    log(f"[bench] plain loop   {result['plain_images_per_s']:7.1f} images/s  ({result['plain_per_core']:.1f}/core, 1 core)  peak memory {result['plain_peak_rss_mb']:.0f} MB")
    log(f"[bench] Ray pipeline {result['ray_images_per_s']:7.1f} images/s  ({result['ray_per_core']:.1f}/core)  peak memory {result['ray_peak_rss_mb']:.0f} MB (PSS, driver + Ray processes), manifest order")
    log(f"[bench] Ray shuffled {result['shuffled_images_per_s']:7.1f} images/s  peak memory {result['shuffled_peak_rss_mb']:.0f} MB "
        f"(interleave {shuffled.interleave}, window {shuffled.window}; two passes each, ABBA)")  # fmt: skip
    log(f"[bench] ratio Ray / plain: {result['ratio']:.2f}x; shuffled / manifest order: {result['shuffled_ratio']:.2f}x")
    return result
