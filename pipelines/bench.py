"""Data benchmark: S3 -> decoded, resized, normalised tensors, Ray pipeline vs a plain loop.

    unilip data bench --src s3://unilip/bench/generation [--resolution 448] [--inflight-mb 96]

Both paths read the same shards through the same S3 access point and decode with the
same function (PIL, draft mode for JPEG, squash-resized to the resolution),
then normalise for InternVL into torch tensors (the training collate's function). The
plain loop is one process; the Ray pipeline is `source_dataset` consumed with
`iter_batches`. Prints images/s for both, their ratio, images/s per core, and the peak
memory of each: proportional set size (PSS, shared pages counted once) of this process
and, for Ray, of every Ray process, sampled every 0.2 s on a second pass (the sampling
is not free, so the timed pass runs without it).
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np

from unilip.config import DataConfig


class PeakRSS:
    """Samples the summed PSS of this process (and, with `ray=True`, every Ray process)."""

    def __init__(self, ray: bool = False, interval: float = 0.2):
        import psutil

        self.psutil, self.ray, self.interval = psutil, ray, interval
        self.peak, self._stop = 0, threading.Event()

    def _sample(self) -> int:
        # PSS, not RSS: the object store's shared pages are counted once, not once per process.
        me = self.psutil.Process()
        total = me.memory_full_info().pss
        if self.ray:
            for p in self.psutil.process_iter(["name", "cmdline"]):
                try:
                    cmd = " ".join(p.info["cmdline"] or [])
                    if p.pid != me.pid and ("ray::" in (p.info["name"] or "") or "ray/" in cmd or "ray::" in cmd):
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


def ray_pipeline(src: str, task: str, s3, resolution: int) -> int:
    from pipelines.read import source_dataset

    count = 0
    for batch in source_dataset(src, task, s3, resolution).iter_batches(batch_size=32, batch_format="numpy"):
        count += len(_normalise(batch["image"]))
        if "source" in batch:
            count += len(_normalise(batch["source"]))
    return count


def run_bench(src: str, s3, resolution: int = 448, inflight_mb: int | None = DataConfig.inflight_mb, log=print) -> dict:
    from cluster.connect import init_ray, quiet_ray_data
    from pipelines.read import configure_data_context, shard_uris
    from pipelines.shards import read_manifest

    task = read_manifest(src, s3).task
    uris = shard_uris(src, s3)
    cores = os.cpu_count() or 1

    def measure(run, ray: bool) -> tuple[int, float, int]:
        """Images, seconds and peak memory of `run`: timed on a pass of its own, because
        sampling the memory of every Ray process costs a good part of a core."""
        t0 = time.perf_counter()
        n = run()
        seconds = time.perf_counter() - t0
        with PeakRSS(ray=ray) as rss:
            run()
        return n, seconds, rss.peak

    plain_loop(uris[:1], task, s3, resolution)  # warm-up: imports and first calls are not throughput
    n_plain, plain_s, plain_rss = measure(lambda: plain_loop(uris, task, s3, resolution), ray=False)
    ray = init_ray()
    quiet_ray_data()
    configure_data_context(inflight_mb)
    ray_pipeline(src, task, s3, resolution)  # warm-up: worker start-up is not throughput
    n_ray, ray_s, ray_rss = measure(lambda: ray_pipeline(src, task, s3, resolution), ray=True)
    ray.shutdown()
    result = {
        "images": n_plain,
        "plain_images_per_s": n_plain / plain_s,
        "ray_images_per_s": n_ray / ray_s,
        "ratio": (n_ray / ray_s) / (n_plain / plain_s),
        "plain_per_core": n_plain / plain_s,
        "ray_per_core": n_ray / ray_s / cores,
        "plain_peak_rss_mb": plain_rss / 2**20,
        "ray_peak_rss_mb": ray_rss / 2**20,
        "cores": cores,
    }
    if n_ray != n_plain:
        raise RuntimeError(f"the two paths decoded different numbers of images: {n_ray} vs {n_plain}")
    budget = "Ray Data default" if inflight_mb is None else f"{inflight_mb} MB"
    log(f"[bench] {src}: {n_plain} images at {resolution} px, {cores} cores, in-flight budget {budget}")
    log(f"[bench] plain loop   {result['plain_images_per_s']:7.1f} images/s  ({result['plain_per_core']:.1f}/core, 1 core)  peak memory {result['plain_peak_rss_mb']:.0f} MB")
    log(f"[bench] Ray pipeline {result['ray_images_per_s']:7.1f} images/s  ({result['ray_per_core']:.1f}/core)  peak memory {result['ray_peak_rss_mb']:.0f} MB (PSS, driver + Ray processes)")
    log(f"[bench] ratio Ray / plain: {result['ratio']:.2f}x")
    return result
