"""Training jobs on the embedded stack: Ray Train + DeepSpeed (gloo), moto S3, sqlite MLflow.

Every recipe's tiny variant runs through `unilip train all` (one worker, ZeRO-2, fp32 as
the variants say); one run, under ZeRO-3 in bf16 as the recipes ship, loses a worker twice
in one shuffled epoch and resumes. A stopped run restarted (tests/test_data_stops.py) and a
release continued by a submitted job (tests/test_cluster.py) are the other launches."""

import math
import re

import mlflow
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from cluster.registry import fetch_model
from jobs.evaluation.fid import inception_network
from jobs.training.recipes import chain
from pipelines.sample_data import build_sample_dataset
from pipelines.shards import read_manifest
from tests.conftest import loss_steps, mlflow_run, recorded_samples, run_cli, run_inline, sets
from unilip.model import UniLIP


def train(*args, workers=2, timeout=900):
    out = run_cli("train", *args, "--preset", "tiny", "--workers", str(workers), timeout=timeout)
    assert out.returncode == 0, (out.stdout + out.stderr)[-6000:]
    return out.stdout + out.stderr


def checkpoints(s3, runs: str) -> list[str]:
    return sorted({k[len(runs) + 1 :].split("/")[0] for k in s3.list_keys(f"{runs}/step-")})


# the six-stage chain takes 6-9 minutes on 2 cores
pytestmark = pytest.mark.timeout(1800)


def test_train_all_runs_every_stage_and_exports_a_generating_model(stack, s3, sample, tmp_path):
    """`unilip train all --preset tiny`: the six stages, each from the previous stage's export,
    on one worker (a second costs each stage a process's start-up, about a quarter of its
    time; the ZeRO-3 test and the soak train on two)."""
    export = tmp_path / "unilip-tiny"
    before = stack.credential_rotations()
    logs = train("all", "--export-dir", str(export), workers=1, timeout=1500)
    # the session's keys rotate every 30 s, each revoked a minute after its issue: the
    # chain outlives many of them, in its driver, workers, data tasks and MLflow uploads
    assert stack.credential_rotations() - before >= 3
    for name in chain():
        runs = f"s3://{stack.bucket}/runs/{name}-tiny"
        assert checkpoints(s3, runs) == ["step-00000003", "step-00000006"], name
        run = mlflow_run(f"{name}-tiny")
        assert run.data.params["name"] == name and run.data.params["train.zero_stage"] == "2"
        assert run.data.params["train.precision"] == "fp32"
        assert loss_steps(run) == [1, 2, 3, 4, 5, 6], name
        assert {"train/lr", "train/samples_per_s", "train/grad_norm"} <= set(run.data.metrics), name
        assert not {k: v for k, v in run.data.metrics.items() if k.startswith("data/skipped/") and v}, name
        timings = {k: run.data.metrics[k] for k in ("train/step_s", "train/data_wait_s", "train/host_s")}
        assert 0 <= timings["train/data_wait_s"] < timings["train/step_s"] and timings["train/host_s"] > 0, (
            name,
            timings,
        )
        artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
        assert {"model", "loss.png", "eval"} <= artifacts, name
        registered = run.data.tags["unilip.registered"]
        assert registered.startswith(f"models:/unilip-tiny-{name}/"), name
        version = mlflow.MlflowClient().get_model_version(f"unilip-tiny-{name}", registered.rsplit("/", 1)[1])
        assert version.tags["stage"] == name and version.tags["run_id"] == run.info.run_id
    # Lineage: each stage started from the export of the stage before it (other tests
    # register versions of the same models: the run's own is the one its tag names).
    order = chain()
    for prev, name in zip(order, order[1:]):
        registered = mlflow_run(f"{name}-tiny").data.tags["unilip.registered"]
        version = mlflow.MlflowClient().get_model_version(f"unilip-tiny-{name}", registered.rsplit("/", 1)[1])
        assert version.tags["from"] == mlflow_run(f"{prev}-tiny").data.tags["unilip.registered"], name
    assert "eval step 6: psnr" in logs and "ssim" in logs
    # recon-stage2-448: adversarial loss (hinge + LeCam) and self-distillation from step 0, every term finite
    client = mlflow.MlflowClient()
    run_id = mlflow_run("recon-stage2-448-tiny").info.run_id
    for term in ("mse", "lpips", "distill", "gan", "critic", "lecam", "loss"):
        history = client.get_metric_history(run_id, f"train/{term}")
        assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 6] and all(math.isfinite(m.value) for m in history), (
            term
        )
    # the stages that train the encoder watch understanding at each eval; stage 1 (frozen encoder) has nothing to watch
    for name in ("recon-stage2", "recon-stage2-448"):
        metrics = mlflow_run(f"{name}-tiny").data.metrics
        assert metrics["eval/understanding_kl"] > 0 and 0 <= metrics["eval/understanding_top1"] <= 1, name
    assert "eval/understanding_kl" not in mlflow_run("recon-stage1-tiny").data.metrics
    # gen-stage2: global steps that hold both tasks (a step's four micro batches differ)
    run_id = mlflow_run("gen-stage2-tiny").info.run_id
    assert client.get_metric_history(run_id, "train/flow_generation") and client.get_metric_history(
        run_id, "train/flow_editing"
    )
    # The exported directory is the model library's, in fp32 (the EMA averages): it loads and generates.
    for part in ("dit", "connector", "queries"):
        assert {v.dtype for v in load_file(str(export / f"{part}.safetensors")).values()} == {torch.float32}, part
    model = UniLIP.from_pretrained(export)
    (image,) = model.generate(["a red apple on a table"], seed=0, steps=2)
    assert isinstance(image, Image.Image) and image.size == (448, 448)


def test_worker_killed_twice_in_a_shuffled_epoch_resumes_with_every_sample_once_under_zero3(
    stack, s3, sample, tmp_path
):
    # rFID plumbing: FID Inception weights (random here: none can be downloaded) on S3.
    torch.manual_seed(0)
    weights = tmp_path / "inception.safetensors"
    save_file({k: v.contiguous() for k, v in inception_network().state_dict().items()}, str(weights))
    s3.put_bytes(f"{sample}/weights/inception.safetensors", weights.read_bytes())
    # 48 samples in 24 shards, read in the shipped (shuffled) order; 12 steps x global
    # batch 4 = one epoch; a worker dies as step 5 begins, and halfway through uploading
    # the checkpoint of step 8 (uploads are asynchronous: training goes on meanwhile)
    build_sample_dataset(f"{sample}/many", s3, 48, 0, shard_size=2, size=64, log=lambda m: None)
    logs = train(
        "recon-stage1",
        "--run-name",
        "kill",
        *sets(
            "train.zero_stage=3",
            "train.precision=bf16",
            "train.steps=12",
            "train.checkpoint_every=2",
            f"data.sources.0.uri={sample}/many/generation",
            "train.fault_steps=[5]",
            "train.fault_uploads=[8]",
            "train.record_samples=true",
            "train.eval_every=12",  # once, at the end: PSNR, SSIM and rFID
            f"data.fid_weights={sample}/weights/inception.safetensors",
        ),
        timeout=1500,  # 293 s here; 652 s with the CPU halved (every process on one core)
    )
    assert "SIGKILL at step 5" in logs and "SIGKILL halfway through uploading step-00000008" in logs
    # Ray Train registers a reported checkpoint asynchronously: a failure right after a
    # report may leave the one before it as the newest registered. Either is a correct
    # resume; the half-uploaded checkpoint never is.
    resumed = [int(n) for n in re.findall(r"resumed from step (\d+)", logs)]
    assert len(resumed) == 2 and resumed[0] in (2, 4) and resumed[1] in (4, 6), logs[-6000:]
    runs = f"s3://{stack.bucket}/runs/kill"
    steps, per_rank = recorded_samples(s3, runs)
    assert steps == [f"step-{i:08d}" for i in range(1, 13)]  # the right number of steps, each recorded once
    keys = per_rank[0] + per_rank[1]
    manifest = read_manifest(f"{sample}/many/generation", s3)
    assert len(keys) == len(set(keys)) == manifest.samples  # no repeats, no gaps
    # shuffled: consecutive samples of a worker rarely share a shard (about 0.5 in manifest order)
    pairs = [(a.split("#")[0], b.split("#")[0]) for r in (0, 1) for a, b in zip(per_rank[r], per_rank[r][1:])]
    assert sum(a == b for a, b in pairs) / len(pairs) <= 0.45
    assert checkpoints(s3, runs) == ["step-00000010", "step-00000012"]  # the newest two kept
    # MLflow: one run, continued after the failure, with metrics, eval images and the model.
    run = mlflow_run("kill")
    assert loss_steps(run) == list(range(1, 13))
    assert run.data.params["train.trainable"] == "['down_proj', 'pixel_decoder']"
    assert run.data.params["train.zero_stage"] == "3" and run.data.params["train.precision"] == "bf16"
    assert {"eval/psnr", "eval/ssim", "eval/rfid"} <= set(run.data.metrics)
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"model", "loss.png"} <= artifacts
    model = UniLIP.from_pretrained(fetch_model(run.data.tags["unilip.registered"]))
    assert {"down_proj", "pixel_decoder"} <= model.trained_parts

    # The same run name again: a finished, exported run is not trained or exported twice.
    again = run_inline(  # it starts nothing: in this process
        "train",
        "recon-stage1",
        "--preset",
        "tiny",
        "--run-name",
        "kill",
        *sets("train.zero_stage=3", "train.steps=12", f"data.sources.0.uri={sample}/many/generation"),
    )
    assert again.returncode == 0 and "already finished and exported" in again.stdout, again.stderr[-3000:]
