"""Shared fixtures: one embedded stack (S3 server, MLflow, Ray on 127.0.0.1) per session.

A test that uses the stack, or a module that starts services itself (`pytestmark =
pytest.mark.stack`), is marked `stack`; `make quick` runs the others (`-m "not stack"`).
`make test` runs two pytest-xdist processes: every `stack` test in one of them, in one
group (one stack, and services that would only slow each other down), the others beside
it, on the CPU the stack's tests leave idle."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.local import LocalStack

ROOT = Path(__file__).resolve().parents[1]


STACK_FIXTURES = {"stack", "s3", "sample", "ray_session"}


def pytest_collection_modifyitems(items):
    for item in items:
        if STACK_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.stack)
        if item.get_closest_marker("stack"):
            item.add_marker(pytest.mark.xdist_group("stack"))  # one process runs them all (--dist loadgroup)


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    """The embedded stack, started once, its environment active for the session; stopped by
    PID. Its S3 server enforces authentication, and every process's keys expire and are
    revoked every 30 seconds (cluster/credentials.py): the whole suite runs under rotation."""
    st = LocalStack(
        tmp_path_factory.mktemp("stack"),
        bucket="unilip-test",
        credentials="rotating",
        rotation_s=30,
        log=lambda m: None,
    )
    with st:
        yield st
    assert st.leftover_processes() == []


@pytest.fixture(scope="session")
def s3(stack):
    return stack.s3()


@pytest.fixture(scope="module")
def sample(stack, s3):
    """The sample dataset the recipes' tiny variants read (small images), MLflow pointed at the
    stack. Per module: the S3 fault test restarts the in-memory S3 server, which empties it."""
    import mlflow

    root = write_samples(stack, s3)
    mlflow.set_tracking_uri(stack.env()["MLFLOW_TRACKING_URI"])
    return root


def write_samples(stack, s3) -> str:
    """The sample data the recipes' tiny variants read (and their held-out images) in the stack's bucket."""
    from pipelines.sample_data import build_sample_dataset

    root = f"s3://{stack.bucket}"
    build_sample_dataset(f"{root}/sample", s3, 32, 16, shard_size=8, size=128, log=lambda m: None)
    build_sample_dataset(f"{root}/sample-eval", s3, 4, 0, seed=1, shard_size=4, size=128, log=lambda m: None)
    return root


def recorded_samples(s3, runs: str) -> tuple[list[str], list[str]]:
    """What `train.record_samples` wrote for a run: the recorded steps, and every sample key
    trained on (rank 0's, then rank 1's, each in step order)."""
    import json

    records = s3.list_keys(f"{runs}/samples/")
    steps = sorted({k.rsplit("/", 1)[1].split("-rank")[0] for k in records})
    per_rank = [
        [key for k in sorted(records) if k.endswith(f"-rank-{r}.json") for key in json.loads(s3.get_bytes(k))]
        for r in (0, 1)
    ]
    return steps, per_rank


def mlflow_run(run_name: str):
    """The one MLflow run of the training experiment with this `unilip.run` tag."""
    import mlflow

    from jobs.training.train import EXPERIMENT

    (run,) = mlflow.search_runs(
        experiment_names=[EXPERIMENT], filter_string=f"tags.`unilip.run` = '{run_name}'", output_format="list"
    )
    return run


def loss_steps(run) -> list[int]:
    """The steps a run logged its training loss at."""
    import mlflow

    return sorted({m.step for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, "train/loss")})


@pytest.fixture(scope="module")
def ray_session(stack):
    """A driver connected to the stack's Ray for the tests of one module."""
    from cluster.connect import init_ray, quiet_ray_data

    ray = init_ray()
    quiet_ray_data()
    yield ray
    ray.shutdown()


def run_cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `unilip ARGS...` as a user would, in a child process. Past the timeout it gets
    SIGTERM (it then stops what it started) and the failure shows the end of its output."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException as e:  # our timeout, pytest-timeout's, Ctrl-C: never leave it running
        proc.terminate()
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        if isinstance(e, subprocess.TimeoutExpired):
            pytest.fail(f"unilip {' '.join(args)} timed out after {timeout}s:\n{out[-3000:]}\n{err[-3000:]}")
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_inline(*args: str) -> subprocess.CompletedProcess:
    """`unilip ARGS...` in the test's own process: the command line's code path without a
    child's start-up (imports are paid once a session). For quick commands that start
    nothing; `run_cli` runs the ones that start services or must be a process of their own."""
    import contextlib
    import io

    from cli import run

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = run(list(args))
        except SystemExit as e:  # argparse: a usage error (2), --help (0)
            code = e.code
    return subprocess.CompletedProcess(["unilip", *args], code, out.getvalue(), err.getvalue())


def sets(*overrides: str) -> list[str]:
    """`--set KEY=VALUE` arguments for a command, one pair per override."""
    return [arg for item in overrides for arg in ("--set", item)]
