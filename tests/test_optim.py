"""Schedules and parameter groups shared by every stage, against hand-computed values."""

import pytest
import torch

from jobs.training.optim import EMA, adamw_groups, ema_decay, lr_at
from unilip.config import TrainConfig


def test_lr_schedule_and_the_discriminators_own_warmup_from_the_gan_start():
    cfg = TrainConfig(steps=1000, lr=1e-4, min_lr=1e-5, warmup_steps=100)
    assert lr_at(0, cfg) == pytest.approx(1e-6) and lr_at(99, cfg) == pytest.approx(1e-4)
    assert lr_at(550, cfg) == pytest.approx(1e-5 + 0.5 * 9e-5)  # half-way through the cosine
    assert lr_at(999, cfg) == pytest.approx(1e-5, rel=1e-3)
    # the release's discriminator: warmup restarts at the GAN start, the cosine spans what is left
    assert lr_at(399, cfg, start=400) == 0.0
    assert lr_at(400, cfg, start=400) == pytest.approx(1e-6) and lr_at(499, cfg, start=400) == pytest.approx(1e-4)
    assert lr_at(750, cfg, start=400) == pytest.approx(1e-5 + 0.5 * 9e-5)  # (750 - 500) / (600 - 100) = 0.5


def test_ema_warms_up_as_the_release():
    assert ema_decay(1, 0.999) == 0.0  # the first update copies the weights
    assert ema_decay(2, 0.999) == pytest.approx(2 / 11) and ema_decay(91, 0.999) == pytest.approx(91 / 100)
    assert ema_decay(10**6, 0.999) == 0.999
    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA({"p": p}, 0.999)
    p.data.fill_(1.0)
    ema.update(1)
    assert torch.equal(ema.shadow["p"], torch.ones(3))
    p.data.fill_(12.0)
    ema.update(2)  # decay 2/11: 1 + (12 - 1) x 9/11 = 10
    assert torch.allclose(ema.shadow["p"], torch.full((3,), 10.0))


def test_weight_decay_spares_norms_biases_and_embeddings():
    named = [
        ("embeddings.patch_embeddings.projection.weight", torch.nn.Parameter(torch.zeros(4, 3, 2, 2))),
        ("embeddings.position_embeddings", torch.nn.Parameter(torch.zeros(1, 5, 4))),
        ("layer.attention.q.weight", torch.nn.Parameter(torch.zeros(4, 4))),
        ("layer.norm.weight", torch.nn.Parameter(torch.zeros(4))),
        ("layer.q.bias", torch.nn.Parameter(torch.zeros(4))),
    ]
    groups = adamw_groups([{"name": "encoder", "params": [p for _, p in named], "named": named, "lr_scale": 0.1}], 1e-4)
    decayed = next(g for g in groups if g["weight_decay"] == 1e-4)
    assert [id(p) for p in decayed["params"]] == [id(named[2][1])]
    assert all(g["lr_scale"] == 0.1 for g in groups) and sum(len(g["params"]) for g in groups) == 5
