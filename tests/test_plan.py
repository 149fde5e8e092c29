"""The run planner: its FLOPs model against hand-computed values and torch's FLOP counter."""

import pytest
import torch

from jobs.performance.gpus import GPUS
from jobs.performance.plan import (
    SOURCE_SIZES,
    SanaDiT,
    Transformer,
    counted_flops,
    dit_flops,
    edit_fraction,
    estimate_run,
    on_meta,
    transformer_flops,
)
from jobs.training.recipes import chain, load_recipe
from tests.conftest import run_inline


def test_transformer_flops_by_hand():
    t = Transformer(layers=2, width=4, heads=2, kv_heads=1, head_dim=2, mlp=8, gated=True)
    # q = 4, kv = 2, T = 3: projections 2.3.4.(4+4) + 2.3.4.4 = 288; attention 4.9.4 = 144;
    # SwiGLU 2.3.4.8.3 = 576; per layer 1008, two layers
    assert transformer_flops(t, 3) == 2016
    assert transformer_flops(t, 3, layers=1) == 1008


def test_dit_flops_by_hand():
    dit = SanaDiT(layers=1, width=4, head_dim=2, mlp_ratio=2.5, caption_channels=6, in_channels=2)
    # T = 4, S = 3, h = 10: self-attention 2.4.4.16 + 4.4.4.3 = 704; cross 2.4.2.16 + 2.3.2.16
    # + 4.4.3.4 = 640; GLUMBConv 2.4.4.20 + 2.4.20.9 + 2.4.10.4 = 2400; caption projection
    # 2.3.(6.4 + 16) = 240 and patch in/out 2.4.2.2.4 = 128
    assert dit_flops(dit, tokens=4, cond_tokens=3) == 4112


def test_counted_flops_of_a_real_class_on_meta_by_hand():
    from unilip.losses import NLayerDiscriminator

    disc = on_meta(lambda: NLayerDiscriminator(32))
    # 32 px, width 32: stem 5x5 3->32 at 32x32; three stages of 3x3 conv (32->32 at 32x32,
    # 32->64 at 16x16, 64->128 at 8x8), each then a depthwise 4x4 blur with stride 2;
    # max-pool to 16x16; head 1x1 128->128 and 5x5 128->1 at 16x16
    convs = (
        1024 * 32 * 3 * 25
        + 1024 * 32 * 32 * 9
        + 256 * 64 * 32 * 9
        + 64 * 128 * 64 * 9
        + 256 * 128 * 128
        + 256 * 128 * 25
    )
    blurs = 32 * 256 * 16 + 64 * 64 * 16 + 128 * 16 * 16
    assert counted_flops(disc, (1, 3, 32, 32)) == 2 * (convs + blurs) == 53_149_696


def test_llm_formula_matches_torch_counter_on_the_real_qwen2_class():
    """The tiny preset's Qwen2 (grouped-query attention, SwiGLU) counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    from jobs.performance.plan import transformer
    from unilip.presets import build_backbones

    mllm = build_backbones("tiny", device="meta").mllm
    tokens, text = 37, mllm.config.text_config
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        mllm.model.language_model(inputs_embeds=torch.empty(1, tokens, text.hidden_size, device="meta"))
    assert counter.get_total_flops() == transformer_flops(transformer(text.to_dict(), gated=True), tokens)


def test_vit_and_dit_formulas_match_torch_counter_on_the_tiny_preset_classes():
    """The FLOPs model of the tiny preset, read from its configs as the real presets' are,
    against torch's own count of its InternViT and SANA DiT (on the meta device)."""
    from torch.utils.flop_counter import FlopCounterMode

    from jobs.performance.plan import architecture, vit_flops
    from unilip.presets import build_backbones

    backbones = build_backbones("tiny", device="meta")
    arch = architecture(backbones.mllm.config.to_dict(), dict(backbones.dit.config))
    measured = counted_flops(backbones.mllm.model.vision_tower, (1, 3, 448, 448))
    assert measured == pytest.approx(vit_flops(arch, 448), rel=0.01)

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        backbones.dit(
            torch.empty(1, 32, 16, 16, device="meta"),
            encoder_hidden_states=torch.empty(1, 20, arch.dit.caption_channels, device="meta"),
            timestep=torch.empty(1, device="meta"),
        )
    # the formula leaves out the per-sample timestep MLPs (a few d x d products)
    assert counter.get_total_flops() == pytest.approx(dit_flops(arch.dit, tokens=256, cond_tokens=20), rel=0.02)


def test_plan_arithmetic_and_task_share():
    recipe = load_recipe("gen-stage2")
    edit = edit_fraction(recipe)
    gen = sum(SOURCE_SIZES[s.name] for s in recipe.data.sources if s.task == "generation")
    assert edit == pytest.approx(10 * 1_500_000 / (gen + 10 * 1_500_000))  # about 2:1
    plan = estimate_run("gen-stage2", "unilip-1b", gpus=16, gpu="a100-80g", price=2.0, mfu=0.4, decode_rate=50)
    step = plan.flops_per_sample * 512 / (16 * GPUS["a100-80g"].peak_tflops * 1e12 * 0.4)
    assert plan.step_s == pytest.approx(step)
    assert plan.gpu_hours == pytest.approx(200_000 * step / 3600 * 16)
    assert plan.cost == pytest.approx(plan.gpu_hours * 2.0)
    assert plan.decode_cores == -(-512 / step * (1 + edit) // 50)
    # activation checkpointing of the LLM, connector and DiT (as shipped) adds one forward each
    by_name = {p.name: p for p in plan.parts}
    assert (
        by_name["SANA DiT"].passes == 3 + 1 and by_name["LLM"].passes == 2 + 1
    )  # queries train through the frozen LLM
    assert by_name["InternViT (edit reference)"].passes == 1 and by_name["connector"].passes == 3 + 1
    stage1 = {p.name: p for p in estimate_run("gen-stage1").parts}
    assert stage1["SANA DiT"].passes == 2 + 1  # frozen DiT, gradients pass through to the connector
    plain = {p.name: p for p in estimate_run("gen-stage1", overrides=["train.activation_checkpointing=[]"]).parts}
    assert plain["SANA DiT"].passes == 2 and plain["LLM"].passes == 2


def test_plan_cli_prints_every_recipe_and_rejects_bad_input():
    # the per-GPU memory, measured at real size on the meta device, is tests/test_memory.py's
    out = run_inline("plan", "all", "--preset", "unilip-3b", "--no-memory")
    assert out.returncode == 0, out.stderr
    for name in chain():
        assert f"== {name} (unilip-3b)" in out.stdout
    assert out.stdout.count("\n  GPU hours ") == len(chain()) and "Assumptions:" in out.stdout
    bad = run_inline("plan", "gen-stage2", "--gpu", "v100")
    assert bad.returncode == 2 and "unknown GPU 'v100'" in bad.stderr
    bad = run_inline("plan", "no-such-stage")
    assert bad.returncode == 2 and "unknown recipe" in bad.stderr
