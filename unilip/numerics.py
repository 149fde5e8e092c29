"""The numerics policy: what runs in the training precision and what runs in fp32.

Training runs the model in `train.precision` (bf16 by default): DeepSpeed casts the
parameters of the module it trains and keeps fp32 master weights in the optimizer. Around
that model, the following are fp32 whatever the precision, as in the authors' release:

- every loss term (MSE, LPIPS, ConvNeXt, self-distillation, adversarial, the
  discriminator's own loss, rectified flow): inputs cast with `fp32`, autocast off;
- the loss networks (LPIPS, ConvNeXt-S, the distillation teacher, the discriminator):
  kept out of the DeepSpeed module, so never cast, and trained (the discriminator) by
  their own fp32 optimizer;
- images in and out of the model: pixel values are built in fp32 and cast at the model's
  entry; resizes of decoded images run in fp32 (some resampling kernels have no bf16 CPU
  version) and return fp32;
- the sampler's latent state between solver steps, the EMA of the trained weights, and
  the exported weights.

Inference (`generate`, `edit`, `reconstruct`, `understand`, Serve) runs the model in the
device's precision: bf16 on CUDA, fp32 on the CPU (whose bf16 matmuls are slow), unless
asked otherwise (`--dtype`, Serve's `dtype` argument); the same fp32 islands apply.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from unilip.errors import InputError

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def inference_dtype(device: torch.device | str, dtype: str = "auto") -> torch.dtype:
    """ "auto": bf16 on CUDA, fp32 elsewhere; or "bf16" / "fp32"."""
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise InputError(f"dtype must be auto, bf16 or fp32, got {dtype!r}")
    return DTYPES[dtype]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def fp32(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(t.float() for t in tensors)


def full_precision(device: torch.device | str | None = None):
    """A block where autocast, if anyone turned it on, is off: the losses run in fp32."""
    kind = torch.device(device).type if device is not None else "cpu"
    if kind not in ("cpu", "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(kind, enabled=False)


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, size, size) in fp32, bilinear without antialiasing: how the
    release resizes the pixel decoder's 32x output to the input size in training."""
    images = images.float()
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
