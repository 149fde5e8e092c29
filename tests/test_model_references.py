"""One model reference everywhere (`cluster.registry`): a Hugging Face hub id is a model as a
directory, `s3://` or `models:/` is, resolved offline through `huggingface_hub`'s own code
on a cache laid out here as it lays out a download."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.conftest import ROOT
from tests.release_fixture import perturbed_tiny, write_release


def hub_cache(cache: Path, repo: str, files: Path) -> None:
    """`files` as huggingface_hub's cache holds a downloaded repository: content-addressed
    blobs, a snapshot of links to them under the commit, and refs/main naming the commit."""
    base = cache / f"models--{repo.replace('/', '--')}"
    commit = hashlib.sha1(repo.encode()).hexdigest()
    for path in sorted(p for p in files.rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob = base / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = base / "snapshots" / commit / path.relative_to(files)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)


def test_hub_ids_are_model_references_offline(tmp_path):
    model = perturbed_tiny()
    model_dir = model.save_pretrained(tmp_path / "model")
    release = write_release(model, tmp_path / "release")
    cache = tmp_path / "hub"
    hub_cache(cache, "unilip-test/tiny", model_dir)
    hub_cache(cache, "unilip-test/UniLIP-tiny", release)
    out = tmp_path / "out"
    generate = ["generate", "--prompt", "a red apple", "--steps", "2", "--seed", "0", "--out"]
    commands = [
        ["convert", "official", "--src", "unilip-test/UniLIP-tiny", "--out", str(out / "converted")],
        [*generate, str(out / "hub"), "--model", "unilip-test/tiny"],
        [*generate, str(out / "dir"), "--model", str(model_dir)],
        [*generate, str(out / "x"), "--model", "unilip-test/UniLIP-tiny"],
        [*generate, str(out / "y"), "--model", "unilip-test/absent"],
    ]
    script = f"import json, sys\nfrom cli import run\nprint(json.dumps([run(argv) for argv in {commands!r}]))\n"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env |= {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    codes = json.loads(done.stdout.strip().splitlines()[-1])
    assert codes == [0, 0, 0, 2, 2], done.stderr[-3000:]
    # the release converted from the hub holds the weights it was written from
    assert json.loads((out / "converted" / "config.json").read_text())["model"]["preset"] == "tiny"
    for part in ("dit", "encoder", "queries", "down_proj"):
        converted, source = (load_file(str(d / f"{part}.safetensors")) for d in (out / "converted", model_dir))
        assert converted.keys() == source.keys() and all(torch.equal(converted[k], source[k]) for k in source), part
    # the hub's snapshot generates what the directory does
    (hub,), (local,) = (sorted((out / d).glob("*.png")) for d in ("hub", "dir"))
    assert np.array_equal(np.asarray(Image.open(hub)), np.asarray(Image.open(local)))
    assert "unilip-test/UniLIP-tiny is the authors' release checkpoint: convert it first" in done.stderr
    assert "cannot fetch unilip-test/absent from the Hugging Face hub" in done.stderr
