"""Losing machines: a Ray cluster of three nodes on this machine (a head and two worker
nodes, each its own raylet started with `ray start` in its own session), with S3 (keys
rotating every 30 s) and MLflow (jobs/performance/soak.py's cluster).

Training, as `unilip bench soak` runs it but with three faults in a fixed order: a worker
node killed mid-epoch without notice (its raylet and every process on it, SIGKILL; the run
resumes from its S3 checkpoint once a replacement joins), the S3 server frozen for a few
seconds, and a notice (Ray's drain, as a spot reclaim or a pod's preStop hook asks for: the
run checkpoints at once, resumes on a replacement, and loses no step when the node goes).
Every sample of every epoch is trained exactly once.

Serving: an application under steady load scales from 1 to 2 model replicas (one per
worker node), loses the node of one, recovers once a replacement joins, and scales back to 1.

Placement is fixed by the nodes' CPUs: the head has 1 (job driver and data tasks), each
worker node 2, and a training worker or a model replica asks for more than 1, so no node
holds two and the head none.
"""

import time

import pytest

from jobs.performance.soak import Cluster, run_soak
from tests.conftest import ROOT

pytestmark = [pytest.mark.stack, pytest.mark.timeout(1500)]  # a three-node cluster of its own


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Its own stack (another cluster than the session's); everything stopped by PID afterwards."""
    c = Cluster(tmp_path_factory.mktemp("multinode"), bucket="unilip-multinode", log=lambda m: None)
    with c:
        yield c
    assert c.stack.leftover_processes() == []


def test_training_survives_a_node_loss_an_s3_outage_and_a_notice(cluster):
    # each fault at a step, whatever the machine's speed: the node just after the checkpoint
    # at the first epoch's end (step 24 of 3 x 24), whose resumed run's rest of that epoch is
    # empty and goes on with the next; the notice with room to be seen (Ray's watcher and the
    # loop each poll every 5 s: 17 steps went by once) and acted on before the run ends
    schedule, at_steps = ["node", "notice", "outage"], [25, 30, 56]
    result = run_soak(seed=0, steps=72, schedule=schedule, at_steps=at_steps, cluster=cluster)
    assert result["faults_injected"] == {"worker": 0, "node": 1, "notice": 1, "outage": 1}
    assert result["steps_recorded_once"] and result["samples_lost"] == result["samples_repeated"] == 0
    (node,) = [f for f in result["faults"] if f["kind"] == "node"]
    assert node["resumed_from"] in (16, 24)  # a checkpoint (every 8 steps; 16 if 24's was not registered yet)
    assert result["steps_redone"]["notice"] == [0]  # a notice costs at most the step in flight
    assert result["credential_rotations"] >= 1
    assert result["registered"].startswith("models:/unilip-tiny-recon-stage1/")


def model_replicas(st) -> dict[str, str]:
    """Alive UniLIPModel replicas of the Serve application: actor id -> node id."""
    return {
        a.actor_id: a.node_id
        for a in st.state("actors")
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
    with ServeProcess(
        str(model_dir), "--config", str(path), env=cluster.stack.env(), log=tmp_path / "serve.log"
    ) as server:
        assert len(model_replicas(cluster)) == 1  # idle: the minimum
        load = Load(server.url, clients=4)
        try:
            replicas = wait_for("2 replicas under load", lambda: replicas_when(cluster, 2), 180)
            names = cluster.node_names()
            on = sorted(names[n] for n in replicas.values())
            assert len(set(on)) == 2 and "head" not in on, on  # on different worker nodes
            time.sleep(5)
            killed_at = time.monotonic()
            cluster.kill_node(on[0])
            cluster.add_node()  # the replacement machine
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
