"""Cluster definitions and job submission: every manifest checked, and a tiny release,
converted and registered, continued by a recipe submitted to a real `ray start --head` on
127.0.0.1 with `unilip submit`."""

import os
import re
import shlex
import string
from pathlib import Path

import mlflow
import pytest
import ray
import torch
import yaml

from cli import build_parser
from cluster.local import LocalStack
from cluster.registry import fetch_model
from cluster.submit import FORWARDED_ENV
from jobs.training.recipes import chain, recipe_names
from tests.conftest import ROOT, loss_steps, mlflow_run, run_cli, run_inline, sets
from tests.release_fixture import perturbed_tiny, write_release
from unilip.model import UniLIP

KUBERAY = ROOT / "cluster" / "kuberay"
IMAGE = re.compile(r"^[\w.\-/]+:[\w.\-]+$")  # registry/name:tag


def load(path: Path, **subst) -> dict:
    text = path.read_text()
    return yaml.safe_load(string.Template(text).substitute(subst) if subst else text)


def pod_templates(cluster_spec: dict) -> list[tuple[str, dict]]:
    groups = [("head", cluster_spec["headGroupSpec"])] + [(g["groupName"], g) for g in cluster_spec["workerGroupSpecs"]]
    return [(name, g["template"]["spec"]) for name, g in groups]


def check_pinned(image: str) -> None:
    assert IMAGE.match(image) and not image.endswith(":latest"), image


def check_cluster_spec(spec: dict) -> dict[str, dict]:
    """Resources, pinned images and secrets of every group; returns the containers by group."""
    assert spec["rayVersion"] == ray.__version__ and spec["enableInTreeAutoscaling"] is True
    containers = {}
    for name, pod in pod_templates(spec):
        (container,) = pod["containers"]
        check_pinned(container["image"])
        res = container["resources"]
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(res[kind]), (name, kind)
        assert container["envFrom"] == [{"secretRef": {"name": "unilip-env"}}]  # secrets from Kubernetes
        assert "env" not in container  # nothing inline
        containers[name] = container
    for group in spec["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
    return containers


def test_raycluster_has_head_gpu_and_cpu_groups():
    doc = load(KUBERAY / "raycluster.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCluster")
    containers = check_cluster_spec(doc["spec"])
    gpus = {name: c["resources"]["limits"].get("nvidia.com/gpu") for name, c in containers.items()}
    assert gpus["a100"] == "8" and gpus["cpu-data"] is None and gpus["head"] is None
    groups = {g["groupName"]: g for g in doc["spec"]["workerGroupSpecs"]}
    assert "A100" in groups["a100"]["template"]["spec"]["nodeSelector"]["nvidia.com/gpu.product"]
    assert doc["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


@pytest.mark.parametrize("recipe", chain())
def test_rayjob_template_renders_a_valid_train_command_for_every_recipe(recipe):
    doc = load(KUBERAY / "rayjob.yaml", RECIPE=recipe, PRESET="unilip-1b", WORKERS="16")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    assert doc["metadata"]["name"] == f"unilip-{recipe}"
    cluster = load(KUBERAY / "raycluster.yaml")["metadata"]["name"]
    assert doc["spec"]["clusterSelector"] == {"ray.io/cluster": cluster}
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "cli"]
    args = build_parser().parse_args(argv[3:])  # the project's own parser accepts it
    assert args.command == "train" and args.recipe in recipe_names() and args.gpu and args.workers == 16
    for c in doc["spec"]["submitterPodTemplate"]["spec"]["containers"]:
        check_pinned(c["image"])


def test_rayservice_serves_the_projects_application_on_gpus():
    from ray.serve.schema import ServeDeploySchema

    doc = load(KUBERAY / "rayservice.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayService")
    serve_config = yaml.safe_load(doc["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config)  # Ray's own schema for the config
    local = yaml.safe_load((ROOT / "serve" / "serve.yaml").read_text())
    (app,), (local_app,) = serve_config["applications"], local["applications"]
    assert app["import_path"] == local_app["import_path"]
    assert {d["name"] for d in app["deployments"]} == {d["name"] for d in local_app["deployments"]}
    assert set(app["args"]) <= set(local_app["args"]) and app["args"]["model"].startswith("models:/")
    model = next(d for d in app["deployments"] if d["name"] == "UniLIPModel")
    assert model["ray_actor_options"]["num_gpus"] == 1
    assert model["autoscaling_config"]["max_replicas"] > model["autoscaling_config"]["min_replicas"]
    containers = check_cluster_spec(doc["spec"]["rayClusterConfig"])
    assert containers["a100-serve"]["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_aws_launcher_config_is_valid_for_ray():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load(ROOT / "cluster" / "aws" / "cluster.yaml")
    validate_config(prepare_config(config))  # defaults filled in, then Ray's cluster-launcher JSON schema
    assert config["provider"]["type"] == "aws" and config["idle_timeout_minutes"] > 0
    check_pinned(config["docker"]["image"])
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    instance = {name: t["node_config"]["InstanceType"] for name, t in types.items()}
    assert {"p4de.24xlarge", "p4d.24xlarge"} <= set(instance.values()) and "c6i.8xlarge" in instance.values()
    assert types["a100-40g-spot"]["node_config"]["InstanceMarketOptions"] == {"MarketType": "spot"}


def test_dockerfile_and_manifests_pin_versions_and_hold_no_secrets():
    dockerfile = (ROOT / "cluster" / "Dockerfile").read_text()
    (base,) = re.findall(r"^FROM (\S+)", dockerfile, re.M)
    check_pinned(base)
    assert base.split(":")[1].startswith(ray.__version__ + "-")  # the Ray the project pins
    assert "cluster/env/install.sh" in dockerfile  # the pinned constraints, as `make` installs
    files = [*KUBERAY.glob("*.yaml"), ROOT / "cluster" / "aws" / "cluster.yaml", ROOT / "cluster" / "Dockerfile"]
    images = set()
    for path in files:
        text = path.read_text()
        assert not re.search(r"(AWS_SECRET_ACCESS_KEY|AWS_ACCESS_KEY_ID|PASSWORD|API_KEY)\s*[:=]\s*\S", text), path
        images |= set(re.findall(r"image: (\S+)", text))
    project = {i for i in images if "unilip" in i}
    assert len(project) == 1  # one image tag, used everywhere


# ----------------------------------------------------------------------------- submission


@pytest.fixture
def ray_head(stack, tmp_path):
    """A second Ray cluster: `ray start --head` on 127.0.0.1 that knows the S3 credentials
    (as a cluster's secret would) but not the endpoints; stopped by PID afterwards."""
    saved = {k: os.environ.pop(k) for k in FORWARDED_ENV if k in os.environ}
    head = LocalStack(tmp_path / "head", bucket=stack.bucket, log=lambda m: None)
    try:
        head.up(("ray",))
    finally:
        os.environ.update(saved)
    try:
        yield f"http://127.0.0.1:{head.services()['ray'].ports['dashboard']}"
    finally:
        head.down()
        assert head.leftover_processes() == []


def test_a_release_continued_by_a_job_submitted_to_a_ray_head(stack, s3, sample, ray_head, tmp_path):
    """A release checkpoint -> `unilip convert official --register` -> `unilip submit
    gen-stage3 --from models:/...` to a Ray head -> the jobs commands follow it."""
    tiny = perturbed_tiny()
    release = write_release(tiny, tmp_path / "UniLIP-tiny")
    converted = run_inline(  # a conversion and an MLflow registration start nothing: in this process
        "convert",
        "official",
        "--src",
        str(release),
        "--out",
        str(tmp_path / "converted"),
        "--register",
        "unilip-tiny-release",
    )
    assert converted.returncode == 0, converted.stderr[-3000:]
    assert "registered models:/unilip-tiny-release/1" in converted.stdout
    out = run_cli(
        "submit",
        "gen-stage3",
        "--preset",
        "tiny",
        "--workers",
        "1",
        "--from",
        "models:/unilip-tiny-release/1",
        "--run-name",
        "from-release",
        *sets("train.steps=2", "train.checkpoint_every=2", "train.eval_every=2"),
        "--address",
        ray_head,
        "--follow",
        timeout=900,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-6000:]
    job_id = re.search(r"submitted job (\S+):", out.stdout).group(1)
    assert f"job {job_id}: SUCCEEDED" in out.stdout
    assert "step 2" in out.stdout  # the job's log was streamed
    assert "DiT positional embedding 'sincos', as the starting model's generator was trained" in out.stdout + out.stderr

    assert s3.list_keys(f"s3://{stack.bucket}/runs/from-release/step-00000002/")  # the checkpoint, in the moto bucket
    mlflow.set_tracking_uri(stack.env()["MLFLOW_TRACKING_URI"])
    run = mlflow_run("from-release")
    assert run.info.status == "FINISHED" and loss_steps(run) == [1, 2]
    registered = run.data.tags["unilip.registered"]
    version = mlflow.MlflowClient().get_model_version("unilip-tiny-gen-stage3", registered.rsplit("/", 1)[1])
    assert version.tags["from"] == "models:/unilip-tiny-release/1"
    trained = UniLIP.from_pretrained(fetch_model(registered))
    # the DiT's positional embedding, which no weight file shows, goes through the registry
    # both ways: the release's sincos, kept by the stage that continued it (its recipe says none)
    assert UniLIP.from_pretrained(fetch_model("models:/unilip-tiny-release/1")).cfg.dit_pos_embed == "sincos"
    assert trained.cfg.dit_pos_embed == "sincos" and trained.generator.dit.patch_embed.pos_embed is not None
    # gen-stage3 trains the generator; the release's encoder and pixel decoder come through unchanged
    for part in ("encoder", "pixel_decoder", "down_proj"):
        got, want = trained.components()[part].state_dict(), tiny.components()[part].state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want), part
    got, want = trained.components()["dit"].state_dict(), tiny.components()["dit"].state_dict()
    assert not all(torch.equal(got[k], want[k]) for k in want)  # and the DiT trained from the release's weights

    # the jobs commands only ask the head over HTTP: in this process
    listed = run_inline("jobs", "list", "--address", ray_head)
    assert listed.returncode == 0 and job_id in listed.stdout and "gen-stage3" in listed.stdout
    status = run_inline("jobs", "status", job_id, "--address", ray_head)
    assert status.returncode == 0 and f"{job_id}: SUCCEEDED" in status.stdout
    logs = run_inline("jobs", "logs", job_id, "--address", ray_head)
    assert logs.returncode == 0 and "from-release" in logs.stdout
    stop = run_inline("jobs", "stop", job_id, "--address", ray_head)
    assert stop.returncode == 0 and "already finished" in stop.stdout
    missing = run_inline("jobs", "status", "no-such-job", "--address", ray_head)
    assert missing.returncode == 2 and "no-such-job" in missing.stderr
