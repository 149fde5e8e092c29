"""Step-time benchmark: the Ray Train + DeepSpeed loop vs a bare PyTorch loop, same model and batch.

    eval "$(unilip local env)"
    unilip data sample --out s3://$UNILIP_BUCKET/sample --gen 64 --edit 32 --size 256
    unilip data sample --out s3://$UNILIP_BUCKET/sample-eval --gen 4 --edit 0 --seed 1
    unilip bench train recon-stage1 --preset tiny --steps 40 --warmup 10

Both loops train the same stage from the same seed with the same micro batch, gradient
accumulation (one worker), precision and torch thread count. The bare loop is one
process running the training loop's own `optimizer_step` on a plain-PyTorch stand-in for
the DeepSpeed engine (AdamW, clipping; in bf16 the parameters are cast as DeepSpeed
casts them, without fp32 master weights), and EMA, over batches decoded and mixed
beforehand and held in memory, so its step is compute only. The Ray loop is `unilip train` with one worker: DeepSpeed (ZeRO from the
recipe), batches streamed from S3 through Ray Data and the task mixer, the data position
bookkeeping; each step's time is the loop's `train/step_s` metric in MLflow. Steps that
checkpoint or evaluate are excluded (neither runs inside the timed span), and so are the
first `--warmup` steps of each loop. Prints the median and mean step time of both and
their ratio.
"""

from __future__ import annotations

import random
import statistics
import time

import torch

from unilip.config import ConfigError, Recipe


def plain_batches(recipe: Recipe, s3, count: int) -> list[dict]:
    """`count` mixer batches decoded in this process: the recipe's sources and ratios, no Ray."""
    from pipelines.decode import SampleDecoder
    from pipelines.ingest import source_specs
    from pipelines.mix import MixSource, TaskMixer
    from pipelines.read import shard_uris
    from pipelines.shard_source import read_shard

    def epoch(uri: str, task: str):
        decode = SampleDecoder(task, recipe.data.resolution, preprocess=recipe.data.preprocess, seed=recipe.data.seed)
        for url in shard_uris(uri, s3):
            fs, path = s3.resolve(url)
            rows = list(read_shard(fs, path, url, task))
            yield decode({k: [r.get(k) for r in rows] for k in rows[0]})

    specs = source_specs(recipe.data, s3)
    sources = [
        MixSource(s.name, s.task, specs[s.name].weight, lambda _, s=s: epoch(s.uri, s.task))
        for s in recipe.data.sources
    ]
    mixer = TaskMixer(sources, recipe.train.micro_batch, recipe.data.batch_mode, recipe.data.seed)
    return [mixer.next_batch() for _ in range(count)]


class BareEngine:
    """What `optimizer_step` asks of a DeepSpeed engine, in plain PyTorch: forward, a
    backward scaled for accumulation, and clip + AdamW at each accumulation boundary.
    In bf16 it casts the parameters as DeepSpeed does, without fp32 master weights."""

    def __init__(self, net, optimizer, accumulation: int, grad_clip: float):
        self.net, self.optimizer, self.accumulation, self.grad_clip = net, optimizer, accumulation, grad_clip
        self.params = [p for p in net.parameters() if p.requires_grad]
        self.micro = 0

    def __call__(self, *args):
        return self.net(*args)

    def backward(self, loss) -> None:
        (loss / self.accumulation).backward()

    def step(self) -> None:
        self.micro += 1
        if self.micro % self.accumulation == 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)


def bare_step_times(recipe: Recipe, init_from: str | None, s3, steps: int, threads: int, log=print) -> list[float]:
    """Seconds per optimizer step of a plain PyTorch loop (one process, no DeepSpeed, no Ray)."""
    from jobs.training.loop import build_stage, optimizer_step
    from jobs.training.optim import EMA, gradient_accumulation
    from pipelines.mix import collate

    tc = recipe.train
    torch.set_num_threads(threads)
    stage = build_stage(recipe, init_from, s3, "cpu")
    if tc.precision == "bf16":
        for p in stage.net.parameters():
            p.data = p.data.to(torch.bfloat16)
    accumulation = gradient_accumulation(tc, 1)
    log(f"[bench] bare loop: decoding {steps * accumulation} micro batches into memory")
    batches = iter(plain_batches(recipe, s3, steps * accumulation))
    engine = BareEngine(stage.net, stage.optimizer, accumulation, tc.grad_clip)
    ema = EMA({n: p for n, p in stage.net.named_parameters() if p.requires_grad}, tc.ema_decay)
    rng, generator = random.Random(tc.seed * 1000), torch.Generator().manual_seed(tc.seed * 1000)
    times = []
    stage.net.train()
    for step in range(steps):
        started = time.perf_counter()
        micro = [collate(next(batches)) for _ in range(accumulation)]
        optimizer_step(engine, stage, micro, step, recipe, 1, rng, generator, "cpu")
        ema.update(step + 1)
        times.append(time.perf_counter() - started)
    return times


def timed_run(overrides: list[str] | None, steps: int, checkpoint_every: int) -> list[str]:
    """The overrides of a timed `unilip train` run: `steps` steps, each logged, no evaluation."""
    return [
        *(overrides or []),
        f"train.steps={steps}",
        "train.log_every=1",
        "train.eval_every=0",
        f"train.checkpoint_every={checkpoint_every}",
    ]


def ray_step_times(
    name: str, preset: str, overrides: list[str], init_from: str | None, run_name: str, log=print
) -> list[float]:
    """Seconds per optimizer step of `unilip train` with one worker, from its MLflow metrics."""
    return [v for _, v in ray_run_metrics(name, preset, overrides, init_from, run_name, ["train/step_s"], log)[0]]


def ray_run_metrics(
    name: str, preset: str, overrides: list[str], init_from: str | None, run_name: str, keys: list[str], log=print
) -> list[list[tuple[int, float]]]:
    """`unilip train` with one worker; then each of `keys` from its MLflow run, as (step, value) in step order."""
    import os

    import mlflow

    from jobs.tracking import find_run
    from jobs.training.run import Launch
    from jobs.training.train import EXPERIMENT, run_stage

    run_stage(name, Launch(preset, 1, overrides=overrides, cpus_per_worker=1.0), init_from, run_name, log=log)
    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI"))
    run = find_run(EXPERIMENT, run_name)
    client = mlflow.MlflowClient()
    return [
        [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, k), key=lambda m: m.step)]
        for k in keys
    ]


def run_step_bench(
    name: str,
    preset: str = "tiny",
    steps: int = 40,
    warmup: int = 10,
    overrides: list[str] | None = None,
    init_from: str | None = None,
    log=print,
) -> dict:
    from jobs.training.train import prepare
    from unilip.s3 import s3_access

    if steps <= warmup:
        raise ConfigError(f"--steps ({steps}) must exceed --warmup ({warmup})")
    # One worker, every step logged; no eval, one checkpoint at the end (outside the timed span).
    overrides = timed_run(overrides, steps, checkpoint_every=steps)
    recipe = prepare(name, preset, overrides)
    s3 = s3_access(recipe.s3)
    threads = 1  # what a Ray worker holding 1 CPU gets (OMP_NUM_THREADS=1)
    run_name = f"bench-{name}-{preset}-{int(time.time())}"
    log(
        f"[bench] {name} ({preset}): {steps} steps, micro batch {recipe.train.micro_batch}, "
        f"global batch {recipe.train.global_batch}, {threads} torch thread, warm-up {warmup} steps"
    )
    ray_times = ray_step_times(name, preset, overrides, init_from, run_name, log)
    if len(ray_times) != steps:
        raise RuntimeError(f"the Ray run logged {len(ray_times)} step times, expected {steps}")
    bare_times = bare_step_times(recipe, init_from, s3, steps, threads, log)
    ray_t, bare_t = ray_times[warmup:], bare_times[warmup:]
    result = {
        "steps_timed": len(ray_t),
        "bare_median_s": statistics.median(bare_t),
        "bare_mean_s": statistics.fmean(bare_t),
        "ray_median_s": statistics.median(ray_t),
        "ray_mean_s": statistics.fmean(ray_t),
    }
    result["ratio_median"] = result["ray_median_s"] / result["bare_median_s"]
    result["ratio_mean"] = result["ray_mean_s"] / result["bare_mean_s"]
    log(
        f"[bench] bare PyTorch loop        median {result['bare_median_s'] * 1e3:7.1f} ms/step  mean {result['bare_mean_s'] * 1e3:7.1f}"
    )
    log(
        f"[bench] Ray Train + DeepSpeed    median {result['ray_median_s'] * 1e3:7.1f} ms/step  mean {result['ray_mean_s'] * 1e3:7.1f}"
    )
    log(
        f"[bench] ratio Ray / bare: {result['ratio_median']:.2f}x (median), {result['ratio_mean']:.2f}x (mean), "
        f"over steps {warmup + 1}-{steps}"
    )
    return result
