import json
import time

import mlflow
import numpy as np
import pytest

from cluster.connect import init_ray
from cluster.local import SERVICES, LocalStack, pid_alive
from pipelines.read import raw_dataset
from pipelines.sample_data import build_sample_dataset
from tests.conftest import run_cli, run_inline


def test_stack_services_are_up_on_loopback(stack):
    rows = {r["name"]: r for r in stack.status()}
    assert set(rows) == set(SERVICES)
    assert all(r["alive"] for r in rows.values())
    assert stack.bucket in rows["s3"]["buckets"]
    env = stack.env()
    assert env["AWS_ENDPOINT_URL_S3"].startswith("http://127.0.0.1:")
    assert env["MLFLOW_TRACKING_URI"].startswith("http://127.0.0.1:")
    assert env["RAY_ADDRESS"].startswith("127.0.0.1:")


def test_ray_data_streams_shards_from_the_bucket(stack, s3):
    uri = f"s3://{stack.bucket}/stream-test"
    manifests = build_sample_dataset(uri, s3, 9, 4, shard_size=4, size=96, log=lambda m: None)
    ray = init_ray()
    try:
        nodes = ray.nodes()
        assert [n["NodeManagerAddress"] for n in nodes] == ["127.0.0.1"]  # joined the stack's Ray
        gen = raw_dataset(f"{uri}/generation", "generation", s3).take_all()
        edit = raw_dataset(f"{uri}/editing", "editing", s3).take_all()
    finally:
        ray.shutdown()
    assert sorted(r["key"] for r in gen) == [f"gen{i:08d}" for i in range(9)]
    assert manifests["generation"].samples == 9
    assert len(edit) == 4 and all(r["source"][:2] == r["image"][:2] == b"\xff\xd8" for r in edit)  # raw JPEG bytes
    assert all(r["image"][:2] == b"\xff\xd8" and r["text"] and not r["skip"] for r in gen)


def test_mlflow_run_with_artifacts_in_the_bucket(stack, s3, tmp_path):
    mlflow.set_experiment("stack-test")
    with mlflow.start_run() as run:
        mlflow.log_param("alpha", 0.5)
        for step in range(3):
            mlflow.log_metric("loss", 1.0 / (step + 1), step=step)
        (tmp_path / "note.json").write_text(json.dumps({"ok": True}))
        mlflow.log_artifact(str(tmp_path / "note.json"))
    got = mlflow.get_run(run.info.run_id)
    assert got.data.params["alpha"] == "0.5" and got.data.metrics["loss"] == 1.0 / 3
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "loss")
    assert np.allclose([m.value for m in history], [1.0, 0.5, 1.0 / 3])
    # the server proxies artifacts into the bucket
    stored = [k for k in s3.list_keys(f"s3://{stack.bucket}/mlflow/") if k.endswith("note.json")]
    assert len(stored) == 1 and json.loads(s3.get_bytes(stored[0])) == {"ok": True}


def test_cli_help_lists_subcommands():
    r = run_cli("--help")
    assert r.returncode == 0
    for sub in ("local", "data", "recipe", "model", "generate", "edit", "reconstruct", "understand", "demo"):
        assert sub in r.stdout


@pytest.mark.stack
def test_cli_local_up_status_down_leaves_nothing(tmp_path):
    home = str(tmp_path / "home")
    up = run_cli("local", "up", "--home", home, "--bucket", "cli-bucket", "--rotating-credentials")
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        status = run_inline("local", "status", "--home", home)
        assert status.returncode == 0
        for name in SERVICES:
            assert f"{name:<7} running" in status.stdout
        assert "cli-bucket" in status.stdout
        pids = [svc.pid for svc in LocalStack(home).services().values()]
        assert len(pids) == 4 and all(pid_alive(p) for p in pids)
        env = run_inline("local", "env", "--home", home)
        assert "export AWS_ENDPOINT_URL_S3=http://127.0.0.1:" in env.stdout
        # keys come from the rotating endpoint, through the container provider of both SDKs
        assert "export AWS_CONTAINER_CREDENTIALS_FULL_URI=http://127.0.0.1:" in env.stdout
        assert "export AWS_ACCESS_KEY_ID=''" in env.stdout
        again = run_inline("local", "up", "--home", home)  # idempotent: nothing restarted
        assert "already running" in again.stdout
        assert [svc.pid for svc in LocalStack(home).services().values()] == pids
    finally:
        down = run_cli("local", "down", "--home", home)
    assert down.returncode == 0, down.stdout + down.stderr
    deadline = time.monotonic() + 10
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(pid_alive(p) for p in pids)
    assert LocalStack(home).leftover_processes() == []
    assert "nothing running" in run_inline("local", "status", "--home", home).stdout
