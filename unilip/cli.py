"""The `unilip` command line.

    unilip --help
    unilip local up|status|env|down [--home DIR]
    unilip data sample --out s3://unilip/sample --gen 200 --edit 100
    unilip data bench --ingest --src s3://unilip/sample/generation
    unilip recipe list
    unilip recipe show gen-stage2 --set train.lr=2e-4
    unilip plan gen-stage2 --gpus 16 --gpu a100-80g
    unilip model summary --preset unilip-1b
    unilip convert official --src ./UniLIP-1B --out ./unilip-1b-release --register unilip-1b-release
    unilip eval geneval --model ./unilip-1b-release --out ./eval/unilip-1b --gpus 8
    unilip eval check geneval ./eval/unilip-1b; unilip eval summarize geneval ./eval/unilip-1b
    unilip bench model --preset unilip-1b --init random --device cuda --json bench.json
    unilip submit recon-stage1 --preset unilip-1b --workers 4 --gpu --address http://HEAD:8265 --follow
    unilip jobs list|status|logs|stop [JOB_ID] --address http://HEAD:8265
    unilip demo

Each subcommand imports what it needs when it runs, so `unilip --help` stays fast and
the model library never pulls in Ray. Errors in user input print one line and exit 2.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys

from unilip.config import DataConfig


def _local(args) -> int:
    from cluster.local import LocalStack

    stack = LocalStack(args.home, bucket=args.bucket, artifacts=args.artifacts)
    if args.action == "up":
        stack.up()
        args.action = "status"
    if args.action == "status":
        rows = stack.status()
        if not rows:
            print(f"nothing running (state in {stack.home})")
        for row in rows:
            state = "running" if row["alive"] else "DEAD"
            extra = f"  buckets: {row['buckets']}" if "buckets" in row else ""
            extra += f"  dashboard: {row['dashboard']}" if "dashboard" in row else ""
            print(f"{row['name']:<7} {state:<8} pid {row['pid']:<8} {row['address']}{extra}")
        return 0 if all(r["alive"] for r in rows) else 1
    if args.action == "env":
        for key, value in stack.env().items():
            print(f"export {key}={shlex.quote(value)}")
        return 0
    stack.down()
    left = stack.leftover_processes()
    if left:
        print(f"error: processes still running: {left}", file=sys.stderr)
        return 1
    return 0


def _data_sample(args) -> int:
    from pipelines.sample_data import build_sample_dataset
    from unilip.s3 import s3_access

    build_sample_dataset(args.out, s3_access(), args.gen, args.edit, args.seed, args.shard_size, args.size)
    return 0


def _data_convert(args) -> int:
    from cluster.connect import init_ray, quiet_ray_data
    from pipelines.convert import convert
    from unilip.s3 import s3_access

    init_ray()
    quiet_ray_data()
    convert(args.source_format, args.src, args.out, s3_access(), args.shard_size, args.task)
    return 0


def _data_bench(args) -> int:
    from pipelines.bench import run_bench
    from unilip.s3 import s3_access

    inflight = None if args.inflight_mb == 0 else args.inflight_mb
    if args.ingest:
        from pipelines.bench import run_ingest_bench

        if args.micro_batch < 1 or args.steps < 1 or args.step_s < 0:
            raise ValueError(f"--micro-batch and --steps must be >= 1 and --step-s >= 0, got {args.micro_batch}, {args.steps}, {args.step_s}")
        run_ingest_bench(args.src, s3_access(), args.resolution, args.micro_batch, args.step_s, args.steps, inflight)
    else:
        run_bench(args.src, s3_access(), args.resolution, inflight)
    return 0


def _recipe(args) -> int:
    from jobs.recipes import load_recipe, recipe_names
    from unilip.config import to_dict

    if args.action == "list":
        for name in recipe_names():
            recipe = load_recipe(name)
            print(f"{name:<18} {recipe.description}")
        return 0
    if not args.name:
        raise ValueError("recipe show needs a recipe name")
    import yaml

    print(yaml.safe_dump(to_dict(load_recipe(args.name, args.set)), sort_keys=False), end="")
    return 0


def _train(args) -> int:
    from jobs.train import run_all, run_stage

    common = dict(preset=args.preset, workers=args.workers, gpu=args.gpu, overrides=args.set, storage=args.storage,
                  cpus_per_worker=args.cpus_per_worker)  # fmt: skip
    if args.recipe == "all":
        if args.from_uri or args.run_name:
            raise ValueError("--from and --run-name apply to one stage, not to `train all` (each stage of `all` has its own "
                             "run name); a RayJob runs one stage: apply cluster/kuberay/rayjob.yaml once per stage")
        uri = run_all(**common)
    else:
        uri = run_stage(args.recipe, init_from=args.from_uri, run_name=args.run_name, **common)
    if args.export_dir:
        import shutil

        from unilip.artifacts import fetch_model

        shutil.copytree(fetch_model(uri), args.export_dir, dirs_exist_ok=True)
        print(f"model directory: {args.export_dir}")
    print(uri)
    return 0


def _submit(args) -> int:
    from cluster.submit import follow, submit

    job_id = submit(args.recipe, _train_argv(args), args.address, args.env, args.job_id)
    print(f"submitted job {job_id}: unilip jobs status {job_id} --address {args.address or '$RAY_API_SERVER_ADDRESS'}", flush=True)
    if not args.follow:
        return 0
    status = follow(args.address, job_id)
    print(f"job {job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


def _jobs(args) -> int:
    from cluster import submit as jobs

    if args.action == "list":
        rows = jobs.list_jobs(args.address)
        print(f"{'JOB ID':<30} {'STATUS':<10} {'STARTED':<20} {'RECIPE':<18} ENTRYPOINT")
        for r in rows:
            print(f"{r['id']:<30} {r['status']:<10} {r['start']:<20} {r['recipe']:<18} {r['entrypoint']}")
        return 0
    if not args.job_id:
        raise ValueError(f"jobs {args.action} needs a JOB_ID (see `unilip jobs list`)")
    if args.action == "status":
        info = jobs.job_status(args.address, args.job_id)
        print(f"{info['id']}: {info['status']}" + (f" ({info['message']})" if info["message"] else ""))
        return 0
    if args.action == "logs":
        if args.follow:
            return 0 if jobs.follow(args.address, args.job_id) == "SUCCEEDED" else 1
        print(jobs.job_logs(args.address, args.job_id), end="")
        return 0
    stopped = jobs.stop_job(args.address, args.job_id)
    print(f"{args.job_id}: {'stop requested' if stopped else 'already finished'}")
    return 0


def _train_bench(args) -> int:
    from jobs.bench import run_step_bench

    run_step_bench(args.recipe, args.preset, args.steps, args.warmup, args.set, args.from_uri)
    return 0


def _serve(args) -> int:
    from serve.app import DEFAULT_CONFIG, load_config, run_local

    overrides = {"model": args.model, "api_key_env": args.api_key_env, "max_batch_size": args.max_batch_size, "dtype": args.dtype}
    # On this machine only, unless asked: the config's 0.0.0.0 is for clusters (`serve deploy`, RayService)
    run_local(load_config(args.config or DEFAULT_CONFIG, overrides, args.host or "127.0.0.1", args.port))
    return 0


def _bench(args) -> int:
    from jobs.model_bench import run_model_bench

    batches = [int(b) for b in args.batches.split(",")]
    if any(b < 1 for b in batches) or args.train_steps < 1 or args.inference_steps < 1:
        raise ValueError("--batches, --train-steps and --inference-steps must be positive")
    recipes = args.recipes.split(",") if args.recipes else None
    run_model_bench(args.preset, args.init, args.device, recipes, batches, args.inference_steps, args.train_steps,
                    args.warmup, args.repeats, args.peak_tflops, args.json)  # fmt: skip
    return 0


def _serve_bench(args) -> int:
    from serve.bench import run_serve_bench

    run_serve_bench(args.model, args.clients, args.requests, args.steps)
    return 0


def _plan(args) -> int:
    from cluster.memory import format_memory, memory_plan, meta_stage, verdicts
    from cluster.plan import assumptions, format_plan, make_plan
    from jobs.recipes import chain, load_recipe

    names = chain() if args.recipe == "all" else [args.recipe]
    overrides = [f"model.preset={args.preset}", *args.set]
    for name in names:
        plan = make_plan(name, args.preset, args.gpus, args.gpu, args.price, args.mfu, args.decode_rate, overrides=overrides)
        print(format_plan(plan))
        if args.memory:
            print(f"  (measuring {name}'s activations at real size on the meta device ...)", file=sys.stderr, flush=True)
            recipe = load_recipe(name, overrides)
            stage = meta_stage(recipe)
            mem = memory_plan(recipe, plan.gpus, stage=stage)
            print(format_memory(mem, verdicts(mem, recipe, stage)))
        print(flush=True)
    print(assumptions(plan))
    return 0


def _model(args) -> int:
    from unilip.config import ModelConfig, apply_overrides

    if args.action == "summary":
        from unilip.summary import format_summary, parameter_summary

        cfg = apply_overrides(ModelConfig(preset=args.preset), args.set)
        print(format_summary(args.preset, parameter_summary(args.preset, cfg.dit_pos_embed), cfg.dit_pos_embed))
        return 0
    from unilip.model import UniLIP

    if not args.out:
        raise ValueError("model init needs --out DIR (the model directory to write)")
    cfg = apply_overrides(ModelConfig(preset=args.preset), args.set)
    out = UniLIP.from_preset(args.preset, cfg).save_pretrained(args.out)
    print(f"wrote an untrained {args.preset} model to {out}")
    return 0


def _convert(args) -> int:
    from unilip.official import convert_official

    sources = {"mllm": args.mllm, "dit": args.dit, "dcae": args.dcae}
    report = convert_official(args.src, args.out, args.preset, sources, check_llm=not args.skip_llm_check)
    print("\n".join(report.lines()))
    if args.register:
        print(f"registered {_register_converted(args.out, args.register, args.src)}")
    return 0


def _register_converted(model_dir: str, name: str, src: str) -> str:
    """Log a converted model directory as an MLflow run's artifacts and register it."""
    import json
    import os
    from pathlib import Path

    from jobs.tracking import Tracker

    release = json.loads((Path(model_dir) / "config.json").read_text())["converted_from"]
    tracker = Tracker(os.environ.get("MLFLOW_TRACKING_URI"), "unilip-convert", f"convert-{name}", None, release)
    try:
        return tracker.register(Path(model_dir), name, {"source": src, "summary": f"converted from the release checkpoint {src}"})
    finally:
        tracker.end()


def _eval(args) -> int:
    from pathlib import Path

    from jobs.benchmarks import benchmark

    if args.bench_command == "recon":
        from jobs.recon_eval import run_recon

        run_recon(args.model, args.data, args.out, args.size, args.fid_weights, args.batch, args.gpus, args.actors, args.limit, args.dtype)
        return 0
    if args.bench_command in ("check", "summarize"):
        from jobs.eval_images import bench_files

        bench = benchmark(args.name)
        files = bench_files(bench, args.out, args.bench)
        if args.bench_command == "check":
            problems = bench.check(Path(args.out), files, args.n)
            for p in problems[:50]:
                print(f"  {p}")
            print(f"{bench.name}: {'layout ok' if not problems else f'{len(problems)} problems'} ({args.out})")
            return 0 if not problems else 1
        _summarize(bench, args.out, files)
        return 0
    from jobs.eval_images import Sampling, run_eval

    bench = benchmark(args.bench_command)
    sampling = Sampling(args.guidance, args.steps, args.solver)
    run_eval(bench, args.model, args.out, args.bench, sampling, args.n, args.seed, args.batch, args.gpus, args.actors, args.limit,
             args.dtype, args.allow_unpinned)  # fmt: skip
    if args.score:
        _score(bench, args)
    return 0


def _score(bench, args) -> None:
    """Run the benchmark's official scorer in its own environment, then summarize."""
    import subprocess
    from pathlib import Path

    files = bench.locate(args.bench)
    if not args.scorer_repo:
        raise ValueError(f"--score needs --scorer-repo (the official {bench.source.split('@')[0]} checkout) and --scorer-python")
    argv = bench.score_argv(Path(args.out), files, Path(args.scorer_repo), args.scorer_python, vars(args))
    if argv is None:
        raise ValueError(f"{bench.name} is scored by an API judge: run the commands printed above with your key")
    cmd, cwd = argv
    print(f"[eval] scoring: {' '.join(cmd)}", flush=True)
    if subprocess.run(cmd, cwd=cwd).returncode != 0:
        raise ValueError(f"the {bench.name} scorer failed (its output is above)")
    _summarize(bench, args.out, files)


def _summarize(bench, out: str, files) -> None:
    """The scorer's outputs -> the benchmark's scores, printed and logged to the eval's MLflow run."""
    from pathlib import Path

    from jobs.eval_images import log_scores

    scores = bench.summarize(Path(out), files)
    for k, v in scores.items():
        print(f"{k:<28} {v:.4f}")
    if run := log_scores(bench.name, out, scores):
        print(f"logged to MLflow run {run}")


def _load_model(args):
    from unilip.model import UniLIP

    return UniLIP.from_pretrained(args.model).for_inference(args.device, args.dtype)


def _open_images(paths: list[str]):
    from PIL import Image, UnidentifiedImageError

    images = []
    for path in paths:
        try:
            with Image.open(path) as im:
                im.load()
                images.append(im.copy())
        except (OSError, UnidentifiedImageError) as e:
            raise ValueError(f"cannot read image {path}: {e}") from None
    return images


def _write_images(images, out: str, stem: str) -> None:
    from pathlib import Path

    Path(out).mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        path = Path(out) / f"{stem}-{i:02d}.png"
        image.save(path)
        print(path)


def _generate(args) -> int:
    model = _load_model(args)
    kw = dict(guidance_scale=args.guidance, steps=args.steps, seed=args.seed, solver=args.solver)
    if args.command == "generate":
        images = model.generate(args.prompt * args.n, **kw)
    else:
        sources = _open_images(args.image)
        if len(args.prompt) not in (1, len(sources)):
            raise ValueError(f"give one instruction, or one per image ({len(sources)})")
        prompts = args.prompt * len(sources) if len(args.prompt) == 1 else args.prompt
        images = model.edit(sources, prompts, **kw)
    _write_images(images, args.out, args.command)
    return 0


def _reconstruct(args) -> int:
    _write_images(_load_model(args).reconstruct(_open_images(args.image), args.size), args.out, "reconstruction")
    return 0


def _understand(args) -> int:
    print(_load_model(args).understand(_open_images([args.image])[0], args.question, args.max_new_tokens))
    return 0


def _demo(args) -> int:
    from jobs.demo import run_demo

    if args.steps < 2:
        raise ValueError("--steps must be at least 2 (a loss trend needs two points)")
    stages = {"stages": tuple(args.stages.split(","))} if args.stages else {}
    run_demo(args.steps, args.gen, args.edit, args.size, args.results, args.lr, args.workers, verbose=args.verbose, **stages)
    return 0


def _inference_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if there is one)")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto", help="default auto: bf16 on CUDA, fp32 on the CPU")


def _train_args(p: argparse.ArgumentParser) -> None:
    """The options of `unilip train`, shared with `unilip submit` (which passes them on)."""
    p.add_argument("recipe", help="recipe name (unilip recipe list) or `all` for the whole chain")
    p.add_argument("--preset", default="tiny", help="tiny | unilip-1b | unilip-3b (tiny also picks the recipe's tiny variant)")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers (default 2)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (nccl, bf16)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field, e.g. train.zero_stage=3")
    p.add_argument("--from", dest="from_uri", help="start from this model: DIR, s3://..., models:/NAME/VERSION")
    p.add_argument("--run-name", help="run name (default RECIPE-PRESET); the same name resumes")
    p.add_argument("--storage", help="checkpoint storage (default s3://$UNILIP_BUCKET/runs)")
    p.add_argument("--cpus-per-worker", type=float, help="CPUs reserved per worker (default: 1 with GPUs, else half the cluster's CPUs shared)")


def _train_argv(args) -> list[str]:
    """The parsed train options back as command-line arguments."""
    argv = ["--preset", args.preset, "--workers", str(args.workers)]
    argv += ["--gpu"] if args.gpu else []
    argv += [a for item in args.set for a in ("--set", item)]
    for dest, flag in (("from_uri", "--from"), ("run_name", "--run-name"), ("storage", "--storage"), ("cpus_per_worker", "--cpus-per-worker")):
        if getattr(args, dest) is not None:
            argv += [flag, str(getattr(args, dest))]
    return argv


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unilip", description="UniLIP training and serving system.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("local", help="the embedded local stack (Ray, S3 server, MLflow on 127.0.0.1)")
    p.add_argument("action", choices=["up", "status", "env", "down"])
    p.add_argument("--home", help="state directory (default: $UNILIP_HOME or ~/.unilip)")
    p.add_argument("--bucket", default="unilip", help="bucket created in the S3 server (default: unilip)")
    p.add_argument("--artifacts", choices=["bucket", "local"], default="bucket", help="where MLflow stores artifacts")
    p.set_defaults(func=_local)

    data = sub.add_parser("data", help="datasets: sample builder, converters, benchmark").add_subparsers(dest="data_command", required=True, metavar="ACTION")
    p = data.add_parser("sample", help="write the sample dataset (real photos, real edits) as webdataset shards")
    p.add_argument("--out", required=True, help="s3://BUCKET/PREFIX or a directory")
    p.add_argument("--gen", type=int, default=200, help="generation samples (default 200)")
    p.add_argument("--edit", type=int, default=100, help="editing samples (default 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-size", type=int, default=100, help="samples per shard (default 100)")
    p.add_argument("--size", type=int, default=1024, help="longest image side in pixels (default 1024)")
    p.set_defaults(func=_data_sample)
    p = data.add_parser("convert", help="convert GPT-Image-Edit / ShareGPT-4o-Image / webdataset tars to shards (on Ray)")
    p.add_argument("--from", dest="source_format", required=True, choices=["gpt-image-edit", "sharegpt-4o", "wds"])
    p.add_argument("--src", required=True, help="source directory or s3:// prefix")
    p.add_argument("--out", required=True, help="s3://BUCKET/PREFIX or a directory")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--task", choices=["generation", "editing"], default="generation", help="task of --from wds tars")
    p.set_defaults(func=_data_convert)
    p = data.add_parser("bench", help="images/s S3 -> tensors: Ray pipeline (manifest order and shuffled) vs a plain single-process "
                        "loop; --ingest: the training worker's CPU per image and wait per micro batch, before and after")  # fmt: skip
    p.add_argument("--src", required=True, help="a source (directory or s3:// prefix with manifest.json)")
    p.add_argument("--resolution", type=int, default=448)
    p.add_argument("--inflight-mb", type=int, default=DataConfig.inflight_mb,
                   help=f"object-store MB in flight (default {DataConfig.inflight_mb}; 0: Ray Data's default)")  # fmt: skip
    p.add_argument("--ingest", action="store_true", help="the training worker's path (split -> mixer -> device), no model")
    p.add_argument("--micro-batch", type=int, default=32, help="--ingest: images per micro batch (default 32, the paper's)")
    p.add_argument("--step-s", type=float, default=0.2, help="--ingest: seconds of the simulated step (default 0.2)")
    p.add_argument("--steps", type=int, default=40, help="--ingest: steps per pass (default 40)")
    p.set_defaults(func=_data_bench)

    p = sub.add_parser("recipe", help="training recipes: list them, show one with overrides")
    p.add_argument("action", choices=["list", "show"])
    p.add_argument("name", nargs="?", help="recipe name or YAML path (for show)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field, e.g. train.lr=2e-4")
    p.set_defaults(func=_recipe)

    p = sub.add_parser("train", help="train a stage (or `all` of them) on the Ray cluster: Ray Train + DeepSpeed")
    _train_args(p)
    p.add_argument("--export-dir", help="also copy the final model directory here")
    p.set_defaults(func=_train)

    p = sub.add_parser("submit", help="submit `unilip train RECIPE ...` to a Ray cluster as a Ray job")
    _train_args(p)
    p.add_argument("--address", help="the cluster's dashboard, http://HEAD:8265 (default $RAY_API_SERVER_ADDRESS)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra environment variable for the job")
    p.add_argument("--job-id", help="submission id (default: Ray picks one)")
    p.add_argument("--follow", action="store_true", help="stream the job's log until it ends; exit 1 unless it SUCCEEDED")
    p.set_defaults(func=_submit)

    p = sub.add_parser("jobs", help="list Ray jobs, or show the status or log of one, or stop it")
    p.add_argument("action", choices=["list", "status", "logs", "stop"])
    p.add_argument("job_id", nargs="?", help="job id (status, logs, stop)")
    p.add_argument("--address", help="the cluster's dashboard, http://HEAD:8265 (default $RAY_API_SERVER_ADDRESS)")
    p.add_argument("--follow", action="store_true", help="logs: stream until the job ends")
    p.set_defaults(func=_jobs)

    p = sub.add_parser("plan", help="estimate step time, wall clock, GPU hours, cost, decode cores and per-GPU memory of a recipe")
    p.add_argument("recipe", help="recipe name or `all`")
    p.add_argument("--preset", default="unilip-1b", help="unilip-1b | unilip-3b (default unilip-1b)")
    p.add_argument("--gpus", type=int, help="GPUs (default: the paper's, 4 for reconstruction, 16 for generation)")
    p.add_argument("--gpu", default="a100-80g", help="a100-40g | a100-80g | h100-80g (default a100-80g)")
    p.add_argument("--price", type=float, help="USD per GPU-hour (default: the AWS on-demand list price)")
    p.add_argument("--mfu", type=float, default=0.35, help="achieved fraction of peak FLOP/s (default 0.35)")
    p.add_argument("--decode-rate", type=float, default=45.0, help="images/s one CPU core decodes (default 45, `unilip data bench`)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field, e.g. train.zero_stage=3")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the per-GPU memory (it measures activations, seconds per recipe)")
    p.set_defaults(func=_plan)

    p = sub.add_parser("train-bench", help="time per optimizer step: `unilip train` (1 worker) vs a bare PyTorch loop")
    p.add_argument("recipe", help="recipe name, e.g. recon-stage1")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per loop (default 40)")
    p.add_argument("--warmup", type=int, default=10, help="first steps left out of the figures (default 10)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field")
    p.add_argument("--from", dest="from_uri", help="start from this model (stages that follow another)")
    p.set_defaults(func=_train_bench)

    p = sub.add_parser("serve", help="serve a model over HTTP (OpenAI-compatible) with Ray Serve, on 127.0.0.1; Ctrl-C stops")
    p.add_argument("--model", required=True, help="models:/NAME/VERSION, models:/NAME@ALIAS, a directory or s3://...")
    p.add_argument("--config", help="Ray Serve config file (default: the project's serve/serve.yaml)")
    p.add_argument("--host", help="HTTP host (default 127.0.0.1; the config's 0.0.0.0 is for clusters)")
    p.add_argument("--port", type=int, help="HTTP port (default from the config: 8000)")
    p.add_argument("--api-key-env", help="require `Authorization: Bearer $VAR` with the key in this environment variable")
    p.add_argument("--max-batch-size", type=int, help="generation/edit requests per model call")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], help="model precision (default from the config: auto, bf16 on GPUs)")
    p.set_defaults(func=_serve)

    p = sub.add_parser("bench", help="model: a training step per recipe and 448 px sampling on this machine's GPU (no Ray)")
    p.add_argument("target", choices=["model"])
    p.add_argument("--preset", default="unilip-1b", help="tiny | unilip-1b | unilip-3b (default unilip-1b)")
    p.add_argument("--init", choices=["random", "pretrained"], default="random", help="weights (default random: no download)")
    p.add_argument("--device", help="cuda, cpu (default: cuda if there is one)")
    p.add_argument("--recipes", help="comma-separated recipes (default: all six)")
    p.add_argument("--batches", default="1,4,8", help="inference batch sizes (default 1,4,8)")
    p.add_argument("--inference-steps", type=int, default=20, help="sampling steps (default 20)")
    p.add_argument("--train-steps", type=int, default=3, help="timed optimizer steps per recipe and task (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    p.add_argument("--repeats", type=int, default=2, help="timed sampling calls per batch size (default 2)")
    p.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak (default: from its name)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.set_defaults(func=_bench)

    p = sub.add_parser("serve-bench", help="HTTP overhead at batch 1 and batching speed-up under concurrent load")
    p.add_argument("--model", required=True, help="model to serve (directory, s3://..., models:/...)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    p.add_argument("--requests", type=int, default=10, help="requests per client (default 10)")
    p.add_argument("--steps", type=int, default=2, help="sampling steps per image (default 2)")
    p.set_defaults(func=_serve_bench)

    p = sub.add_parser("model", help="models: create a model directory from a preset (init), or count a preset's parameters (summary)")
    p.add_argument("action", choices=["init", "summary"])
    p.add_argument("--preset", default="tiny", help="tiny | unilip-1b | unilip-3b")
    p.add_argument("--out", help="model directory to write (init)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a ModelConfig field, e.g. init=random, dit_pos_embed=sincos")  # fmt: skip
    p.set_defaults(func=_model)

    convert = sub.add_parser("convert", help="convert other checkpoints to this project's model directory").add_subparsers(
        dest="convert_command", required=True, metavar="FORMAT")  # fmt: skip
    p = convert.add_parser("official", help="the authors' released UniLIP-1B/3B (kanashi6/UniLIP-*) -> a model directory")
    p.add_argument("--src", required=True, help="the release directory (config.json + safetensors), or an s3:// prefix holding it")
    p.add_argument("--out", required=True, help="model directory to write")
    p.add_argument("--preset", help="tiny | unilip-1b | unilip-3b (default: from the release's mllm_hf_path)")
    p.add_argument("--register", metavar="NAME", help="also register the result in MLflow as NAME ($MLFLOW_TRACKING_URI)")
    for part in ("mllm", "dit", "dcae"):
        p.add_argument(f"--{part}", help=f"where the frozen {part} comes from (default: the preset's hub id; a directory or s3://)")
    p.add_argument("--skip-llm-check", action="store_true",
                   help="do not check that the release's frozen LLM is the one of --mllm (tensor by tensor; fails on the first difference)")  # fmt: skip
    p.set_defaults(func=_convert)

    evals = sub.add_parser("eval", help="the paper's benchmarks: images as the official scorers read them, check, summarize").add_subparsers(
        dest="bench_command", required=True, metavar="BENCH")  # fmt: skip
    from jobs.benchmarks import BENCHMARKS

    for name, bench in BENCHMARKS.items():
        p = evals.add_parser(name, help=f"{bench.source}: {bench.images_per_prompt} image(s) per prompt")
        p.add_argument("--model", required=True, help="DIR, s3://..., models:/NAME/VERSION")
        p.add_argument("--out", required=True, help="output directory or s3:// prefix (the scorer's layout goes under OUT/" + name + ")")
        p.add_argument("--bench", help=bench.bench_help)
        p.add_argument("--n", type=int, help=f"images per prompt (default {bench.images_per_prompt}, the papers')")
        p.add_argument("--seed", type=int, default=42, help="image k of a prompt gets seed + k (default 42)")
        p.add_argument("--batch", type=int, default=8, help="images per model call (default 8); results depend on it, not on --gpus")
        p.add_argument("--gpus", type=int, default=0, help="GPU actors, one GPU each (default 0: CPU actors)")
        p.add_argument("--actors", type=int, default=1, help="CPU actors when --gpus is 0 (default 1)")
        p.add_argument("--limit", type=int, help="only the first N prompts (a smoke test; the layout check then only reports)")
        p.add_argument("--guidance", type=float, default=4.5, help="classifier-free guidance (default 4.5, the papers')")
        p.add_argument("--steps", type=int, default=20, help="sampling steps (default 20)")
        p.add_argument("--solver", choices=["dpm", "euler"], default="dpm", help="default dpm: the release's DPM-Solver++")
        p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto")
        p.add_argument("--allow-unpinned", action="store_true", help="accept bench files whose sha256 is not the pinned one")
        p.add_argument("--score", action="store_true", help="then run the official scorer (geneval, dpg: offline) and summarize")
        p.add_argument("--scorer-repo", help="--score: the official scorer's checkout")
        p.add_argument("--scorer-python", default="python", help="--score: the scorer environment's python (default python)")
        p.add_argument("--detector-dir", help="--score geneval: the folder with the Mask2Former checkpoint")
        p.set_defaults(func=_eval)
    p = evals.add_parser("recon", help="rFID, PSNR, SSIM (and the release's SSIM) of reconstructions")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="an image folder, or a source (manifest.json + shards; local or s3://)")
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=int, default=448, help="evaluation resolution (default 448)")
    p.add_argument("--fid-weights", help="pt_inception-2015-12-05-6726825d.pth (or .safetensors): rFID; without it, PSNR/SSIM only")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--gpus", type=int, default=0)
    p.add_argument("--actors", type=int, default=1)
    p.add_argument("--limit", type=int, help="only the first N images")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto")
    p.set_defaults(func=_eval)
    for action, text in (("check", "validate OUT's layout as the official scorer reads it"),
                         ("summarize", "the official scorer's outputs -> the benchmark's scores (and MLflow)")):  # fmt: skip
        p = evals.add_parser(action, help=text)
        p.add_argument("name", choices=list(BENCHMARKS), metavar="BENCH")
        p.add_argument("out", help="the eval's output directory")
        p.add_argument("--bench", help="the bench files (default: those OUT/BENCH.run.json names)")
        p.add_argument("--n", type=int, help="images per prompt expected (check)")
        p.set_defaults(func=_eval)

    for name, text in (("generate", "text -> images"), ("edit", "image + instruction -> edited image")):
        p = sub.add_parser(name, help=f"{text} (PNG files)")
        p.add_argument("--model", required=True, help="model directory")
        p.add_argument("--prompt", action="append", required=True, help="prompt (repeatable)")
        if name == "edit":
            p.add_argument("--image", action="append", required=True, help="reference image (repeatable)")
        else:
            p.add_argument("--n", type=int, default=1, help="images per prompt")
        p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default 4.5)")
        p.add_argument("--steps", type=int, default=None, help="sampling steps (default 20)")
        p.add_argument("--solver", choices=["euler", "dpm"], default=None)
        p.add_argument("--seed", type=int, default=None)
        p.add_argument("--out", default="outputs", help="output directory")
        _inference_args(p)
        p.set_defaults(func=_generate)

    p = sub.add_parser("reconstruct", help="image -> UniLIP features -> pixels (PNG files)")
    p.add_argument("--model", required=True)
    p.add_argument("--image", action="append", required=True)
    p.add_argument("--size", type=int, default=448)
    p.add_argument("--out", default="outputs")
    _inference_args(p)
    p.set_defaults(func=_reconstruct)

    p = sub.add_parser("understand", help="answer a question about an image (InternVL3 with the UniLIP encoder)")
    p.add_argument("--model", required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--question", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    _inference_args(p)
    p.set_defaults(func=_understand)

    p = sub.add_parser("demo", help="the whole system end to end on the embedded default (what `make demo` runs)")
    p.add_argument("--steps", type=int, default=30, help="training steps per stage (default 30)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of every stage (default 1e-3)")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers (default 2)")
    p.add_argument("--stages", help="comma-separated stages to train, in order, the last one generating "
                                    "(default recon-stage1,recon-stage2,gen-stage1,gen-stage2,gen-stage3)")
    p.add_argument("--gen", type=int, default=64, help="generation samples (default 64)")
    p.add_argument("--edit", type=int, default=32, help="editing samples (default 32)")
    p.add_argument("--size", type=int, default=512, help="longest image side of the sample data (default 512)")
    p.add_argument("--results", default="demo-results", help="results directory (default demo-results)")
    p.add_argument("--verbose", action="store_true", help="show the Ray workers' own lines (default: in the logs the summary names)")
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    from cluster.local import StackError
    from cluster.submit import ClusterError
    from unilip.config import ConfigError
    from unilip.s3 import S3Error

    args = build_parser().parse_args(argv)
    # SIGTERM (kill, a stopped job, a CI timeout) unwinds like Ctrl-C, so `with` blocks stop
    # the services and servers they started.
    signal.signal(signal.SIGTERM, lambda signum, _: sys.exit(128 + signum))
    try:
        return args.func(args)
    except (ConfigError, ValueError, S3Error, StackError, ClusterError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
