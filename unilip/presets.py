"""Model presets: a name -> factory registry of the backbones UniLIP is built around.

    backbones = build_backbones("tiny")          # random weights, small configs, seconds on CPU
    backbones = build_backbones("unilip-1b")     # InternVL3-1B + SANA 600M + DC-AE (from_pretrained)
    backbones = build_backbones("unilip-1b", init="random", device="meta")   # real size, no download
    backbones = build_backbones("unilip-1b", dit_pos_embed="sincos")         # the DiT as the release trained it

A preset's backbones are the pretrained networks the model is built around; where they
come from (hub ids, directories, s3://) is its `Upstream`, recorded in every model
directory. Every backbone is a real `transformers`/`diffusers` class: the MLLM is
`InternVLForConditionalGeneration` (InternViT + projector + Qwen2), the pixel decoder's
backbone is `AutoencoderDC`, the DiT is `SanaTransformer2DModel`. Real presets load from
hub ids, local directories or `s3://` prefixes (fetched through the project's S3 access
point into a local cache); nothing is downloaded in tests. With `init="random"` a real
preset is built from its published architecture (`unilip.architectures`) with random
weights (seeded, as the tiny preset's), on any device, `meta` included, and the tiny
tokenizer widened to InternVL3's vocabulary and special-token ids.

Every build takes the DiT's positional embedding (`model.dit_pos_embed`), which no weight
file records: the same SANA weights compute something else with and without it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from unilip.architectures import REAL_PRESETS, TINY_DCAE, TINY_INTERNVL, TINY_SANA
from unilip.config import ConfigError


@dataclass
class Upstream:
    """The checkpoints a preset's backbones come from (recorded in model directories)."""

    mllm: str
    dit: str
    dcae: str
    unilip_factor: float  # latent scale for diffusion in UniLIP space


@dataclass
class Backbones:
    """The pretrained networks a UniLIP model is built around, and where they came from."""

    mllm: torch.nn.Module  # InternVLForConditionalGeneration
    tokenizer: object
    dcae: torch.nn.Module  # AutoencoderDC
    dit: torch.nn.Module  # SanaTransformer2DModel
    upstream: Upstream


INITS = ("pretrained", "random")
# model.dit_pos_embed -> SanaTransformer2DModel's interpolation_scale. The pinned diffusers
# adds the 2-D sincos embedding only when the scale is set; 0.32.2 (the release's) turned an
# unset scale into max(sample_size // 64, 1) = 1 for the 16x16 latent and always added it.
DIT_POS_EMBED = {"none": None, "sincos": 1}
ATTENTION = (
    "sdpa"  # every part's attention: torch's fused scaled_dot_product_attention (flash / memory-efficient on CUDA)
)
PRESETS: dict[str, Callable[..., Backbones]] = {}  # name -> factory(init, device, dit_args from `dit_kwargs`)
UPSTREAM: dict[str, Upstream] = {}  # name -> where its backbones come from


def register(name: str):
    def wrap(fn: Callable[..., Backbones]) -> Callable[..., Backbones]:
        PRESETS[name] = fn
        return fn

    return wrap


def build_backbones(
    name: str, init: str = "pretrained", device: str | torch.device | None = None, dit_pos_embed: str = "none"
) -> Backbones:
    """A preset's backbones: `init` "pretrained" (the default; the tiny preset has no other
    weights than its seeded random ones) or "random"; built on `device` (default CPU), the
    DiT with the positional embedding `dit_pos_embed` ("none" or "sincos")."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; available: {', '.join(sorted(PRESETS))}")
    if init not in INITS:
        raise ConfigError(f"model.init must be one of {', '.join(INITS)}, got {init!r}")
    return PRESETS[name](init, device, dit_kwargs(dit_pos_embed))


def dit_kwargs(dit_pos_embed: str) -> dict:
    """The SanaTransformer2DModel arguments that give it `dit_pos_embed`."""
    if dit_pos_embed not in DIT_POS_EMBED:
        raise ConfigError(f"model.dit_pos_embed must be one of {', '.join(DIT_POS_EMBED)}, got {dit_pos_embed!r}")
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


UPSTREAM["tiny"] = Upstream(mllm="tiny", dit="tiny", dcae="tiny", unilip_factor=1.0)


@register("tiny")
def tiny(init: str = "pretrained", device=None, dit_args: dict | None = None) -> Backbones:
    """Small configs of the real classes, random weights (deterministic), the tokenizer fixture."""
    from diffusers import AutoencoderDC, SanaTransformer2DModel
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    from unilip.tokenizer import IMG_CONTEXT, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    text = {**TINY_INTERNVL["text_config"], "vocab_size": len(tokenizer)}
    config = InternVLConfig(
        **{**TINY_INTERNVL, "text_config": text},
        attn_implementation=ATTENTION,
        image_token_id=tokenizer.convert_tokens_to_ids(IMG_CONTEXT),
    )
    with _seeded(device):
        mllm = InternVLForConditionalGeneration(config)
        dcae = AutoencoderDC(**TINY_DCAE)
        dit = SanaTransformer2DModel(**TINY_SANA, **(dit_args or {}))
    mllm.eval(), dcae.eval(), dit.eval()
    return Backbones(mllm, tokenizer, dcae, dit, UPSTREAM["tiny"])


# ----------------------------------------------------------------------------- real


def resolve_pretrained(source: str) -> str:
    """A hub id or local path as is; an `s3://` prefix fetched into the local cache first."""
    from unilip.s3 import is_s3, s3_access

    return str(s3_access().fetch(source)) if is_s3(source) else source


def pretrained_backbones(upstream: Upstream, dtype=torch.float32, dit_args: dict | None = None) -> Backbones:
    """Load every part from its source (hub id, local directory or s3:// prefix); `dit_args`
    override the DiT's saved config (`dit_kwargs`)."""
    from diffusers import AutoencoderDC, SanaTransformer2DModel
    from transformers import AutoTokenizer, InternVLForConditionalGeneration

    mllm_path = resolve_pretrained(upstream.mllm)
    return Backbones(
        mllm=InternVLForConditionalGeneration.from_pretrained(
            mllm_path, dtype=dtype, attn_implementation=ATTENTION
        ).eval(),
        tokenizer=AutoTokenizer.from_pretrained(mllm_path),
        dcae=AutoencoderDC.from_pretrained(resolve_pretrained(upstream.dcae), torch_dtype=dtype).eval(),
        dit=SanaTransformer2DModel.from_pretrained(
            resolve_pretrained(upstream.dit), subfolder="transformer", torch_dtype=dtype, **(dit_args or {})
        ).eval(),
        upstream=upstream,
    )


DCAE = "mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers"


def random_backbones(upstream: Upstream, mllm: dict, dit: dict, device=None) -> Backbones:
    """A real preset's published architecture with random weights (`unilip.architectures`)."""
    from diffusers import AutoencoderDC, SanaTransformer2DModel
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    from unilip.architectures import DCAE_F32C32_SANA_1_1, random_init
    from unilip.tokenizer import INTERNVL3, build_tiny_tokenizer

    with _seeded(device):
        return Backbones(
            mllm=InternVLForConditionalGeneration(
                InternVLConfig(**random_init(mllm), attn_implementation=ATTENTION)
            ).eval(),
            tokenizer=build_tiny_tokenizer(layout=INTERNVL3),
            dcae=AutoencoderDC(**DCAE_F32C32_SANA_1_1).eval(),
            dit=SanaTransformer2DModel(**dit).eval(),
            upstream=upstream,
        )


def _real(name: str, upstream: Upstream) -> None:
    mllm, dit = REAL_PRESETS[name]

    def build(init: str = "pretrained", device=None, dit_args: dict | None = None) -> Backbones:
        if init == "random":
            return random_backbones(upstream, mllm, dit | (dit_args or {}), device)
        backbones = pretrained_backbones(upstream, dit_args=dit_args)
        if device is not None:
            backbones.mllm, backbones.dcae, backbones.dit = (
                m.to(device) for m in (backbones.mllm, backbones.dcae, backbones.dit)
            )
        return backbones

    register(name)(build)
    UPSTREAM[name] = upstream


_real("unilip-1b", Upstream("OpenGVLab/InternVL3-1B-hf", "Efficient-Large-Model/Sana_600M_512px_diffusers", DCAE, 10.6))
_real("unilip-3b", Upstream("OpenGVLab/InternVL3-2B-hf", "Efficient-Large-Model/Sana_1600M_512px_diffusers", DCAE, 9.5))
