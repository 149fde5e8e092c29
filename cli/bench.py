"""Performance: `unilip bench model|train|checkpoint|soak|serve|data` (each prints its figures and, with
`--json FILE`, writes them) and `unilip plan` (what a run costs before renting GPUs)."""

from __future__ import annotations

import argparse

from cli.options import MODEL, overrides


def add(sub) -> None:
    bench = sub.add_parser(
        "bench", help="performance benchmarks: model, train, checkpoint, soak, serve, data"
    ).add_subparsers(dest="bench_target", required=True, metavar="TARGET")

    def target(name: str, help: str, func) -> argparse.ArgumentParser:
        p = bench.add_parser(name, help=help)
        p.add_argument("--json", help="also write the figures to this JSON file")
        p.set_defaults(func=lambda args: run(func, args))
        return p

    p = target("model", "a training step per recipe and 448 px sampling on this machine's GPU (no Ray)", model)
    p.add_argument("--preset", default="unilip-1b", help="tiny | unilip-1b | unilip-3b (default unilip-1b)")
    p.add_argument(
        "--init", choices=["random", "pretrained"], default="random", help="weights (default random: no download)"
    )
    p.add_argument("--device", help="cuda, cpu (default: cuda if there is one)")
    p.add_argument("--recipes", help="comma-separated recipes (default: all six)")
    p.add_argument("--batches", default="1,4,8", help="inference batch sizes (default 1,4,8)")
    p.add_argument("--inference-steps", type=int, default=20, help="sampling steps (default 20)")
    p.add_argument("--train-steps", type=int, default=3, help="timed optimizer steps per recipe and task (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    p.add_argument("--repeats", type=int, default=2, help="timed sampling calls per batch size (default 2)")
    p.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak (default: from its name)")

    def training_run(p: argparse.ArgumentParser, steps: int, steps_help: str) -> None:
        """The arguments of a benchmark that runs `unilip train`."""
        p.add_argument("recipe", help="recipe name, e.g. recon-stage1")
        p.add_argument("--preset", default="tiny")
        p.add_argument("--steps", type=int, default=steps, help=f"{steps_help} (default {steps})")
        overrides(p, "a recipe field")
        p.add_argument("--from", dest="from_uri", help="start from this model (stages that follow another)")

    p = target("train", "time per optimizer step: `unilip train` (1 worker) vs a bare PyTorch loop", train)
    training_run(p, 40, "optimizer steps per loop")
    p.add_argument("--warmup", type=int, default=10, help="first steps left out of the figures (default 10)")

    p = target("checkpoint", "the step loop's stall at a checkpoint: synchronous vs asynchronous upload", checkpoint)
    training_run(p, 12, "optimizer steps per run")
    p.add_argument("--every", type=int, default=2, help="a checkpoint every N steps (default 2)")

    p = target(
        "soak", "train the tiny preset on a local 3-node cluster under random faults; check every sample once", soak
    )
    p.add_argument("--minutes", type=float, default=20.0, help="how long faults are injected (default 20)")
    p.add_argument("--seed", type=int, default=0, help="the faults' kinds and moments (default 0)")
    p.add_argument("--steps", type=int, help="optimizer steps (default: enough epochs to outlast the faults)")

    p = target("serve", "HTTP overhead at batch 1 and batching speed-up under concurrent load", serve)
    p.add_argument("--model", required=True, help=f"model to serve: {MODEL}")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    p.add_argument("--requests", type=int, default=10, help="requests per client (default 10)")
    p.add_argument("--steps", type=int, default=2, help="sampling steps per image (default 2)")

    p = target(
        "data",
        "images/s S3 -> tensors: Ray pipeline (manifest order and shuffled) vs a plain single-process loop; "
        "--ingest: the training worker's CPU per image and wait per micro batch, before and after",
        data,
    )
    from unilip.config import DataConfig

    p.add_argument("--src", required=True, help="a source (directory or s3:// prefix with manifest.json)")
    p.add_argument("--resolution", type=int, default=448)
    p.add_argument(
        "--inflight-mb",
        type=int,
        default=DataConfig.inflight_mb,
        help=f"object-store MB in flight (default {DataConfig.inflight_mb}; 0: Ray Data's default)",
    )
    p.add_argument(
        "--ingest", action="store_true", help="the training worker's path (split -> mixer -> device), no model"
    )
    p.add_argument(
        "--micro-batch", type=int, default=32, help="--ingest: images per micro batch (default 32, the paper's)"
    )
    p.add_argument("--step-s", type=float, default=0.2, help="--ingest: seconds of the simulated step (default 0.2)")
    p.add_argument("--steps", type=int, default=40, help="--ingest: steps per pass (default 40)")

    p = sub.add_parser(
        "plan", help="estimate step time, wall clock, GPU hours, cost, decode cores and per-GPU memory of a recipe"
    )
    p.add_argument("recipe", help="recipe name or `all`")
    p.add_argument("--preset", default="unilip-1b", help="unilip-1b | unilip-3b (default unilip-1b)")
    p.add_argument("--gpus", type=int, help="GPUs (default: the paper's, 4 for reconstruction, 16 for generation)")
    p.add_argument("--gpu", default="a100-80g", help="a100-40g | a100-80g | h100-80g (default a100-80g)")
    p.add_argument("--price", type=float, help="USD per GPU-hour (default: the AWS on-demand list price)")
    p.add_argument("--mfu", type=float, default=0.35, help="achieved fraction of peak FLOP/s (default 0.35)")
    p.add_argument("--decode-rate", type=float, default=45.0, help="images/s a CPU core decodes (`unilip bench data`)")
    overrides(p)
    p.add_argument(
        "--no-memory",
        dest="memory",
        action="store_false",
        help="skip the per-GPU memory (it measures activations, seconds per recipe)",
    )
    p.set_defaults(func=plan)


def run(bench, args) -> int:
    """One benchmark: its figures printed as it goes, then written to --json."""
    import json
    from pathlib import Path

    figures = bench(args)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
        print(f"[bench {args.bench_target}] wrote {args.json}")
    return 0


def model(args) -> dict:
    from jobs.performance.model import run_model_bench

    batches = [int(b) for b in args.batches.split(",")]
    recipes = args.recipes.split(",") if args.recipes else None
    return run_model_bench(
        args.preset,
        args.init,
        args.device,
        recipes,
        batches,
        args.inference_steps,
        args.train_steps,
        args.warmup,
        args.repeats,
        args.peak_tflops,
    )


def train(args) -> dict:
    from jobs.performance.train_step import run_step_bench

    return run_step_bench(args.recipe, args.preset, args.steps, args.warmup, args.set, args.from_uri)


def checkpoint(args) -> dict:
    from jobs.performance.checkpoint import run_checkpoint_bench

    return run_checkpoint_bench(args.recipe, args.preset, args.steps, args.every, args.set, args.from_uri)


def soak(args) -> dict:
    from jobs.performance.soak import run_soak

    return run_soak(args.minutes, args.seed, args.steps)


def serve(args) -> dict:
    from jobs.performance.serve import run_serve_bench

    return run_serve_bench(args.model, args.clients, args.requests, args.steps)


def data(args) -> dict:
    from jobs.performance.data import run_bench, run_ingest_bench
    from unilip.s3 import s3_access

    inflight = None if args.inflight_mb == 0 else args.inflight_mb
    if args.ingest:
        return run_ingest_bench(
            args.src, s3_access(), args.resolution, args.micro_batch, args.step_s, args.steps, inflight
        )
    return run_bench(args.src, s3_access(), args.resolution, inflight)


def plan(args) -> int:
    from jobs.performance.plan import report

    report(
        args.recipe,
        args.preset,
        args.set,
        args.memory,
        gpus=args.gpus,
        gpu=args.gpu,
        price=args.price,
        mfu=args.mfu,
        decode_rate=args.decode_rate,
    )
    return 0
