"""What a GPU does with the model: a training step per recipe and 448 px sampling, timed.

    unilip bench model --preset unilip-1b --init random --device cuda --json bench-1b.json
    python -m cli bench model --preset unilip-3b --init random --device cuda   # from a source tree
    unilip bench model --preset tiny --device cpu --batches 1,2 --inference-steps 2  # the suite's smoke test

It imports torch, transformers, diffusers, safetensors, tokenizers and pillow (and numpy
and pyyaml, which transformers brings), never Ray, DeepSpeed or MLflow, so it runs on a
bare GPU machine with the project's source tree. With `lpips` and `torchvision` missing the
reconstruction steps leave the LPIPS and ConvNeXt terms out (and out of the FLOPs), and say so.

Training: for each recipe, one optimizer step of its per-GPU micro batch as the training
loop runs it on one GPU: the model in bf16, the stage's loss (fp32 loss networks), and
DeepSpeed's bf16 optimizer reproduced with plain torch: fp32 master weights, fused AdamW,
gradient clipping, the bf16 weights refreshed from the masters. Timed after warm-up steps,
with step time, samples/s, MFU (`jobs.performance.plan`'s FLOPs of the step over the GPU's dense bf16
peak; HFU adds the recompute of checkpointed blocks) and peak GPU memory. A generation recipe's step is the mean of its tasks' micro batches
weighted by their share. Inference: `generate` and `edit` at 448 px, 20 steps, CFG, at
batch 1, 4 and 8: seconds per image, against the paper's A100 latency (Table 9).
"""

from __future__ import annotations

import importlib.util
import platform
import time
from dataclasses import replace

import torch

from jobs.performance.gpus import by_device_name
from jobs.performance.memory import CAPTION, adversarial_step, micro_batch_step, micro_batches
from jobs.performance.plan import ARCHITECTURES, PAPER_LATENCY_S, edit_fraction, recipe_parts
from unilip.errors import UserError
from unilip.prompts import generation_prompt

# Dense bf16 peak TFLOP/s by the device name CUDA reports (SXM parts unless the name says PCIe)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    gpu = by_device_name(torch.cuda.get_device_name(device))
    return gpu.peak_tflops if gpu else None


def bench_recipe(name: str, preset: str, init: str, device: torch.device, steps: int, warmup: int) -> dict:
    from jobs.training.loop import build_stage
    from jobs.training.recipes import load_recipe

    overrides = [
        f"model.preset={preset}",
        f"model.init={init}",
        "loss.lpips_weights=null",
        "loss.convnext_weights=null",
    ]
    missing = [m for m in ("lpips", "torchvision") if importlib.util.find_spec(m) is None]
    if missing:
        overrides += ["loss.lpips=0", "loss.convnext=0"]
    recipe = load_recipe(name, overrides, variant="tiny" if preset == "tiny" else None)
    stage = build_stage(recipe, None, None, device, throwaway=True)
    model, tc = stage.net.model, recipe.train
    model.to(torch.bfloat16)  # as DeepSpeed casts the module; the loss networks stay fp32
    stage.net.train()
    params = [p for p in model.parameters() if p.requires_grad]
    master = [p.detach().float().clone() for p in params]
    opt = torch.optim.AdamW(master, lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay, fused=True)
    batches = micro_batches(recipe, device)
    share = edit_fraction(recipe) if preset in ARCHITECTURES and len(batches) > 1 else 0.5
    weights = {"editing": share, "generation": 1 - share} if len(batches) > 1 else {batches[0][0]: 1.0}
    n, res = tc.micro_batch, recipe.data.resolution

    def one_step(batch: dict) -> None:
        micro_batch_step(stage, recipe, batch)
        if stage.critic_optimizer is not None and adversarial_step(recipe) is not None:
            stage.critic_optimizer.step()
            stage.critic_optimizer.zero_grad(set_to_none=True)
        for m, p in zip(master, params):  # DeepSpeed's bf16 optimizer: fp32 gradients and masters
            m.grad = None if p.grad is None else p.grad.float()
            p.grad = None
        torch.nn.utils.clip_grad_norm_(master, tc.grad_clip, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_copy_(params, master)

    times = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for task, batch in batches:
        for _ in range(warmup):
            one_step(batch)
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            one_step(batch)
        sync(device)
        times[task] = (time.perf_counter() - start) / steps
    step_s = sum(times[t] * w for t, w in weights.items())
    row = {
        "recipe": name,
        "micro_batch": n,
        "resolution": res,
        "step_s": step_s,
        "samples_per_s": n / step_s,
        "task_step_s": times,
        "trained_params": sum(p.numel() for p in params),
        "flops_per_sample": None,
        "executed_flops_per_sample": None,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "left_out": [f"lpips, convnext ({', '.join(missing)} not installed)"]
        if missing and recipe.kind == "reconstruction"
        else [],
    }
    if preset in ARCHITECTURES:  # the FLOPs model at the benchmark's prompt length
        prompt_tokens = len(model.generator.tokens(generation_prompt(CAPTION), 0)[0]) - 1 - recipe.model.num_queries
        row["flops_per_sample"], row["executed_flops_per_sample"] = step_flops(recipe, preset, prompt_tokens)
    return row


def step_flops(recipe, preset: str, prompt_tokens: int) -> tuple[float, float]:
    """Training FLOPs per sample: the model's (what MFU counts) and those executed, with
    the recompute of checkpointed blocks (HFU)."""
    flops = lambda r: sum(p.train_flops for p in recipe_parts(r, ARCHITECTURES[preset], prompt_tokens))  # noqa: E731
    return flops(replace(recipe, train=replace(recipe.train, activation_checkpointing=[]))), flops(recipe)


def bench_inference(
    preset: str, init: str, device: torch.device, batches: list[int], steps: int, repeats: int
) -> list[dict]:
    from PIL import Image

    from unilip.config import ModelConfig
    from unilip.model import UniLIP

    model = UniLIP.from_preset(
        preset, ModelConfig(preset=preset, init=init), device=device if init == "random" else None
    )
    model.for_inference(device)  # bf16 on CUDA
    photo = Image.new("RGB", (640, 480), (120, 80, 40))
    calls = {
        "generation": lambda b, s: model.generate_tensors([CAPTION] * b, steps=steps, seed=[s + i for i in range(b)]),
        "editing": lambda b, s: model.edit_tensors(
            [photo] * b, ["Make it black and white."] * b, steps=steps, seed=[s + i for i in range(b)]
        ),
    }
    rows = []
    for task, call in calls.items():
        for b in batches:
            call(b, 0)  # warm-up (kernels, allocator, autotuning)
            sync(device)
            start = time.perf_counter()
            for r in range(repeats):
                call(b, r + 1)
            sync(device)
            per_image = (time.perf_counter() - start) / (repeats * b)
            rows.append({"task": task, "batch": b, "steps": steps, "s_per_image": per_image})
    for row in rows:
        one = next(r for r in rows if r["task"] == row["task"] and r["batch"] == batches[0])
        row["vs_batch_1"] = row["s_per_image"] / one["s_per_image"]
    return rows


def run_model_bench(
    preset: str = "unilip-1b",
    init: str = "random",
    device: str | None = None,
    recipes: list[str] | None = None,
    batches: list[int] | None = None,
    inference_steps: int = 20,
    train_steps: int = 3,
    warmup: int = 1,
    repeats: int = 2,
    peak: float | None = None,
    log=print,
) -> dict:
    from jobs.training.recipes import chain
    from unilip.numerics import default_device

    device = torch.device(device) if device else default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: this machine's torch sees no CUDA device")
    recipes = recipes or chain()
    unknown = sorted(set(recipes) - set(chain()))
    if unknown:
        raise UserError(f"unknown recipe(s) {unknown}; the recipes: {', '.join(chain())}")
    batches = batches or [1, 4, 8]
    if any(b < 1 for b in batches) or train_steps < 1 or inference_steps < 1:
        raise UserError("--batches, --train-steps and --inference-steps must be positive")
    tflops = peak_tflops(device, peak)
    machine = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "peak_tflops_bf16": tflops,
        "preset": preset,
        "init": init,
    }
    log(f"[bench model] {preset} ({init} weights) on {machine['device']}, torch {torch.__version__}")
    train = []
    for name in recipes:
        start = time.perf_counter()
        row = bench_recipe(name, preset, init, device, train_steps, warmup)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the stage is gone; give its blocks back before the next one
        if tflops and row["flops_per_sample"]:  # model FLOPs (MFU) and those executed, recompute included (HFU)
            row["mfu"] = row["flops_per_sample"] * row["samples_per_s"] / (tflops * 1e12)
            row["hfu"] = row["executed_flops_per_sample"] * row["samples_per_s"] / (tflops * 1e12)
        train.append(row)
        log(f"[bench model] {name}: {row['step_s']:.3f} s/step ({time.perf_counter() - start:.0f} s with the build)")
    inference = bench_inference(preset, init, device, batches, inference_steps, repeats)
    report = {
        "machine": machine,
        "train": train,
        "inference": inference,
        "paper_latency_s": PAPER_LATENCY_S.get(preset),
    }
    log(format_report(report))
    return report


def format_report(report: dict) -> str:
    m = report["machine"]
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    lines = [
        f"training, one optimizer step, bf16, fused AdamW ({m['device']}, peak {fmt(m['peak_tflops_bf16'], 'g')} TFLOP/s)",
        f"  {'recipe':<18}{'micro':>6}{'px':>5}{'s/step':>9}{'samples/s':>11}{'MFU':>7}{'HFU':>7}{'peak GiB':>10}  left out",
    ]
    for r in report["train"]:
        lines.append(
            f"  {r['recipe']:<18}{r['micro_batch']:>6}{r['resolution']:>5}{r['step_s']:>9.3f}{r['samples_per_s']:>11.1f}"
            f"{fmt(r.get('mfu'), '.1%'):>7}{fmt(r.get('hfu'), '.1%'):>7}{fmt(r['peak_memory_gib'], '.1f'):>10}  {'; '.join(r['left_out']) or '-'}"
        )
    paper = report["paper_latency_s"]
    lines.append(f"inference, 448 px, CFG{f' (paper: {paper} s per image on one A100)' if paper else ''}")
    lines.append(f"  {'task':<12}{'batch':>6}{'steps':>6}{'s/image':>10}{'vs batch 1':>12}")
    for r in report["inference"]:
        lines.append(
            f"  {r['task']:<12}{r['batch']:>6}{r['steps']:>6}{r['s_per_image']:>10.3f}{r['vs_batch_1']:>11.2f}x"
        )
    return "\n".join(lines)
