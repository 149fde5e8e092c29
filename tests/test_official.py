"""`unilip convert official`: the authors' released checkpoints -> this project's model.

A synthetic release (the tiny preset's shapes under the release's names and file layout,
`tests/release_fixture.py`) converts, loads, and gives the outputs of the same weights
loaded natively; the real UniLIP-1B key list maps onto the unilip-1b model built on the
meta device; broken releases fail on their first bad key, and pickles are never read. The
converted DiT adds the positional embedding the release was trained with (diffusers
0.32.2's), and a release whose frozen LLM is not upstream.mllm's is refused.
"""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from tests.conftest import run_cli, run_inline
from tests.release_fixture import key_patterns, official_1b_keys, perturbed_tiny, release_state, write_release
from unilip.model import UniLIP, component_state
from unilip.official import ConversionError, convert_official, expected_shapes, map_keys, release_model_config
from unilip.presets import build_backbones

QUIET = dict(log=lambda m: None)


@pytest.fixture(scope="module")
def tiny():
    return perturbed_tiny()


@pytest.fixture(scope="module")
def native(tiny, tmp_path_factory):
    """The same weights saved and loaded the project's own way."""
    return UniLIP.from_pretrained(tiny.save_pretrained(tmp_path_factory.mktemp("native") / "model"))


def test_the_synthetic_release_has_the_real_release_layout(tiny):
    # the renamed parts, key for key (layer numbers aside); the DiT and DC-AE decoder are
    # copied under their diffusers names, and the LLM is dropped, so their tiny shapes differ
    copied = ("model.dit.", "model.vae_decoder.decoder.", "model.language_model.")
    renamed = lambda keys: {k for k in key_patterns(keys) if not k.startswith(copied)}  # noqa: E731
    real, synthetic = renamed(official_1b_keys()), renamed(release_state(tiny))
    assert real - synthetic == {"model.vision_tower.encoder.layers.N.attn.qkv.bias"}  # the tiny ViT has no qkv bias
    assert synthetic <= real


def test_the_real_1b_release_maps_onto_the_unilip_1b_model():
    """Every key and shape of the real checkpoint against the model the preset builds (meta)."""
    mapping = map_keys(
        official_1b_keys(), expected_shapes(release_model_config({"n_query": 256, "connect_layer": 6}, "unilip-1b"))
    )
    per_component = {}
    for move in mapping.moves:
        per_component[move.component] = per_component.get(move.component, 0) + 1
    assert per_component == {
        "encoder": 442,
        "down_proj": 24,
        "pixel_decoder": 196,
        "queries": 1,
        "connector": 73,
        "caption_projector": 2,
        "dit": 548,
    }
    assert len(mapping.unused) == 291  # the frozen LLM (290 tensors) and lm_head
    assert list(mapping.created) == [("connector", "model.embed_tokens.weight")]


@pytest.mark.parametrize("shards", [1, 2])
def test_converted_release_loads_and_equals_the_native_model(tiny, native, tmp_path, shards):
    release = write_release(tiny, tmp_path / "UniLIP-tiny", shards=shards)
    report = convert_official(str(release), tmp_path / "converted", **QUIET)
    assert report.preset == "tiny" and sum(report.tensors.values()) == 241
    model = UniLIP.from_pretrained(tmp_path / "converted")
    for name, part in model.components().items():
        got_state, want_state = component_state(part), component_state(native.components()[name])
        assert got_state.keys() == want_state.keys(), name
        unused = "model.embed_tokens.weight" if name == "connector" else None  # created: the release has none
        assert all(torch.equal(got_state[k], want_state[k]) for k in want_state if k != unused), name
    assert not model.components()["connector"].state_dict()["model.embed_tokens.weight"].any()
    config = json.loads((tmp_path / "converted" / "config.json").read_text())
    assert (
        config["model"]["solver"] == "dpm"
        and config["model"]["guidance_scale"] == 4.5
        and config["model"]["num_inference_steps"] == 20
    )
    assert config["prompt_format"]["generation"] == "Generate an image: {prompt}"
    assert config["converted_from"]["tensors"] == 311 and config["converted_from"]["n_query"] == 256
    assert config["model"]["dit_pos_embed"] == "sincos"
    if shards == 1:  # the four tasks give the outputs of the same weights with the release's DiT embedding
        native = UniLIP.from_pretrained(native_dir(tiny, tmp_path, "sincos"))
        pil = [Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8))]
        for m in (model, native):
            m.eval()
        sampling = dict(steps=2, seed=[3])
        assert torch.equal(
            model.generate_tensors(["a red fox"], **sampling), native.generate_tensors(["a red fox"], **sampling)
        )
        assert torch.equal(
            model.edit_tensors(pil, ["Make it blue."], **sampling),
            native.edit_tensors(pil, ["Make it blue."], **sampling),
        )
        pixels = model.preprocess(pil, 448)
        assert torch.equal(model.reconstruct_tensors(pixels)[0], native.reconstruct_tensors(pixels)[0])
        assert model.understand(pil[0], "What is it?", 8) == native.understand(pil[0], "What is it?", 8)


def native_dir(tiny, tmp_path, dit_pos_embed: str):
    """`tiny`'s weights saved the project's way, its DiT with `dit_pos_embed`."""
    model = UniLIP(build_backbones("tiny", dit_pos_embed=dit_pos_embed), replace(tiny.cfg, dit_pos_embed=dit_pos_embed))
    for name, part in model.components().items():
        source = tiny.components()[name]
        part.data.copy_(source) if isinstance(part, torch.nn.Parameter) else part.load_state_dict(source.state_dict())
    model.trained_parts = set(tiny.trained_parts)
    return model.save_pretrained(tmp_path / f"native-{dit_pos_embed}")


def test_the_converted_dit_adds_the_sincos_embedding_diffusers_0_32_added(tiny, tmp_path):
    """The release's DiT was fine-tuned with the 2-D sincos embedding diffusers 0.32.2 added
    to SANA (a non-persistent buffer, in no weight file): the converted DiT adds exactly
    diffusers' own `get_2d_sincos_pos_embed` at its 16x16 latent grid, and nothing else."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    convert_official(str(write_release(tiny, tmp_path / "release")), tmp_path / "converted", **QUIET)
    dit = UniLIP.from_pretrained(tmp_path / "converted").generator.dit.eval()
    patch = dit.patch_embed
    width, side = dit.config.num_attention_heads * dit.config.attention_head_dim, dit.config.sample_size
    want = get_2d_sincos_pos_embed(
        width, side, base_size=side // dit.config.patch_size, interpolation_scale=1.0, output_type="pt"
    )
    x = torch.randn(2, dit.config.in_channels, side, side, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        added = patch(x) - patch.proj(x).flatten(2).transpose(1, 2)  # what the embedding adds to every token
    assert torch.allclose(added, want.float().expand_as(added), atol=1e-6)
    # the same weights without it compute something else: the embedding is not a no-op
    plain = UniLIP.from_pretrained(native_dir(tiny, tmp_path, "none")).generator.dit.eval()
    t, cond = torch.tensor([500.0, 500.0]), torch.randn(2, 5, dit.config.caption_channels)
    with torch.no_grad():
        with_pe, without = (d(x, encoder_hidden_states=cond, timestep=t).sample for d in (dit, plain))
    assert (with_pe - without).abs().max() > 1e-2


def test_a_release_with_another_frozen_llm_is_refused(tiny, tmp_path):
    def other_llm(state):
        state["model.language_model.layers.2.mlp.up_proj.weight"] += 0.5

    release = _broken(tiny, tmp_path / "a", other_llm)
    with pytest.raises(
        ConversionError,
        match=r"model.language_model.layers.2.mlp.up_proj.weight: the release's frozen LLM "
        r"differs from upstream.mllm \(tiny\): .* another InternVL3",
    ):
        convert_official(release, tmp_path / "out-a", **QUIET)
    assert convert_official(release, tmp_path / "out-b", check_llm=False, **QUIET).preset == "tiny"
    # the source as a local directory (transformers' own save, legacy key names, tied head): the same check
    source = tmp_path / "internvl3-tiny"
    build_backbones("tiny").mllm.save_pretrained(source)
    bad = run_inline("convert", "official", "--src", release, "--out", str(tmp_path / "out-c"), "--mllm", str(source))
    assert bad.returncode == 2 and "layers.2.mlp.up_proj.weight: the release's frozen LLM differs" in bad.stderr, (
        bad.stderr[-2000:]
    )
    assert "--skip-llm-check" in bad.stderr and "Traceback" not in bad.stderr
    good = run_inline(
        "convert",
        "official",
        "--src",
        str(write_release(tiny, tmp_path / "b")),
        "--out",
        str(tmp_path / "out-d"),
        "--mllm",
        str(source),
    )
    assert good.returncode == 0 and "frozen LLM: 75 tensors equal" in good.stdout, good.stderr[-2000:]
    skipped = run_inline("convert", "official", "--src", release, "--out", str(tmp_path / "out-e"), "--skip-llm-check")
    assert skipped.returncode == 0 and "checking the release's frozen LLM" not in skipped.stdout, skipped.stderr[-2000:]


def _broken(tiny, tmp_path, edit) -> str:
    release = write_release(tiny, tmp_path / "broken")
    state = load_file(str(release / "model.safetensors"))
    edit(state)
    save_file(state, str(release / "model.safetensors"))
    return str(release)


def test_broken_releases_fail_on_their_first_bad_key(tiny, tmp_path, monkeypatch):
    def drop(state):
        del state["model.vae_decoder.down_mlp.1.weight"]

    with pytest.raises(ConversionError, match=r"missing key: nothing in the checkpoint gives down_proj/fc1.weight"):
        convert_official(_broken(tiny, tmp_path / "a", drop), tmp_path / "out-a", **QUIET)

    def reshape(state):
        state["model.projector.weight"] = state["model.projector.weight"][:, :-1].contiguous()

    with pytest.raises(
        ConversionError,
        match=r"model.projector.weight -> caption_projector/weight: shape \[48, 63\], the model expects \[48, 64\]",
    ):
        convert_official(_broken(tiny, tmp_path / "b", reshape), tmp_path / "out-b", **QUIET)

    def extra(state):
        state["model.vision_tower.encoder.layers.0.attn.q_norm.weight"] = torch.ones(64, dtype=torch.bfloat16)

    with pytest.raises(
        ConversionError, match=r"unrecognised key 'model.vision_tower.encoder.layers.0.attn.q_norm.weight'"
    ):
        convert_official(_broken(tiny, tmp_path / "c", extra), tmp_path / "out-c", **QUIET)

    # a shard the index lists is missing
    release = write_release(tiny, tmp_path / "d", shards=2)
    (release / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(
        ConversionError,
        match=r"weight file model-00002-of-00002.safetensors missing \(listed in model.safetensors.index.json\)",
    ):
        convert_official(str(release), tmp_path / "out-d", **QUIET)

    # pickles only: refused, and never opened
    release = write_release(tiny, tmp_path / "e")
    state = load_file(str(release / "model.safetensors"))
    (release / "model.safetensors").unlink()
    torch.save(state, release / "pytorch_model.bin")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called on a pickle"))
    with pytest.raises(
        ConversionError, match=r"holds only pickle weights \(pytorch_model.bin\), which are never loaded"
    ):
        convert_official(str(release), tmp_path / "out-e", **QUIET)

    # not a release at all: a project model directory
    with pytest.raises(ConversionError, match=r"model_type None, a UniLIP release has 'unilip_internvl'"):
        convert_official(str(tiny.save_pretrained(tmp_path / "f")), tmp_path / "out-f", **QUIET)


def test_cli_converts_from_s3_and_errors_name_the_problem(stack, s3, tiny, tmp_path):
    release = write_release(tiny, tmp_path / "UniLIP-tiny")
    src = f"s3://{stack.bucket}/releases/UniLIP-tiny"  # fetched into the cache first
    for path in release.iterdir():
        s3.put_bytes(f"{src}/{path.name}", path.read_bytes())
    out = run_cli(
        "convert",
        "official",
        "--src",
        src,
        "--out",
        str(tmp_path / "converted"),
        env={"UNILIP_CACHE": str(tmp_path / "cache")},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "unused: 75 source tensors, the frozen LLM and its head" in out.stdout
    assert (
        "created: connector/model.embed_tokens.weight" in out.stdout
        and "discriminator (reconstruction stages): fresh" in out.stdout
    )
    assert UniLIP.from_pretrained(tmp_path / "converted").trained_parts == {
        "encoder",
        "down_proj",
        "pixel_decoder",
        "queries",
        "connector",
        "caption_projector",
        "dit",
    }
    bad = run_inline("convert", "official", "--src", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "nowhere does not exist" in bad.stderr
    (tmp_path / "empty").mkdir()
    bad = run_inline("convert", "official", "--src", str(tmp_path / "empty"), "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "no readable config.json" in bad.stderr
