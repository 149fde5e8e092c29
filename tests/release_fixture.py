"""A synthetic release checkpoint: a tiny UniLIP's weights laid out as the authors'
released UniLIP-1B/3B directories are (`UniLIP_InternVLForCausalLM.save_pretrained`:
config.json, bf16 `model.safetensors` or shards with an index, the tokenizer with its 3
added tokens). The names are written here from the release's module layout, independently
of the converter's rules; `tests/data/official_unilip_1b_keys.txt` (every key of the real
1B checkpoint, built from the authors' class) checks that they are the release's names.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import torch

EXTRA_TOKENS = ["<video>", "[IMG]", "[/IMG]", "<image>"]  # the release's vocabulary: +4 rows


def perturbed_tiny(seed: int = 7):
    """A tiny model whose every saved part differs from the preset's seeded weights (so a
    loader that fell back to them would show), held at bf16 values (as the release stores)."""
    from unilip.model import UniLIP

    model = UniLIP.from_preset("tiny")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _name, part in model.components().items():
            for p in [part] if isinstance(part, torch.nn.Parameter) else part.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=gen)).copy_(p.to(torch.bfloat16).float())
    model.trained_parts = set(model.components())
    return model


def _vit_name(key: str) -> str:
    """transformers' InternVL vision tower key -> InternViT's original name (the release's)."""
    key = key.replace("embeddings.cls_token", "embeddings.class_embedding")
    key = key.replace("embeddings.position_embeddings", "embeddings.position_embedding")
    key = key.replace("embeddings.patch_embeddings.projection", "embeddings.patch_embedding")
    key = key.replace("encoder.layer.", "encoder.layers.").replace("attention.projection_layer", "attn.proj")
    key = key.replace("layernorm_before", "norm1").replace("layernorm_after", "norm2")
    return re.sub(r"lambda_(\d)", r"ls\1", key)


def release_state(model) -> dict[str, torch.Tensor]:
    """Every tensor of the release's state_dict for `model`'s weights, under the release's names."""
    parts = model.components()
    out: dict[str, torch.Tensor] = {"model.latent_queries": parts["queries"].detach()}
    enc = parts["encoder"].state_dict()
    for key, value in enc.items():
        if (
            key.startswith("vision_tower.")
            and ".attention." in key
            and key.rsplit(".", 2)[-2] in ("q_proj", "k_proj", "v_proj")
        ):
            if ".q_proj." in key:  # InternViT's fused qkv: q, k, v stacked along rows
                stem, kind = key.split(".attention.q_proj.")
                fused = torch.cat([enc[f"{stem}.attention.{p}_proj.{kind}"] for p in "qkv"])
                out[f"model.{_vit_name(stem)}.attn.qkv.{kind}"] = fused
            continue
        if key.startswith("vision_tower."):
            out[f"model.{_vit_name(key)}"] = value
        else:  # mlp1, an nn.Sequential: LayerNorm, Linear, GELU, Linear
            index = {"layer_norm": 0, "linear_1": 1, "linear_2": 3}[key.split(".")[1]]
            out[f"model.multi_modal_projector.{index}.{key.split('.')[2]}"] = value
    for key, value in parts["down_proj"].state_dict().items():  # DCAE_Decoder's down_blocks (each an MLP) and down_mlp
        index = {"norm": 0, "fc1": 1, "fc2": 3}
        if key.startswith("blocks."):
            _, j, layer, kind = key.split(".")
            out[f"model.vae_decoder.down_blocks.{j}.mlp.{index[layer]}.{kind}"] = value
        else:
            layer, kind = key.split(".")
            out[f"model.vae_decoder.down_mlp.{index[layer]}.{kind}"] = value
    out |= {f"model.vae_decoder.decoder.{k}": v for k, v in parts["pixel_decoder"].state_dict().items()}
    out |= {
        f"model.llm_connector.{k[len('model.') :]}": v
        for k, v in parts["connector"].state_dict().items()
        if k != "model.embed_tokens.weight"
    }  # the release deletes the connector's embed_tokens
    out |= {f"model.projector.{k}": v for k, v in parts["caption_projector"].state_dict().items()}
    out |= {f"model.dit.{k}": v for k, v in parts["dit"].state_dict().items()}
    lm = model.mllm.model.language_model.state_dict()
    rows = len(EXTRA_TOKENS)
    for key, value in lm.items():  # the frozen LLM, its vocabulary resized for the added tokens
        if key == "embed_tokens.weight":
            value = torch.cat([value, value.mean(0, keepdim=True).expand(rows, -1)])
        out[f"model.language_model.{key}"] = value
    head = model.mllm.lm_head.weight
    out["lm_head.weight"] = torch.cat([head, head.mean(0, keepdim=True).expand(rows, -1)])
    return {k: v.detach().to(torch.bfloat16).contiguous() for k, v in out.items()}


def write_release(model, out: str | Path, shards: int = 1) -> Path:
    """The release directory: config.json, generation_config.json, weights, tokenizer."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = release_state(model)
    if shards == 1:
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        keys = list(state)
        weight_map = {}
        for i in range(shards):
            name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            chunk = keys[i * len(keys) // shards : (i + 1) * len(keys) // shards]
            save_file({k: state[k] for k in chunk}, str(out / name), metadata={"format": "pt"})
            weight_map |= {k: name for k in chunk}
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    text = model.mllm.config.text_config
    config = {
        "architectures": ["UniLIP_InternVLForCausalLM"],
        "model_type": "unilip_internvl",
        "n_query": model.cfg.num_queries,
        "connect_layer": model.cfg.connector_layers,
        "unilip_factor": 1.0,
        "mllm_path": "tiny",
        "mllm_hf_path": "tiny",
        "vae_path": "tiny",
        "dit_path": "tiny",
        "image_token_id": model.mllm.config.image_token_id,
        "image_seq_length": 256,
        "downsample_ratio": 0.5,
        "text_config": {
            "model_type": "qwen2",
            "vocab_size": text.vocab_size + len(EXTRA_TOKENS),
            "hidden_size": text.hidden_size,
        },
        "torch_dtype": "bfloat16",
        "transformers_version": "4.52.1",
        "use_cache": True,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(
        json.dumps({"_from_model_config": True, "transformers_version": "4.52.1"})
    )
    tok = copy.deepcopy(model.tokenizer)
    tok.add_tokens(EXTRA_TOKENS, special_tokens=True)
    tok.save_pretrained(str(out))
    return out


def key_patterns(keys) -> set[str]:
    """Keys with their layer and block numbers collapsed (the layout, whatever the depth)."""
    return {re.sub(r"\.\d+(?=\.|$)", ".N", k) for k in keys}


def official_1b_keys() -> dict[str, tuple[int, ...]]:
    """Every key and shape of the real UniLIP-1B checkpoint (built from the authors' class)."""
    rows = (Path(__file__).parent / "data" / "official_unilip_1b_keys.txt").read_text().splitlines()
    return {k: tuple(json.loads(s)) for k, s, _ in (r.split("\t") for r in rows if r and not r.startswith("#"))}
