"""The UniLIP encoder: InternViT's last layer, CLS dropped, pixel shuffle 0.5, projector.

It wraps the MLLM's own vision tower and projector modules (not copies), so whatever the
reconstruction training does to them is what InternVL3 sees when it answers questions:
the UniLIP encoder is swapped into the MLLM by construction.

    enc = UniLIPEncoder(mllm.model.vision_tower, mllm.model.multi_modal_projector)
    feats = enc(pixel_values)   # (B, 256, D) at 448 px, (B, 64, D) at 224 px
"""

from __future__ import annotations

import torch
from torch import nn

from unilip.errors import InputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PATCH_MULTIPLE = 28  # patch 14 x pixel shuffle 2: image sides must be multiples of this


def pixel_values_from_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 images -> InternVL pixel values (B, 3, H, W), float32:
    (images / 255 - mean) / std with ImageNet mean/std, folded into one multiply and one add
    in place on the float copy (every training batch goes through this)."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device)
    std = torch.tensor(IMAGENET_STD, device=images.device)
    return images.float().mul_(1 / (255 * std)).add_(-mean / std).permute(0, 3, 1, 2)


def denormalize(pixel_values: torch.Tensor) -> torch.Tensor:
    """InternVL pixel values -> images in [0, 1]."""
    mean = pixel_values.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = pixel_values.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return pixel_values * std + mean


def pixel_shuffle(x: torch.Tensor, scale: float = 0.5) -> torch.Tensor:
    """InternVL's space-to-channel shuffle: (B, W, H, C) -> (B, W*s, H*s, C/s^2)."""
    b, w, h, c = x.shape
    x = x.reshape(b, w, int(h * scale), int(c / scale)).permute(0, 2, 1, 3)
    x = x.reshape(b, int(h * scale), int(w * scale), int(c / scale**2))
    return x.permute(0, 2, 1, 3)


def check_images(pixel_values: torch.Tensor) -> None:
    if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
        raise InputError(f"expected images of shape (B, 3, H, W), got {tuple(pixel_values.shape)}")
    h, w = pixel_values.shape[-2:]
    if h != w or h % PATCH_MULTIPLE or h < 2 * PATCH_MULTIPLE:
        raise InputError(
            f"image size {h}x{w} unsupported: square, a multiple of {PATCH_MULTIPLE}, at least 56 (224 or 448)"
        )


class UniLIPEncoder(nn.Module):
    def __init__(self, vision_tower: nn.Module, projector: nn.Module, downsample_ratio: float = 0.5):
        super().__init__()
        self.vision_tower = vision_tower
        self.projector = projector
        self.downsample_ratio = downsample_ratio

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """fp32 (or any) pixel values in, features in the encoder's dtype out."""
        check_images(pixel_values)
        pixel_values = pixel_values.to(self.vision_tower.dtype)
        feats = self.vision_tower(pixel_values=pixel_values).last_hidden_state[:, 1:]  # drop CLS
        b, n, c = feats.shape
        side = int(n**0.5)
        feats = pixel_shuffle(feats.reshape(b, side, side, c), self.downsample_ratio)
        return self.projector(feats.reshape(b, -1, feats.shape[-1]))
