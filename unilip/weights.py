"""Weight files: safetensors, or a torch file of tensors only (`weights_only=True`: never
pickled objects, which can run code)."""

from __future__ import annotations

from pathlib import Path

import torch

from unilip.errors import UserError


def load_state(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a `.safetensors` file or a torch file of tensors."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)
