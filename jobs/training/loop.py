"""The one training loop: every stage, on every Ray Train worker, under DeepSpeed.

`unilip train` (`jobs/training/train.py`) starts `train_loop` on every worker with the
run's settings (`Run`). A worker (`Worker`) then:

    sets up: its data (this worker's split of every source, mixed into single-task micro
        batches by the step schedule, prepared ahead in a thread), the model in the
        training precision (StageNet: the stage's loss as its forward) under DeepSpeed,
        the EMA of the trained weights, and MLflow (rank 0); a restart restores the
        newest checkpoint: weights, optimizer, EMA, critic, random states, data position
    per optimizer step (`optimizer_step`):
        for each of `accumulation` micro batches:   (global = workers x micro x accumulation)
            loss <- reconstruction terms (fp32 loss networks, unilip.losses) or rectified flow
            engine.backward(loss); engine.step()    (ZeRO, clipping, bf16)
            the discriminator's own loss, when the adversarial loss is on
        the discriminator's step (fp32, its own AdamW and lr schedule from the GAN start)
        the EMA update; the step's samples recorded as trained on
    every log_every: the interval's means of the terms and timings over workers, read from
        the device once (rank 0 -> MLflow), a progress line
    every eval_every: PSNR/SSIM or sample grids; every checkpoint_every: a checkpoint
    at the end: the EMA weights exported as a model directory and registered in MLflow.
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

from jobs.training import checkpoint
from jobs.training.optim import (
    EMA,
    adamw_groups,
    deepspeed_config,
    gathered,
    gradient_accumulation,
    lr_at,
    own_clipping,
    set_lr,
    zero_stage,
)
from jobs.training.run import Run
from pipelines.budget import DataStopped
from pipelines.ingest import REST, worker_mixer
from pipelines.mix import StepData, collate
from pipelines.position import Position
from unilip.config import LossConfig, Recipe, to_dict
from unilip.losses import TERMS, ReconstructionLoss
from unilip.model import UniLIP

# How often the workers ask Ray whether a node of the run is going: a spot reclaim gives two
# minutes, a pod's preStop drain three; the question is an actor round trip every worker joins.
NOTICE_POLL_S = 5.0


def watching_notices() -> bool:
    """Whether anything watches for drains (off on the single-node local stack: no notice can come)."""
    return os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "1") != "0"


# What a step reports, per stage kind (every worker reports the same names: they are averaged)
STEP_TERMS = {
    "reconstruction": ("loss", *TERMS, "critic", "lecam"),
    "generation": ("loss", "flow_generation", "flow_editing"),
}


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
    from cluster.registry import fetch_model

    # the original encoder: the distillation's target, and the understanding signal's
    # reference wherever the encoder trains (held_out.understanding_drift)
    teacher = recipe.kind == "reconstruction" and (recipe.loss.distill > 0 or "encoder" in recipe.train.trainable)
    if init_from:
        return UniLIP.from_pretrained(fetch_model(init_from, s3), teacher=teacher, cfg=recipe.model)
    return UniLIP.from_preset(recipe.model.preset, recipe.model, teacher=teacher, device=device)


def local_loss_config(cfg: LossConfig, s3=None) -> LossConfig:
    """The loss config with the weight files of the terms that are on fetched (s3:// -> the local cache)."""
    from unilip.s3 import s3_access

    fetch = lambda weight, uri: str((s3 or s3_access()).fetch(uri)) if weight and uri else None  # noqa: E731
    return dataclasses.replace(
        cfg,
        lpips_weights=fetch(cfg.lpips, cfg.lpips_weights),
        convnext_weights=fetch(cfg.convnext, cfg.convnext_weights),
    )


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
            d_groups = [
                {
                    "name": "discriminator",
                    "params": list(loss.discriminator.parameters()),
                    "named": list(loss.discriminator.named_parameters()),
                    "lr_scale": 1.0,
                }
            ]
            critic_opt = torch.optim.AdamW(adamw_groups(d_groups, tc.weight_decay), lr=tc.lr, betas=tuple(tc.betas))
    return Stage(net, torch.optim.AdamW(groups, lr=tc.lr, betas=tuple(tc.betas)), critic_opt)


def optimizer_step(
    engine,
    stage: Stage,
    micro_batches,
    step: int,
    recipe: Recipe,
    world: int,
    rng: random.Random,
    generator: torch.Generator,
    device,
) -> dict[str, torch.Tensor]:
    """One optimizer step over collated micro batches (a sized iterable: `pipelines.mix.StepData` draws
    each as it is needed): the model through DeepSpeed, then
    the discriminator (when the adversarial loss is on at `step`). Returns this worker's
    terms, each the mean over the micro batches that had it, as tensors where they were
    computed: reading them here would make the host wait for the device every step; and
    the gradients' norm where the loop clips them (`own_clipping`)."""
    tc, loss = recipe.train, stage.loss
    set_lr(stage.optimizer, lr_at(step, tc))
    critic_on = loss is not None and loss.gan_active(step)
    sums: dict[str, list[torch.Tensor]] = {}
    for batch in micro_batches:
        terms = engine(batch, step, rng, generator)
        engine.backward(terms["loss"])
        if own_clipping(tc, world) and engine.is_gradient_accumulation_boundary():
            trained = [p for p in engine.module.parameters() if p.requires_grad]
            terms["grad_norm"] = torch.nn.utils.clip_grad_norm_(trained, tc.grad_clip or float("inf"))
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


def train_loop(config: dict) -> str | None:
    """Ray Train's entry on every worker: the run in `config["run"]`, from its start or its
    newest checkpoint to its end. Returns why it stopped early (rank 0's reaches the driver)."""
    return Worker(config["run"]).fit()


class Worker:
    """One worker's part of a run: set up (or restored) in the constructor, trained by `fit`."""

    def __init__(self, run: Run):
        import deepspeed
        import ray.train

        from jobs.evaluation.held_out import load_eval_images
        from jobs.tracking import Tracker
        from pipelines.mix import prepared
        from unilip.s3 import s3_access

        self.run, recipe = run, run.recipe
        self.tc = tc = recipe.train
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.s3 = s3_access(recipe.s3)
        deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo")
        self.log = print if self.rank == 0 else (lambda *a, **k: None)
        self.accumulation = gradient_accumulation(tc, self.world)

        # The data position first, then the mixer: its reading threads start the datasets
        # streaming while the model and its engine are built.
        resume = checkpoint.resumed()
        state = resume[0] if resume else None
        self.step, run_id = (state.step, state.mlflow_run_id) if state else (0, None)
        self.position = Position(run.layout(), state.position if state else None)
        mixer = worker_mixer(
            run.sources,
            {n: ray.train.get_dataset_shard(n) for n in run.sources},
            tc.micro_batch,
            recipe.data.batch_mode,
            recipe.data.seed,
            rank=self.rank,
            world=self.world,
            accumulation=self.accumulation,
            rest={n: ray.train.get_dataset_shard(n + REST) for n in run.sources},
            state=state.mixer if state else None,
            epochs=self.position.epochs,
            local_shuffle=recipe.data.worker_shuffle_buffer,
            pin_memory=self.device.type == "cuda",
        )
        self.mixer_state = mixer.state()  # the schedule's state after the last step trained: what a checkpoint saves
        self.micro_batches = prepared(mixer, self.accumulation, recipe.data.worker_prefetch)

        self.stage = build_stage(recipe, run.init_from, self.s3, self.device)
        self.model, self.loss = self.stage.net.model, self.stage.loss
        self.engine, *_ = deepspeed.initialize(
            model=self.stage.net, optimizer=self.stage.optimizer, config=deepspeed_config(tc, self.world)
        )
        self.ema = EMA({n: p for n, p in self.engine.module.named_parameters() if p.requires_grad}, tc.ema_decay)
        self.log(
            f"[{recipe.name}] {self.world} workers on {self.device.type}, {torch.get_num_threads()} torch threads each, "
            f"micro batch {tc.micro_batch} x {self.accumulation} accumulation, ZeRO-{zero_stage(tc, self.world)}, {tc.precision}"
        )
        if self.model.cfg.dit_pos_embed != recipe.model.dit_pos_embed:
            self.log(
                f"[{recipe.name}] DiT positional embedding {self.model.cfg.dit_pos_embed!r}, as the starting model's "
                f"generator was trained (the recipe's {recipe.model.dit_pos_embed!r} applies to a DiT fresh from its source)"
            )

        # Sampling randomness (CFG drops, noise, timesteps) differs per worker, and is checkpointed.
        self.rng = random.Random(tc.seed * 1000 + self.rank)
        self.generator = torch.Generator().manual_seed(tc.seed * 1000 + self.rank)
        if resume:
            checkpoint.restore(resume[1], self.engine, self.ema, self.critic(), self.rng, self.generator, self.rank)
            self.log(f"[{recipe.name}] resumed from step {self.step} ({resume[1].path})")
        else:
            self.log(f"[{recipe.name}] starting at step 0 (no checkpoint of this run yet)")

        self.tracker = (
            Tracker(run.tracking_uri, run.experiment, run.name, run_id, to_dict(recipe)) if self.rank == 0 else None
        )
        self.eval_images = self.fid = None
        if recipe.data.eval_uri and tc.eval_every:
            # reconstruction is scored on centre crops; generation edits squashed references
            framing = "center_crop" if recipe.kind == "reconstruction" else "squash"
            self.eval_images = load_eval_images(
                recipe.data.eval_uri, self.s3, recipe.data.eval_samples, recipe.data.resolution, framing
            )
            if self.rank == 0 and recipe.data.fid_weights and recipe.kind == "reconstruction":
                from jobs.evaluation.fid import FIDFeatures

                self.fid = FIDFeatures(self.s3.fetch(recipe.data.fid_weights))

    def critic(self):
        """The discriminator and its optimizer, when the stage has one."""
        return (
            (self.loss.discriminator, self.stage.critic_optimizer) if self.stage.critic_optimizer is not None else None
        )

    def fit(self) -> str | None:
        """Train to the end and export; or stop on the data, returning why."""
        tc, first_step = self.tc, self.step
        self.engine.train()
        # per step: the loss terms; its time (data, forward, backward, optimizer, EMA), the part
        # of it spent waiting for the data, and the host's own work on the batch
        self.means = IntervalMeans((*STEP_TERMS[self.run.recipe.kind], "step_s", "data_wait_s", "host_s"), self.device)
        self.started, self.first_step = time.perf_counter(), first_step
        self.checkpointed = first_step
        self.verdict_ref, self.notice_due = None, time.monotonic() + NOTICE_POLL_S
        try:
            while self.step < tc.steps:
                self.train_step()
                if self.step % tc.log_every == 0 or self.step == tc.steps:
                    self.log_interval()
                if self.eval_images is not None and (self.step % tc.eval_every == 0 or self.step == tc.steps):
                    self.evaluate()
                if self.step % tc.checkpoint_every == 0 or self.step == tc.steps:
                    self.save_checkpoint()
        except DataStopped as stop:
            self.stop(str(stop))
            return str(stop)
        registered = [self.tracker.registered() if self.tracker else None]
        dist.broadcast_object_list(registered, src=0)
        if first_step < tc.steps or registered[0] is None:  # not a restart of a finished, exported run
            self.export()
        else:
            self.log(f"[{self.run.recipe.name}] already finished and exported: {registered[0]}")
        dist.barrier()
        if self.tracker:
            self.tracker.end()
        return None

    def train_step(self) -> None:
        maybe_fault(self.run, self.step, self.rank, self.world, self.s3)
        started = time.perf_counter()
        data = StepData(self.micro_batches, self.accumulation, self.device, collate)
        self.agree(data.fetch())
        terms = optimizer_step(
            self.engine, self.stage, data, self.step, self.run.recipe, self.world, self.rng, self.generator, self.device
        )
        self.grad_norm = terms.pop("grad_norm", None)
        self.ema.update(self.step + 1)
        booked = time.perf_counter()
        for raw in data.consumed:  # trained on: only now consumed
            record_consumed(self.position, raw)
        self.mixer_state = data.mixer_state
        data.host_s += time.perf_counter() - booked
        self.means.add(
            terms | {"step_s": time.perf_counter() - started, "data_wait_s": data.wait_s, "host_s": data.host_s}
        )
        if self.tc.record_samples:
            keys = [f"{u}#{i}" for raw in data.consumed for u, i in zip(raw["url"], raw["index"])]
            uri = f"{self.run.path}/samples/step-{self.step + 1:08d}-rank-{self.rank}.json"
            self.s3.write_bytes(uri, json.dumps(keys).encode())
        self.step += 1

    def agree(self, error: Exception | None) -> None:
        """Before the step's first collective, the workers agree, in one all-reduce, on what
        ends the run here: a worker's data failed (access denied, an epoch without samples),
        the run's ledger says stop (the bad-data budget), or a node of the run is about to go
        (asked of Ray every NOTICE_POLL_S: the question is a barrier of its own). Any other
        error in the data is a bug: it is raised."""
        failure = data_failure(error)
        if error is not None and failure is None:
            raise error
        verdict = self.ledger_verdict() if self.rank == 0 else None
        poll = self.rank == 0 and watching_notices() and time.monotonic() >= self.notice_due
        flags = torch.tensor([float(failure is not None or verdict is not None), float(poll)], device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        stop, poll = flags.tolist()
        if stop:
            self.stop_on_data(failure, verdict)
        if poll:
            self.notice_due = time.monotonic() + NOTICE_POLL_S
            self.on_notice()

    def ledger_verdict(self) -> str | None:
        """The ledger's latest verdict, asked without waiting for it (one question in flight):
        a step never waits for the ledger, which hears of a bad sample a step or two late anyway."""
        import ray

        if self.verdict_ref is not None and ray.wait([self.verdict_ref], timeout=0)[0]:
            verdict, self.verdict_ref = ray.get(self.verdict_ref), None
            if verdict is not None:
                return verdict
        if self.verdict_ref is None:
            self.verdict_ref = self.run.counter.verdict.remote()
        return None

    def stop_on_data(self, failure: Exception | None, verdict: str | None) -> None:
        """Every worker raises DataStopped with the same reason."""
        import ray

        deadline = time.monotonic() + 10.0  # the ledger may still be hearing of what failed
        while self.rank == 0 and verdict is None and time.monotonic() < deadline:
            verdict = ray.get(self.run.counter.verdict.remote())
            if verdict is None:
                time.sleep(0.5)
        reasons = [None] * self.world
        dist.all_gather_object(reasons, verdict or (str(failure) if failure else None))
        raise DataStopped(next(r for r in reasons if r))

    def on_notice(self) -> None:
        """When a node of this run is about to go (Ray's drain of it, as a spot reclaim notice
        or a pod's termination asks for: cluster/preemption.py), the steps trained so far are
        checkpointed (the upload waited for), then the run stops on every worker; Ray Train
        starts it again on the nodes left and those that replace the one going, from this
        checkpoint. A notice costs at most NOTICE_POLL_S and the step in flight."""
        import ray.train

        notice = ray.train.get_preemption_info()  # the same on every worker
        if notice is None:
            return
        self.log(
            f"[{self.run.recipe.name}] node(s) {', '.join(notice.preempted_node_ids)} going (ranks "
            f"{notice.preempted_ranks}): checkpointing step {self.step} before they do"
        )
        if self.step > self.checkpointed:
            self.save_checkpoint(upload="sync")
        raise NodePreempted(f"stopped at step {self.step} for node(s) {', '.join(notice.preempted_node_ids)} going")

    def stop(self, reason: str) -> None:
        """Stop on the data, with a checkpoint of every step trained: a re-run resumes there."""
        self.log(f"[{self.run.recipe.name}] stopping at step {self.step}: {reason}")
        if self.step > self.checkpointed:
            self.save_checkpoint()
        if self.tracker:
            self.tracker.end(stopped=reason)

    def log_interval(self) -> None:
        import ray

        tc, step = self.tc, self.step
        elapsed = time.perf_counter() - self.started
        rate = (step - self.first_step) * tc.global_batch / elapsed
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = self.grad_norm if grad_norm is None else grad_norm  # the loop's clipping (`own_clipping`)
        metrics = {f"train/{k}": v for k, v in self.means.read().items()}
        metrics |= {"train/lr": lr_at(step - 1, tc), "train/samples_per_s": rate}
        if grad_norm is not None:
            metrics["train/grad_norm"] = float(grad_norm)
        if self.tracker:
            skips = ray.get(self.run.counter.get.remote())
            metrics |= {f"data/skipped/{k}": v for k, v in skips.items()}
            self.tracker.metrics(metrics, step)
        eta = (tc.steps - step) * elapsed / max(1, step - self.first_step)
        self.log(
            f"[{self.run.recipe.name}] step {step}/{tc.steps}  loss {metrics['train/loss']:.4f}  lr {metrics['train/lr']:.2e}  "
            f"{rate:.1f} samples/s  ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}"
        )

    def evaluate(self) -> None:
        """Every rank evaluates the same inputs in lockstep: under ZeRO-3 the forward hooks are collectives."""
        from jobs.evaluation.held_out import evaluate
        from jobs.tracking import image_grid

        self.engine.eval()
        teacher = self.loss.teacher if self.loss is not None and "encoder" in self.tc.trainable else None
        with gathered(list(self.engine.module.parameters())):
            metrics, rows = evaluate(
                self.model, self.run.recipe.kind, self.eval_images, seed=self.tc.seed, fid=self.fid, teacher=teacher
            )
        self.engine.train()
        if self.tracker:
            self.tracker.metrics(metrics, self.step)
            self.tracker.image(image_grid(rows), f"eval/step-{self.step:08d}.png")
            if metrics:
                values = "  ".join(f"{k.split('/')[-1]} {v:.4f}" for k, v in metrics.items())
                self.log(f"[{self.run.recipe.name}] eval step {self.step}: {values}")

    def save_checkpoint(self, upload: str | None = None) -> None:
        self.position.merge_workers(self.device)  # every worker's consumed samples, on every worker
        state = checkpoint.TrainState(
            self.step,
            self.tracker.run_id if self.tracker else None,
            self.mixer_state,
            self.position.state(),
            self.run.fingerprint,
            self.run.recipe.name,
        )
        started = time.perf_counter()
        checkpoint.save(
            state,
            self.engine,
            self.ema,
            self.critic(),
            self.rng,
            self.generator,
            self.rank,
            upload or self.tc.checkpoint_upload,
            faulty_upload(self.run, self.step, self.rank, self.world, self.s3),
        )
        self.checkpointed = self.step
        if self.tracker:  # what the checkpoint cost the step loop: the stall a benchmark compares
            self.tracker.metrics({"train/checkpoint_s": time.perf_counter() - started}, self.step)
        self.log(f"[{self.run.recipe.name}] checkpoint {checkpoint.dir_name(self.step)}")

    def export(self) -> None:
        """EMA weights -> a model directory, registered in MLflow with its lineage (rank 0)."""
        run, recipe = self.run, self.run.recipe
        with gathered(list(self.engine.module.parameters())):
            if self.rank == 0:
                self.ema.copy_to_params()
                with tempfile.TemporaryDirectory() as tmp:
                    out = self.model.save_pretrained(Path(tmp) / "model")
                    lineage = {
                        "stage": recipe.name,
                        "run": run.name,
                        "run_id": self.tracker.run_id,
                        "from": run.init_from or f"preset:{recipe.model.preset}",
                        "steps": str(recipe.train.steps),
                        "summary": f"{recipe.name} ({recipe.description}), run {run.name}",
                    }
                    uri = self.tracker.register(out, run.model_name, lineage)
                self.tracker.loss_plot()
                print(f"[{recipe.name}] exported EMA weights: {uri}")


def record_consumed(position, raw: dict) -> None:
    """The samples of a micro batch as consumed, per source and epoch (in order: a batch
    may run across the end of a source's epoch)."""
    for source in dict.fromkeys(raw["origin"]):
        rows = raw["origin"] == source
        for epoch in dict.fromkeys(raw["epoch"][rows].tolist()):
            sel = rows & (raw["epoch"] == epoch)
            position.consume(source, int(epoch), raw["url"][sel], raw["index"][sel])


class NodePreempted(RuntimeError):
    """Raised on every worker after the checkpoint a preemption notice asked for: Ray Train
    restarts the run (a worker-group failure, within `train.max_failures`) from it."""


def data_failure(error: BaseException | None):
    """The failure of the data plane under `error` (as raised in a read task or the mixer
    and passed on by Ray and the reading threads): access denied or an empty epoch; or None."""
    from pipelines.mix import EmptyEpoch
    from pipelines.shard_source import StorageAccessError

    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, StorageAccessError | EmptyEpoch):
            return error
        seen.add(id(error))
        error = getattr(error, "cause", None) or error.__cause__ or error.__context__
    return None


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


def maybe_fault(run: Run, step: int, rank: int, world: int, s3) -> None:
    """Recovery testing: one worker kills its own process, once per run, as each of
    `train.fault_steps` begins."""
    if step in run.recipe.train.fault_steps and once(run, f"fault-{step}", rank, world, s3):
        print(f"[fault] rank {rank}: SIGKILL at step {step}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def faulty_upload(run: Run, step: int, rank: int, world: int, s3):
    """Recovery testing: for the checkpoints of `train.fault_uploads`, a Ray
    `checkpoint_upload_fn` that uploads half of the worker's files, then kills the worker
    (once per run); None otherwise."""
    if step not in run.recipe.train.fault_uploads or not once(run, f"fault-upload-{step}", rank, world, s3):
        return None

    def upload(checkpoint, name: str):
        import ray.train
        from pyarrow import fs as pafs

        storage = ray.train.get_context().get_storage()
        files = sorted(p for p in Path(checkpoint.path).rglob("*") if p.is_file())
        for f in files[: max(1, len(files) // 2)]:
            dest = f"{storage.experiment_fs_path}/{name}/{f.relative_to(checkpoint.path)}"
            pafs.copy_files(str(f), dest, destination_filesystem=storage.storage_filesystem)
        print(f"[fault] rank {rank}: SIGKILL halfway through uploading {name}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    return upload


def once(run: Run, fault: str, rank: int, world: int, s3) -> bool:
    """Whether this worker injects `fault` now: rank 1 (or the only one), the first time."""
    marker = f"{run.path}/{fault}.done"
    if rank != min(1, world - 1) or s3.exists(marker):
        return False
    s3.write_bytes(marker, b"injected")
    return True
