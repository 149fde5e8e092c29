"""The model library on the tiny preset: shapes, freezing per stage, CFG, learning, checkpoints."""

import dataclasses
import random

import numpy as np
import pytest
import torch
from PIL import Image

from jobs.training.recipes import load_recipe
from pipelines.sample_data import generation_sample
from unilip.config import ConfigError, LossConfig, ModelConfig
from unilip.errors import UserError
from unilip.images import read_image
from unilip.model import UniLIP
from unilip.presets import build_backbones
from unilip.prompts import IMAGE, NULL_EDIT, NULL_GENERATION, edit_prompt, generation_prompt


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return UniLIP.from_preset("tiny", ModelConfig(preset="tiny", num_queries=16), teacher=True)


@pytest.fixture(scope="module")
def photos():
    return [read_image(generation_sample(0, i, 256)["jpg"]) for i in range(8)]


def test_feature_latent_and_image_shapes(model):
    llm_width = model.mllm.config.text_config.hidden_size
    for size, tokens, side in ((224, 64, 8), (448, 256, 16)):
        pixels = torch.randn(2, 3, size, size)
        feats = model.encoder(pixels)
        assert feats.shape == (2, tokens, llm_width)
        latent = model.pixel_decoder.encode(feats)
        assert latent.shape == (2, 32, side, side)
        assert model.pixel_decoder.decode(latent, size).shape == (2, 3, size, size)
    # the encoder is InternVL's own image path (last layer, CLS dropped, pixel shuffle, projector)
    reference = model.mllm.model.get_image_features(
        pixels, vision_feature_layer=-1, vision_feature_select_strategy="default"
    )
    assert torch.equal(feats, reference.pooler_output)


EXPECTED_GRADS = {
    "recon-stage1": {"down_proj", "pixel_decoder"},
    "recon-stage2": {"encoder", "down_proj", "pixel_decoder"},
    "recon-stage2-448": {"encoder", "down_proj", "pixel_decoder"},
    "gen-stage1": {"queries", "connector", "caption_projector"},
    "gen-stage2": {"queries", "connector", "caption_projector", "dit"},
    "gen-stage3": {"queries", "connector", "caption_projector", "dit"},
}


def _frozen_state(model, teacher):
    parts = {
        "llm": model.mllm.model.language_model,
        "teacher": teacher,
        "dcae_encoder": model.pixel_decoder.dcae.encoder,
    }
    return {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in parts.items()}


def tiny_loss(recipe) -> LossConfig:
    """A recipe's loss with the tiny variant's networks (random AlexNet LPIPS, small discriminator)."""
    import dataclasses

    return dataclasses.replace(recipe.loss, lpips_net="alex", lpips_weights=None, convnext=0.0, discriminator_width=32)


@pytest.mark.parametrize("recipe_name", sorted(EXPECTED_GRADS))
def test_freezing_per_stage_is_the_papers(photos, recipe_name):
    recipe = load_recipe(recipe_name)
    torch.manual_seed(0)
    model = UniLIP.from_preset("tiny", ModelConfig(preset="tiny", num_queries=16), teacher=True)
    teacher = model.teacher
    model.set_trainable(recipe.train.trainable)
    model.latent_space = recipe.model.latent_space
    before = _frozen_state(model, teacher)
    if recipe.kind == "reconstruction":
        loss_fn = model.reconstruction_loss(tiny_loss(recipe))
        assert model.teacher is None and loss_fn.teacher is teacher  # kept for the understanding signal too
        pixels = model.preprocess(photos[:2], 224)
        terms = model.reconstruction_terms(pixels, loss_fn, step=10**6)  # past the GAN start
        assert ("gan" in terms) == (recipe.loss.gan > 0) and ("distill" in terms) == (recipe.loss.distill > 0)
        loss = terms["loss"]
    else:
        size = 512 if recipe.model.latent_space == "dcae" else 448
        pixels = model.preprocess(photos[:2], size)
        edits = [edit_prompt("Make it brighter.")] * 2
        loss = model.generation_loss([generation_prompt("a cat"), generation_prompt("a dog")], pixels)
        loss = loss + model.generation_loss(edits, pixels, model.preprocess(photos[:2], 448))
    loss.backward()
    with_grad = {
        name
        for name, part in model.components().items()
        if any(
            p.grad is not None and p.grad.abs().sum() > 0
            for p in ([part] if isinstance(part, torch.nn.Parameter) else part.parameters())
        )
    }
    assert with_grad == EXPECTED_GRADS[recipe_name]
    assert all(p.grad is None for p in model.mllm.model.language_model.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    groups = model.param_groups(recipe.train.lr_scales)
    assert {g["name"] for g in groups} == EXPECTED_GRADS[recipe_name]
    if recipe_name == "recon-stage2":
        assert next(g for g in groups if g["name"] == "encoder")["lr_scale"] == 0.1
    # an optimizer step changes trained parts only: the LLM, the teacher, the DC-AE encoder never change
    torch.optim.SGD([p for g in groups for p in g["params"]], lr=0.1).step()
    after = _frozen_state(model, teacher)
    for name in before:
        assert all(torch.equal(before[name][k], after[name][k]) for k in before[name]), name


def test_connector_is_bidirectional_and_honours_padding(model):
    conn = model.generator.connector
    states = torch.randn(1, 6, conn.model.config.hidden_size)
    full = torch.ones(1, 6, dtype=torch.long)
    changed = states.clone()
    changed[0, -1] += 1.0
    assert (conn(states, full)[0, 0] - conn(changed, full)[0, 0]).abs().max() > 1e-4  # last token reaches the first
    padded = torch.tensor([[0, 0, 1, 1, 1, 1]])
    noise = states.clone()
    noise[0, :2] += 10.0  # what sits in padded slots must not matter
    assert torch.allclose(conn(states, padded)[0, 2:], conn(noise, padded)[0, 2:], atol=1e-6)
    assert all(not layer.self_attn.is_causal for layer in conn.model.layers)


def test_cfg_drop_rate_and_edits_keep_the_image(model):
    rng = random.Random(0)
    prompts = [generation_prompt(f"prompt {i}") for i in range(10_000)]
    dropped = model.drop_prompts(prompts, editing=False, rng=rng)
    rate = sum(p == NULL_GENERATION for p in dropped) / len(prompts)
    assert abs(rate - 0.1) < 0.01
    edits = model.drop_prompts(prompts, editing=True, rng=rng)
    assert abs(sum(p == NULL_EDIT for p in edits) / len(prompts) - 0.1) < 0.01
    assert IMAGE in NULL_EDIT
    # the null edit prompt still carries the reference image's 256 feature slots
    ref = model.encoder(torch.randn(1, 3, 448, 448))
    with_image = model.generator.condition_states([NULL_EDIT], ref)
    without = model.generator.condition_states([NULL_GENERATION])
    assert with_image.mask.sum() >= without.mask.sum() + 256


def _train_until_halved(model, loss_fn, max_steps: int) -> list[float]:
    """AdamW on the trainable groups until the loss halves (or max_steps); the loss history."""
    opt = torch.optim.AdamW([p for g in model.param_groups() for p in g["params"]], lr=2e-3)
    losses = []
    for step in range(max_steps):
        loss = loss_fn(step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if losses[-1] <= losses[0] / 2:
            break
    return losses


def test_reconstruction_learns(photos):
    torch.manual_seed(0)
    model = UniLIP.from_preset("tiny", ModelConfig(preset="tiny", num_queries=16))
    model.set_trainable(load_recipe("recon-stage1").train.trainable)
    objective = model.reconstruction_loss(LossConfig(lpips_net="alex"))
    pixels = model.preprocess(photos, 224)  # 8 fixed images
    losses = _train_until_halved(model, lambda step: model.reconstruction_terms(pixels, objective, step)["loss"], 40)
    assert losses[-1] <= losses[0] / 2, losses


def test_flow_loss_learns(photos):
    torch.manual_seed(0)
    model = UniLIP.from_preset("tiny", ModelConfig(preset="tiny", num_queries=16))
    model.set_trainable(load_recipe("gen-stage2").train.trainable)
    x0 = model.target_latent(model.preprocess(photos[:4], 448))

    def flow(step):  # same t and noise every step: a fixed batch
        cond = model.generator.condition_states([generation_prompt("a photo")] * 4)
        return model.generator.flow_loss(x0, cond, torch.Generator().manual_seed(0))

    losses = _train_until_halved(model, flow, 150)
    assert losses[-1] <= losses[0] / 2, losses


def _arrays(images):
    return [np.asarray(im) for im in images]


def test_generate_and_edit_are_seeded_and_honour_guidance(model, photos):
    model.eval()
    a = _arrays(model.generate(["a cat", "a rocket"], seed=3, steps=4))
    b = _arrays(model.generate(["a cat", "a rocket"], seed=3, steps=4))
    assert all(x.shape == (448, 448, 3) for x in a) and all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], _arrays(model.generate(["a cat", "a rocket"], seed=4, steps=4))[0])
    assert not np.array_equal(
        a[0], _arrays(model.generate(["a cat", "a rocket"], seed=3, steps=4, guidance_scale=1.0))[0]
    )
    assert not np.array_equal(
        a[0], _arrays(model.generate(["a cat", "a rocket"], seed=3, steps=6))[0]
    )  # steps honoured
    e1 = _arrays(model.edit(photos[:1], ["Make it brighter."], seed=1, steps=3, solver="dpm"))
    e2 = _arrays(model.edit(photos[:1], ["Make it brighter."], seed=1, steps=3, solver="dpm"))
    assert e1[0].shape == (448, 448, 3) and np.array_equal(e1[0], e2[0])
    assert not np.array_equal(
        e1[0],
        _arrays(model.edit(photos[:1], ["Make it brighter."], seed=1, steps=3, solver="dpm", guidance_scale=7.0))[0],
    )
    assert model.reconstruct(photos[:2])[1].size == (448, 448)


def test_understand_uses_the_unilip_encoder(model, photos):
    answer = model.understand(photos[0], "What is in the picture?", max_new_tokens=4)
    assert isinstance(answer, str)
    # the MLLM's image path is the UniLIP encoder itself, so trained weights are what it sees
    assert model.mllm.model.vision_tower is model.encoder.vision_tower
    assert model.mllm.model.multi_modal_projector is model.encoder.projector


def test_checkpoint_round_trip_is_exact(tmp_path, photos):
    torch.manual_seed(1)
    model = UniLIP.from_preset("tiny", ModelConfig(preset="tiny", num_queries=16)).eval()
    model.set_trainable(["encoder", "down_proj", "pixel_decoder", "queries", "connector", "caption_projector", "dit"])
    with torch.no_grad():  # make every saved part differ from a fresh build
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.01)
    model.save_pretrained(tmp_path / "m")
    loaded = UniLIP.from_pretrained(tmp_path / "m").eval()
    assert loaded.trained_parts == model.trained_parts and loaded.cfg == model.cfg
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    assert np.array_equal(
        _arrays(model.generate(["a cat"], seed=0, steps=3))[0], _arrays(loaded.generate(["a cat"], seed=0, steps=3))[0]
    )
    assert np.array_equal(_arrays(model.reconstruct(photos[:1]))[0], _arrays(loaded.reconstruct(photos[:1]))[0])
    files = {p.name for p in (tmp_path / "m").iterdir()}
    assert {"config.json", "encoder.safetensors", "dit.safetensors", "queries.safetensors"} <= files
    assert "discriminator.safetensors" not in files  # training state of the loss, not part of the model


def test_the_dit_positional_embedding_is_kept_with_the_model(tmp_path):
    """No weight file holds it (a non-persistent buffer), so config.json does: saved, loaded,
    kept by a next stage once the generator trained with it, and never guessed."""
    sincos = UniLIP.from_preset("tiny", ModelConfig(preset="tiny", num_queries=16, dit_pos_embed="sincos")).eval()
    assert sincos.generator.dit.patch_embed.pos_embed is not None
    assert (
        UniLIP.from_preset("tiny", ModelConfig(preset="tiny", num_queries=16)).generator.dit.patch_embed.pos_embed
        is None
    )
    sincos.set_trainable(["connector", "dit"])
    loaded = UniLIP.from_pretrained(sincos.save_pretrained(tmp_path / "sincos")).eval()
    assert loaded.cfg.dit_pos_embed == "sincos" and loaded.generator.dit.patch_embed.pos_embed is not None
    assert torch.equal(
        loaded.generate_tensors(["a cat"], steps=2, seed=0), sincos.generate_tensors(["a cat"], steps=2, seed=0)
    )
    # a next stage (its recipe's model config) keeps what the trained generator needs ...
    assert (
        UniLIP.from_pretrained(tmp_path / "sincos", cfg=ModelConfig(preset="tiny", num_queries=16)).cfg.dit_pos_embed
        == "sincos"
    )
    # ... and takes its own where the generator is untrained (a reconstruction export)
    recon = UniLIP.from_preset("tiny", ModelConfig(preset="tiny", num_queries=16))
    recon.set_trainable(["pixel_decoder"])
    recon.save_pretrained(tmp_path / "recon")
    nxt = UniLIP.from_pretrained(
        tmp_path / "recon", cfg=ModelConfig(preset="tiny", num_queries=16, dit_pos_embed="sincos")
    )
    assert nxt.generator.dit.patch_embed.pos_embed is not None

    def rewrite(name, edit):
        import json

        config = json.loads((tmp_path / name / "config.json").read_text())
        edit(config)
        (tmp_path / name / "config.json").write_text(json.dumps(config))

    # v2 directories were written before the field: the project's own were trained without it
    # (it only ever pinned diffusers that add none), a converted release with it
    rewrite("recon", lambda c: (c.update(version=2), c["model"].pop("dit_pos_embed")))
    assert UniLIP.from_pretrained(tmp_path / "recon").generator.dit.patch_embed.pos_embed is None
    rewrite("recon", lambda c: c.update(converted_from={"source": "UniLIP-1B"}))
    assert UniLIP.from_pretrained(tmp_path / "recon").cfg.dit_pos_embed == "sincos"
    # a v3 directory that does not say is refused, naming the field
    rewrite("sincos", lambda c: c["model"].pop("dit_pos_embed"))
    with pytest.raises(ConfigError, match=r"does not state model.dit_pos_embed \(none or sincos\)"):
        UniLIP.from_pretrained(tmp_path / "sincos")
    with pytest.raises(UserError, match="model.dit_pos_embed must be one of none, sincos, got 'rope'"):
        build_backbones("tiny", dit_pos_embed="rope")


def test_samples_are_clamped_before_the_resize_reconstructions_are_not(photos):
    """The release clamps a decoded sample at 512 px, then resizes it to 448; a
    reconstruction is resized unclamped. Checked on a decoder that overshoots [-1, 1]."""
    import torch.nn.functional as F

    model = UniLIP.from_preset("tiny", ModelConfig(preset="tiny", num_queries=16)).eval()
    decoder = model.pixel_decoder.dcae.decoder
    with torch.no_grad():
        decoder.conv_out.weight.mul_(40)  # far outside [-1, 1]
    decoded = []
    decoder.register_forward_hook(lambda module, args, out: decoded.append(out.detach().float()))
    bilinear = lambda x: F.interpolate(x, size=(448, 448), mode="bilinear", align_corners=False)  # noqa: E731  (cv2 INTER_LINEAR)
    generated = model.generate_tensors(["a cat"], steps=2, seed=0)
    (full,) = decoded
    assert full.shape[-1] == 512 and full.abs().max() > 1.5
    assert torch.allclose(generated, bilinear(full.clamp(-1, 1)), atol=1e-6)
    assert (bilinear(full).clamp(-1, 1) - generated).abs().max() > 0.05  # the other order differs
    edited = model.edit_tensors(photos[:1], ["Make it blue."], steps=2, seed=0)
    assert torch.allclose(edited, bilinear(decoded[-1].clamp(-1, 1)), atol=1e-6)
    recon, _ = model.reconstruct_tensors(model.preprocess(photos[:1], 448))
    assert torch.allclose(recon, bilinear(decoded[-1]), atol=1e-6) and recon.abs().max() > 1.5


def test_generator_loads_the_reconstruction_trained_encoder_explicitly(tmp_path):
    torch.manual_seed(2)
    recon = UniLIP.from_preset("tiny", ModelConfig(preset="tiny", num_queries=16))
    recon.set_trainable(["encoder", "down_proj", "pixel_decoder"])
    with torch.no_grad():
        for p in recon.encoder.parameters():
            p.add_(0.05)
    recon.save_pretrained(tmp_path / "recon")
    gen = UniLIP.from_preset("tiny", ModelConfig(preset="tiny", num_queries=16))
    key = "vision_tower.embeddings.patch_embeddings.projection.weight"
    assert not torch.equal(gen.encoder.state_dict()[key], recon.encoder.state_dict()[key])
    assert gen.load_reconstruction(tmp_path / "recon") == ["encoder", "down_proj", "pixel_decoder"]
    for k, v in recon.encoder.state_dict().items():
        assert torch.equal(gen.encoder.state_dict()[k], v)
    for k, v in recon.pixel_decoder.state_dict().items():
        assert torch.equal(gen.pixel_decoder.state_dict()[k], v)
    untrained = UniLIP.from_preset("tiny", ModelConfig(preset="tiny", num_queries=16))
    untrained.save_pretrained(tmp_path / "plain")
    with pytest.raises(UserError, match="not a reconstruction checkpoint"):
        gen.load_reconstruction(tmp_path / "plain")


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m, im: m.generate([""]), "empty"),
        (lambda m, im: m.generate(["   "]), "empty"),
        (lambda m, im: m.generate(["word " * 1000]), "limit is 767"),
        (
            lambda m, im: m.edit([im], ["word " * 600]),
            "with the chat template and the reference image; the limit is 767",
        ),
        (lambda m, im: m.generate(["<img> sneaky"]), "reserved"),
        (lambda m, im: m.edit([im], ["put <image> here"]), "reserved"),
        (lambda m, im: m.generate(["a cat"], steps=0), "num_inference_steps"),
        (lambda m, im: m.generate(["a cat"], guidance_scale=float("nan")), "guidance_scale"),
        (lambda m, im: m.generate(["a cat"], guidance_scale=100.0), "guidance_scale"),
        (lambda m, im: m.edit([im], ["a", "b"]), "2 instructions"),
        (lambda m, im: m.reconstruct([np.zeros((64, 64, 4), np.uint8)]), "HxWx3"),
        (lambda m, im: m.reconstruct([Image.new("RGB", (8, 8))]), "too small"),
        (lambda m, im: m.reconstruct(["not an image"]), "PIL image"),
        (lambda m, im: m.reconstruct([im], size=100), "multiple of 28"),
        (lambda m, im: m.encoder(torch.randn(1, 4, 224, 224)), "(B, 3, H, W)"),
        (lambda m, im: m.encoder(torch.randn(1, 3, 100, 100)), "multiple of 28"),
        (lambda m, im: m.generate(["a cat"], solver="heun"), "solver"),
    ],
)
def test_bad_input_raises_a_clear_value_error(model, photos, call, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call(model, photos[0])


def test_other_image_modes_are_converted(model):
    for image in (
        Image.new("L", (64, 64), 128),
        Image.new("RGBA", (64, 64), (10, 20, 30, 128)),
        Image.new("P", (64, 64)),
        Image.new("CMYK", (64, 64)),
        np.full((64, 64), 7, np.uint8),
    ):
        assert model.reconstruct([image], size=224)[0].size == (224, 224)


def test_presets_registry():
    with pytest.raises(UserError, match="unknown model preset 'nope'.*tiny.*unilip-1b.*unilip-3b"):
        build_backbones("nope")
    real = UniLIP(build_backbones("tiny"), ModelConfig(preset="unilip-1b"), False)
    real.upstream = dataclasses.replace(real.upstream, mllm="OpenGVLab/InternVL3-1B-hf")  # as a real preset has it
    with pytest.raises(UserError, match="loss.lpips_weights must name"):
        real.reconstruction_loss(load_recipe("recon-stage1", ["loss.lpips_weights=null"]).loss)
    with pytest.raises(UserError, match="loss.convnext_weights must name"):
        real.reconstruction_loss(load_recipe("recon-stage1", ["loss.convnext_weights=null"]).loss)


def test_condition_modes(model):
    parts = build_backbones("tiny")
    lengths = {}
    for mode in ("hidden", "queries", "both"):
        gen = UniLIP(parts, ModelConfig(preset="tiny", num_queries=16, condition=mode)).generator
        cond = gen.condition_states([generation_prompt("a small red boat"), generation_prompt("a cat")])
        lengths[mode] = cond.mask.sum(dim=1).tolist()
    assert lengths["queries"] == [16, 16]  # the query outputs only
    assert [b - h for b, h in zip(lengths["both"], lengths["hidden"])] == [17, 17]  # + <img> and 16 queries
    with pytest.raises(UserError, match="condition"):
        UniLIP(parts, ModelConfig(preset="tiny", condition="neither"))
