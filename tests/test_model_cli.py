"""The offline model CLI as a user runs it, and loading pretrained parts from S3."""

import numpy as np
import torch
from PIL import Image

from tests.conftest import run_cli
from unilip.presets import build_parts, resolve_pretrained

ASTRONAUT = str(__import__("pathlib").Path(__import__("skimage").__file__).parent / "data" / "astronaut.png")


def test_model_cli_end_to_end(tmp_path):
    model = str(tmp_path / "model")
    r = run_cli("model", "init", "--preset", "tiny", "--out", model)  # default config: 256 queries
    assert r.returncode == 0, r.stderr
    out = str(tmp_path / "out")
    r = run_cli("generate", "--model", model, "--prompt", "a red fox", "--n", "2", "--steps", "2", "--seed", "0", "--out", out)
    assert r.returncode == 0, r.stderr
    r = run_cli("edit", "--model", model, "--image", ASTRONAUT, "--prompt", "Make it black and white.", "--steps", "2", "--out", out)
    assert r.returncode == 0, r.stderr
    r = run_cli("reconstruct", "--model", model, "--image", ASTRONAUT, "--out", out)
    assert r.returncode == 0, r.stderr
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["edit-00.png", "generate-00.png", "generate-01.png", "reconstruction-00.png"]
    assert all(Image.open(tmp_path / "out" / f).size == (448, 448) for f in files)
    r = run_cli("understand", "--model", model, "--image", ASTRONAUT, "--question", "What is shown?", "--max-new-tokens", "3")
    assert r.returncode == 0, r.stderr
    for args, message in (
        (["generate", "--model", model, "--prompt", "x", "--guidance", "nan"], "guidance_scale"),
        (["edit", "--model", model, "--image", str(tmp_path / "missing.png"), "--prompt", "x"], "cannot read image"),
        (["generate", "--model", str(tmp_path), "--prompt", "x"], "not a UniLIP model directory"),
    ):
        r = run_cli(*args)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_pretrained_parts_load_from_s3_through_the_access_point(stack, s3, tmp_path, monkeypatch):
    from diffusers import AutoencoderDC

    dcae = build_parts("tiny").dcae
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
