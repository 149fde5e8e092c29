"""Real-size shapes: every recipe's training micro batch (forward and backward, and the
optimizer step) and both sampling paths, with the published architectures on the meta
device (no weights, no memory). A width, channel or token count that disagrees between
the real parts fails here rather than on a rented GPU."""

import pytest
import torch
from PIL import Image

from jobs.performance.memory import CAPTION, meta_stage, micro_batch_step, micro_batches
from jobs.training.recipes import load_recipe, recipe_names
from unilip.meta import meta_run

# every recipe at 1B; at 3B (other widths everywhere) the stage of each kind that runs the most
CASES = [(name, "unilip-1b") for name in recipe_names()] + [
    ("recon-stage2-448", "unilip-3b"),
    ("gen-stage2", "unilip-3b"),
]


@pytest.mark.parametrize("name,preset", CASES)
def test_a_real_size_training_micro_batch(name, preset):
    recipe = load_recipe(name, [f"model.preset={preset}"])
    stage = meta_stage(recipe)
    model = stage.net.model
    # every trained parameter gets its gradient, except the connector's one-row embedding
    # table: a Qwen2Model always has one, the connector takes embeddings
    trained = [
        p
        for g in model.param_groups()
        for n, p in g["named"]
        if (g["name"], n) != ("connector", "model.embed_tokens.weight")
    ]
    with meta_run():
        for _, batch in micro_batches(recipe):
            terms = micro_batch_step(stage, recipe, batch)
            assert terms["loss"].shape == () and terms["loss"].dtype == torch.float32
            if recipe.kind == "reconstruction":
                assert terms["recon"].shape == batch["pixel_values"].shape
        assert all(p.grad is not None and p.grad.shape == p.shape for p in trained)
        assert not any(p.grad is not None for p in model.parameters() if not p.requires_grad)
        stage.optimizer.step()


@pytest.mark.parametrize(
    "preset,dit_pos_embed", [("unilip-1b", "none"), ("unilip-3b", "none"), ("unilip-1b", "sincos")]
)
def test_a_real_size_sampling_step(preset, dit_pos_embed):
    from unilip.config import ModelConfig
    from unilip.model import UniLIP

    cfg = ModelConfig(preset=preset, init="random", dit_pos_embed=dit_pos_embed)  # sincos: a converted release's DiT
    model = UniLIP.from_preset(preset, cfg, device="meta").to(torch.bfloat16).eval()
    assert (model.generator.dit.patch_embed.pos_embed is not None) == (dit_pos_embed == "sincos")
    photo = Image.new("RGB", (640, 480), (120, 80, 40))
    with meta_run():
        generated = model.generate_tensors([CAPTION, "a red fox"], steps=1, seed=[0, 1])
        edited = model.edit_tensors([photo], ["Make it black and white."], steps=1, seed=0)
        recon, feats = model.reconstruct_tensors(model.preprocess([photo], 448))
    assert generated.shape == (2, 3, 448, 448) and edited.shape == (1, 3, 448, 448)
    assert recon.shape == (1, 3, 448, 448) and feats.shape == (1, 256, model.mllm.config.text_config.hidden_size)
