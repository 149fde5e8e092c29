"""bf16 as recipes ship it: real DeepSpeed engines (gloo, one process) over the tiny model,
with the shipped loss networks (LPIPS-VGG16, ConvNeXt-S, the NLayerDiscriminator with
hinge + LeCam, self-distillation), every loss in fp32 around a bf16 model."""

import dataclasses
import math
import os
import random
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist

from jobs.evaluation.held_out import evaluate
from jobs.training.loop import build_stage, optimizer_step
from jobs.training.optim import deepspeed_config
from jobs.training.recipes import load_recipe
from pipelines.mix import collate
from pipelines.sample_data import generation_sample
from unilip.errors import UserError
from unilip.images import read_image
from unilip.prompts import edit_prompt, generation_prompt


@pytest.fixture(scope="module")
def process_group():
    """A one-process gloo group, with the environment a launcher would give DeepSpeed."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def photos():
    return np.stack([np.asarray(read_image(generation_sample(0, i, 256)["jpg"]).resize((448, 448))) for i in range(4)])


def engine_for(recipe):
    import deepspeed

    stage = build_stage(recipe, None, None, "cpu")
    engine, *_ = deepspeed.initialize(
        model=stage.net, optimizer=stage.optimizer, config=deepspeed_config(recipe.train, 1)
    )
    return engine, stage


def raw_batch(photos: np.ndarray, task: str, size: int) -> dict:
    from PIL import Image

    images = np.stack([np.asarray(Image.fromarray(p).resize((size, size))) for p in photos])
    n = len(images)
    prompts = [
        edit_prompt("Make it brighter.") if task == "editing" else generation_prompt("a photo") for _ in range(n)
    ]
    return {
        "key": np.array([str(i) for i in range(n)]),
        "prompt": np.array(prompts, dtype=object),
        "task": np.array([task] * n, dtype=object),
        "image": images,
    } | ({"source": images} if task == "editing" else {})


def test_reconstruction_with_gan_and_distillation_from_step_0_trains_in_bf16(process_group, photos):
    # the shipped recon-stage2 losses, the adversarial loss on from the first step
    recipe = load_recipe(
        "recon-stage2",
        [
            "model.preset=tiny",
            "train.micro_batch=2",
            "train.global_batch=2",
            "train.warmup_steps=1",
            "loss.gan_start_step=0",
            "loss.lpips_weights=null",
            "loss.convnext_weights=null",
        ],
    )
    assert recipe.train.precision == "bf16" and recipe.loss.lpips_net == "vgg" and recipe.loss.gan_loss == "hinge"
    assert recipe.loss.convnext == 0.1 and recipe.loss.lecam == 0.001 and recipe.loss.discriminator_width == 128
    torch.manual_seed(0)
    engine, stage = engine_for(recipe)
    model, loss = stage.net.model, stage.loss
    # the model is bf16 (DeepSpeed cast it); every loss network stays fp32
    assert {p.dtype for p in model.pixel_decoder.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.encoder.parameters()} == {torch.bfloat16}
    for part in (loss.lpips, loss.convnext, loss.teacher, loss.discriminator):
        assert {p.dtype for p in part.parameters()} == {torch.float32}
    critic_before = {k: v.clone() for k, v in loss.discriminator.state_dict().items()}
    decoder_before = [p.float().clone() for p in model.pixel_decoder.parameters()]
    batch = collate(raw_batch(photos[:2], "generation", 224))
    for step in range(2):
        terms = optimizer_step(
            engine, stage, [batch], step, recipe, 1, random.Random(0), torch.Generator().manual_seed(0), "cpu"
        )
        assert set(terms) == {"mse", "lpips", "convnext", "distill", "gan", "loss", "critic", "lecam"}
        assert all(math.isfinite(v) for v in terms.values()), terms
    # fp32 terms of a bf16 reconstruction
    direct = model.reconstruction_terms(batch["pixel_values"], loss, step=0)
    assert direct["recon"].dtype == torch.float32 and all(
        v.dtype == torch.float32 for k, v in direct.items() if k != "recon"
    )
    assert all(torch.isfinite(v) for k, v in direct.items() if k != "recon")
    # both the model and the discriminator trained; the LeCam running means moved
    assert any(not torch.equal(a, p.float()) for a, p in zip(decoder_before, model.pixel_decoder.parameters()))
    after = loss.discriminator.state_dict()
    assert any(not torch.equal(critic_before[k], after[k]) for k in critic_before if k.startswith("net."))
    assert after["ema_real"] != 0 and after["ema_fake"] != 0


def test_generation_stage_trains_and_evaluates_in_bf16(process_group, photos):
    recipe = load_recipe(
        "gen-stage2",
        [
            "model.preset=tiny",
            "model.num_queries=16",
            "train.micro_batch=2",
            "train.global_batch=4",
            "train.warmup_steps=1",
        ],
    )
    assert recipe.train.precision == "bf16"
    torch.manual_seed(0)
    engine, stage = engine_for(recipe)
    assert stage.net.model.generator.dit.dtype == torch.bfloat16
    micro = [collate(raw_batch(photos[:2], "generation", 448)), collate(raw_batch(photos[2:], "editing", 448))]
    terms = optimizer_step(
        engine, stage, micro, 0, recipe, 1, random.Random(0), torch.Generator().manual_seed(0), "cpu"
    )
    assert {"flow_generation", "flow_editing", "loss"} <= set(terms) and all(math.isfinite(v) for v in terms.values())
    # the evaluation that runs every eval_every steps: generation and edits of a bf16 model
    model = stage.net.model.eval()
    model.cfg = dataclasses.replace(model.cfg, num_inference_steps=2)
    metrics, rows = evaluate(model, "generation", photos[:2], seed=0)
    assert [im.size for im in rows[0]] == [(448, 448)] * 4 and len(rows[1]) == 4
    assert all(np.asarray(im).std() > 0 for im in rows[0])


def test_fp32_remains_selectable(process_group, photos):
    recipe = load_recipe(
        "recon-stage1",
        [
            "model.preset=tiny",
            "train.micro_batch=1",
            "train.global_batch=1",
            "train.precision=fp32",
            "loss.lpips_net=alex",
            "loss.lpips_weights=null",
            "loss.convnext=0",
        ],
    )
    torch.manual_seed(0)
    engine, stage = engine_for(recipe)
    assert {p.dtype for p in stage.net.model.pixel_decoder.parameters()} == {torch.float32}
    terms = optimizer_step(
        engine,
        stage,
        [collate(raw_batch(photos[:1], "generation", 224))],
        0,
        recipe,
        1,
        random.Random(0),
        torch.Generator().manual_seed(0),
        "cpu",
    )
    # one worker in fp32: DeepSpeed's path without ZeRO would discard the norm, so the loop clips
    assert set(terms) == {"mse", "lpips", "loss", "grad_norm"} and all(math.isfinite(v) for v in terms.values())


def test_inference_runs_in_the_device_s_precision_with_sdpa(photos):
    """bf16 is what a GPU runs (the default on CUDA); here on the CPU, asked for, the four
    calls run in it and agree with fp32; every attention is torch's fused SDPA."""
    from PIL import Image

    from unilip.model import UniLIP
    from unilip.numerics import inference_dtype

    assert inference_dtype("cuda") == torch.bfloat16 and inference_dtype("cpu") == torch.float32
    assert inference_dtype("cpu", "bf16") == torch.bfloat16
    with pytest.raises(UserError, match="dtype must be auto, bf16 or fp32, got 'fp16'"):
        inference_dtype("cuda", "fp16")

    image = Image.fromarray(photos[0])
    outputs = {}
    for dtype in ("fp32", "bf16"):
        model = UniLIP.from_preset("tiny").for_inference("cpu", dtype)
        assert {p.dtype for p in model.parameters()} == {inference_dtype("cpu", dtype)}
        outputs[dtype] = [
            np.asarray(im, dtype=np.float32)
            for im in (
                model.generate(["a red fox"], steps=2, seed=0)[0],
                model.edit([image], ["make it blue"], steps=2, seed=0)[0],
                model.reconstruct([image])[0],
            )
        ]
        assert model.understand(image, "What is this?", max_new_tokens=4) is not None
    for a, b in zip(outputs["fp32"], outputs["bf16"]):
        assert a.shape == b.shape == (448, 448, 3)
        psnr = 10 * math.log10(255**2 / max(float(np.mean((a - b) ** 2)), 1e-12))
        assert psnr > 25, psnr  # bf16 rounding, not a different computation

    cfg = model.mllm.config
    assert cfg.vision_config._attn_implementation == cfg.text_config._attn_implementation == "sdpa"
    assert model.generator.connector.model.config._attn_implementation == "sdpa"
    dit = model.generator.dit
    assert {type(b.attn2.processor).__name__ for b in dit.transformer_blocks} == {
        "SanaAttnProcessor2_0"
    }  # F.scaled_dot_product_attention
