"""Serving benchmark: HTTP overhead at batch 1, and what dynamic batching buys under load.

    eval "$(unilip local env)"
    unilip model init --preset tiny --out ./unilip-tiny
    unilip bench serve --model ./unilip-tiny [--clients 8] [--requests 10] [--steps 2]

1. Latency at batch 1: the same generation request (one image, fixed seed) as a direct
   in-process `UniLIP.generate` call and over HTTP to `unilip serve`, one at a time;
   medians and their ratio (the HTTP + Ray Serve overhead).
2. Throughput: `--clients` concurrent clients each sending `--requests` requests, against
   the server with `max_batch_size` 4 and then 1; requests/s of both and their ratio.
The in-process model uses as many torch threads as the replica holds CPUs (serve.yaml).
"""

from __future__ import annotations

import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

PROMPT = "a red fox standing in fresh snow"


def post(session, url: str, steps: int, seed: int) -> float:
    t0 = time.perf_counter()
    r = session.post(
        f"{url}/v1/images/generations",
        timeout=600,
        json={"prompt": PROMPT, "n": 1, "seed": seed, "num_inference_steps": steps},
    )
    if r.status_code != 200:
        raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")
    return time.perf_counter() - t0


def load(url: str, clients: int, requests_per_client: int, steps: int) -> tuple[float, list[float]]:
    import requests

    def client(i: int) -> list[float]:
        with requests.Session() as s:
            return [post(s, url, steps, i * 1000 + j) for j in range(requests_per_client)]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = [t for ts in pool.map(client, range(clients)) for t in ts]
    return len(latencies) / (time.perf_counter() - t0), latencies


def run_serve_bench(
    model: str, clients: int = 8, requests_per_client: int = 10, steps: int = 2, repeats: int = 10, log=print
) -> dict:
    import requests
    import torch

    from cluster.registry import load_model
    from serve.app import DEFAULT_CONFIG, ServeProcess, deployment_options, load_config

    replica = deployment_options(load_config(DEFAULT_CONFIG)["applications"][0]).get("UniLIPModel", {})
    torch.set_num_threads(max(1, int(replica.get("ray_actor_options", {}).get("num_cpus", 1))))
    direct = load_model(model)
    direct.generate([PROMPT], steps=steps, seed=[0])  # warm-up
    in_process = []
    for i in range(repeats):
        t0 = time.perf_counter()
        direct.generate([PROMPT], steps=steps, seed=[i])
        in_process.append(time.perf_counter() - t0)
    del direct
    result = {"in_process_median_s": statistics.median(in_process)}
    for batch in (4, 1):
        log(f"[serve-bench] server with max_batch_size {batch} ...")
        with ServeProcess(model, "--max-batch-size", str(batch)) as server, requests.Session() as s:
            if batch == 4:
                post(s, server.url, steps, 0)  # warm-up
                http = [post(s, server.url, steps, i) for i in range(repeats)]
                result["http_median_s"] = statistics.median(http)
            load(server.url, clients, 2, steps)  # warm-up
            rate, latencies = load(server.url, clients, requests_per_client, steps)
            result[f"rps_batch{batch}"] = rate
            result[f"p50_batch{batch}_s"] = statistics.median(latencies)
            result[f"p99_batch{batch}_s"] = sorted(latencies)[max(0, int(len(latencies) * 0.99) - 1)]
    result["http_overhead"] = result["http_median_s"] / result["in_process_median_s"]
    result["batching_speedup"] = result["rps_batch4"] / result["rps_batch1"]
    log(
        f"[serve-bench] batch 1 latency: in-process {result['in_process_median_s'] * 1e3:.0f} ms, "
        f"HTTP {result['http_median_s'] * 1e3:.0f} ms (median of {repeats}): overhead {result['http_overhead']:.2f}x"
    )
    for b in (4, 1):
        log(
            f"[serve-bench] {clients} clients x {requests_per_client} requests, max_batch_size {b}: "
            f"{result[f'rps_batch{b}']:.2f} requests/s, p50 {result[f'p50_batch{b}_s'] * 1e3:.0f} ms, "
            f"p99 {result[f'p99_batch{b}_s'] * 1e3:.0f} ms"
        )
    log(
        f"[serve-bench] batching speed-up: {result['batching_speedup']:.2f}x ({steps} sampling steps, {os.cpu_count()} cores)"
    )
    return result
