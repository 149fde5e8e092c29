"""Parameter counts of a preset, per component, built on the meta device: no weights, no
download, seconds even at real size.

    unilip model summary --preset unilip-1b [--set dit_pos_embed=sincos]
    rows = parameter_summary("unilip-3b")
"""

from __future__ import annotations

import torch
from torch import nn


def count(*modules: nn.Module | nn.Parameter) -> int:
    """Parameters of the modules together, each tensor once (tied weights are one)."""
    seen: dict[int, int] = {}
    for m in modules:
        for p in [m] if isinstance(m, nn.Parameter) else m.parameters():
            seen[id(p)] = p.numel()
    return sum(seen.values())


def parameter_summary(preset: str, dit_pos_embed: str = "none") -> list[tuple[str, int]]:
    """(name, parameters) rows: the parts as published (MLLM, DiT, DC-AE), then UniLIP's
    components (what recipes train and freeze) and the model's total. The DiT's positional
    embedding is a buffer: it changes what the DiT computes, not the counts."""
    from unilip.config import ModelConfig
    from unilip.model import UniLIP
    from unilip.presets import build_backbones

    with torch.device("meta"):
        parts = build_backbones(preset, init="random", device="meta", dit_pos_embed=dit_pos_embed)
        mllm = parts.mllm.model
        rows = [
            ("mllm (InternVL3)", count(parts.mllm)),
            ("  vision tower (InternViT)", count(mllm.vision_tower)),
            ("  projector", count(mllm.multi_modal_projector)),
            ("  language model (Qwen2, with embeddings)", count(mllm.language_model)),
            (
                "  lm_head",
                count(parts.mllm.lm_head)
                if parts.mllm.lm_head.weight is not mllm.language_model.embed_tokens.weight
                else 0,
            ),
            ("dit (SANA)", count(parts.dit)),
            ("dc-ae", count(parts.dcae)),
            ("  encoder (unused by UniLIP)", count(parts.dcae.encoder)),
            ("  decoder", count(parts.dcae.decoder)),
        ]
        model = UniLIP(parts, ModelConfig(preset=preset, init="random", dit_pos_embed=dit_pos_embed), teacher=False)
    rows += [(f"component {name}", count(part)) for name, part in model.components().items()]
    rows.append(("unilip total", count(model)))
    return rows


def format_summary(preset: str, rows: list[tuple[str, int]], dit_pos_embed: str = "none") -> str:
    width = max(len(name) for name, _ in rows)
    lines = [f"{preset}: parameters (architecture built on the meta device; DiT positional embedding: {dit_pos_embed})"]
    lines += [f"  {name:<{width}}  {n:>15,}" for name, n in rows]
    return "\n".join(lines)
