"""Soak run: the tiny preset trained for a long while on a local 3-node cluster under faults.

    unilip bench soak --minutes 20 --seed 0            # about 20 minutes of faults, then to the end
    unilip bench soak --minutes 4 --seed 1 --json soak.json

Its own local stack (cluster/local.py): S3 with authentication enforced and keys that
rotate every 30 s (each revoked a minute after its issue), MLflow, a 1-CPU Ray head and two
2-CPU worker nodes. `unilip train recon-stage1 --preset tiny` runs two workers (one per
worker node) over an epoch of 96 samples (24 steps), a checkpoint every 8 steps, every
step's samples recorded. For `--minutes`, one fault at a time, at random moments drawn
from `--seed` (30-90 s apart, each after the run has trained again since the last):

    worker   SIGKILL of a training worker process
    node     SIGKILL of a worker node (raylet and all its processes), a replacement added
    notice   Ray's drain of a worker node (a spot reclaim notice, a pod's preStop hook),
             a replacement added, the node killed once the run has resumed elsewhere
    outage   the S3 server frozen (SIGSTOP) for 3-8 s, then resumed

Then the run trains to its end. The soak checks that every step was trained and recorded
once in the final history, that every completed epoch trained each sample exactly once,
and that the final model was registered; and prints faults by kind, those survived,
samples lost and repeated, the steps redone after each fault (the steps trained past the
checkpoint the run resumed from) and the wall time.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

KINDS = ("worker", "node", "notice", "outage")
EPOCH_SAMPLES, GLOBAL_BATCH = 96, 4
ROOT = Path(__file__).resolve().parents[2]


class Cluster:
    """The soak's local cluster: its stack, its worker nodes, and what Ray says runs where."""

    def __init__(self, home: Path, bucket: str = "unilip-soak", log=print):
        from cluster.local import LocalStack

        self.stack = LocalStack(
            home, bucket=bucket, num_cpus=1, multinode=True, credentials="rotating", log=lambda m: None
        )
        self.log, self.nodes, self.next_node = log, [], 1

    def __enter__(self) -> Cluster:
        self.stack.up()
        for _ in range(2):
            self.add_node()
        self.stack.activate()  # every client here reaches this cluster, its keys from the stack's endpoint
        return self

    def __exit__(self, *exc) -> None:
        self.stack.deactivate()
        self.stack.down()

    def add_node(self) -> str:
        name = f"node-{self.next_node}"
        self.next_node += 1
        self.stack.add_node(name, num_cpus=2, resources={name: 1})
        self.nodes.append(name)
        return name

    def kill_node(self, name: str) -> None:
        self.stack.kill_node(name)
        self.nodes.remove(name)

    def state(self, kind: str, **kwargs) -> list:
        from ray.util import state as api

        from cluster.local import patched_environ

        with patched_environ(self.stack.env()):
            return getattr(api, f"list_{kind}")(
                filters=[("state", "=", "ALIVE")], limit=1000, raise_on_missing_output=False, **kwargs
            )

    def node_names(self) -> dict[str, str]:
        """Ray node id -> the node's name ("head" for the head)."""
        nodes = self.state("nodes", detail=True)
        return {n.node_id: next((k for k in n.resources_total if k.startswith("node-")), "head") for n in nodes}

    def train_workers(self) -> list[tuple[int, str]]:
        """Alive training workers: (pid, node name)."""
        names = self.node_names()
        actors = self.state("actors", detail=True)
        return [(a.pid, names.get(a.node_id, "?")) for a in actors if a.class_name == "RayTrainWorker"]

    def drain(self, name: str, deadline_s: int = 120) -> None:
        node_id = next(i for i, n in self.node_names().items() if n == name)
        cmd = [str(Path(sys.executable).parent / "ray"), "drain-node", "--address", self.stack.env()["RAY_ADDRESS"]]
        cmd += ["--node-id", node_id, "--reason", "DRAIN_NODE_REASON_PREEMPTION"]
        cmd += ["--reason-message", "soak: spot reclaim", "--deadline-remaining-seconds", str(deadline_s)]
        subprocess.run(cmd, env={**os.environ, **self.stack.env()}, check=True, capture_output=True)

    def freeze_s3(self, seconds: float) -> None:
        pid = self.stack.services()["s3"].pid
        os.killpg(pid, signal.SIGSTOP)
        try:
            time.sleep(seconds)
        finally:
            os.killpg(pid, signal.SIGCONT)


def recorded_steps(s3, runs: str) -> dict[int, dict[int, list[str]]]:
    """step -> rank -> the sample keys recorded for it (the last training of that step)."""
    out: dict[int, dict[int, list[str]]] = {}
    for key in s3.list_keys(f"{runs}/samples/"):
        m = re.search(r"step-(\d+)-rank-(\d+)\.json$", key)
        if m:
            out.setdefault(int(m[1]), {})[int(m[2])] = json.loads(s3.get_bytes(key))
    return out


class Soak:
    """The training run under faults, and the bookkeeping of each."""

    def __init__(self, cluster: Cluster, s3, runs: str, log_file: Path, proc, rng: random.Random, log=print):
        self.cluster, self.s3, self.runs, self.log_file, self.proc, self.rng = cluster, s3, runs, log_file, proc, rng
        self.log = log
        self.highest = 0  # the newest step trained so far

    def last_step(self) -> int:
        keys = self.s3.list_keys(f"{self.runs}/samples/")
        steps = [int(m[1]) for k in keys if (m := re.search(r"step-(\d+)-rank-0\.json$", k))]
        self.highest = max([self.highest, *steps])
        return self.highest

    def resumes(self) -> list[tuple[int, int]]:
        """(worker pid, step) of each start of the workers, from a checkpoint or from scratch
        (a line can repeat in the log)."""
        pattern = r"RayTrainWorker pid=(\d+)\S*\s+.*?(?:resumed from|starting at) step (\d+)"
        found = re.findall(pattern, self.log_file.read_text())
        return list(dict.fromkeys((int(pid), int(n)) for pid, n in found))

    def wait(self, condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                raise RuntimeError(f"the run ended while waiting for {what}:\n{self.log_file.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no {what} after {timeout:.0f}s:\n{self.log_file.read_text()[-4000:]}")
            time.sleep(0.5)

    def inject(self, kind: str) -> dict:
        """One fault, then wait until the run trains again; returns what it cost."""
        cluster, rng = self.cluster, self.rng
        before, known = self.last_step(), {pid for pid, _ in self.resumes()}
        restarted = lambda: [step for pid, step in self.resumes() if pid not in known]  # noqa: E731
        workers = cluster.train_workers()
        pid, node = rng.choice(workers)
        started = time.monotonic()
        if kind == "worker":
            os.kill(pid, signal.SIGKILL)
        elif kind == "node":
            cluster.kill_node(node)
            cluster.add_node()
        elif kind == "notice":
            cluster.drain(node)
            cluster.add_node()
            self.wait(restarted, 600, "resume after the notice")
            cluster.kill_node(node)  # the reclaim itself, once the run has moved
        else:
            cluster.freeze_s3(rng.uniform(3, 8))
        record = {"kind": kind, "at_step": before, "node": node}
        if kind != "outage":
            self.wait(restarted, 600, f"resume after the {kind} fault")
        trained = self.highest  # the newest step trained before the restart
        self.wait(lambda: self.last_step() > before, 600, f"training after the {kind} fault")
        if kind != "outage":  # the start that trains now (an earlier attempt may have failed)
            record["resumed_from"] = restarted()[-1]
            record["redone"] = max(0, trained - record["resumed_from"])
        record["recovery_s"] = round(time.monotonic() - started, 1)
        self.log(f"[soak] {kind} on {node} at step {before}: {record}")
        return record


def run_soak(
    minutes: float = 20.0,
    seed: int = 0,
    steps: int | None = None,
    schedule: list[str] | None = None,
    gaps: tuple[float, float] = (30.0, 90.0),
    at_steps: list[int] | None = None,
    cluster: Cluster | None = None,
    log=print,
) -> dict:
    """The soak (see the module doc); returns its figures. `schedule`: these faults in this
    order instead of random kinds for `minutes` (the short variant the test suite runs);
    `gaps`: the range of seconds between faults, or `at_steps`: fault i once the run has
    trained step at_steps[i] (whatever the machine's speed); `cluster`: one already up (else
    its own)."""
    from jobs.training.train import registered_model
    from pipelines.sample_data import build_sample_dataset

    rng = random.Random(seed)
    per_epoch = EPOCH_SAMPLES // GLOBAL_BATCH
    # enough epochs to outlast the fault window: on 2 cores the run trains about 1.2 steps a
    # second between faults and spends a third of the window recovering (measured, 20 min)
    steps = steps or per_epoch * max(2, round(minutes * 60 * 0.9 / per_epoch))
    t0 = time.monotonic()
    with contextlib.ExitStack() as scope:
        tmp = Path(scope.enter_context(tempfile.TemporaryDirectory(prefix="unilip-soak-")))
        cluster = cluster or scope.enter_context(Cluster(tmp / "stack", log=log))
        stack = cluster.stack
        s3 = stack.s3()
        root = f"s3://{stack.bucket}"
        build_sample_dataset(f"{root}/soak", s3, EPOCH_SAMPLES, 0, shard_size=2, size=64, log=lambda m: None)
        runs = f"{root}/runs/soak"
        sets = [
            f"train.steps={steps}",
            "train.checkpoint_every=8",
            "train.eval_every=0",
            "train.log_every=8",
            "train.record_samples=true",
            "train.max_failures=1000",  # the soak's own faults, each a restart
            f"data.sources.0.uri={root}/soak/generation",
        ]
        cmd = [sys.executable, "-m", "cli", "train", "recon-stage1", "--preset", "tiny", "--workers", "2"]
        cmd += ["--cpus-per-worker", "1.5", "--run-name", "soak", *[a for v in sets for a in ("--set", v)]]
        log_file = tmp / "train.log"
        log(
            f"[soak] {steps} steps ({steps // per_epoch} epochs of {EPOCH_SAMPLES}), faults for {minutes:g} min, seed {seed}"
        )
        with open(log_file, "w") as out:
            proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env={**os.environ, **stack.env(), "RAY_DEDUP_LOGS": "0"},  # every worker line, to be read
                start_new_session=True,
            )
        soak = Soak(cluster, s3, runs, log_file, proc, rng, log)
        faults: list[dict] = []
        try:
            soak.wait(lambda: soak.last_step() >= 1, 600, "a first step")
            rotations = stack.credential_rotations()
            window_end = time.monotonic() + minutes * 60
            planned, marks = list(schedule or []), list(at_steps or [])
            while (planned if schedule else time.monotonic() < window_end) and proc.poll() is None:
                if marks:
                    mark = marks.pop(0)
                    soak.wait(lambda: soak.last_step() >= mark, 600, f"step {mark}")  # noqa: B023 - waited for here
                else:
                    time.sleep(rng.uniform(*gaps))
                if proc.poll() is not None or soak.last_step() >= steps - 4:
                    break
                faults.append(soak.inject(planned.pop(0) if schedule else rng.choice(KINDS)))
            rc = proc.wait(timeout=3600)
            rotations = stack.credential_rotations() - rotations
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if rc != 0:
            raise RuntimeError(f"the soaked run failed (exit {rc}):\n{log_file.read_text()[-6000:]}")
        records = recorded_steps(s3, runs)
        lost = repeated = 0
        for epoch in range(steps // per_epoch):
            keys = [
                k
                for step in range(epoch * per_epoch + 1, (epoch + 1) * per_epoch + 1)
                for rank in (0, 1)
                for k in records.get(step, {}).get(rank, [])
            ]
            lost += EPOCH_SAMPLES - len(set(keys))
            repeated += len(keys) - len(set(keys))
        registered = registered_model(stack.env()["MLFLOW_TRACKING_URI"], "soak")
    result = {
        "seed": seed,
        "steps": steps,
        "epochs": steps // per_epoch,
        "wall_s": round(time.monotonic() - t0, 1),
        "credential_rotations": rotations,
        "faults_injected": {k: sum(f["kind"] == k for f in faults) for k in KINDS},
        "faults_survived": len(faults),  # each was followed by training again; the run then finished
        "steps_recorded_once": sorted(records) == list(range(1, steps + 1)),
        "samples_lost": lost,
        "samples_repeated": repeated,
        "steps_redone": {k: [f["redone"] for f in faults if f["kind"] == k and "redone" in f] for k in KINDS},
        "registered": registered,
        "faults": faults,
    }
    log(
        f"[soak] {len(faults)} faults survived ({', '.join(f'{k} {n}' for k, n in result['faults_injected'].items())}), "
        f"{rotations} credential rotations; samples lost {lost}, repeated {repeated}; steps redone "
        f"{result['steps_redone']}; registered {registered}; {result['wall_s']:.0f} s"
    )
    if lost or repeated or not result["steps_recorded_once"] or not registered:
        raise RuntimeError(f"the soak lost or repeated data: {result}")
    return result
