"""The pixel decoder: UniLIP features -> a 32-channel latent -> the DC-AE decoder -> pixels.

    latent = decoder.encode(features)           # (B, 32, 16, 16) for 256 tokens (448 px)
    images = decoder.decode(latent, size=448)   # (B, 3, 448, 448) in [-1, 1]

The latent is also the diffusion target in generation stages 2-3 (times unilip_factor).
The DC-AE decoder upsamples 32x (16x16 -> 512 px); the result is resized to the input size
(bilinear, in fp32: `unilip.numerics`). Sampled images are clamped before that resize
(`UniLIP.decode_latent`), reconstructions are not: each as the release does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from unilip.numerics import resize_images


class ResidualMLP(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class DownProjection(nn.Module):
    """3 residual MLP blocks at the LLM width, then LayerNorm -> Linear -> GELU -> Linear to 32."""

    def __init__(self, width: int, latent_channels: int = 32, blocks: int = 3):
        super().__init__()
        self.blocks = nn.Sequential(*[ResidualMLP(width) for _ in range(blocks)])
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, latent_channels)
        self.fc2 = nn.Linear(latent_channels, latent_channels)
        for m in self.modules():  # the release's initialisation
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(self.blocks(feats)))))


class PixelDecoder(nn.Module):
    def __init__(self, width: int, dcae: nn.Module):
        super().__init__()
        self.down_proj = DownProjection(width, dcae.config.latent_channels)
        self.dcae = dcae  # only its decoder trains here; its encoder gives gen-stage-1 targets

    def encode(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, N, D) features -> (B, 32, sqrt(N), sqrt(N)) latent."""
        b, n, _ = feats.shape
        side = int(n**0.5)
        return self.down_proj(feats).transpose(1, 2).reshape(b, -1, side, side)

    def decode(self, latent: torch.Tensor, size: int | None = None) -> torch.Tensor:
        """Latent -> (B, 3, size, size) images in [-1, 1] (unclamped), fp32; `size` None:
        the decoder's own 32x (512 px for 256 tokens)."""
        images = self.dcae.decode(latent.to(self.dcae.dtype)).sample
        return images.float() if size is None else resize_images(images, size)
