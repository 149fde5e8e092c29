"""Optimisation shared by every stage: lr schedule, parameter groups, EMA, DeepSpeed config."""

from __future__ import annotations

import math

import torch
from torch import nn

from unilip.config import ConfigError, TrainConfig


def lr_at(step: int, cfg: TrainConfig, start: int = 0) -> float:
    """Linear warmup to `lr`, then cosine decay to `min_lr` at the last step (step counts
    from 0). A schedule that begins at `start` (the discriminator's, at the GAN start, as
    in the release) warms up from there and spans the remaining steps; 0 before it."""
    step -= start
    if step < 0:
        return 0.0
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - start - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def adamw_groups(groups: list[dict], weight_decay: float) -> list[dict]:
    """Split each component's group into decayed (matrices, convolutions) and undecayed
    (norms, biases, and the InternViT patch and position embeddings, as the release has it)."""
    out = []
    for g in groups:
        named = g.get("named") or [(str(i), p) for i, p in enumerate(g["params"])]
        undecayed = {id(p) for n, p in named if p.ndim < 2 or "embed" in n}
        for decay, params in (
            (weight_decay, [p for p in g["params"] if id(p) not in undecayed]),
            (0.0, [p for p in g["params"] if id(p) in undecayed]),
        ):
            if params:
                out.append({"name": g["name"], "params": params, "lr_scale": g["lr_scale"], "weight_decay": decay})
    return out


def gradient_accumulation(cfg: TrainConfig, workers: int) -> int:
    """global batch = workers x micro batch x accumulation; refuse what does not divide."""
    per_step = workers * cfg.micro_batch
    if cfg.global_batch % per_step:
        raise ConfigError(
            f"train.global_batch {cfg.global_batch} is not a multiple of workers x micro_batch "
            f"= {workers} x {cfg.micro_batch}"
        )
    return cfg.global_batch // per_step


def zero_stage(cfg: TrainConfig, workers: int) -> int:
    """ZeRO shards state over data-parallel workers; with one worker there is nothing to
    shard, and its bookkeeping cost about 10% per step in `unilip bench train`: stage 0."""
    return cfg.zero_stage if workers > 1 else 0


def own_clipping(cfg: TrainConfig, workers: int) -> bool:
    """DeepSpeed's ZeRO and bf16 optimizers clip the gradients and report their global norm;
    its fp32 path without ZeRO (one worker) clips and discards the norm. There the training
    loop clips instead (`torch.nn.utils.clip_grad_norm_`, the same clipping), and so logs the
    norm on one worker as on many."""
    return zero_stage(cfg, workers) == 0 and cfg.precision == "fp32"


def deepspeed_config(cfg: TrainConfig, workers: int) -> dict:
    return {
        "train_batch_size": cfg.global_batch,
        "train_micro_batch_size_per_gpu": cfg.micro_batch,
        "gradient_accumulation_steps": gradient_accumulation(cfg, workers),
        "gradient_clipping": 0.0 if own_clipping(cfg, workers) else cfg.grad_clip,
        "zero_optimization": {"stage": zero_stage(cfg, workers)},
        "bf16": {"enabled": cfg.precision == "bf16"},
        "zero_allow_untested_optimizer": True,  # torch AdamW: no compiled op needed
        "steps_per_print": 2**31,
    }


def ema_decay(update: int, ceiling: float) -> float:
    """The release's EMA warmup: the n-th update (from 1) averages with decay
    min((1 + k) / (10 + k), ceiling), k = n - 1; the first one copies the weights."""
    k = update - 1
    return 0.0 if k <= 0 else min((1 + k) / (10 + k), ceiling)


class EMA:
    """Exponential moving average of the trainable parameters, in fp32 (exported weights).

    Under ZeRO-3 the parameters are partitioned; `gathered` assembles them for the update."""

    def __init__(self, named: dict[str, nn.Parameter], decay: float):
        self.named, self.decay = named, decay
        with gathered(list(named.values())):
            self.shadow = {n: p.detach().float().clone() for n, p in named.items()}

    @torch.no_grad()
    def update(self, update: int) -> None:
        """The `update`-th average (from 1: one per optimizer step, so a resume knows it)."""
        decay = ema_decay(update, self.decay)
        with gathered(list(self.named.values())):
            for n, p in self.named.items():
                self.shadow[n].lerp_(p.detach().float(), 1.0 - decay)

    @torch.no_grad()
    def copy_to_params(self) -> None:
        """Put the fp32 averages in place of the (gathered) parameters, whatever their
        training dtype, for the export that ends a run: call inside `gathered(...)`."""
        for n, p in self.named.items():
            p.data = self.shadow[n].to(p.device).clone()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} parameters, e.g. {sorted(missing)[0]}")
        for n in self.shadow:
            self.shadow[n].copy_(state[n])


def gathered(params: list[nn.Parameter]):
    """Full parameters inside the block (a no-op unless they are ZeRO-3 partitioned)."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(params)
