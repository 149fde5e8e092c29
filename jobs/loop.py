"""The one training loop: every stage, on every Ray Train worker, under DeepSpeed.

Started by `jobs/train.py` (`unilip train RECIPE`), which passes the recipe, the run's
storage and tracking settings and the data plan as `config`. Per optimizer step
(`optimizer_step`):

    for each of `accumulation` micro batches:      (global = workers x micro x accumulation)
        batch <- this worker's slot of the step plan (single-task micro batches; the
                 step mixes the tasks at their ratio, pipelines.mix), prepared ahead
                 in a thread (data.worker_prefetch) and moved to the device as uint8
        loss  <- StageNet: the model in the training precision; reconstruction terms
                 (fp32 loss networks, unilip.losses) or the rectified-flow loss
        engine.backward(loss); engine.step()       (DeepSpeed: ZeRO, clipping, bf16)
        the discriminator's own loss, when the adversarial loss is on
    the discriminator's step (fp32, its own AdamW and lr schedule from the GAN start)
    EMA update (the release's warmup); samples of the step recorded as consumed
    every log_every: the interval's means of the terms and timings (train/data_wait_s,
        train/host_s), over workers, read from the device once (rank 0 -> MLflow), a progress line
    every eval_every: PSNR/SSIM or sample grids; every checkpoint_every: a checkpoint
At the end the EMA weights are exported as a model directory and registered in MLflow.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from jobs.checkpoint import DS_TAG, load_critic, load_rng_state, rng_state, safe_checkpoint_engine, save_critic, train_state
from jobs.optim import EMA, adamw_groups, deepspeed_config, gathered, gradient_accumulation, lr_at, set_lr, zero_stage
from unilip.config import LossConfig, Recipe, S3Config, from_dict
from unilip.losses import TERMS, ReconstructionLoss
from unilip.model import UniLIP

# What a step reports, per stage kind (every worker reports the same names: they are averaged)
STEP_TERMS = {"reconstruction": ("loss", *TERMS, "critic", "lecam"), "generation": ("loss", "flow_generation", "flow_editing")}


class StageNet(nn.Module):
    """What DeepSpeed trains: the model, whose forward is the stage's loss on one micro batch.

    The reconstruction loss is not a submodule: its networks stay fp32 (never cast by
    DeepSpeed), and its discriminator trains with its own optimizer."""

    def __init__(self, model: UniLIP, kind: str, loss: ReconstructionLoss | None = None):
        super().__init__()
        self.model, self.kind, self.loss = model, kind, [loss]

    def forward(self, batch: dict, step: int, rng: random.Random, generator: torch.Generator) -> dict:
        if self.kind == "reconstruction":
            return self.model.reconstruction_terms(batch["pixel_values"], self.loss[0], step)
        total, terms = 0.0, {}
        for task in ("generation", "editing"):
            rows = [i for i, t in enumerate(batch["task"]) if t == task]
            if not rows:
                continue
            prompts = [batch["prompt"][i] for i in rows]
            ref = batch["source_pixel_values"] if task == "editing" else None  # the editing rows' inputs, in order
            loss = self.model.generation_loss(prompts, batch["pixel_values"][rows], ref, rng, generator)
            terms[f"flow_{task}"] = loss
            total = total + loss * len(rows) / len(batch["task"])
        terms["loss"] = total
        return terms


def build_model(recipe: Recipe, init_from: str | None, s3, device=None) -> UniLIP:
    """The stage's starting point: the previous stage's export, or the preset's sources
    (built on `device`: `meta` for shapes and memory without weights)."""
    from unilip.artifacts import fetch_model

    teacher = recipe.kind == "reconstruction" and recipe.loss.distill > 0
    if init_from:
        return UniLIP.from_pretrained(fetch_model(init_from, s3), teacher=teacher, cfg=recipe.model)
    return UniLIP.from_preset(recipe.model.preset, recipe.model, teacher=teacher, device=device)


def local_loss_config(cfg: LossConfig, s3) -> LossConfig:
    """The loss config with the weight files of the terms that are on fetched (s3:// -> the local cache)."""
    from unilip.artifacts import fetch_file

    fetch = lambda weight, uri: str(fetch_file(uri, s3)) if weight and uri else None  # noqa: E731
    return dataclasses.replace(cfg, lpips_weights=fetch(cfg.lpips, cfg.lpips_weights),
                               convnext_weights=fetch(cfg.convnext, cfg.convnext_weights))  # fmt: skip


@dataclasses.dataclass
class Stage:
    net: StageNet
    optimizer: torch.optim.Optimizer  # the model's (handed to DeepSpeed)
    critic_optimizer: torch.optim.Optimizer | None  # the discriminator's

    @property
    def loss(self) -> ReconstructionLoss | None:
        return self.net.loss[0]


def build_stage(recipe: Recipe, init_from: str | None, s3, device, throwaway: bool = False) -> Stage:
    """The stage's network, the AdamW over its trainable parameter groups, and for a stage
    with an adversarial loss the discriminator's AdamW (weight decay on its weights only).
    Seeded: identical initial weights on every worker, built on the CPU (the same values
    whatever the device) and moved. `throwaway`: weights nobody keeps (shapes and memory on
    `meta`, benchmarks), built on `device` directly, random perceptual backbones allowed."""
    tc = recipe.train
    torch.manual_seed(tc.seed)
    model = build_model(recipe, init_from, s3, device if throwaway else None)
    model.set_trainable(tc.trainable)
    model.set_activation_checkpointing(tc.activation_checkpointing)
    groups = adamw_groups(model.param_groups(tc.lr_scales), tc.weight_decay)
    loss = None
    if recipe.kind == "reconstruction":
        loss = model.reconstruction_loss(local_loss_config(recipe.loss, s3), allow_random_backbones=throwaway)
    net = StageNet(model, recipe.kind, loss).to(device)
    critic_opt = None
    if loss is not None:
        loss.to(device)
        if loss.discriminator is not None:
            d_groups = [{"name": "discriminator", "params": list(loss.discriminator.parameters()),
                         "named": list(loss.discriminator.named_parameters()), "lr_scale": 1.0}]  # fmt: skip
            critic_opt = torch.optim.AdamW(adamw_groups(d_groups, tc.weight_decay), lr=tc.lr, betas=tuple(tc.betas))
    return Stage(net, torch.optim.AdamW(groups, lr=tc.lr, betas=tuple(tc.betas)), critic_opt)


def optimizer_step(engine, stage: Stage, micro_batches, step: int, recipe: Recipe, world: int,
                   rng: random.Random, generator: torch.Generator, device) -> dict[str, torch.Tensor]:  # fmt: skip
    """One optimizer step over collated micro batches (a sized iterable: `pipelines.mix.StepData` draws
    each as it is needed): the model through DeepSpeed, then
    the discriminator (when the adversarial loss is on at `step`). Returns this worker's
    terms, each the mean over the micro batches that had it, as tensors where they were
    computed: reading them here would make the host wait for the device every step."""
    tc, loss = recipe.train, stage.loss
    set_lr(stage.optimizer, lr_at(step, tc))
    critic_on = loss is not None and loss.gan_active(step)
    sums: dict[str, list[torch.Tensor]] = {}
    for batch in micro_batches:
        terms = engine(batch, step, rng, generator)
        engine.backward(terms["loss"])
        engine.step()
        if critic_on:
            d_terms = loss.discriminator_terms(terms["recon"], batch["pixel_values"])
            (d_terms["critic"] / len(micro_batches)).backward()
            terms |= d_terms
        for k, v in terms.items():
            if k != "recon":
                sums.setdefault(k, []).append(v.detach().float())
    if critic_on:
        set_lr(stage.critic_optimizer, lr_at(step, tc, start=recipe.loss.gan_start_step))
        critic_step(loss.discriminator, stage.critic_optimizer, tc.grad_clip, world)
    return {k: torch.stack(v).mean() for k, v in sums.items()}


class IntervalMeans:
    """The named values of each step (loss terms as device tensors, timings as floats)
    summed where they are over a log interval, then averaged over the interval's steps
    and the workers that had them, and read to the host once (`read`, a collective)."""

    def __init__(self, names: tuple[str, ...], device):
        self.names, self.device = names, device
        self.index = {n: i for i, n in enumerate(names)}
        self._reset()

    def _reset(self) -> None:
        self.sums = torch.zeros(len(self.names), dtype=torch.float64, device=self.device)
        self.host_sums = [0.0] * len(self.names)
        self.counts = [0] * len(self.names)

    def add(self, values: dict[str, torch.Tensor | float]) -> None:
        for name, value in values.items():
            i = self.index[name]
            if isinstance(value, torch.Tensor):
                self.sums[i] += value  # on the device: no wait for it
            else:
                self.host_sums[i] += value  # a timing: no kernel launch for it
            self.counts[i] += 1

    def read(self) -> dict[str, float]:
        """The interval's means (every worker calls it); starts the next interval."""
        host = torch.tensor([self.host_sums, self.counts], dtype=torch.float64).to(self.device)
        values = torch.stack([self.sums + host[0], host[1]])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(values)
        sums, counts = values.tolist()  # the interval's one read of the device
        self._reset()
        return {n: s / c for n, s, c in zip(self.names, sums, counts) if c}


def train_loop(config: dict) -> None:
    import deepspeed
    import ray
    import ray.train

    from jobs.evaluate import evaluate, load_eval_images
    from jobs.tracking import Tracker, image_grid
    from pipelines.ingest import REST, SourcePlan, layout, worker_mixer
    from pipelines.mix import StepData, collate, prepared
    from pipelines.position import Position
    from unilip.s3 import s3_access

    recipe: Recipe = from_dict(Recipe, config["recipe"])
    tc = recipe.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    s3 = s3_access(from_dict(S3Config, config["s3"]))
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    log = print if rank == 0 else (lambda *a, **k: None)
    accumulation = gradient_accumulation(tc, world)

    # The data position first, then the mixer: its reading threads start the datasets
    # streaming while the model and its engine are built.
    plan = {n: SourcePlan(**p) for n, p in config["plan"].items()}
    step, run_id, mixer_state, position = 0, None, None, Position(layout(plan))
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        state = train_state(checkpoint)
        step, run_id, mixer_state = state["step"], state["mlflow_run_id"], state["mixer"]
        position = Position(layout(plan), state["position"])
    shards = {n: ray.train.get_dataset_shard(n) for n in plan}
    rest = {n: ray.train.get_dataset_shard(n + REST) for n in plan}
    mixer = worker_mixer(plan, shards, tc.micro_batch, recipe.data.batch_mode, recipe.data.seed, rank, world,
                         accumulation, rest=rest, state=mixer_state, epochs=position.epochs,
                         local_shuffle=recipe.data.worker_shuffle_buffer, pin_memory=device.type == "cuda")  # fmt: skip
    mixer_state = mixer.state()  # the state of the last step trained, saved by a checkpoint
    micro_batches = prepared(mixer, accumulation, recipe.data.worker_prefetch)

    stage = build_stage(recipe, config["init_from"], s3, device)
    model, loss = stage.net.model, stage.loss
    engine, *_ = deepspeed.initialize(model=stage.net, optimizer=stage.optimizer, config=deepspeed_config(tc, world))
    engine.checkpoint_engine = safe_checkpoint_engine()
    trainable = {n: p for n, p in engine.module.named_parameters() if p.requires_grad}
    ema = EMA(trainable, tc.ema_decay)
    log(f"[{recipe.name}] {world} workers on {device.type}, {torch.get_num_threads()} torch threads each, "
        f"micro batch {tc.micro_batch} x {accumulation} accumulation, ZeRO-{zero_stage(tc, world)}, {tc.precision}")  # fmt: skip
    if model.cfg.dit_pos_embed != recipe.model.dit_pos_embed:
        log(f"[{recipe.name}] DiT positional embedding {model.cfg.dit_pos_embed!r}, as the starting model's generator "
            f"was trained (the recipe's {recipe.model.dit_pos_embed!r} applies to a DiT fresh from its source)")  # fmt: skip

    # Sampling randomness (CFG drops, noise, timesteps) differs per worker, and is checkpointed.
    rng = random.Random(tc.seed * 1000 + rank)
    generator = torch.Generator().manual_seed(tc.seed * 1000 + rank)
    if checkpoint:
        with checkpoint.as_directory() as d:
            d = Path(d)
            engine.load_checkpoint(str(d), tag=DS_TAG, load_module_strict=False)
            from safetensors.torch import load_file

            ema.load_state_dict(load_file(str(d / "ema.safetensors")))
            if stage.critic_optimizer is not None:
                load_critic(d / "critic.safetensors", loss.discriminator, stage.critic_optimizer)
            rng_file = d / f"rng-{rank}.json"
            if rng_file.exists():  # the same number of workers as before
                load_rng_state(json.loads(rng_file.read_text()), rng, generator)
        log(f"[{recipe.name}] resumed from step {step} ({checkpoint.path})")

    counter = config["counter"]

    tracker = None
    if rank == 0:
        tracker = Tracker(config["tracking_uri"], config["experiment"], config["run_name"], run_id, config["recipe"])
        run_id = tracker.run_id
    evaluating = bool(recipe.data.eval_uri and tc.eval_every)
    fid = None
    if evaluating:
        # reconstruction is scored on centre crops; generation edits squashed references
        framing = "center_crop" if recipe.kind == "reconstruction" else "squash"
        eval_images = load_eval_images(recipe.data.eval_uri, s3, recipe.data.eval_samples, recipe.data.resolution, framing)
        if rank == 0 and recipe.data.fid_weights and recipe.kind == "reconstruction":
            from jobs.fid import FIDFeatures
            from unilip.artifacts import fetch_file

            fid = FIDFeatures(fetch_file(recipe.data.fid_weights, s3))

    def run_eval(at: int) -> None:
        # Every rank evaluates the same inputs in lockstep: under ZeRO-3 the forward hooks are collectives.
        engine.eval()
        with gathered(list(engine.module.parameters())):
            metrics, rows = evaluate(model, recipe.kind, eval_images, seed=tc.seed, fid=fid)
        engine.train()
        if tracker:
            tracker.metrics(metrics, at)
            tracker.image(image_grid(rows), f"eval/step-{at:08d}.png")
            if metrics:
                log(f"[{recipe.name}] eval step {at}: " + "  ".join(f"{k.split('/')[-1]} {v:.4f}" for k, v in metrics.items()))

    def save_checkpoint(at: int) -> None:
        position.merge_workers(device)  # every worker's consumed samples, on every worker
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            engine.save_checkpoint(str(out), tag=DS_TAG, exclude_frozen_parameters=True)
            (out / f"rng-{rank}.json").write_text(json.dumps(rng_state(rng, generator)))
            if rank == 0:
                from safetensors.torch import save_file

                state = {"step": at, "mlflow_run_id": run_id, "mixer": mixer_state, "position": position.state(),
                         "data": config["data"], "recipe": recipe.name}  # fmt: skip
                (out / "train_state.json").write_text(json.dumps(state))
                save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(out / "ema.safetensors"))
                if stage.critic_optimizer is not None:
                    save_critic(out / "critic.safetensors", loss.discriminator, stage.critic_optimizer)
            ray.train.report({"step": at}, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"step-{at:08d}")  # fmt: skip
        log(f"[{recipe.name}] checkpoint step-{at:08d}")

    engine.train()
    # per step: the loss terms; its time (data, forward, backward, optimizer, EMA), the part
    # of it spent waiting for the data, and the host's own work on the batch
    means = IntervalMeans((*STEP_TERMS[recipe.kind], "step_s", "data_wait_s", "host_s"), device)
    started, first_step, samples = time.perf_counter(), step, 0
    while step < tc.steps:
        maybe_fault(config, tc.fault_steps, step, rank, world, s3)
        step_started = time.perf_counter()
        data = StepData(micro_batches, accumulation, device, collate)
        terms = optimizer_step(engine, stage, data, step, recipe, world, rng, generator, device)
        ema.update(step + 1)
        booked = time.perf_counter()
        for raw in data.consumed:  # trained on: only now consumed
            record_consumed(position, raw)
        mixer_state = data.mixer_state
        data.host_s += time.perf_counter() - booked
        means.add(terms | {"step_s": time.perf_counter() - step_started, "data_wait_s": data.wait_s, "host_s": data.host_s})
        if tc.record_samples:
            keys = [f"{u}#{i}" for raw in data.consumed for u, i in zip(raw["url"], raw["index"])]
            put(s3, f"{config['storage']}/{config['run_name']}/samples/step-{step + 1:08d}-rank-{rank}.json", json.dumps(keys))
        step += 1
        samples += tc.global_batch
        if step % tc.log_every == 0 or step == tc.steps:
            elapsed = time.perf_counter() - started
            rate = samples / elapsed
            grad_norm = engine.get_global_grad_norm()
            metrics = {f"train/{k}": v for k, v in means.read().items()}
            metrics |= {"train/lr": lr_at(step - 1, tc), "train/samples_per_s": rate}
            if grad_norm is not None:
                metrics["train/grad_norm"] = float(grad_norm)
            if tracker:
                skips = ray.get(counter.get.remote())
                metrics |= {f"data/skipped/{k}": v for k, v in skips.items()}
                tracker.metrics(metrics, step)
            eta = (tc.steps - step) * elapsed / max(1, step - first_step)
            log(f"[{recipe.name}] step {step}/{tc.steps}  loss {metrics['train/loss']:.4f}  lr {metrics['train/lr']:.2e}  "
                f"{rate:.1f} samples/s  ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}")  # fmt: skip
        if evaluating and (step % tc.eval_every == 0 or step == tc.steps):
            run_eval(step)
        if step % tc.checkpoint_every == 0 or step == tc.steps:
            save_checkpoint(step)

    registered = [tracker.registered() if tracker else None]
    dist.broadcast_object_list(registered, src=0)
    if first_step < tc.steps or registered[0] is None:  # not a restart of a finished, exported run
        export(config, recipe, engine, model, ema, tracker, rank)
    else:
        log(f"[{recipe.name}] already finished and exported: {registered[0]}")
    dist.barrier()
    if tracker:
        tracker.end()


def record_consumed(position, raw: dict) -> None:
    """The samples of a micro batch as consumed, per source and epoch (in order: a batch
    may run across the end of a source's epoch)."""
    for source in dict.fromkeys(raw["origin"]):
        rows = raw["origin"] == source
        for epoch in dict.fromkeys(raw["epoch"][rows].tolist()):
            sel = rows & (raw["epoch"] == epoch)
            position.consume(source, int(epoch), raw["url"][sel], raw["index"][sel])


def critic_step(critic: nn.Module, optimizer, grad_clip: float, world: int) -> None:
    """Average the discriminator's gradients over workers, clip, step."""
    grads = [p.grad for p in critic.parameters() if p.grad is not None]
    if world > 1 and grads:
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)
        flat /= world
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
    torch.nn.utils.clip_grad_norm_(critic.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def export(config: dict, recipe: Recipe, engine, model: UniLIP, ema: EMA, tracker, rank: int) -> None:
    """EMA weights -> a model directory, registered in MLflow with its lineage (rank 0)."""
    with gathered(list(engine.module.parameters())):
        if rank == 0:
            ema.copy_to_params()
            with tempfile.TemporaryDirectory() as tmp:
                out = model.save_pretrained(Path(tmp) / "model")
                lineage = {"stage": recipe.name, "run": config["run_name"], "run_id": tracker.run_id,
                           "from": config["init_from"] or f"preset:{recipe.model.preset}", "steps": str(recipe.train.steps),
                           "summary": f"{recipe.name} ({recipe.description}), run {config['run_name']}"}  # fmt: skip
                uri = tracker.register(out, config["model_name"], lineage)
            tracker.loss_plot()
            print(f"[{recipe.name}] exported EMA weights: {uri}")


def maybe_fault(config: dict, fault_steps: list[int], step: int, rank: int, world: int, s3) -> None:
    """Recovery testing: one worker kills its own process, once per run, as each of `fault_steps` begins."""
    if step not in fault_steps or rank != min(1, world - 1):
        return
    marker = f"{config['storage']}/{config['run_name']}/fault-{step}.done"
    if (s3.list_keys(marker) if marker.startswith("s3://") else Path(marker).exists()):
        return
    put(s3, marker, "killed")
    print(f"[fault] rank {rank}: SIGKILL at step {step}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)



def put(s3, uri: str, text: str) -> None:
    """A small file in the run's storage (S3 or a local directory)."""
    if uri.startswith("s3://"):
        s3.put_bytes(uri, text.encode())
    else:
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
        Path(uri).write_text(text)
