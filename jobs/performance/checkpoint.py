"""Checkpoint stall benchmark: what a checkpoint costs the step loop, uploaded
synchronously (every worker waits) and asynchronously (Ray Train's ASYNC mode).

    eval "$(unilip local env)"
    unilip data sample --out s3://$UNILIP_BUCKET/sample --gen 64 --edit 32 --size 256
    unilip data sample --out s3://$UNILIP_BUCKET/sample-eval --gen 4 --edit 0 --seed 1
    unilip bench checkpoint recon-stage1 --preset tiny --steps 12 --every 2 \\
        --set "train.trainable=[encoder, down_proj, pixel_decoder]"

Runs `unilip train` (one worker) four times, the same recipe, seed and steps, in the order
sync, async, async, sync (ABBA: a drift of the machine falls on both arms alike), a
checkpoint every `--every` steps. Each run logs `train/checkpoint_s` at its checkpoint
steps: the time its step loop spent in the checkpoint (the local write, and the upload
when synchronous) and `train/step_s`. Prints both arms' mean stall, their ratio, the
mean step time of each, and the checkpoint's size in storage.
"""

from __future__ import annotations

import statistics
import time

from unilip.config import ConfigError


def checkpoint_bytes(storage_run: str, s3) -> int:
    """Bytes of the newest checkpoint under a run's storage path."""
    from pyarrow import fs

    filesystem, path = s3.resolve(storage_run)
    steps = sorted(i.path for i in filesystem.get_file_info(fs.FileSelector(path)) if i.base_name.startswith("step-"))
    if not steps:
        return 0
    files = filesystem.get_file_info(fs.FileSelector(steps[-1], recursive=True))
    return sum(i.size for i in files if i.type == fs.FileType.File)


def run_checkpoint_bench(
    name: str,
    preset: str = "tiny",
    steps: int = 12,
    every: int = 2,
    overrides: list[str] | None = None,
    init_from: str | None = None,
    log=print,
) -> dict:
    from jobs.performance.train_step import ray_run_metrics, timed_run
    from jobs.training.train import expand, prepare
    from unilip.s3 import s3_access

    if every >= steps:
        raise ConfigError(f"--every ({every}) must be below --steps ({steps}): nothing to compare otherwise")
    stamp = int(time.time())
    stalls: dict[str, list[float]] = {"sync": [], "async": []}
    step_s: dict[str, list[float]] = {"sync": [], "async": []}
    size = 0
    for i, mode in enumerate(("sync", "async", "async", "sync")):
        run_overrides = timed_run(
            [*(overrides or []), f"train.checkpoint_upload={mode}"], steps, checkpoint_every=every
        )
        recipe = prepare(name, preset, run_overrides)
        run_name = f"bench-checkpoint-{name}-{preset}-{stamp}-{i}-{mode}"
        log(f"[bench] {name} ({preset}): {steps} steps, a checkpoint every {every}, upload {mode} ({i + 1}/4)")
        stall, times = ray_run_metrics(
            name, preset, run_overrides, init_from, run_name, ["train/checkpoint_s", "train/step_s"], log
        )
        # the last checkpoint ends the run (its upload is waited for either way): left out
        stalls[mode] += [v for s, v in stall if s < steps]
        step_s[mode] += [v for _, v in times]
        storage = expand("s3://${UNILIP_BUCKET}/runs", "storage")
        size = max(size, checkpoint_bytes(f"{storage}/{run_name}", s3_access(recipe.s3)))
    result = {
        "checkpoints_timed": len(stalls["sync"]) // 2,
        "checkpoint_mb": size / 1e6,
        "sync_stall_s": statistics.fmean(stalls["sync"]),
        "async_stall_s": statistics.fmean(stalls["async"]),
        "sync_step_s": statistics.fmean(step_s["sync"]),
        "async_step_s": statistics.fmean(step_s["async"]),
    }
    result["stall_ratio"] = result["async_stall_s"] / result["sync_stall_s"]
    log(f"[bench] checkpoint {result['checkpoint_mb']:.1f} MB in storage, {result['checkpoints_timed']} timed per run")
    for mode in ("sync", "async"):
        log(
            f"[bench] {mode:<5} upload: stall {result[f'{mode}_stall_s'] * 1e3:7.1f} ms per checkpoint, "
            f"step {result[f'{mode}_step_s'] * 1e3:7.1f} ms"
        )
    log(f"[bench] ratio async / sync stall: {result['stall_ratio']:.2f}x")
    return result
