"""Activation checkpointing per component: the same loss and the same gradients, bit for
bit, in the shipped precision (bf16), with the blocks' activations recomputed."""

import pytest
import torch

from unilip.activation_checkpointing import is_checkpointed
from unilip.config import ModelConfig
from unilip.errors import UserError
from unilip.model import UniLIP
from unilip.prompts import edit_prompt, generation_prompt

COMPONENTS = ["encoder", "llm", "connector", "dit", "pixel_decoder"]


def step(checkpointing: list[str], calls: list | None = None):
    """Loss and gradients of one reconstruction + generation + editing batch, every part trained."""
    torch.manual_seed(0)  # UniLIP's own parts (queries, connector, projections) draw from the global generator
    model = UniLIP.from_preset("tiny", ModelConfig(preset="tiny", num_queries=16)).to(torch.bfloat16).train()
    model.set_trainable(list(model.components()))
    model.set_activation_checkpointing(checkpointing)
    if calls is not None:  # a layer inside a checkpointed block runs again in the backward pass
        model.generator.dit.transformer_blocks[0].attn2.register_forward_pre_hook(lambda *_: calls.append(1))
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, 3, 224, 224, generator=g)
    target = torch.randn(2, 3, 448, 448, generator=g)
    recon, _ = model.reconstruct_tensors(pixels)
    loss = (recon.float() - pixels.tanh()).square().mean()
    loss = loss + model.generation_loss(
        [generation_prompt("a red fox")] * 2, target, generator=torch.Generator().manual_seed(1)
    )
    loss = loss + model.generation_loss(
        [edit_prompt("make it blue")] * 2, target, target, generator=torch.Generator().manual_seed(2)
    )
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, model


def test_checkpointing_changes_memory_not_results():
    loss, grads, plain = step([])
    calls: list = []
    loss_ckpt, grads_ckpt, model = step(COMPONENTS, calls)
    assert all(is_checkpointed(b) for blocks in model.checkpoint_blocks().values() for b in blocks)
    assert len(calls) == 2 * 2  # two generation losses, each block run forward and again for backward
    assert torch.equal(loss, loss_ckpt)
    assert grads.keys() == grads_ckpt.keys() and len(grads) > 100
    assert all(torch.equal(grads[n], grads_ckpt[n]) for n in grads)
    # parameter names (checkpoints, exports) are unchanged
    assert list(dict(model.named_parameters())) == list(dict(plain.named_parameters()))


def test_recon_stage2_448_checkpoints_as_the_release_and_bad_names_are_refused():
    from jobs.training.recipes import load_recipe

    assert load_recipe("recon-stage2-448").train.activation_checkpointing == ["encoder", "pixel_decoder"]
    model = UniLIP.from_preset("tiny")
    with pytest.raises(
        UserError, match=r"unknown component\(s\) \['vae'\] for activation checkpointing; choose from: encoder, llm"
    ):
        model.set_activation_checkpointing(["vae"])
