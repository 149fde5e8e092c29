"""Training jobs on Ray: one stage (`unilip train RECIPE`) or the whole chain (`unilip train all`).

    eval "$(unilip local env)"                      # or RAY_ADDRESS / AWS_* / MLFLOW_* of a real cluster
    unilip data sample --out s3://$UNILIP_BUCKET/sample
    unilip data sample --out s3://$UNILIP_BUCKET/sample-eval --gen 8 --edit 0 --seed 1
    unilip train recon-stage1 --preset tiny --workers 2
    unilip train all --preset tiny --workers 2 --export-dir ./unilip-tiny
    unilip train gen-stage2 --preset unilip-1b --workers 16 --gpu --from models:/unilip-1b-gen-stage1/1

A stage is a Ray Train `TorchTrainer` running `jobs.training.loop.train_loop` on every
worker, with the run's settings (`jobs.training.run.Run`) built here once.
Checkpoints go to STORAGE/RUN_NAME/step-N (S3 through the project's access point);
running again with the same run name resumes from the newest one, and a worker failure
resumes automatically (up to `train.max_failures`). The run name defaults to
`RECIPE-PRESET`. Each stage registers its export as `unilip-PRESET-RECIPE` in MLflow; a
stage without `--from` starts from the newest registered export of the stage it follows.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time

from jobs.training.recipes import chain, load_recipe
from jobs.training.run import Launch
from pipelines.position import Position
from unilip.config import ConfigError, Recipe
from unilip.s3 import s3_access

EXPERIMENT = "unilip-training"


def model_name(preset: str, recipe: str) -> str:
    """Registered model name: unilip-tiny-gen-stage3, unilip-1b-gen-stage3."""
    return f"{preset if preset.startswith('unilip-') else 'unilip-' + preset}-{recipe}"


def expand(uri: str | None, what: str) -> str | None:
    """`$VAR` / `${VAR}` in a data URI from the environment; unset variables are an error."""
    if uri is None:
        return None
    out = os.path.expandvars(uri)
    missing = re.findall(r"\$\{?(\w+)", out)
    if missing:
        raise ConfigError(f'{what} {uri!r} uses ${missing[0]}, which is not set (eval "$(unilip local env)"?)')
    return out


def prepare(name: str, preset: str, overrides: list[str]) -> Recipe:
    recipe = load_recipe(name, [f"model.preset={preset}", *overrides], variant="tiny" if preset == "tiny" else None)
    for src in recipe.data.sources:
        src.uri = expand(src.uri, f"data source {src.name}")
    recipe.data.eval_uri = expand(recipe.data.eval_uri, "data.eval_uri")
    tasks = {s.task for s in recipe.data.sources}
    if recipe.train.zero_stage == 3 and len(tasks) > 1 and recipe.data.batch_mode != "lockstep":
        raise ConfigError(
            "train.zero_stage 3 with generation and editing sources needs data.batch_mode lockstep "
            "(under ZeRO-3 every worker must run the same modules at each micro step)"
        )
    return recipe


def run_stage(
    name: str,
    launch: Launch,
    init_from: str | None = None,
    run_name: str | None = None,
    *,
    quiet: bool = False,
    log=print,
) -> str:
    """Train one stage to completion (resuming if the run exists); returns the registered model URI.
    `quiet`: the workers' lines stay in Ray's log files, and a progress line read from MLflow
    stands in for them."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from cluster.connect import init_ray, quiet_ray_data
    from jobs.tracking import latest_model
    from jobs.training import checkpoint
    from jobs.training.loop import train_loop
    from jobs.training.optim import gradient_accumulation
    from jobs.training.run import Run
    from pipelines.budget import Budget, DataStopped, skip_counter
    from pipelines.ingest import check_resume, dataset_factories, fingerprint, source_specs

    preset, workers, gpu = launch.preset, launch.workers, launch.gpu
    recipe = prepare(name, preset, launch.overrides)
    gradient_accumulation(recipe.train, workers)  # refuse a batch that does not divide before starting
    s3 = s3_access(recipe.s3)
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI")
    if init_from is None and recipe.after:
        init_from = latest_model(tracking_uri, model_name(preset, recipe.after))
        if init_from is None:
            raise ConfigError(
                f"{name} starts from {recipe.after}'s export: run `unilip train {recipe.after} --preset {preset}` "
                f"first, or pass --from DIR|s3://...|models:/..."
            )
    storage = (launch.storage or expand("s3://${UNILIP_BUCKET}/runs", "storage")).rstrip("/")
    run_name = run_name or f"{name}-{preset}"
    resume = checkpoint.resume_point(f"{storage}/{run_name}", s3)
    if resume and resume.step >= recipe.train.steps and (done := registered_model(tracking_uri, run_name)):
        log(f"[{name}] run {run_name} already finished and exported: {done}")  # nothing to start workers for
        return done
    specs = source_specs(recipe.data, s3)
    data = fingerprint(recipe.data, specs)
    for warning in check_resume(resume and resume.data, data):  # refuses changed manifests
        log(f"[{name}] warning: {warning}")

    # the workers reach S3, MLflow and the Hugging Face hub (a `--from owner/name`) as this process does
    env = s3.env() | {k: v for k, v in os.environ.items() if k.startswith(("MLFLOW_", "AWS_", "UNILIP_", "HF_"))}
    # Ray Train's print patch tees worker prints once more when stdout is wrapped: one line each.
    env["RAY_TRAIN_ENABLE_PRINT_PATCH"] = "0"
    # progress bars (Ray Data's split coordinator, MLflow downloads) are noise in a training log
    env["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
    env["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    # quiet: Ray's own INFO lines (connecting, the dashboard) stay out of the terminal too
    init_ray(
        runtime_env={"env_vars": env}, log_to_driver=not quiet, logging_level=logging.WARNING if quiet else logging.INFO
    )
    quiet_ray_data()
    cpus_per_worker = launch.cpus_per_worker
    if cpus_per_worker is None:  # leave half the CPUs to the data pipeline on CPU-only clusters
        cpus_per_worker = 1.0 if gpu else min(1.0, ray.cluster_resources().get("CPU", 2) / (2 * workers))
    run = Run(
        recipe,
        run_name,
        storage,
        init_from,
        model_name(preset, name),
        tracking_uri,
        EXPERIMENT,
        specs,
        data,
        skip_counter(f"unilip-skips-{run_name}"),
    )
    run.counter.configure.remote(Budget.of(recipe.data), {n: spec.samples for n, spec in specs.items()})
    fs, storage_path = s3.resolve(storage)
    log(
        f"[{name}] preset {preset}, {workers} workers x {cpus_per_worker:g} CPU{' + GPU' if gpu else ''}, "
        f"from {init_from or 'the preset'}; run {run_name} at {run.path}"
    )

    def position() -> Position | None:  # where the workers Ray Train (re)starts will resume
        state = checkpoint.resume_point(run.path, s3)
        return Position(run.layout(), state.position) if state else None

    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"run": run},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpu, resources_per_worker={"CPU": cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=recipe.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=recipe.train.keep_checkpoints),
        ),
        datasets=dataset_factories(recipe.data, s3, run.counter, position),
    )
    with ProgressWatcher(name, run_name, recipe.train.steps, log=log) if quiet else contextlib.nullcontext():
        result = trainer.fit()
    if result.return_value:  # stopped on its data, after a checkpoint
        raise DataStopped(f"[{name}] run {run_name} stopped: {result.return_value}")
    registered = registered_model(tracking_uri, run_name)
    if not registered:
        raise RuntimeError(f"run {run_name} finished without registering a model")
    log(f"[{name}] done: {registered}")
    return registered


class ProgressWatcher:
    """A stage's progress line (step, loss, samples/s, ETA) read from its MLflow run every
    `every` seconds: the terminal's view of a run whose workers' own lines go to Ray's
    log files (`unilip demo` without --verbose)."""

    def __init__(self, name: str, run_name: str, steps: int, every: float = 10.0, log=print):
        import threading

        self.name, self.run_name, self.steps, self.every, self.log = name, run_name, steps, every, log
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=30)

    def _watch(self) -> None:
        import mlflow

        from jobs.tracking import find_run

        client, first, shown = mlflow.MlflowClient(), None, 0
        while not self.stop.wait(self.every):
            try:
                run = find_run(EXPERIMENT, self.run_name)
                history = client.get_metric_history(run.info.run_id, "train/loss") if run else []
            except Exception:  # MLflow busy or restarting: the next poll tries again
                continue
            if not history or history[-1].step == shown:
                continue
            step, shown = history[-1].step, history[-1].step
            first = first or (time.monotonic(), step)  # the step rate from here: start-up is not a step
            done = step - first[1]
            eta = (
                time.strftime("%M:%S", time.gmtime((self.steps - step) * (time.monotonic() - first[0]) / done))
                if done
                else "--:--"
            )
            rate = run.data.metrics.get("train/samples_per_s", float("nan"))
            self.log(
                f"   [{self.name}] step {step}/{self.steps}  loss {history[-1].value:.4f}  {rate:.1f} samples/s  ETA {eta}"
            )


def registered_model(tracking_uri: str | None, run_name: str) -> str | None:
    """The model URI the run registered (its `unilip.registered` tag), if any."""
    import mlflow

    from jobs.tracking import find_run

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    run = find_run(EXPERIMENT, run_name)
    return run.data.tags.get("unilip.registered") if run else None


def run_all(launch: Launch, log=print) -> str:
    """The whole chain; each stage starts from the previous stage's registered export."""
    uri = None
    stages = chain()
    for i, name in enumerate(stages, 1):
        log(f"== stage {i}/{len(stages)}: {name}")
        uri = run_stage(name, launch, uri, log=log)
    return uri
