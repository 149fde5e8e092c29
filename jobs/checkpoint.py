"""What a training checkpoint holds besides DeepSpeed's own files, and loading them safely.

A checkpoint directory (one per K steps, `step-00001000`, on the run's storage path):
    state/...                DeepSpeed: trainable weights, optimizer state (per ZeRO rank)
    train_state.json         step, MLflow run id, data position and fingerprint, step-plan state
    rng-RANK.json            each worker's RNG states (Python, NumPy, torch, sampling)
    ema.safetensors          EMA of the trainable weights (what gets exported)
    critic.safetensors       the discriminator and its AdamW state (reconstruction stage 2)

Nothing is unpickled freely: DeepSpeed's files load with `weights_only=True` and an
allowlist of DeepSpeed's own state types; everything else is JSON or safetensors.
"""

from __future__ import annotations

import base64
import json
import random
from pathlib import Path

import numpy as np
import torch

DS_TAG = "state"  # not "latest": DeepSpeed writes a file of that name


def train_state(checkpoint) -> dict:
    """A Ray Train checkpoint's train_state.json (step, data position, mixer, MLflow run),
    read in place: the rest of the checkpoint is not fetched for it."""
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/train_state.json") as f:
        return json.loads(f.read())


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
