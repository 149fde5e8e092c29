"""The cluster definitions through the validators of the tools that run them, from the
installed packages: Ray's launcher schema and `prepare_config`, the strict Kubernetes
schema for every pod template, Ray Serve's schema with unknown keys refused, and the
KubeRay operator's own rules (ray-operator/controllers/ray/utils/validation.go). Each
check passes on the shipped files and is shown to fail on a planted mistake."""

import copy
import json
import re
import string

import jsonschema
import pytest
import yaml

from tests.conftest import ROOT, run_inline

KUBERAY, AWS = ROOT / "cluster" / "kuberay", ROOT / "cluster" / "aws"
K8S_VERSION = "1.37.0"  # kubernetes-validate's newest schemas (strict: unknown fields are errors)
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
QUANTITY = re.compile(
    r"^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?[0-9]+)?$"
)  # resource.Quantity
# KubeRay's name limits: services get suffixes ("-serve-svc"), clusters of jobs and services 6 characters
MAX_NAME = {"RayCluster": 53, "RayJob": 47, "RayService": 47}


def load(path, **subst):
    text = path.read_text()
    return yaml.safe_load(string.Template(text).substitute(subst) if subst else text)


def manifests() -> dict[str, dict]:
    return {
        "raycluster": load(KUBERAY / "raycluster.yaml"),
        "rayservice": load(KUBERAY / "rayservice.yaml"),
        "rayjob": load(KUBERAY / "rayjob.yaml", RECIPE="recon-stage2-448", PRESET="unilip-3b", WORKERS="4"),
    }


# ------------------------------------------------------------------------- Kubernetes


def pod_templates(doc: dict) -> list[tuple[str, dict]]:
    """(where, PodTemplateSpec) of every pod a KubeRay object makes."""
    spec = doc["spec"]
    if doc["kind"] == "RayJob":
        return [("submitterPodTemplate", spec["submitterPodTemplate"])]
    cluster = spec["rayClusterConfig"] if doc["kind"] == "RayService" else spec
    groups = [("headGroupSpec", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster["workerGroupSpecs"]]
    return [(name, g["template"]) for name, g in groups]


def k8s_errors(doc: dict) -> list[str]:
    import kubernetes_validate

    errors = []
    for where, template in pod_templates(doc):
        pod = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": template}
        try:
            kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{doc['kind']} {where}: {e.message}")
    return errors


def operator_errors(doc: dict, cluster_name: str = "unilip") -> list[str]:
    """The KubeRay operator's checks that the CRD schema does not make (it sets the object
    ValidationFailed on reconcile, after `kubectl apply` succeeded), and the API server's
    pod rules the operator's pods would meet later."""
    kind, name, spec, errors = doc["kind"], doc["metadata"]["name"], doc["spec"], []
    if len(name) > MAX_NAME[kind] or not DNS1035.match(name):
        errors.append(f"{kind} name {name!r}: a DNS-1035 label of at most {MAX_NAME[kind]} characters")
    if kind == "RayJob":
        if "backoffLimit" in spec and "clusterSelector" in spec:
            errors.append("RayJob: BackoffLimit is incompatible with ClusterSelector mode")
        if spec.get("clusterSelector", {}).get("ray.io/cluster") != cluster_name:
            errors.append(f"RayJob: clusterSelector must name the RayCluster {cluster_name!r}")
    cluster = spec.get("rayClusterConfig") if kind == "RayService" else spec if kind == "RayCluster" else None
    if cluster:
        for g in cluster["workerGroupSpecs"]:
            if not g.get("minReplicas", 0) <= g.get("replicas", 0) <= g.get("maxReplicas", 2**31):
                errors.append(f"{kind} group {g['groupName']}: minReplicas <= replicas <= maxReplicas")
        for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
            if not all(isinstance(v, str) for v in group.get("rayStartParams", {}).values()):
                errors.append(f"{kind}: rayStartParams values must be strings")
    for where, template in pod_templates(doc):
        for c in template["spec"]["containers"]:
            res = c.get("resources", {})
            for kind_, values in res.items():
                errors += [
                    f"{kind} {where}: {kind_}.{k} {v!r} is not a quantity"
                    for k, v in values.items()
                    if not QUANTITY.match(str(v))
                ]
            for key in set(res.get("requests", {})) | set(res.get("limits", {})):
                if "/" in key and res.get("requests", {}).get(key) != res.get("limits", {}).get(key):
                    errors.append(f"{kind} {where}: extended resource {key} needs requests equal to limits")
            for port in c.get("ports", []):
                if "name" in port and not (
                    len(port["name"]) <= 15 and re.match(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", port["name"])
                ):
                    errors.append(f"{kind} {where}: port name {port['name']!r} is not an IANA service name")
    return errors


def test_kuberay_manifests_pass_the_strict_pod_schema_and_the_operator_s_rules():
    docs = manifests()
    for doc in docs.values():
        assert k8s_errors(doc) == [], doc["kind"]
        assert operator_errors(doc) == [], doc["kind"]
    # the RayJob of every recipe has a valid name
    for recipe in (p.stem for p in (ROOT / "jobs" / "recipes").glob("*.yaml")):
        assert operator_errors(load(KUBERAY / "rayjob.yaml", RECIPE=recipe, PRESET="unilip-1b", WORKERS="16")) == []


def planted(doc: dict, edit) -> dict:
    doc = copy.deepcopy(doc)
    edit(doc)
    return doc


def head(doc):
    return doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]


def test_the_checks_fail_on_planted_mistakes():
    docs = manifests()
    cluster, job = docs["raycluster"], docs["rayjob"]
    typo = planted(cluster, lambda d: head(d).__setitem__("resource", head(d).pop("resources")))
    assert any("'resource' was unexpected" in e for e in k8s_errors(typo))
    quantity = planted(cluster, lambda d: head(d)["resources"]["limits"].__setitem__("memory", "32Gx"))
    assert operator_errors(quantity) == ["RayCluster headGroupSpec: limits.memory '32Gx' is not a quantity"]
    bounds = planted(cluster, lambda d: d["spec"]["workerGroupSpecs"][0].__setitem__("minReplicas", 9))
    assert operator_errors(bounds) == ["RayCluster group a100: minReplicas <= replicas <= maxReplicas"]
    backoff = planted(job, lambda d: d["spec"].__setitem__("backoffLimit", 2))  # what rayjob.yaml used to set
    assert operator_errors(backoff) == ["RayJob: BackoffLimit is incompatible with ClusterSelector mode"]
    long_name = planted(job, lambda d: d["metadata"].__setitem__("name", "unilip-" + "x" * 41))
    assert "at most 47 characters" in operator_errors(long_name)[0]
    gpu = cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]
    assert gpu["limits"]["nvidia.com/gpu"] == gpu["requests"]["nvidia.com/gpu"]
    unequal = planted(
        cluster,
        lambda d: d["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"][
            "requests"
        ].__setitem__("nvidia.com/gpu", "4"),
    )
    assert "needs requests equal to limits" in operator_errors(unequal)[0]
    port = planted(cluster, lambda d: head(d)["ports"][0].__setitem__("name", "gcs-server-port-x"))
    assert "not an IANA service name" in operator_errors(port)[0]
    numbers = planted(cluster, lambda d: d["spec"]["headGroupSpec"]["rayStartParams"].__setitem__("num-cpus", 0))
    assert operator_errors(numbers) == ["RayCluster: rayStartParams values must be strings"]


# ------------------------------------------------------------------------ Ray launcher


def launcher_errors(config: dict) -> list[str]:
    """Ray's own path for `ray up`: ray-schema.json, then prepare_config + validate_config."""
    from pathlib import Path

    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    errors = [e.message for e in jsonschema.Draft7Validator(schema).iter_errors(config)]
    if not errors:
        try:
            validate_config(prepare_config(copy.deepcopy(config)))
        except Exception as e:  # Ray raises ValueError / jsonschema errors
            errors.append(str(e).splitlines()[0])
    return errors


def launcher_rules(config: dict) -> list[str]:
    """What the schema cannot see: the AMI the image's CUDA needs, and the profiles whose
    policies let the head's autoscaler launch workers."""
    errors = []
    head_type = config["head_node_type"]
    for name, node in config["available_node_types"].items():
        nc = node["node_config"]
        ami = nc.get("ImageId", "")
        if not (ami.startswith("ami-") or "base-oss-nvidia-driver-gpu" in ami):
            errors.append(f"{name}: no ImageId of a driver >= 580 AMI (Ray would fall back to its Ubuntu 18.04 DLAMI)")
        profile = nc.get("IamInstanceProfile", {}).get("Name")
        if profile != ("unilip-ray-head" if name == head_type else "unilip-ray-worker"):
            errors.append(f"{name}: instance profile {profile!r}")
        if "spot" in name and "MarketType" not in str(nc.get("InstanceMarketOptions")):
            errors.append(f"{name}: a spot node type without spot market options")
        if name.startswith("a100") and ("40g" in name) != nc["InstanceType"].startswith("p4d."):
            errors.append(f"{name}: the name says another A100 than {nc['InstanceType']}")
    return errors


def policy_errors(policy: dict, needs: set[str]) -> list[str]:
    """An IAM policy document's shape, and the actions it must allow."""
    errors = []
    if policy.get("Version") != "2012-10-17" or not isinstance(policy.get("Statement"), list):
        return ["Version 2012-10-17 and a Statement list"]
    allowed = set()
    for st in policy["Statement"]:
        if set(st) - {"Sid", "Effect", "Action", "Resource", "Condition"} or st.get("Effect") not in ("Allow", "Deny"):
            errors.append(f"statement {st.get('Sid')}: keys {sorted(st)}")
        actions = st.get("Action", [])
        actions = [actions] if isinstance(actions, str) else actions
        errors += [f"action {a!r}" for a in actions if not re.match(r"^[a-z0-9-]+:[A-Za-z*]+$", a)]
        if st.get("Effect") == "Allow":
            allowed |= set(actions)
    return errors + [f"missing {a}" for a in sorted(needs - allowed)]


HEAD_NEEDS = {
    "ec2:RunInstances",
    "ec2:TerminateInstances",
    "ec2:CreateTags",
    "ec2:DescribeInstances",
    "iam:PassRole",
    "ssm:GetParameters",
    "s3:GetObject",
    "s3:PutObject",
    "s3:ListBucket",
}
WORKER_NEEDS = {"s3:GetObject", "s3:PutObject", "s3:ListBucket"}


def test_aws_launcher_config_passes_ray_s_validators_and_the_cuda_and_iam_rules():
    config = load(AWS / "cluster.yaml")
    assert launcher_errors(config) == [] and launcher_rules(config) == []
    head_policy, worker_policy = (json.loads((AWS / f"iam-{k}-policy.json").read_text()) for k in ("head", "worker"))
    assert policy_errors(head_policy, HEAD_NEEDS) == [] and policy_errors(worker_policy, WORKER_NEEDS) == []
    assert not any(
        a.startswith(("ec2:", "iam:")) for st in worker_policy["Statement"] for a in st["Action"]
    )  # workers: S3 only
    # planted mistakes
    typo = planted(config, lambda c: c["available_node_types"]["a100"].__setitem__("min_worker", 1))
    assert any("min_worker" in e for e in launcher_errors(typo))
    no_ami = planted(config, lambda c: c["available_node_types"]["a100"]["node_config"].pop("ImageId"))
    assert launcher_rules(no_ami) == [
        "a100: no ImageId of a driver >= 580 AMI (Ray would fall back to its Ubuntu 18.04 DLAMI)"
    ]
    s3_only_head = planted(head_policy, lambda p: p.__setitem__("Statement", p["Statement"][:3]))
    assert "missing iam:PassRole" in policy_errors(s3_only_head, HEAD_NEEDS)


def test_the_image_puts_its_venv_first_for_the_launcher_s_login_shells():
    dockerfile = (ROOT / "cluster" / "Dockerfile").read_text()
    # Ray's launcher runs `bash --login -c -i 'source ~/.bashrc; ...'`: the venv must come
    # after the base image's conda lines there, not only in ENV PATH
    assert re.search(r"echo 'export PATH=/home/ray/venv/bin:\$PATH.*' >> /home/ray/\.bashrc", dockerfile)
    lines = dockerfile.splitlines()
    assert lines.index("RUN mkdir -p /home/ray/unilip") < lines.index(
        "WORKDIR /home/ray/unilip"
    )  # ray owns it, any builder
    assert "580.65.06" in dockerfile and "cu130" in dockerfile  # the CUDA story says what it needs


# --------------------------------------------------------------------------- Ray Serve


def test_serve_configs_pass_ray_s_schema_and_unknown_keys_are_refused(tmp_path):
    from ray.serve.schema import ServeDeploySchema

    from serve.app import load_config, unknown_keys
    from unilip.config import ConfigError

    local = load(ROOT / "serve" / "serve.yaml")
    cluster = yaml.safe_load(load(KUBERAY / "rayservice.yaml")["spec"]["serveConfigV2"])
    for config in (local, cluster):
        ServeDeploySchema.model_validate(config)
        assert unknown_keys(config, ServeDeploySchema) == []
        assert config["http_options"]["host"] == "0.0.0.0"  # reachable on every node of a cluster
    load_config(ROOT / "serve" / "serve.yaml")
    bad = copy.deepcopy(local)
    bad["applications"][0]["deployments"][0]["max_ongoing_request"] = 8  # misspelt: Ray alone would ignore it
    bad["applications"][0]["deployments"][0]["autoscaling_config"]["max_replica"] = 2
    ServeDeploySchema.model_validate(bad)  # what Ray's schema alone lets through
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(
        ConfigError,
        match=r"unknown Ray Serve config key\(s\) applications\.0\.deployments\.0\.autoscaling_config"
        r"\.max_replica, applications\.0\.deployments\.0\.max_ongoing_request",
    ):
        load_config(path)


def test_train_all_in_the_rayjob_template_is_a_clear_error():
    doc = load(KUBERAY / "rayjob.yaml", RECIPE="all", PRESET="unilip-1b", WORKERS="16")
    argv = doc["spec"]["entrypoint"].split()[3:]
    r = run_inline(*argv)
    assert r.returncode == 2 and "a RayJob runs one stage: apply cluster/kuberay/rayjob.yaml once per stage" in r.stderr
