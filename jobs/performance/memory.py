"""Per-GPU memory of a recipe's training step, before renting the GPUs.

    unilip plan recon-stage2-448 --gpus 4 --gpu a100-40g       (the memory table is part of the plan)
    unilip plan gen-stage2 --set train.zero_stage=3 --set train.activation_checkpointing=[dit]
    report = memory_estimate(load_recipe("gen-stage2", ["model.preset=unilip-1b"]), gpus=16)

Figures are per GPU for N data-parallel workers at the recipe's ZeRO stage (off with one
worker, as training runs it). Model states follow the ZeRO paper's accounting of
mixed-precision AdamW (Rajbhandari et al., 2020), per parameter:

- weights: 2 bytes (bf16; 4 in fp32 recipes) for every parameter of the trained module,
  the frozen ones too (DeepSpeed casts the whole module); / N under ZeRO-3;
- gradients: 2 bytes (4 in fp32) per trained parameter; / N from ZeRO-2;
- optimizer: 16 bytes per trained parameter, the fp32 master weights, AdamW's two moments
  and the fp32 gradient its step reads (fp32 recipes: 8, the two moments); / N from ZeRO-1;
- EMA: 4 bytes per trained parameter on every worker (the fp32 average that is exported);
- a gradient bucket under ZeRO-2/3: 2 bytes x min(5e8, trained parameters), DeepSpeed's
  default reduce bucket.

The loss networks are fp32 outside the trained module (`unilip.numerics`): LPIPS,
ConvNeXt-S and the distillation teacher at 4 bytes per parameter, the discriminator at 16
(weights, gradients, AdamW's moments). Activations are measured, not modelled: the
recipe's micro batch runs forward and backward at real size on the meta device
(`unilip.meta`), each gradient released as soon as it is accumulated (DeepSpeed moves it
into its bucket), and the peak of live tensor bytes is taken; for a generation recipe,
the larger of its tasks' micro batches (prompts of about 150 tokens). A reserve of 3 GiB
covers the CUDA context, NCCL's buffers and allocator fragmentation (an assumption).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

import torch

from jobs.performance.gpus import RENTED, GiB
from unilip.config import Recipe

RESERVE = 3 * GiB
BUCKET = 500_000_000  # DeepSpeed's default reduce_bucket_size, in elements
# What activation checkpointing can save per stage kind: the blocks gradients cross
CHECKPOINTABLE = {"reconstruction": ["encoder", "pixel_decoder"], "generation": ["llm", "connector", "dit"]}
# About 150 tokens, as BLIP3o's long captions
CAPTION = (
    "A sunlit kitchen with white cabinets and a wooden table, a bowl of red apples and a glass "
    "vase of tulips, morning light through a tall window, soft shadows, a photo. "
) * 3


@dataclass
class Component:
    name: str
    params: int
    trained: bool


@dataclass
class MemoryEstimate:
    recipe: str
    preset: str
    gpus: int
    zero: int
    precision: str
    micro_batch: int
    resolution: int
    parts: list[Component]  # the trained module (the UniLIP model), by component
    loss_nets: list[tuple[str, int, int]] = field(default_factory=list)  # (name, parameters, bytes per parameter)
    activations: int = 0
    checkpointing: list[str] = field(default_factory=list)

    @property
    def trained_params(self) -> int:
        return sum(p.params for p in self.parts if p.trained)

    def states(self, part: Component) -> dict[str, float]:
        """Bytes per GPU of one component: weights, gradients, optimizer, EMA."""
        n, z, bf16 = self.gpus, self.zero, self.precision == "bf16"
        width = 2 if bf16 else 4
        out = {"weights": part.params * width / (n if z >= 3 else 1), "gradients": 0.0, "optimizer": 0.0, "ema": 0.0}
        if part.trained:
            out["gradients"] = part.params * width / (n if z >= 2 else 1)
            out["optimizer"] = part.params * (16 if bf16 else 8) / (n if z >= 1 else 1)
            out["ema"] = part.params * 4
        return out

    @property
    def bucket(self) -> float:
        return 2 * min(BUCKET, self.trained_params) if self.zero >= 2 else 0.0

    @property
    def model_states(self) -> float:
        return sum(sum(self.states(p).values()) for p in self.parts) + self.bucket

    @property
    def loss_bytes(self) -> float:
        return sum(params * width for _, params, width in self.loss_nets)

    @property
    def total(self) -> float:
        return self.model_states + self.loss_bytes + self.activations + RESERVE


def component_parts(model, trainable: list[str]) -> list[Component]:
    """The trained module by component, and what else it holds (frozen: the LLM and its
    head, the DC-AE encoder), each tensor counted once."""
    from unilip.summary import count

    parts = [Component(name, count(module), name in trainable) for name, module in model.components().items()]
    rest = count(model) - sum(p.params for p in parts)
    return parts + [Component("llm, lm_head, dc-ae encoder", rest, False)]


def loss_networks(loss) -> list[tuple[str, int, int]]:
    from unilip.summary import count

    if loss is None:
        return []
    nets = [
        ("lpips", loss.lpips, 4),
        ("convnext-s", loss.convnext, 4),
        ("teacher", loss.teacher, 4),
        ("discriminator", loss.discriminator, 16),
    ]
    return [(name, count(net), width) for name, net, width in nets if net is not None]


def meta_stage(recipe: Recipe):
    """The recipe's stage (model, loss networks, optimizers) at real size on the meta
    device, the model in the training precision as DeepSpeed casts it, in train mode."""
    from jobs.training.loop import build_stage
    from unilip.config import apply_overrides

    recipe = apply_overrides(recipe, ["model.init=random", "loss.lpips_weights=null", "loss.convnext_weights=null"])
    stage = build_stage(recipe, None, None, "meta", throwaway=True)
    if recipe.train.precision == "bf16":
        stage.net.model.to(torch.bfloat16)
    stage.net.train()
    return stage


def micro_batches(recipe: Recipe, device="meta") -> list[tuple[str, dict]]:
    """(task, micro batch) for each task the recipe trains on, at its resolution and micro
    batch size: fp32 pixels as collated, prompts of about 150 tokens."""
    from unilip.prompts import edit_prompt, generation_prompt

    n, res = recipe.train.micro_batch, recipe.data.resolution
    pixels = lambda side: torch.randn(n, 3, side, side, device=device)  # noqa: E731
    if recipe.kind == "reconstruction":
        return [("reconstruction", {"pixel_values": pixels(res)})]
    out = [
        (
            "generation",
            {"task": ["generation"] * n, "prompt": [generation_prompt(CAPTION)] * n, "pixel_values": pixels(res)},
        )
    ]
    if any(s.task == "editing" for s in recipe.data.sources):
        out.append(
            (
                "editing",
                {
                    "task": ["editing"] * n,
                    "prompt": [edit_prompt(CAPTION)] * n,
                    "pixel_values": pixels(res),
                    "source_pixel_values": pixels(448),
                },
            )
        )  # edit references are read at 448 px
    return out


def adversarial_step(recipe: Recipe) -> int | None:
    """The first step with the adversarial loss on, if the recipe reaches it."""
    start = recipe.loss.gan_start_step
    on = recipe.kind == "reconstruction" and recipe.loss.gan > 0 and start is not None and start < recipe.train.steps
    return start if on else None


def micro_batch_step(stage, recipe: Recipe, batch: dict) -> dict:
    """One micro batch of the training step: the stage's loss forward and backward, and
    the discriminator's when the adversarial loss is on (at its first step)."""
    step = adversarial_step(recipe)
    terms = stage.net(batch, step or 0, random.Random(0), torch.Generator().manual_seed(0))
    terms["loss"].backward()
    if step is not None:
        stage.loss.discriminator_terms(terms["recon"], batch["pixel_values"])["critic"].backward()
    return terms


def activation_peak(stage, recipe: Recipe) -> int:
    """Peak bytes of the step's tensors over forward and backward, the largest micro batch."""
    from unilip.meta import meta_run

    params = [p for p in stage.net.parameters() if p.requires_grad]
    if stage.loss is not None and stage.loss.discriminator is not None:
        params += list(stage.loss.discriminator.parameters())
    release = lambda p: setattr(p, "grad", None)  # noqa: E731
    hooks = [p.register_post_accumulate_grad_hook(release) for p in params]
    try:
        peaks = []
        for _, batch in micro_batches(recipe):
            with meta_run() as run:
                micro_batch_step(stage, recipe, batch)
            peaks.append(run.peak)
        return max(peaks)
    finally:
        for h in hooks:
            h.remove()


def memory_estimate(recipe: Recipe, gpus: int, checkpointing: list[str] | None = None, stage=None) -> MemoryEstimate:
    """The per-GPU memory of `recipe` on `gpus` workers, with the `checkpointing` blocks
    checkpointed besides the recipe's (a stage built before may be passed to reuse it)."""
    from jobs.training.optim import zero_stage

    tc = recipe.train
    stage = stage or meta_stage(recipe)
    checkpointing = list(dict.fromkeys([*tc.activation_checkpointing, *(checkpointing or [])]))
    stage.net.model.set_activation_checkpointing(checkpointing)
    return MemoryEstimate(
        recipe.name,
        recipe.model.preset,
        gpus,
        zero_stage(tc, gpus),
        tc.precision,
        tc.micro_batch,
        recipe.data.resolution,
        component_parts(stage.net.model, tc.trainable),
        loss_networks(stage.loss),
        activation_peak(stage, recipe),
        checkpointing,
    )


def verdicts(plan: MemoryEstimate, recipe: Recipe, stage=None) -> list[str]:
    """Per GPU kind: "fits", or what would make it fit (activation checkpointing of the
    blocks gradients cross, ZeRO-3, both; measured or computed when first needed), or the
    micro batch that would."""
    remedies: list[tuple[str, MemoryEstimate]] = []

    def remedy_plans():
        if remedies:
            return remedies
        blocks = CHECKPOINTABLE[recipe.kind] if recipe is not None else []
        if not set(blocks) <= set(plan.checkpointing):
            everything = memory_estimate(recipe, plan.gpus, blocks, stage)
            remedies.append(
                (f"activation checkpointing (train.activation_checkpointing=[{','.join(blocks)}])", everything)
            )
        else:
            everything = plan
        if plan.gpus > 1 and plan.zero < 3:
            remedies.append(("ZeRO-3 (train.zero_stage=3)", replace(plan, zero=3)))
            remedies.append(("ZeRO-3 and activation checkpointing", replace(everything, zero=3)))
        return remedies

    lines = []
    for kind, gpu in RENTED.items():
        capacity = gpu.memory
        if plan.total <= capacity:
            lines.append(f"fits on {kind} ({plan.total / GiB:.1f} of {capacity / GiB:.1f} GiB)")
            continue
        options = remedy_plans()
        fixes = [f"{name}: {p.total / GiB:.1f} GiB" for name, p in options if p.total <= capacity]
        if fixes:
            fix = f"use {fixes[0]}"
        else:
            best = options[-1][1] if options else plan
            fix = f"{'activation checkpointing and ZeRO-3 are not enough' if options else 'nothing else to shard or checkpoint'}: {smaller_batch(best, capacity)}"
        lines.append(f"does not fit on {kind} ({plan.total / GiB:.1f} of {capacity / GiB:.1f} GiB): {fix}")
    return lines


def smaller_batch(plan: MemoryEstimate, capacity: float) -> str:
    """The micro batch that would fit, activations taken as proportional to it."""
    room = capacity - (plan.total - plan.activations)
    fits = int(plan.micro_batch * room / plan.activations) if room > 0 and plan.activations else 0
    if fits < 1:
        return "more GPUs (the model states alone do not fit)"
    return f"a micro batch of {fits} or less with those (activations scale with it)"


def format_memory(plan: MemoryEstimate, verdict_lines: list[str]) -> str:
    g = lambda b: f"{b / GiB:8.2f}"  # noqa: E731
    ckpt = ", ".join(plan.checkpointing) or "none"
    lines = [
        f"  memory per GPU (GiB): {plan.gpus} workers, ZeRO-{plan.zero}, {plan.precision}, micro batch "
        f"{plan.micro_batch} at {plan.resolution} px, activation checkpointing: {ckpt}",
        f"    {'component':<38}{'params':>14}{'weights':>9}{'grads':>9}{'optim':>9}{'EMA':>9}",
    ]
    for p in plan.parts:
        s = plan.states(p)
        label = f"{p.name} ({'trained' if p.trained else 'frozen'})"
        lines.append(
            f"    {label:<38}{p.params:>14,}{g(s['weights'])}{g(s['gradients'])}{g(s['optimizer'])}{g(s['ema'])}"
        )
    if plan.bucket:
        lines.append(f"    {'gradient bucket (ZeRO-2/3)':<52}{g(plan.bucket)}")
    for name, params, width in plan.loss_nets:
        lines.append(f"    {name + ' (loss, fp32)':<38}{params:>14,}{g(params * width)}")
    lines += [
        f"    {'activations (measured)':<52}{g(plan.activations)}",
        f"    {'reserve (CUDA, NCCL, fragmentation)':<52}{g(RESERVE)}",
        f"    {'total':<52}{g(plan.total)}",
    ]
    return "\n".join(lines + [f"  {v}" for v in verdict_lines])
