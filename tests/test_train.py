"""Training jobs on the embedded stack: Ray Train + DeepSpeed (gloo), moto S3, sqlite MLflow."""

import json

import mlflow
import pytest

from pipelines.sample_data import build_sample_dataset
from pipelines.shards import join, read_manifest
from tests.conftest import run_cli
from unilip.artifacts import fetch_model
from unilip.model import UniLIP


@pytest.fixture(scope="module")
def sample(stack, s3):
    root = f"s3://{stack.bucket}"
    build_sample_dataset(f"{root}/sample", s3, 32, 16, shard_size=8, size=128, log=lambda m: None)
    build_sample_dataset(f"{root}/sample-eval", s3, 4, 0, seed=1, shard_size=4, size=128, log=lambda m: None)
    return root


def train(*args, timeout=900):
    out = run_cli("train", *args, "--preset", "tiny", "--workers", "2", timeout=timeout)
    assert out.returncode == 0, out.stderr[-4000:]
    return out


def test_worker_killed_mid_run_resumes_with_every_sample_once(stack, s3, sample):
    # 8 steps x global batch 4 = 32 samples: exactly one epoch of the generation source.
    out = train("recon-stage1", "--run-name", "kill", "--set", "train.steps=8", "--set", "train.checkpoint_every=2",
                "--set", "train.fault_step=5", "--set", "train.record_samples=true", "--set", "train.eval_every=4")
    logs = out.stdout + out.stderr
    assert "SIGKILL at step 5" in logs
    assert "resumed from step 4" in logs, logs[-6000:]
    runs = f"s3://{stack.bucket}/runs/kill"
    records = [k for k in s3.list_keys(f"{runs}/samples/")]
    steps = sorted({k.rsplit("/", 1)[1].split("-rank")[0] for k in records})
    assert steps == [f"step-{i:08d}" for i in range(1, 9)]  # the right number of steps, each once
    keys = [key for k in records for key in json.loads(s3.get_bytes(k))]
    manifest = read_manifest(join(f"{sample}/sample", "generation"), s3)
    assert len(keys) == len(set(keys)) == manifest.samples  # no repeats, no gaps
    # Checkpoints on S3: the newest two kept.
    ckpts = sorted({k[len(runs) + 1 :].split("/")[0] for k in s3.list_keys(f"{runs}/step-")})
    assert ckpts == ["step-00000006", "step-00000008"]
    # MLflow: one run, continued after the failure, with metrics, eval images and the model.
    mlflow.set_tracking_uri(stack.env()["MLFLOW_TRACKING_URI"])
    (run,) = mlflow.search_runs(experiment_names=["unilip-training"], filter_string="tags.`unilip.run` = 'kill'", output_format="list")
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "train/loss")
    assert sorted({m.step for m in history}) == list(range(1, 9))
    assert run.data.params["train.trainable"] == "['down_proj', 'pixel_decoder']"
    assert "eval/psnr" in run.data.metrics and "eval/ssim" in run.data.metrics
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"model", "loss.png"} <= artifacts
    model = UniLIP.from_pretrained(fetch_model(run.data.tags["unilip.registered"]))
    assert {"down_proj", "pixel_decoder"} <= model.trained_parts

    # The same run name again: it continues the finished run instead of starting over.
    again = train("recon-stage1", "--run-name", "kill", "--set", "train.steps=8")
    assert "already finished and exported" in again.stdout + again.stderr
