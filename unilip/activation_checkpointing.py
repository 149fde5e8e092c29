"""Activation checkpointing: a block keeps only its inputs in the forward pass and runs
again in the backward pass to rebuild what its gradients need.

    enable_checkpointing(model.generator.dit.transformer_blocks)

The block's class is swapped for a subclass whose forward is checkpointed (torch's
non-reentrant checkpoint), so parameter names, state dicts and copies are unchanged and
every part (transformers, diffusers, the project's own) is checkpointed the same way.
Outside autograd (no_grad, inference) the block runs as before. A block in train mode
with BatchNorm updates its running statistics twice per step (forward and recompute).
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

_CHECKPOINTED: set[type] = set()


@functools.cache
def checkpointed(cls: type[nn.Module]) -> type[nn.Module]:
    def forward(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            return cls.forward(self, *args, **kwargs)
        return checkpoint(cls.forward, self, *args, use_reentrant=False, **kwargs)

    sub = type(f"Checkpointed{cls.__name__}", (cls,), {"forward": forward, "__module__": cls.__module__})
    _CHECKPOINTED.add(sub)
    return sub


def enable_checkpointing(blocks: nn.ModuleList) -> None:
    for block in blocks:
        if type(block) not in _CHECKPOINTED:
            block.__class__ = checkpointed(type(block))


def is_checkpointed(block: nn.Module) -> bool:
    return type(block) in _CHECKPOINTED
