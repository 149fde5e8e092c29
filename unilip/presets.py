"""Model presets: a name -> factory registry of the pretrained parts UniLIP is built from.

    parts = build_parts("tiny")          # random weights, small configs, seconds on CPU
    parts = build_parts("unilip-1b")     # InternVL3-1B + SANA 600M + DC-AE (from_pretrained)
    parts = build_parts("unilip-1b", init="random", device="meta")   # real size, no download
    parts = build_parts("unilip-1b", dit_pos_embed="sincos")         # the DiT as the release trained it

Every part is a real `transformers`/`diffusers` class: the MLLM is
`InternVLForConditionalGeneration` (InternViT + projector + Qwen2), the pixel decoder's
backbone is `AutoencoderDC`, the DiT is `SanaTransformer2DModel`. Real presets load from
hub ids, local directories or `s3://` prefixes (fetched through the project's S3 access
point into a local cache); nothing is downloaded in tests. With `init="random"` a real
preset is built from its published architecture (`unilip.real_configs`) with random
weights (seeded, as the tiny preset's), on any device, `meta` included, and the tiny
tokenizer widened to InternVL3's vocabulary and special-token ids.

Every build takes the DiT's positional embedding (`model.dit_pos_embed`), which no weight
file records: the same SANA weights compute something else with and without it.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from unilip.real_configs import INTERNVL3_1B, INTERNVL3_2B, SANA_600M_512PX, SANA_1600M_512PX


@dataclass
class Sources:
    """Where a preset's frozen and initial parts come from (recorded in checkpoints)."""

    mllm: str
    dit: str
    dcae: str
    unilip_factor: float  # latent scale for diffusion in UniLIP space


@dataclass
class Parts:
    mllm: torch.nn.Module  # InternVLForConditionalGeneration
    tokenizer: object
    dcae: torch.nn.Module  # AutoencoderDC
    dit: torch.nn.Module  # SanaTransformer2DModel
    sources: Sources


INITS = ("pretrained", "random")
# model.dit_pos_embed -> SanaTransformer2DModel's interpolation_scale. The pinned diffusers
# adds the 2-D sincos embedding only when the scale is set; 0.32.2 (the release's) turned an
# unset scale into max(sample_size // 64, 1) = 1 for the 16x16 latent and always added it.
DIT_POS_EMBED = {"none": None, "sincos": 1}
ATTENTION = "sdpa"  # every part's attention: torch's fused scaled_dot_product_attention (flash / memory-efficient on CUDA)
PRESETS: dict[str, Callable[..., Parts]] = {}  # name -> factory(init, device, dit_args from `dit_kwargs`)
SOURCES: dict[str, Sources] = {}  # name -> where its parts come from


def register(name: str):
    def wrap(fn: Callable[..., Parts]) -> Callable[..., Parts]:
        PRESETS[name] = fn
        return fn

    return wrap


def build_parts(name: str, init: str = "pretrained", device: str | torch.device | None = None,
                dit_pos_embed: str = "none") -> Parts:  # fmt: skip
    """A preset's parts: `init` "pretrained" (the default; the tiny preset has no other
    weights than its seeded random ones) or "random"; built on `device` (default CPU), the
    DiT with the positional embedding `dit_pos_embed` ("none" or "sincos")."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; available: {', '.join(sorted(PRESETS))}")
    if init not in INITS:
        raise ValueError(f"model.init must be one of {', '.join(INITS)}, got {init!r}")
    return PRESETS[name](init, device, dit_kwargs(dit_pos_embed))


def dit_kwargs(dit_pos_embed: str) -> dict:
    """The SanaTransformer2DModel arguments that give it `dit_pos_embed`."""
    if dit_pos_embed not in DIT_POS_EMBED:
        raise ValueError(f"model.dit_pos_embed must be one of {', '.join(DIT_POS_EMBED)}, got {dit_pos_embed!r}")
    return {"interpolation_scale": DIT_POS_EMBED[dit_pos_embed]}


def dit_pos_embed_of(dit: torch.nn.Module) -> str:
    """The positional embedding a built SANA DiT adds: "none" or "sincos"."""
    return "none" if dit.patch_embed.pos_embed is None else "sincos"


@contextlib.contextmanager
def _seeded(device):
    """Deterministic random weights on `device` (a meta build has no values to seed)."""
    with torch.random.fork_rng(), torch.device(device or "cpu"):
        torch.manual_seed(PRESET_SEED)
        yield


# ----------------------------------------------------------------------------- tiny

PRESET_SEED = 1234  # random weights (tiny, and real presets with init random) are a function of this seed


SOURCES["tiny"] = Sources(mllm="tiny", dit="tiny", dcae="tiny", unilip_factor=1.0)


@register("tiny")
def tiny(init: str = "pretrained", device=None, dit_args: dict | None = None) -> Parts:
    """Small configs of the real classes, random weights (deterministic), the tokenizer fixture."""
    from diffusers import AutoencoderDC, SanaTransformer2DModel
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    from unilip.tokenizer import IMG_CONTEXT, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    config = InternVLConfig(
        vision_config=dict(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            image_size=[448, 448], patch_size=[14, 14],
        ),
        text_config=dict(
            model_type="qwen2", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
            num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
            tie_word_embeddings=True,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids(IMG_CONTEXT),
        image_seq_length=256,
        attn_implementation=ATTENTION,
    )  # fmt: skip
    with _seeded(device):
        mllm = InternVLForConditionalGeneration(config)
        dcae = AutoencoderDC(
            latent_channels=32, attention_head_dim=8,
            encoder_block_types="ResBlock", decoder_block_types="ResBlock",
            encoder_block_out_channels=(8, 8, 16, 16, 32, 32), decoder_block_out_channels=(8, 8, 16, 16, 32, 32),
            encoder_layers_per_block=(1, 1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1, 1),
            encoder_qkv_multiscales=((),) * 6, decoder_qkv_multiscales=((),) * 6,
            scaling_factor=0.5,
        )
        dit = SanaTransformer2DModel(
            in_channels=32, out_channels=32, num_attention_heads=2, attention_head_dim=16, num_layers=2,
            num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32,
            caption_channels=48, sample_size=16, patch_size=1, **(dit_args or {}),
        )  # fmt: skip
    mllm.eval(), dcae.eval(), dit.eval()
    return Parts(mllm, tokenizer, dcae, dit, SOURCES["tiny"])


# ----------------------------------------------------------------------------- real


def resolve_pretrained(source: str, cache_dir: str | Path | None = None) -> str:
    """A hub id or local path as is; an `s3://` prefix fetched into a local cache first."""
    from unilip.s3 import is_s3, s3_access

    if not is_s3(source):
        return source
    s3 = s3_access()
    root = Path(cache_dir or os.environ.get("UNILIP_CACHE", Path.home() / ".cache" / "unilip")) / source[5:]
    for uri in s3.list_keys(source.rstrip("/") + "/"):
        dest = root / uri[len(source.rstrip("/")) + 1 :]
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_suffix(dest.suffix + ".part")
            tmp.write_bytes(s3.get_bytes(uri))
            tmp.replace(dest)
    if not root.exists():
        raise FileNotFoundError(f"nothing under {source}")
    return str(root)


def pretrained_parts(sources: Sources, dtype=torch.float32, dit_args: dict | None = None) -> Parts:
    """Load every part from its source (hub id, local directory or s3:// prefix); `dit_args`
    override the DiT's saved config (`dit_kwargs`)."""
    from diffusers import AutoencoderDC, SanaTransformer2DModel
    from transformers import AutoTokenizer, InternVLForConditionalGeneration

    mllm_path = resolve_pretrained(sources.mllm)
    return Parts(
        mllm=InternVLForConditionalGeneration.from_pretrained(mllm_path, dtype=dtype, attn_implementation=ATTENTION).eval(),
        tokenizer=AutoTokenizer.from_pretrained(mllm_path),
        dcae=AutoencoderDC.from_pretrained(resolve_pretrained(sources.dcae), torch_dtype=dtype).eval(),
        dit=SanaTransformer2DModel.from_pretrained(resolve_pretrained(sources.dit), subfolder="transformer", torch_dtype=dtype,
                                                    **(dit_args or {})).eval(),
        sources=sources,
    )


DCAE = "mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers"


def random_parts(sources: Sources, mllm: dict, dit: dict, device=None) -> Parts:
    """A real preset's published architecture with random weights (`unilip.real_configs`)."""
    from diffusers import AutoencoderDC, SanaTransformer2DModel
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    from unilip.real_configs import DCAE_F32C32_SANA_1_1, random_init
    from unilip.tokenizer import INTERNVL3, build_tiny_tokenizer

    with _seeded(device):
        parts = Parts(
            mllm=InternVLForConditionalGeneration(InternVLConfig(**random_init(mllm), attn_implementation=ATTENTION)).eval(),
            tokenizer=build_tiny_tokenizer(layout=INTERNVL3),
            dcae=AutoencoderDC(**DCAE_F32C32_SANA_1_1).eval(),
            dit=SanaTransformer2DModel(**dit).eval(),
            sources=sources,
        )
    return parts


def _real(name: str, sources: Sources, mllm: dict, dit: dict) -> None:
    def build(init: str = "pretrained", device=None, dit_args: dict | None = None) -> Parts:
        if init == "random":
            return random_parts(sources, mllm, dit | (dit_args or {}), device)
        parts = pretrained_parts(sources, dit_args=dit_args)
        if device is not None:
            parts.mllm, parts.dcae, parts.dit = parts.mllm.to(device), parts.dcae.to(device), parts.dit.to(device)
        return parts

    register(name)(build)
    SOURCES[name] = sources


_real("unilip-1b", Sources("OpenGVLab/InternVL3-1B-hf", "Efficient-Large-Model/Sana_600M_512px_diffusers", DCAE, 10.6),
      INTERNVL3_1B, SANA_600M_512PX)  # fmt: skip
_real("unilip-3b", Sources("OpenGVLab/InternVL3-2B-hf", "Efficient-Large-Model/Sana_1600M_512px_diffusers", DCAE, 9.5),
      INTERNVL3_2B, SANA_1600M_512PX)  # fmt: skip
