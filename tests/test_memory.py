"""Per-GPU memory planning: the model-state arithmetic and the measured activations
against hand-computed figures, the verdicts, and the real recipes through `unilip plan`."""

import torch
from torch import nn

from jobs.performance.memory import CHECKPOINTABLE, RESERVE, Component, GiB, MemoryEstimate, verdicts
from tests.conftest import run_inline
from unilip.activation_checkpointing import enable_checkpointing
from unilip.meta import meta_run

UNIT = 64 * 1000 * 4  # one (64, 1000) fp32 activation


def test_meta_run_counts_what_autograd_keeps_by_hand():
    layers = [nn.Linear(1000, 1000, device="meta") for _ in range(4)]
    x = torch.empty(64, 1000, device="meta", requires_grad=True)
    with meta_run() as run:
        h = x
        for layer in layers:
            h = torch.relu(layer(h))
        # each ReLU keeps its output (its backward and the next Linear's read it); the
        # Linear outputs are freed; the weights' transposes are views (no new bytes)
        assert run.live == 4 * UNIT
        h.sum().backward()
        del h
    # what stays: the gradients, 4 x (1000 x 1000 + 1000) floats and x's (64 x 1000)
    assert run.live == 4 * (1000 * 1000 + 1000) * 4 + UNIT


def test_checkpointed_blocks_keep_their_inputs_only():
    def blocks():
        torch.manual_seed(0)
        return nn.ModuleList(
            nn.Sequential(nn.Linear(1000, 1000), nn.ReLU(), nn.Linear(1000, 1000), nn.ReLU()).to("meta")
            for _ in range(4)
        )

    def forward_live(mods):
        x = torch.empty(64, 1000, device="meta", requires_grad=True)
        with meta_run() as run:
            h = x
            for m in mods:
                h = m(h)
            return run.live

    plain, checkpointed = blocks(), blocks()
    enable_checkpointing(checkpointed)
    assert forward_live(plain) == 8 * UNIT  # two ReLU outputs per block
    assert forward_live(checkpointed) == 4 * UNIT  # each block's output (the next one's input, and the result)


def test_model_states_by_hand():
    parts = [Component("dit", 1_000_000, True), Component("llm", 3_000_000, False)]
    plan = MemoryEstimate(
        "r",
        "p",
        gpus=4,
        zero=2,
        precision="bf16",
        micro_batch=8,
        resolution=448,
        parts=parts,
        loss_nets=[("teacher", 500_000, 4)],
        activations=10_000_000,
    )
    assert plan.states(parts[0]) == {"weights": 2e6, "gradients": 2e6 / 4, "optimizer": 16e6 / 4, "ema": 4e6}
    assert plan.states(parts[1]) == {"weights": 6e6, "gradients": 0.0, "optimizer": 0.0, "ema": 0.0}
    assert plan.bucket == 2e6  # 2 bytes x the 1M trained parameters (under DeepSpeed's 5e8 bucket)
    # 8e6 weights + 0.5e6 gradients + 4e6 optimizer + 4e6 EMA + 2e6 bucket + 2e6 teacher + 10e6 activations
    assert plan.total == 30.5e6 + RESERVE
    zero3 = MemoryEstimate(**{**plan.__dict__, "zero": 3})
    assert zero3.states(parts[0])["weights"] == 2e6 / 4 and zero3.states(parts[1])["weights"] == 6e6 / 4
    zero0 = MemoryEstimate(**{**plan.__dict__, "zero": 0})
    assert (
        zero0.states(parts[0]) == {"weights": 2e6, "gradients": 2e6, "optimizer": 16e6, "ema": 4e6}
        and zero0.bucket == 0
    )
    fp32 = MemoryEstimate(**{**plan.__dict__, "zero": 1, "precision": "fp32"})
    assert fp32.states(parts[0]) == {"weights": 4e6, "gradients": 4e6, "optimizer": 8e6 / 4, "ema": 4e6}


def test_verdicts_name_what_fits_and_what_would():
    # 1B trained parameters on 8 GPUs at ZeRO-2, activation checkpointing already on everything
    parts = [Component("dit", 1_000_000_000, True)]
    plan = MemoryEstimate(
        "r",
        "p",
        8,
        2,
        "bf16",
        32,
        448,
        parts,
        [],
        activations=int(30 * GiB),
        checkpointing=CHECKPOINTABLE["generation"],
    )
    # 2 GB weights + 0.25 gradients + 2 optimizer + 4 EMA + 1 bucket = 9.25e9 B = 8.6 GiB, + 30 + 3 GiB
    assert round(plan.total / GiB, 2) == 41.61
    lines = verdicts(plan, recipe=None)
    # ZeRO-3 shards the weights too: 0.25 + 0.25 + 2 + 4 + 1 = 7.5e9 B = 6.98 GiB, + 33 GiB
    assert lines[0] == "does not fit on a100-40g (41.6 of 40.0 GiB): use ZeRO-3 (train.zero_stage=3): 40.0 GiB"
    assert lines[1] == "fits on a100-80g (41.6 of 80.0 GiB)"
    huge = MemoryEstimate(**{**plan.__dict__, "activations": int(60 * GiB)})
    # at ZeRO-3, 40 - 6.98 - 3 = 30.0 GiB for activations: 32 x 30.0 / 60 -> 16
    assert verdicts(huge, recipe=None)[0].endswith("a micro batch of 16 or less with those (activations scale with it)")
    # one GPU (ZeRO off) with everything checkpointed: only a smaller micro batch is left
    alone = MemoryEstimate(**{**huge.__dict__, "gpus": 1, "zero": 0})
    assert (
        verdicts(alone, recipe=None)[1].startswith("does not fit on a100-80g")
        and "nothing else to shard or checkpoint: a micro batch of" in verdicts(alone, recipe=None)[1]
    )


def test_plan_prints_memory_per_gpu_for_a_real_recipe():
    r = run_inline("plan", "recon-stage2-448", "--gpus", "4")
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    assert (
        "memory per GPU (GiB): 4 workers, ZeRO-2, bf16, micro batch 16 at 448 px, activation checkpointing: encoder, pixel_decoder"
        in out
    )
    assert "teacher (loss, fp32)" in out and "308,495,104" in out and "discriminator (loss, fp32)" in out
    assert "fits on a100-80g" in out and "does not fit on a100-40g" in out
    # without checkpointing the same stage needs more (measured again)
    r = run_inline("plan", "recon-stage2-448", "--gpus", "4", "--set", "train.activation_checkpointing=[]")
    total = lambda text: float(next(line for line in text.splitlines() if line.startswith("    total ")).split()[-1])  # noqa: E731  memory's
    assert total(r.stdout) > total(out) + 20
