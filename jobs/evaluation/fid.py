"""rFID: the Fréchet Inception Distance between held-out images and their reconstructions.

The standard FID network (pytorch-fid's port of the TensorFlow Inception, 2048-d pool
features, inputs resized to 299 bilinearly and scaled to [-1, 1]) with its weights
from a configured file, since nothing can be downloaded at run time:

    unilip train recon-stage1 --set data.fid_weights=s3://bucket/weights/pt_inception-2015-12-05-6726825d.pth

The file is pytorch-fid's published state dict (loaded with `weights_only=True`) or the
same tensors as safetensors. With few held-out images the estimate is biased upwards;
compare rFID values only at the same `data.eval_samples`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from unilip.weights import load_state


def inception_network() -> nn.Module:
    """The FID Inception's layers, randomly initialised (pytorch-fid's `fid_inception_v3`
    without its download)."""
    from pytorch_fid import inception as fid

    net = fid._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b = fid.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = fid.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = fid.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = fid.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = fid.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = fid.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = fid.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = fid.FIDInceptionE_1(1280)
    net.Mixed_7c = fid.FIDInceptionE_2(2048)
    return net


class FIDFeatures(nn.Module):
    """uint8 images (N, H, W, 3) -> 2048-d pool features."""

    LAYERS = (
        "Conv2d_1a_3x3",
        "Conv2d_2a_3x3",
        "Conv2d_2b_3x3",
        "maxpool1",
        "Conv2d_3b_1x1",
        "Conv2d_4a_3x3",
        "maxpool2",
        "Mixed_5b",
        "Mixed_5c",
        "Mixed_5d",
        "Mixed_6a",
        "Mixed_6b",
        "Mixed_6c",
        "Mixed_6d",
        "Mixed_6e",
        "Mixed_7a",
        "Mixed_7b",
        "Mixed_7c",
        "avgpool",
    )

    def __init__(self, weights: str | Path):
        super().__init__()
        net = inception_network()
        net.load_state_dict(load_state(weights))
        self.layers = nn.Sequential(*(getattr(net, name) for name in self.LAYERS)).eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, images: np.ndarray, batch_size: int = 16) -> np.ndarray:
        out = []
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size])).permute(0, 3, 1, 2).float() / 255
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
            out.append(self.layers(x).flatten(1).double().numpy())
        return np.concatenate(out)
