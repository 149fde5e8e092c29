"""Everything a training checkpoint holds, written and read here only, and where a run
resumes from.

A checkpoint (one per `train.checkpoint_every` steps, `step-00001000`, under the run's
storage path, the newest `train.keep_checkpoints` kept by Ray Train):

    state/...             DeepSpeed: the trainable weights and optimizer state (per ZeRO rank)
    train_state.json      `TrainState`: step, MLflow run, data position and fingerprint,
                          the step schedule's state after the last step trained
    rng-RANK.json         each worker's random states (Python, NumPy, torch, sampling)
    ema.safetensors       the EMA of the trainable weights (what the export holds)
    critic.safetensors    the discriminator and its AdamW state (adversarial stages)

A run resumes from the newest checkpoint Ray Train reports (`resume_point` on the driver,
`restore` on the workers): the same data position (every sample of the epoch once), the
same step schedule, the same random states. Nothing is unpickled freely: DeepSpeed's files
load with `weights_only=True` and an allowlist of DeepSpeed's own state types; everything
else is JSON or safetensors.
"""

from __future__ import annotations

import base64
import json
import random
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

DS_TAG = "state"  # not "latest": DeepSpeed writes a file of that name
TRAIN_STATE = "train_state.json"
EMA = "ema.safetensors"
CRITIC = "critic.safetensors"


@dataclass
class TrainState:
    step: int  # optimizer steps trained
    mlflow_run_id: str | None
    mixer: dict | None  # the step schedule's state after the last step trained
    position: dict  # the data position: the samples trained on, per source and epoch
    data: dict  # the data fingerprint the position depends on
    recipe: str


def dir_name(step: int) -> str:
    return f"step-{step:08d}"


def read_state(checkpoint) -> TrainState:
    """A Ray Train checkpoint's train state, read in place: nothing else is fetched for it."""
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{TRAIN_STATE}") as f:
        return TrainState(**json.loads(f.read()))


def resume_point(run_path: str, s3) -> TrainState | None:
    """Where the run at `run_path` resumes from: the train state of the newest checkpoint
    Ray Train will hand its workers; None for a new run (driver side)."""
    from ray.train import Result

    fs, path = s3.resolve(run_path)
    try:
        checkpoint = Result.from_path(path, storage_filesystem=fs).checkpoint
    except RuntimeError:  # no such run yet
        return None
    return read_state(checkpoint) if checkpoint is not None else None


def resumed() -> tuple[TrainState, object] | None:
    """On a worker: the train state and checkpoint this start resumes from, or None."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    return (read_state(checkpoint), checkpoint) if checkpoint else None


def save(
    state: TrainState,
    engine,
    ema,
    critic,
    rng: random.Random,
    generator: torch.Generator,
    rank: int,
    upload: str = "async",
    upload_fn=None,
) -> None:
    """Write a checkpoint of every worker's part to local disk and report it to Ray Train,
    which uploads it (`upload`: "async", in a thread of its own while training goes on,
    the local copy deleted afterwards; "sync": before this returns) and keeps the newest
    K. A checkpoint becomes the resume point only once every worker's upload is complete.
    `critic`: (discriminator, its optimizer) or None. `upload_fn`: Ray's
    `checkpoint_upload_fn` (recovery testing)."""
    import ray.train
    from ray.train import CheckpointUploadMode
    from safetensors.torch import save_file

    out = Path(tempfile.mkdtemp(prefix=f"unilip-{dir_name(state.step)}-"))
    engine.save_checkpoint(str(out), tag=DS_TAG, exclude_frozen_parameters=True)
    (out / f"rng-{rank}.json").write_text(json.dumps(rng_state(rng, generator)))
    if rank == 0:
        (out / TRAIN_STATE).write_text(json.dumps(asdict(state)))
        save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(out / EMA))
        if critic is not None:
            save_critic(out / CRITIC, *critic)
    ray.train.report(
        {"step": state.step},
        checkpoint=ray.train.Checkpoint.from_directory(str(out)),
        checkpoint_dir_name=dir_name(state.step),
        checkpoint_upload_mode=CheckpointUploadMode.ASYNC if upload == "async" else CheckpointUploadMode.SYNC,
        delete_local_checkpoint_after_upload=True,
        checkpoint_upload_fn=upload_fn,
    )


def restore(checkpoint, engine, ema, critic, rng: random.Random, generator: torch.Generator, rank: int) -> None:
    """Load a checkpoint's weights, optimizer, EMA, critic and this worker's random states."""
    from safetensors.torch import load_file

    with checkpoint.as_directory() as d:
        d = Path(d)
        engine.checkpoint_engine = safe_checkpoint_engine()
        engine.load_checkpoint(str(d), tag=DS_TAG, load_module_strict=False)
        ema.load_state_dict(load_file(str(d / EMA)))
        if critic is not None:
            load_critic(d / CRITIC, *critic)
        rng_file = d / f"rng-{rank}.json"
        if rng_file.exists():  # the same number of workers as before
            load_rng_state(json.loads(rng_file.read_text()), rng, generator)


def _safe_globals() -> list:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def safe_checkpoint_engine():
    """DeepSpeed's torch checkpoint engine, loading with `weights_only=True`. DeepSpeed is
    imported here, not with the module: the driver and Ray Train's controller import the
    training loop's module but never run it."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(_safe_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)

    return SafeCheckpointEngine()


def rng_state(rng: random.Random, generator: torch.Generator) -> dict:
    version, internal, gauss = random.getstate()
    s_version, s_internal, s_gauss = rng.getstate()
    np_state = np.random.get_state()

    def b64(t: torch.Tensor) -> str:
        return base64.b64encode(t.numpy().tobytes()).decode()

    return {
        "python": [version, list(internal), gauss],
        "sampling": [s_version, list(s_internal), s_gauss],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": b64(torch.get_rng_state()),
        "generator": b64(generator.get_state()),
    }


def load_rng_state(state: dict, rng: random.Random, generator: torch.Generator) -> None:
    def tensor(s: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)

    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    v, internal, gauss = state["sampling"]
    rng.setstate((v, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(tensor(state["torch"]))
    generator.set_state(tensor(state["generator"]))


def save_critic(path: Path, critic: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The discriminator's weights and AdamW state in one safetensors file (+ groups in its metadata)."""
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().contiguous() for k, v in critic.state_dict().items()}
    opt = optimizer.state_dict()
    for idx, state in opt["state"].items():
        for key, value in state.items():
            tensors[f"optim.{idx}.{key}"] = torch.as_tensor(value).contiguous()
    save_file(tensors, str(path), metadata={"param_groups": json.dumps(opt["param_groups"])})


def load_critic(path: Path, critic: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        groups = json.loads(f.metadata()["param_groups"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    critic.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, key = k.split(".", 2)
            state.setdefault(int(idx), {})[key] = v
    optimizer.load_state_dict({"state": state, "param_groups": groups})
