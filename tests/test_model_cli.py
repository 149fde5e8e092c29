"""The offline model CLI as a user runs it (in this process: the same parser and handlers), and
loading pretrained parts from S3."""

import numpy as np
import torch
from PIL import Image

from tests.conftest import run_inline
from unilip.presets import build_backbones, resolve_pretrained

ASTRONAUT = str(__import__("pathlib").Path(__import__("skimage").__file__).parent / "data" / "astronaut.png")


def test_model_cli_end_to_end(tmp_path):
    model = str(tmp_path / "model")
    r = run_inline("model", "init", "--preset", "tiny", "--out", model)  # default config: 256 queries
    assert r.returncode == 0, r.stderr
    out = str(tmp_path / "out")
    r = run_inline(
        "generate", "--model", model, "--prompt", "a red fox", "--n", "2", "--steps", "2", "--seed", "0", "--out", out
    )
    assert r.returncode == 0, r.stderr
    r = run_inline(
        "edit",
        "--model",
        model,
        "--image",
        ASTRONAUT,
        "--prompt",
        "Make it black and white.",
        "--steps",
        "2",
        "--out",
        out,
    )
    assert r.returncode == 0, r.stderr
    r = run_inline("reconstruct", "--model", model, "--image", ASTRONAUT, "--out", out)
    assert r.returncode == 0, r.stderr
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["edit-00.png", "generate-00.png", "generate-01.png", "reconstruction-00.png"]
    assert all(Image.open(tmp_path / "out" / f).size == (448, 448) for f in files)
    r = run_inline(
        "understand", "--model", model, "--image", ASTRONAUT, "--question", "What is shown?", "--max-new-tokens", "3"
    )
    assert r.returncode == 0, r.stderr
    # the DiT's positional embedding, chosen at init and stated in the directory; the summary names it
    r = run_inline(
        "model", "init", "--preset", "tiny", "--out", str(tmp_path / "sincos"), "--set", "dit_pos_embed=sincos"
    )
    assert r.returncode == 0 and '"dit_pos_embed": "sincos"' in (tmp_path / "sincos" / "config.json").read_text(), (
        r.stderr
    )
    r = run_inline("model", "summary", "--preset", "tiny", "--set", "dit_pos_embed=sincos")
    assert r.returncode == 0 and "DiT positional embedding: sincos" in r.stdout, r.stderr
    r = run_inline("model", "summary", "--preset", "tiny", "--set", "dit_pos_embed=rope")
    assert r.returncode == 2 and "dit_pos_embed" in r.stderr and "'none', 'sincos'" in r.stderr, r.stderr
    for args, message in (
        (["generate", "--model", model, "--prompt", "x", "--guidance", "nan"], "guidance_scale"),
        (["edit", "--model", model, "--image", str(tmp_path / "missing.png"), "--prompt", "x"], "cannot read image"),
        (["generate", "--model", str(tmp_path), "--prompt", "x"], "not a UniLIP model directory"),
    ):
        r = run_inline(*args)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_pretrained_parts_load_from_s3_through_the_access_point(stack, s3, tmp_path, monkeypatch):
    from diffusers import AutoencoderDC

    dcae = build_backbones("tiny").dcae
    local = tmp_path / "dcae"
    dcae.save_pretrained(local)
    uri = f"s3://{stack.bucket}/models/dcae-tiny"
    for f in local.iterdir():
        s3.put_bytes(f"{uri}/{f.name}", f.read_bytes())
    monkeypatch.setenv("UNILIP_CACHE", str(tmp_path / "cache"))
    path = resolve_pretrained(uri)
    assert path.startswith(str(tmp_path / "cache"))
    loaded = AutoencoderDC.from_pretrained(path)
    x = torch.randn(1, 32, 4, 4)
    with torch.no_grad():
        assert np.allclose(dcae.decode(x).sample.numpy(), loaded.decode(x).sample.numpy())
    assert resolve_pretrained("OpenGVLab/InternVL3-1B-hf") == "OpenGVLab/InternVL3-1B-hf"  # hub ids pass through


def test_a_model_on_pretrained_sources_builds_its_dit_with_the_saved_embedding(tmp_path):
    """The path of a real preset (every frozen part `from_pretrained` from its source): the
    DiT comes from SANA's published config, which says nothing of the embedding, and gets
    the one the model directory states."""
    import dataclasses
    import json

    from unilip.config import ModelConfig
    from unilip.model import UniLIP

    parts = build_backbones("tiny", dit_pos_embed="sincos")
    parts.mllm.save_pretrained(tmp_path / "mllm")
    parts.tokenizer.save_pretrained(tmp_path / "mllm")
    parts.dcae.save_pretrained(tmp_path / "dcae")
    parts.dit.save_pretrained(tmp_path / "sana" / "transformer")
    config = tmp_path / "sana" / "transformer" / "config.json"
    config.write_text(
        json.dumps(json.loads(config.read_text()) | {"interpolation_scale": None})
    )  # as SANA publishes it
    parts.upstream = dataclasses.replace(
        parts.upstream, mllm=str(tmp_path / "mllm"), dit=str(tmp_path / "sana"), dcae=str(tmp_path / "dcae")
    )
    model = UniLIP(parts, ModelConfig(preset="tiny", num_queries=8, dit_pos_embed="sincos")).eval()
    model.set_trainable(["connector", "dit"])
    loaded = UniLIP.from_pretrained(model.save_pretrained(tmp_path / "model")).eval()
    assert loaded.upstream.dit == str(tmp_path / "sana") and loaded.generator.dit.patch_embed.pos_embed is not None
    assert torch.equal(
        loaded.generate_tensors(["a cat"], steps=2, seed=0), model.generate_tensors(["a cat"], steps=2, seed=0)
    )
