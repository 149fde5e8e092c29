"""A run that loses its data stops, after a checkpoint, with a message that says why; fixed
and re-run, it resumes and trains every sample of the epoch exactly once.

One run on the session's stack (authentication enforced, keys rotating): first the read
access to its source is revoked mid-run, then its shards are deleted, then restored. The
last restart also changes the order settings (a warning: each sample still comes once)
and continues the run's MLflow run; a restart on other data is refused before it starts."""

import json
import re
import subprocess
import sys
import time

import pytest

from cluster.credentials import RUNNER
from pipelines.sample_data import build_sample_dataset
from pipelines.shards import read_manifest
from tests.conftest import ROOT, loss_steps, mlflow_run, recorded_samples, run_cli, run_inline, sets

pytestmark = pytest.mark.timeout(1200)


# one worker: the stops and the resumes are the data's; the ZeRO-3 test and the soak split an
# epoch between two
LAUNCH = ("--preset", "tiny", "--workers", "1")


def train(*args):
    return run_cli("train", *args, *LAUNCH, timeout=600)


def stopped_at(output: str) -> int:
    (step,) = re.findall(r"stopping at step (\d+)", output)
    return int(step)


def test_denied_then_deleted_shards_stop_the_run_and_the_fixed_run_trains_every_sample_once(
    stack, s3, sample, tmp_path
):
    gen = f"{sample}/faults/generation"
    build_sample_dataset(f"{sample}/faults", s3, 48, 0, shard_size=4, size=96, log=lambda m: None)
    manifest = read_manifest(gen, s3)
    shards = [f"{gen}/{s.path}" for s in manifest.shards]
    args = (
        "recon-stage1",
        "--run-name",
        "datastop",
        *sets(
            "train.steps=24",  # two epochs: 48 samples, global batch 4
            "train.checkpoint_every=4",
            "train.eval_every=100",
            "train.record_samples=true",
            f"data.sources.0.uri={gen}",
        ),
    )
    runs = f"s3://{stack.bucket}/runs/datastop"

    # 1. Mid-run, read access to the source is revoked. Its first epoch is read ahead of
    # training; the second is read once the first is consumed (the epoch barrier), so
    # the revocation meets reads still to come. Never bad data: the run stops on it.
    cmd = [sys.executable, "-m", "cli", "train", *args, *LAUNCH]
    log = tmp_path / "train.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    iam = stack.iam()
    try:
        deadline = time.monotonic() + 300
        while not s3.exists(f"{runs}/samples/step-00000004-rank-0.json"):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-6000:]
            time.sleep(0.5)
        deny = {
            "Version": "2012-10-17",
            "Statement": [
                {"Effect": "Deny", "Action": "s3:GetObject", "Resource": [f"arn:aws:s3:::{u[5:]}" for u in shards]}
            ],
        }
        iam.put_user_policy(UserName=RUNNER, PolicyName="deny-source", PolicyDocument=json.dumps(deny))
        assert proc.wait(timeout=300) == 2, log.read_text()[-6000:]
    finally:
        proc.kill()
        iam.delete_user_policy(UserName=RUNNER, PolicyName="deny-source")
    output = log.read_text()
    # Ray logs the failed read task on its own; the error is the command's, without a traceback
    (error,) = [line for line in output.splitlines() if line.startswith("error: ")]
    assert error.startswith(
        "error: [recon-stage1] run datastop stopped: data source 'sample-generation': access denied"
    )
    assert "ACCESS_DENIED" in error and any(u in error for u in shards), error
    first = stopped_at(output)
    assert 4 <= first < 24, first
    assert s3.list_keys(f"{runs}/step-{first:08d}/")  # every step trained is checkpointed

    # 2. Then the source's shards are deleted: past the bad-data budget, it stops again.
    gone = shards  # the whole prefix
    saved = {u: s3.get_bytes(u) for u in gone}
    for u in gone:
        bucket, key = u[5:].split("/", 1)
        s3.client.delete_object(Bucket=bucket, Key=key)
    out = train(*args)
    assert out.returncode == 2, (out.stdout + out.stderr)[-6000:]
    output = out.stdout + out.stderr
    (error,) = [line for line in output.splitlines() if line.startswith("error: ")]
    assert "data source 'sample-generation' is over its bad-data budget" in error and "unreadable_shard: " in error
    assert "max_skip_fraction=0.01" in error and any(u in error for u in gone), error
    assert f"resumed from step {first}" in output
    second = stopped_at(output)
    assert first <= second < 24, (first, second)

    # 3. Restored, the run resumes and finishes: every sample once in each epoch, though the
    # restart also changed the order settings; one MLflow run, every step logged once.
    for u, data in saved.items():
        s3.put_bytes(u, data)
    out = train(*args, *sets("data.shuffle_buffer=7"))
    assert out.returncode == 0, (out.stdout + out.stderr)[-6000:]
    output = out.stdout + out.stderr
    assert f"resumed from step {second}" in output
    assert "warning: the data order changed since the checkpoint (shuffle_buffer 1000 -> 7)" in output
    steps, _ = recorded_samples(s3, runs)
    assert steps == [f"step-{i:08d}" for i in range(1, 25)]  # no step lost or trained twice
    epochs = {0: [], 1: []}
    for k in s3.list_keys(f"{runs}/samples/"):  # steps 1-12 are epoch 0, 13-24 epoch 1 (4 samples a step)
        step = int(k.rsplit("/", 1)[1][len("step-") :].split("-")[0])
        epochs[int(step > 12)] += json.loads(s3.get_bytes(k))
    for keys in epochs.values():
        assert len(keys) == len(set(keys)) == manifest.samples
    assert loss_steps(mlflow_run("datastop")) == list(range(1, 25))  # three launches, one run

    # Other data under the source's name: the saved position would not match it. Refused
    # before any worker starts (in this process).
    other = run_inline(
        "train",
        *args[:3],
        "--preset",
        "tiny",
        *sets("train.steps=30", f"data.sources.0.uri={sample}/sample-eval/generation"),
    )
    assert other.returncode == 2 and "source 'sample-generation' changed since the checkpoint" in other.stderr, (
        other.stderr[-2000:]
    )
