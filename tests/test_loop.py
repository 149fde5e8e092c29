"""The training loop's host side: nothing in a step reads the device, and the logged
values are the interval's means (`jobs.training.loop.IntervalMeans`)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cluster.local import free_port
from jobs.training.loop import IntervalMeans

ROOT = Path(__file__).resolve().parents[1]


def test_interval_means_average_each_value_over_the_steps_that_had_it():
    means = IntervalMeans(("loss", "flow_editing", "step_s"), torch.device("cpu"))
    means.add({"loss": torch.tensor(1.0), "step_s": 0.5})
    means.add({"loss": torch.tensor(3.0), "flow_editing": torch.tensor(4.0), "step_s": 1.5})
    assert means.read() == {"loss": 2.0, "flow_editing": 4.0, "step_s": 1.0}
    assert means.read() == {}  # a new interval
    means.add({"loss": torch.tensor(5.0)})
    assert means.read() == {"loss": 5.0}


def host_reads_of_one_step(recipe_name: str) -> list[str]:
    """Run one optimizer step of the tiny `recipe_name` under a one-worker DeepSpeed engine
    and return where this project's own code read a tensor to the host during it (the
    frame that called `item`, `float`, `bool` or `tolist`). DeepSpeed's and torch's own
    reads are not counted: they are theirs."""
    import random
    import traceback

    import deepspeed
    import numpy as np

    from jobs.training import loop
    from jobs.training.optim import deepspeed_config
    from jobs.training.train import prepare
    from pipelines.mix import collate

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=os.environ["PORT"],
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        UNILIP_BUCKET="unused",
    )
    deepspeed.init_distributed(dist_backend="gloo")
    recipe = prepare(recipe_name, "tiny", ["train.global_batch=2", "loss.gan_start_step=0"])
    stage = loop.build_stage(recipe, None, None, torch.device("cpu"))
    engine, *_ = deepspeed.initialize(
        model=stage.net, optimizer=stage.optimizer, config=deepspeed_config(recipe.train, 1)
    )
    res = recipe.data.resolution
    image = np.random.default_rng(0).integers(0, 255, (1, res, res, 3), dtype=np.uint8)
    raw = {
        "key": np.array(["k"]),
        "prompt": np.array(["A cat."], dtype=object),
        "task": np.array(["generation"], dtype=object),
        "image": image,
        "source": np.zeros_like(image),
    }
    rng, generator = random.Random(0), torch.Generator().manual_seed(0)

    def step(i):
        return loop.optimizer_step(
            engine, stage, [collate(raw), collate(raw)], i, recipe, 1, rng, generator, torch.device("cpu")
        )

    step(0)  # first-step set-up out of the way
    ours, originals = [], {n: getattr(torch.Tensor, n) for n in ("item", "__float__", "tolist", "__bool__")}

    def spy(name):
        def read(self, *args, **kwargs):
            caller = traceback.extract_stack(limit=2)[0]
            if str(ROOT) in caller.filename and "site-packages" not in caller.filename:
                ours.append(f"{name} at {caller.filename}:{caller.lineno}")
            return originals[name](self, *args, **kwargs)

        return read

    for name in originals:
        setattr(torch.Tensor, name, spy(name))
    try:
        terms = step(1)
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
    assert all(isinstance(v, torch.Tensor) for v in terms.values()), terms
    return ours


@pytest.mark.parametrize("recipe", ["recon-stage2", "gen-stage2"])
def test_an_optimizer_step_reads_nothing_to_the_host(recipe):
    # its own process: DeepSpeed's process group is global state
    code = f"from tests.test_loop import host_reads_of_one_step as f; print('HOST READS', f({recipe!r}))"
    r = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PORT": str(free_port())},
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "HOST READS []" in r.stdout, r.stdout[-3000:]
