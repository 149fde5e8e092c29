"""Losing a machine: a Ray cluster of three nodes on this machine (a head and two worker
nodes, each its own raylet started with `ray start` in its own session), with the
embedded S3 and MLflow. A training run with one worker on each worker node loses one
node (its raylet and every process on it, SIGKILL) mid-epoch; once a replacement node
joins, the run resumes from its S3 checkpoint and trains every sample of the epoch once.

Placement is fixed by the nodes' CPUs: the head has 1 (job driver and data tasks), each
worker node 2, and a training worker asks for 1.5, so no node holds two and the head none.
"""

import os
import subprocess
import sys
import time

import pytest

from cluster.local import LocalStack, patched_environ
from pipelines.sample_data import build_sample_dataset
from pipelines.shards import read_manifest
from tests.conftest import ROOT, recorded_samples, write_samples


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Its own stack (another cluster than the session's): S3, MLflow, a 1-CPU head and two
    2-CPU worker nodes; everything stopped by PID afterwards."""
    st = LocalStack(tmp_path_factory.mktemp("multinode"), bucket="unilip-multinode", num_cpus=1, multinode=True, log=lambda m: None)
    try:
        st.up()
        for name in ("node-1", "node-2"):
            add_node(st, name)
        yield st
    finally:
        st.down()
        assert st.leftover_processes() == []


def add_node(st, name: str) -> None:
    """A 2-CPU worker node, with a resource of its name so that its Ray node id can be told."""
    st.add_node(name, num_cpus=2, resources={name: 1})


def state(st, kind: str, **kwargs) -> list:
    """Ray's state API on this cluster. It prefers RAY_API_SERVER_ADDRESS to its `address`
    argument, and the session's stack sets that variable: this cluster's environment wins here."""
    from ray.util import state as api

    with patched_environ(st.env()):
        # the dead nodes are filtered out on the server: not a truncation
        return getattr(api, f"list_{kind}")(filters=[("state", "=", "ALIVE")], limit=1000, raise_on_missing_output=False, **kwargs)


def node_names(st) -> dict[str, str]:
    """Ray node id -> the name the test gave the node (the head: "head")."""
    nodes = state(st, "nodes", detail=True)
    return {n.node_id: next((k for k in n.resources_total if k.startswith("node-")), "head") for n in nodes}


def train_workers(st) -> dict[str, str]:
    """Alive Ray Train workers: actor id -> node id."""
    return {a.actor_id: a.node_id for a in state(st, "actors") if a.class_name == "RayTrainWorker"}


def test_training_survives_losing_a_worker_node_with_every_sample_once(cluster, tmp_path):
    s3 = cluster.s3()
    root = write_samples(cluster, s3)
    # 48 samples, 12 steps x global batch 4: one epoch; checkpoints every 2 steps
    build_sample_dataset(f"{root}/many", s3, 48, 0, shard_size=2, size=64, log=lambda m: None)
    runs = f"{root}/runs/node-loss"
    log = tmp_path / "train.log"
    cmd = [sys.executable, "-m", "unilip.cli", "train", "recon-stage1", "--preset", "tiny", "--workers", "2",
           "--cpus-per-worker", "1.5", "--run-name", "node-loss", "--set", "train.steps=12", "--set", "train.checkpoint_every=2",
           "--set", "train.eval_every=12", "--set", "train.record_samples=true", "--set", f"data.sources.0.uri={root}/many/generation"]  # fmt: skip
    env = {**os.environ, **cluster.env()}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not s3.list_keys(f"{runs}/step-00000004/") and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-6000:]
            time.sleep(1)
        names = node_names(cluster)
        assert sorted(names[n] for n in train_workers(cluster).values()) == ["node-1", "node-2"]  # one on each
        cluster.kill_node("node-1")
        add_node(cluster, "node-3")  # the replacement machine
        assert proc.wait(timeout=900) == 0, log.read_text()[-6000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    logs = log.read_text()
    assert "resumed from step" in logs, logs[-6000:]
    steps, per_rank = recorded_samples(s3, runs)
    assert steps == [f"step-{i:08d}" for i in range(1, 13)]  # every step recorded once
    keys = per_rank[0] + per_rank[1]
    assert len(keys) == len(set(keys)) == read_manifest(f"{root}/many/generation", s3).samples  # none lost, none repeated

