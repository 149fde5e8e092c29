"""The model on the meta device: every shape of a real-size step, no weights, no memory.

    model = UniLIP.from_preset("unilip-1b", cfg, device="meta")      # cfg.init = "random"
    with meta_run():                         # data-dependent reads get a fixed answer
        model.generation_loss(prompts, pixels).backward()
    with meta_run() as memory:               # and the bytes the step's tensors would hold
        ...
    memory.peak                              # at their peak, over forward and backward

A meta tensor has a shape and a dtype but no values, so a read of its value (`.item()`,
`bool(tensor)`: "is every position unpadded?") cannot be answered; `meta_run` answers it
True (or 1), which takes the no-padding path. Memory is counted the way an allocator
would see it: every storage an operation creates is live from its creation until its
last reference goes, views share their base's bytes, and tensors made before the block
(parameters, inputs) are not counted. Attention runs as on a GPU: on the meta device
`scaled_dot_product_attention` would pick its math path and keep each T x T matrix for
the backward pass, where CUDA runs a fused kernel that keeps O(T); inside the block it is
the memory-efficient kernel (its meta version).
"""

from __future__ import annotations

import contextlib
import weakref

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class MetaRun(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen: weakref.WeakSet = weakref.WeakSet()

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and args[0].is_meta:
            return True if args[0].dtype == torch.bool else 1
        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):
            return out  # a view or an in-place result: no new bytes
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.is_meta:
                storage = t.untyped_storage()
                if storage not in self._seen:
                    self._seen.add(storage)
                    self.live += storage.nbytes()
                    weakref.finalize(storage, self._free, storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out


def fused_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """`scaled_dot_product_attention` as CUDA runs it: the memory-efficient kernel."""
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        repeat = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(repeat, -3), value.repeat_interleave(repeat, -3)
    if attn_mask is not None and attn_mask.dtype == torch.bool:  # as SDPA converts a boolean mask to a bias
        attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~attn_mask, float("-inf")
        )
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    return torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key, value, attn_mask, grad, dropout_p, is_causal, scale=scale
    )[0]


@contextlib.contextmanager
def meta_run():
    mode, sdpa = MetaRun(), F.scaled_dot_product_attention
    F.scaled_dot_product_attention = fused_attention
    try:
        with mode:
            yield mode
    finally:
        F.scaled_dot_product_attention = sdpa
