"""Run planner: what a recipe costs on rented GPUs, before renting them.

    unilip plan gen-stage2 --gpus 16 --gpu a100-80g
    unilip plan all --preset unilip-3b --price 3.2
    unilip plan recon-stage2-448 --gpus 4 --set train.micro_batch=8 --no-memory

Per-GPU memory (weights, gradients, optimizer, activations measured at real size on the
meta device, a verdict per GPU kind) comes from `jobs/performance/memory.py`.

The FLOPs model (forward FLOPs, 2 per multiply-add, per training sample):

- Transformer stacks (InternViT, the Qwen2 LLM, the connector), per layer over T tokens of
  width d with q = heads x head_dim and k = kv_heads x head_dim:
  projections 2T.d.(q + 2k) + 2T.q.d, attention 4T^2.q (QK^T and AV, counted in full also
  when causal), MLP 2T.d.m x 3 (SwiGLU) or x 2 (GELU).
- InternViT adds its patch embedding 2T.(3.14^2).d; T = (res/14)^2 + 1 (the CLS token).
- Projector (pixel shuffle 0.5 -> LayerNorm -> Linear -> GELU -> Linear) over (res/28)^2
  tokens: 2T.(4.d_vit.d + d^2). Down-projection: 3 residual MLPs 2T.2d^2 each, then
  2T.(32d + 32^2).
- SANA DiT per layer over T latent tokens and S condition tokens, width d, FFN hidden
  h = 2.5d: linear self-attention 2T.4d^2 + 4T.d.(head_dim + 1) (K^T V with the
  normaliser row, then Q (K^T V)), cross-attention 2T.2d^2 + 2S.2d^2 + 4T.S.d, GLUMBConv
  2T.d.2h + 2T.2h.9 + 2T.h.d; plus the caption projection 2S.(c.d + d^2) once.
- Convolutional parts (DC-AE decoder and encoder, the LPIPS backbone, ConvNeXt-S, the
  discriminator): the real classes are built from their published configs on the meta
  device (no weights, no memory) and counted by torch's FLOP counter.

Training multiplies each part's forward by 3 when it is trained (forward, input and weight
gradients), by 2 when it is frozen but gradients pass through it (the frozen LLM under the
trainable queries, the frozen DiT in generation stage 1, the loss networks and the
discriminator under the decoder), and by 1 when it only runs forward; the loss networks
also run forward once on the real image. A part whose blocks are checkpointed
(`train.activation_checkpointing`) and that gradients cross runs its forward once more. Step time is FLOPs / (GPUs x peak x MFU):
the achievable fraction of peak (MFU) is an assumption, printed with the result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from jobs.performance.gpus import RENTED
from unilip.architectures import DCAE_F32C32_SANA_1_1, REAL_PRESETS
from unilip.config import ModelConfig
from unilip.errors import UserError

DEFAULT_MFU = 0.35  # sustained fraction of peak for mid-sized transformer training in bf16
# Images per second per CPU core decoding ~1024 px JPEGs to 448 px (BENCHMARKS.md, data plane)
DEFAULT_DECODE_RATE = 45.0
# Published sample counts of the recipes' sources (UNILIP_FACTS.md, the paper section 4.1)
SOURCE_SIZES = {
    "blip3o-long": 27_200_000,
    "blip3o-short": 4_770_000,
    "journeydb": 4_280_000,
    "gpt-image-edit": 1_500_000,
    "blip3o-60k": 60_000,
    "sharegpt-4o-t2i": 45_000,
    "sharegpt-4o-image": 46_000,
}
PAPER_GPUS = {"reconstruction": 4, "generation": 16}  # 4 A100s; 2 nodes x 8
PAPER_LATENCY_S = {"unilip-1b": 1.4, "unilip-3b": 1.7}  # Table 9, one A100, 20 steps, 448 px


@dataclass(frozen=True)
class Transformer:
    layers: int
    width: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp: int
    gated: bool  # SwiGLU (gate, up, down) or a two-matrix GELU MLP


@dataclass(frozen=True)
class SanaDiT:
    layers: int
    width: int
    head_dim: int
    mlp_ratio: float = 2.5
    caption_channels: int = 2304
    in_channels: int = 32


@dataclass(frozen=True)
class Architecture:
    vit: Transformer
    llm: Transformer
    dit: SanaDiT  # its in_channels: the 32-channel latent the down-projection makes
    patch: int  # the ViT's


def transformer(config: dict, gated: bool) -> Transformer:
    """The shape of an HF transformer config (a vision_config or text_config dict)."""
    heads = config["num_attention_heads"]
    return Transformer(
        config["num_hidden_layers"],
        config["hidden_size"],
        heads,
        config.get("num_key_value_heads", heads),
        config["hidden_size"] // heads,
        config["intermediate_size"],
        gated,
    )


def architecture(mllm: dict, dit: dict) -> Architecture:
    """The FLOPs model's view of a preset, from its published configs (`unilip.architectures`)."""
    return Architecture(
        vit=transformer(mllm["vision_config"], gated=False),  # InternViT: a two-matrix GELU MLP
        llm=transformer(mllm["text_config"], gated=True),  # Qwen2: SwiGLU
        dit=SanaDiT(
            dit["num_layers"],
            dit["num_attention_heads"] * dit["attention_head_dim"],
            dit["attention_head_dim"],
            dit["mlp_ratio"],
            dit["caption_channels"],
            dit["in_channels"],
        ),
        patch=mllm["vision_config"]["patch_size"][0],
    )


ARCHITECTURES = {name: architecture(mllm, dit) for name, (mllm, dit) in REAL_PRESETS.items()}


# ----------------------------------------------------------------------------- FLOPs


def transformer_flops(t: Transformer, tokens: int, layers: int | None = None) -> float:
    """Forward FLOPs of `layers` (default all) layers over `tokens` tokens, full attention."""
    q, kv = t.heads * t.head_dim, t.kv_heads * t.head_dim
    projections = 2 * tokens * t.width * (q + 2 * kv) + 2 * tokens * q * t.width
    attention = 4 * tokens * tokens * q
    mlp = 2 * tokens * t.width * t.mlp * (3 if t.gated else 2)
    return (t.layers if layers is None else layers) * (projections + attention + mlp)


def vit_flops(arch: Architecture, resolution: int) -> float:
    tokens = (resolution // arch.patch) ** 2 + 1
    return 2 * tokens * 3 * arch.patch**2 * arch.vit.width + transformer_flops(arch.vit, tokens)


def projector_flops(arch: Architecture, resolution: int) -> float:
    tokens, d = (resolution // (2 * arch.patch)) ** 2, arch.llm.width
    return 2 * tokens * (4 * arch.vit.width * d + d * d)


def down_proj_flops(arch: Architecture, resolution: int) -> float:
    tokens, d, c = (resolution // (2 * arch.patch)) ** 2, arch.llm.width, arch.dit.in_channels
    return 3 * 2 * tokens * 2 * d * d + 2 * tokens * (c * d + c * c)


def dit_flops(dit: SanaDiT, tokens: int, cond_tokens: int) -> float:
    """Forward FLOPs of one SANA DiT evaluation (patch size 1: tokens = latent pixels)."""
    d, h, T, S = dit.width, int(dit.mlp_ratio * dit.width), tokens, cond_tokens
    self_attn = 2 * T * 4 * d * d + 4 * T * d * (dit.head_dim + 1)
    cross_attn = 2 * T * 2 * d * d + 2 * S * 2 * d * d + 4 * T * S * d
    ffn = 2 * T * d * 2 * h + 2 * T * 2 * h * 9 + 2 * T * h * d
    io = 2 * S * (dit.caption_channels * d + d * d) + 2 * T * 2 * dit.in_channels * d
    return dit.layers * (self_attn + cross_attn + ffn) + io


def counted_flops(module, *inputs) -> float:
    """Forward FLOPs of a module counted by torch on meta tensors (shapes only)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(*(torch.empty(shape, device="meta") for shape in inputs))
    return float(counter.get_total_flops())


def on_meta(build):
    import torch

    with torch.device("meta"):
        return build()


def conv_part_flops(name: str, pixels: int, width: int = 128) -> float:
    """Forward FLOPs of a convolutional part: the DC-AE decoder rendering a `pixels` image
    (32x its latent), the DC-AE encoder, an LPIPS backbone ("lpips-vgg", "lpips-alex") or
    the discriminator (`width` channels) on a `pixels` image, ConvNeXt-S at its 224 px."""
    from diffusers import AutoencoderDC

    if name in ("dcae_decoder", "dcae_encoder"):
        dcae = on_meta(lambda: AutoencoderDC(**DCAE_F32C32_SANA_1_1))
        if name == "dcae_decoder":
            return counted_flops(dcae.decoder, (1, 32, pixels // 32, pixels // 32))
        return counted_flops(dcae.encoder, (1, 3, pixels, pixels))
    if name in ("lpips-vgg", "lpips-alex"):
        from torchvision.models import alexnet, vgg16

        return counted_flops(on_meta(vgg16 if name == "lpips-vgg" else alexnet).features, (1, 3, pixels, pixels))
    if name == "convnext":
        from torchvision.models import convnext_small

        return counted_flops(on_meta(convnext_small), (1, 3, 224, 224))
    if name == "discriminator":
        from unilip.losses import NLayerDiscriminator

        return counted_flops(on_meta(lambda: NLayerDiscriminator(width)), (1, 3, pixels, pixels))
    raise ValueError(f"unknown convolutional part {name!r}")


# ----------------------------------------------------------------------------- recipes


@dataclass
class Compute:
    name: str
    flops: float  # forward FLOPs per sample
    passes: float  # 1 forward only, 2 gradients pass through, 3 trained

    @property
    def train_flops(self) -> float:
        return self.flops * self.passes


def edit_fraction(recipe) -> float:
    """Share of editing samples under the recipe's sampling weights (published sizes)."""
    from pipelines.mix import effective_weights

    for s in recipe.data.sources:
        if s.name not in SOURCE_SIZES:
            raise UserError(f"no published size for source {s.name!r}; known: {', '.join(SOURCE_SIZES)}")
    weights = effective_weights(recipe.data.sources, SOURCE_SIZES)
    return sum(weights[s.name] for s in recipe.data.sources if s.task == "editing") / sum(weights.values())


def condition_tokens(arch: Architecture, edit: bool, prompt_tokens: int, num_queries: int) -> int:
    """LLM sequence: chat template + prompt, [<img> 256 x IMG_CONTEXT </img>], <img> + queries."""
    image = (448 // (2 * arch.patch)) ** 2 + 2 if edit else 0
    return prompt_tokens + image + 1 + num_queries


def recipe_parts(recipe, arch: Architecture, prompt_tokens: int = 64) -> list[Compute]:
    """Per-sample forward FLOPs and passes of every part a recipe's training step runs."""
    res, trained = recipe.data.resolution, set(recipe.train.trainable)
    checkpointed = set(recipe.train.activation_checkpointing)
    recompute = lambda component, passes: passes + 1 if component in checkpointed and passes >= 2 else passes  # noqa: E731
    if recipe.kind == "reconstruction":
        enc, loss = (3 if "encoder" in trained else 1), recipe.loss
        out = 32 * res // (2 * arch.patch)  # the pixel decoder renders 32x the latent, then resizes
        parts = [
            Compute("InternViT", vit_flops(arch, res), recompute("encoder", enc)),
            Compute("projector", projector_flops(arch, res), enc),
            Compute("down-projection", down_proj_flops(arch, res), 3),
            Compute("DC-AE decoder", conv_part_flops("dcae_decoder", out), recompute("pixel_decoder", 3)),
        ]
        if loss.lpips:  # the reconstruction (gradients pass) and the real image (forward)
            parts.append(Compute(f"LPIPS {loss.lpips_net}", conv_part_flops(f"lpips-{loss.lpips_net}", res), 3))
        if loss.convnext:
            parts.append(Compute("ConvNeXt-S", conv_part_flops("convnext", 224), 3))
        if loss.distill:  # the frozen original encoder for self-distillation
            parts.append(Compute("InternViT teacher", vit_flops(arch, res) + projector_flops(arch, res), 1))
        start = loss.gan_start_step
        if loss.gan and start is not None and start < recipe.train.steps:
            # the decoder's gradient passes through D (2), D trains on real and fake (2 x 3);
            # averaged over the steps the adversarial loss is on
            on = (recipe.train.steps - start) / recipe.train.steps
            parts.append(
                Compute(
                    "discriminator", conv_part_flops("discriminator", res, loss.discriminator_width), (2 + 2 * 3) * on
                )
            )
        return parts
    edit = edit_fraction(recipe)
    num_queries = recipe.model.num_queries
    seq = (1 - edit) * condition_tokens(arch, False, prompt_tokens, num_queries) + edit * condition_tokens(
        arch, True, prompt_tokens, num_queries
    )
    seq = round(seq)
    connector = Transformer(**{**arch.llm.__dict__, "layers": recipe.model.connector_layers})
    latent = 16 * 16  # the diffusion latent: UniLIP's of a 448 px image, or DC-AE's of a 512 px one
    target = (
        Compute("DC-AE encoder (target)", conv_part_flops("dcae_encoder", 512), 1)
        if recipe.model.latent_space == "dcae"
        else Compute(
            "UniLIP encoder (target)", vit_flops(arch, res) + projector_flops(arch, res) + down_proj_flops(arch, res), 1
        )
    )
    return [
        Compute("LLM", transformer_flops(arch.llm, seq), recompute("llm", 2 if "queries" in trained else 1)),
        Compute("InternViT (edit reference)", edit * (vit_flops(arch, res) + projector_flops(arch, res)), 1),
        Compute(
            "connector",
            transformer_flops(connector, seq) + 2 * seq * arch.llm.width * arch.dit.caption_channels,
            recompute("connector", 3),
        ),
        Compute("SANA DiT", dit_flops(arch.dit, latent, seq), recompute("dit", 3 if "dit" in trained else 2)),
        target,
    ]


def inference_flops(arch: Architecture, steps: int = 20, prompt_tokens: int = 64, num_queries: int = 256) -> float:
    """One 448 px text-to-image sample: LLM + connector and DiT for the CFG pair, then decode."""
    seq = condition_tokens(arch, False, prompt_tokens, num_queries)
    connector = Transformer(**{**arch.llm.__dict__, "layers": ModelConfig.connector_layers})
    condition = transformer_flops(arch.llm, seq) + transformer_flops(connector, seq)
    return 2 * condition + steps * 2 * dit_flops(arch.dit, 256, seq) + conv_part_flops("dcae_decoder", 512)


@dataclass
class Estimate:
    recipe: str
    preset: str
    gpus: int
    gpu: str
    mfu: float
    price: float
    decode_rate: float
    parts: list[Compute] = field(default_factory=list)
    steps: int = 0
    global_batch: int = 0
    images_per_sample: float = 1.0

    @property
    def flops_per_sample(self) -> float:
        return sum(p.train_flops for p in self.parts)

    @property
    def step_s(self) -> float:
        peak = RENTED[self.gpu].peak_tflops * 1e12
        return self.flops_per_sample * self.global_batch / (self.gpus * peak * self.mfu)

    @property
    def wall_h(self) -> float:
        return self.steps * self.step_s / 3600

    @property
    def gpu_hours(self) -> float:
        return self.wall_h * self.gpus

    @property
    def cost(self) -> float:
        return self.gpu_hours * self.price

    @property
    def images_per_s(self) -> float:
        """Images Ray Data must decode per second to keep the GPUs busy."""
        return self.global_batch / self.step_s * self.images_per_sample

    @property
    def decode_cores(self) -> int:
        return math.ceil(self.images_per_s / self.decode_rate)


def estimate_run(
    recipe_name: str,
    preset: str = "unilip-1b",
    gpus: int | None = None,
    gpu: str = "a100-80g",
    price: float | None = None,
    mfu: float = DEFAULT_MFU,
    decode_rate: float = DEFAULT_DECODE_RATE,
    prompt_tokens: int = 64,
    overrides: list[str] | None = None,
) -> Estimate:
    from jobs.training.recipes import load_recipe

    if preset not in ARCHITECTURES:
        raise UserError(f"no FLOPs model for preset {preset!r}; known: {', '.join(ARCHITECTURES)}")
    if gpu not in RENTED:
        raise UserError(f"unknown GPU {gpu!r}; known: {', '.join(RENTED)}")
    if not 0 < mfu <= 1:
        raise UserError(f"--mfu must be in (0, 1], got {mfu}")
    recipe = load_recipe(recipe_name, overrides)
    gpus = gpus or PAPER_GPUS[recipe.kind]
    if gpus < 1:
        raise UserError(f"--gpus must be at least 1, got {gpus}")
    plan = Estimate(recipe.name, preset, gpus, gpu, mfu, RENTED[gpu].price if price is None else price, decode_rate)
    plan.parts = recipe_parts(recipe, ARCHITECTURES[preset], prompt_tokens)
    plan.steps, plan.global_batch = recipe.train.steps, recipe.train.global_batch
    plan.images_per_sample = 1 + (edit_fraction(recipe) if recipe.kind == "generation" else 0)
    return plan


def _human(x: float, unit: str = "") -> str:
    for scale, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M")):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {suffix}{unit}"
    return f"{x:.0f} {unit}"


def format_estimate(plan: Estimate) -> str:
    lines = [
        f"== {plan.recipe} ({plan.preset}) on {plan.gpus} x {plan.gpu}: {plan.steps:,} steps x batch {plan.global_batch}"
    ]
    lines.append(f"  {'part':<28}{'fwd FLOPs/sample':>18}{'passes':>8}{'train FLOPs':>14}")
    for p in plan.parts:
        lines.append(f"  {p.name:<28}{_human(p.flops, 'FLOP'):>18}{p.passes:>8g}{_human(p.train_flops, 'FLOP'):>14}")
    lines += [
        f"  {'total per sample':<54}{_human(plan.flops_per_sample, 'FLOP'):>14}",
        f"  step time       {plan.step_s:8.2f} s",
        f"  wall clock      {plan.wall_h:8.1f} h ({plan.wall_h / 24:.1f} days)",
        f"  GPU hours       {plan.gpu_hours:8.0f}",
        f"  cost            {plan.cost:8,.0f} USD at {plan.price:.2f} USD per GPU-hour",
        f"  Ray Data        {plan.decode_cores:8d} CPU cores to decode {plan.images_per_s:.0f} images/s"
        f" at {plan.decode_rate:g} images/s per core",
    ]
    return "\n".join(lines)


def assumptions(plan: Estimate) -> str:
    peak = RENTED[plan.gpu].peak_tflops
    arch = ARCHITECTURES[plan.preset]
    latency = inference_flops(arch) / (peak * 1e12)
    paper = PAPER_LATENCY_S[plan.preset]
    return "\n".join(
        [
            "Assumptions:",
            f"  peak {peak:g} TFLOP/s bf16 dense per {plan.gpu}; achieved fraction (MFU) {plan.mfu:.0%} (--mfu)",
            "  prompts of 64 tokens; editing share from the recipe's proportions, or multipliers x published source sizes",
            f"  decode rate {plan.decode_rate:g} images/s per core (--decode-rate; `unilip bench data` measures it)",
            "  the paper reports no training wall clock or GPU hours, only the hardware: "
            "4 A100s (reconstruction), 2 nodes x 8 A100s (generation)",
            f"  inference check: one 448 px image (20 steps, CFG) is {_human(inference_flops(arch), 'FLOP')}, "
            f"{latency * 1000:.0f} ms at peak; the paper measures {paper} s on one A100 (Table 9), "
            f"i.e. {latency / paper:.1%} of peak at batch 1",
        ]
    )


def report(
    recipe: str,
    preset: str = "unilip-1b",
    overrides: list[str] | None = None,
    memory: bool = True,
    log=print,
    **options,
) -> None:
    """`unilip plan`: the estimate of a recipe (or `all` of them), with its per-GPU memory.
    `options`: `estimate_run`'s (gpus, gpu, price, mfu, decode_rate)."""
    import sys

    from jobs.performance.memory import format_memory, memory_estimate, meta_stage, verdicts
    from jobs.training.recipes import chain, load_recipe

    overrides = [f"model.preset={preset}", *(overrides or [])]
    for name in chain() if recipe == "all" else [recipe]:
        estimate = estimate_run(name, preset, overrides=overrides, **options)
        log(format_estimate(estimate))
        if memory:
            print(
                f"  (measuring {name}'s activations at real size on the meta device ...)", file=sys.stderr, flush=True
            )
            loaded = load_recipe(name, overrides)
            stage = meta_stage(loaded)
            mem = memory_estimate(loaded, estimate.gpus, stage=stage)
            log(format_memory(mem, verdicts(mem, loaded, stage)))
        log("")
    log(assumptions(estimate))
