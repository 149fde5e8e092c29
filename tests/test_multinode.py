"""Losing a machine: a Ray cluster of three nodes on this machine (a head and two worker
nodes, each its own raylet started with `ray start` in its own session), with the
embedded S3 and MLflow. A training run with one worker on each worker node loses one
node (its raylet and every process on it, SIGKILL) mid-epoch; once a replacement node
joins, the run resumes from its S3 checkpoint. Then another node gets a notice (Ray's
drain, as a spot reclaim or a pod's preStop hook asks for): the run checkpoints at once,
resumes on a replacement, and loses no step when the node goes. Every sample of the
epoch is trained once. A
Serve application under steady load scales from 1 to 2 model replicas (one per worker
node), loses the node of one, recovers once a replacement joins, and scales back to 1.

Placement is fixed by the nodes' CPUs: the head has 1 (job driver and data tasks), each
worker node 2, and a training worker asks for 1.5, so no node holds two and the head none.
"""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.local import LocalStack, patched_environ
from pipelines.sample_data import build_sample_dataset
from pipelines.shards import read_manifest
from tests.conftest import ROOT, recorded_samples, sets, write_samples

pytestmark = pytest.mark.stack  # a three-node cluster of its own


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Its own stack (another cluster than the session's): S3, MLflow, a 1-CPU head and two
    2-CPU worker nodes; everything stopped by PID afterwards."""
    st = LocalStack(
        tmp_path_factory.mktemp("multinode"), bucket="unilip-multinode", num_cpus=1, multinode=True, log=lambda m: None
    )
    try:
        st.up()
        for name in ("node-1", "node-2"):
            add_node(st, name)
        st.activate()  # this module's clients reach this cluster (its keys are read where used)
        yield st
    finally:
        st.deactivate()
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
        return getattr(api, f"list_{kind}")(
            filters=[("state", "=", "ALIVE")], limit=1000, raise_on_missing_output=False, **kwargs
        )


def node_names(st) -> dict[str, str]:
    """Ray node id -> the name the test gave the node (the head: "head")."""
    nodes = state(st, "nodes", detail=True)
    return {n.node_id: next((k for k in n.resources_total if k.startswith("node-")), "head") for n in nodes}


def train_workers(st) -> dict[str, str]:
    """Alive Ray Train workers: actor id -> node id."""
    return {a.actor_id: a.node_id for a in state(st, "actors") if a.class_name == "RayTrainWorker"}


def last_trained(s3, runs: str) -> int:
    """The newest step whose samples a worker recorded as trained."""
    return max(int(k.rsplit("/", 1)[1][5:13]) for k in s3.list_keys(f"{runs}/samples/"))


def worker_lines(log, pattern: str) -> list[tuple[int, int]]:
    """(worker pid, the number `pattern` captures) of each distinct training-worker line, in order."""
    found = re.findall(r"RayTrainWorker pid=(\d+)\S*\s+.*?" + pattern, log.read_text())
    return list(dict.fromkeys((int(pid), int(n)) for pid, n in found))


def wait_until(condition, proc, log, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-6000:]
        time.sleep(0.5)


def test_training_survives_losing_worker_nodes_and_a_notice_costs_no_step(cluster, tmp_path):
    s3 = cluster.s3()
    root = write_samples(cluster, s3)
    # 96 samples, 24 steps x global batch 4: one epoch; checkpoints every 4 steps. A node
    # goes without notice after step 6, another with notice (Ray's drain, as a spot
    # reclaim or a pod's preStop hook asks for) a few steps after the resume.
    build_sample_dataset(f"{root}/many", s3, 96, 0, shard_size=2, size=64, log=lambda m: None)
    runs = f"{root}/runs/node-loss"
    log = tmp_path / "train.log"
    cmd = [
        sys.executable,
        "-m",
        "cli",
        "train",
        "recon-stage1",
        "--preset",
        "tiny",
        "--workers",
        "2",
        "--cpus-per-worker",
        "1.5",
        "--run-name",
        "node-loss",
        *sets(
            "train.precision=bf16",  # as the recipes ship; and its slower steps leave the faults time to land
            "train.steps=24",
            "train.checkpoint_every=4",
            "train.eval_every=24",
            "train.record_samples=true",
            f"data.sources.0.uri={root}/many/generation",
        ),
    ]
    env = {**os.environ, **cluster.env(), "RAY_DEDUP_LOGS": "0"}  # every worker line, for the test to read
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
    resumes = lambda: worker_lines(log, r"resumed from step (\d+)")  # noqa: E731
    try:
        wait_until(lambda: s3.exists(f"{runs}/samples/step-00000006-rank-0.json"), proc, log)
        names = node_names(cluster)
        assert sorted(names[n] for n in train_workers(cluster).values()) == ["node-1", "node-2"]  # one on each
        trained_at_loss = last_trained(s3, runs)
        cluster.kill_node("node-1")  # no notice
        add_node(cluster, "node-3")  # the replacement machine
        wait_until(lambda: resumes(), proc, log)
        (worker, first), *_ = resumes()
        trained = lambda: [n for pid, n in worker_lines(log, r"\] step (\d+)/24") if pid == worker]  # noqa: E731
        wait_until(lambda: any(n >= first + 2 for n in trained()), proc, log)  # trained again
        assert max(trained()) < 20, "the run got too close to its end before the notice"
        node_2 = next(n for n, name in node_names(cluster).items() if name == "node-2")
        drain = [
            str(Path(sys.executable).parent / "ray"),
            "drain-node",
            "--address",
            cluster.env()["RAY_ADDRESS"],
            "--node-id",
            node_2,
        ]
        drain += ["--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot reclaim in 2 minutes"]
        subprocess.run([*drain, "--deadline-remaining-seconds", "120"], env=env, check=True, capture_output=True)
        add_node(cluster, "node-4")  # its replacement, started on the notice
        notices = lambda: worker_lines(log, r"checkpointing step (\d+) before")  # noqa: E731
        wait_until(notices, proc, log, timeout=120)
        (_, trained_at_notice), *_ = notices()  # the steps trained when the notice came
        wait_until(lambda: len(resumes()) == 2, proc, log)
        cluster.kill_node("node-2")  # the reclaim itself
        assert proc.wait(timeout=900) == 0, log.read_text()[-6000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    (_, first), (_, second) = resumes()
    redone_without_notice, redone_with_notice = trained_at_loss - first, trained_at_notice - second
    print(f"steps redone: {redone_without_notice} after the loss without notice, {redone_with_notice} with")
    assert redone_with_notice == 0 < redone_without_notice, (redone_without_notice, redone_with_notice)
    steps, per_rank = recorded_samples(s3, runs)
    assert steps == [f"step-{i:08d}" for i in range(1, 25)]  # every step recorded once
    keys = per_rank[0] + per_rank[1]
    assert (
        len(keys) == len(set(keys)) == read_manifest(f"{root}/many/generation", s3).samples
    )  # none lost, none repeated


def model_replicas(st) -> dict[str, str]:
    """Alive UniLIPModel replicas of the Serve application: actor id -> node id."""
    return {
        a.actor_id: a.node_id
        for a in state(st, "actors")
        if a.class_name.startswith("ServeReplica:") and a.class_name.endswith(":UniLIPModel")
    }


def replicas_when(st, n: int) -> dict[str, str] | None:
    replicas = model_replicas(st)
    return replicas if len(replicas) == n else None


class Load:
    """Clients posting generation requests back to back; every answer's time and status."""

    def __init__(self, url: str, clients: int):
        import threading

        self.url, self.stop, self.results = url, threading.Event(), []
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]
        for t in self.threads:
            t.start()

    def _client(self, i: int) -> None:
        import requests

        n = 0
        while not self.stop.is_set():
            try:
                r = requests.post(
                    f"{self.url}/v1/images/generations",
                    timeout=60,
                    json={"prompt": f"fox {i} {n}", "num_inference_steps": 1, "seed": n},
                )
                status = r.status_code
            except requests.RequestException:
                status = 0
            self.results.append((time.monotonic(), status))
            if status != 200:  # as a client should: wait before asking again (the 503s say 1 s)
                time.sleep(1)
            n += 1

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=90)


def ok_since(results: list, since: float) -> int:
    """How many answers in a row, the latest last, succeeded after `since`."""
    run = 0
    for t, status in reversed(list(results)):
        if t < since or status != 200:
            break
        run += 1
    return run


def wait_for(what, check, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"{what} not seen after {timeout:.0f} s")


def test_serve_survives_losing_a_node_and_scales_with_load(cluster, tmp_path):
    import yaml

    from serve.app import ServeProcess
    from unilip.model import UniLIP

    model_dir = UniLIP.from_preset("tiny").save_pretrained(tmp_path / "unilip-tiny")
    config = yaml.safe_load((ROOT / "serve" / "serve.yaml").read_text())
    deployments = {d["name"]: d for d in config["applications"][0]["deployments"]}
    # a replica per worker node (2 CPUs each; the head's 1 cannot hold one), 1 to 2 of them,
    # scaled within seconds
    deployments["UniLIPModel"].update(
        max_ongoing_requests=2,
        ray_actor_options={"num_cpus": 2},
        autoscaling_config={
            "min_replicas": 1,
            "max_replicas": 2,
            "target_ongoing_requests": 1,
            "upscale_delay_s": 1,
            "downscale_delay_s": 5,
            "look_back_period_s": 12,
        },
    )
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    with ServeProcess(str(model_dir), "--config", str(path), env=cluster.env(), log=tmp_path / "serve.log") as server:
        assert len(model_replicas(cluster)) == 1  # idle: the minimum
        load = Load(server.url, clients=4)
        try:
            replicas = wait_for("2 replicas under load", lambda: replicas_when(cluster, 2), 180)
            names = node_names(cluster)
            on = sorted(names[n] for n in replicas.values())
            assert len(set(on)) == 2 and "head" not in on, on  # on different worker nodes
            time.sleep(5)
            killed_at = time.monotonic()
            cluster.kill_node(on[0])
            add_node(cluster, "node-4")  # the replacement machine
            wait_for("2 replicas again", lambda: replicas_when(cluster, 2), 180)
            # 8 answers in a row after the loss (before it counts nothing here)
            wait_for("8 answers in a row", lambda: ok_since(load.results, killed_at) >= 8, 180)
        finally:
            load.close()
        before = [s for t, s in load.results if t < killed_at]
        after = [(t - killed_at, s) for t, s in load.results if t >= killed_at]
        failed = [t for t, s in after if s != 200]
        last_failure = max(failed, default=0.0)
        recovered = min((t for t, s in after if s == 200 and t > last_failure), default=None)
        # a replica added by the autoscaler takes requests only once its model is loaded
        assert len(before) >= 8 and set(before) == {200}, before
        print(
            f"node lost under load: {len(failed)} of {len(after)} requests failed (statuses "
            f"{sorted({s for _, s in after if s != 200})}); all succeed again {recovered} s after the loss"
        )
        statuses = sorted({s for _, s in after if s != 200})
        # requests succeed again within a bounded time: the node's death is noticed (Ray's
        # heartbeats), then the replica's (Serve's health check: every 10 s, 30 s timeout)
        assert recovered is not None and recovered < 180, statuses
        assert sum(s == 200 for t, s in after if t >= recovered) >= 8  # and keep succeeding
        wait_for("back to 1 replica after the load", lambda: replicas_when(cluster, 1), 120)
