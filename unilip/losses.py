"""Reconstruction objective: MSE + LPIPS + self-distillation + adversarial (patch GAN, BCE).

    loss_fn = ReconstructionLoss(ReconstructionWeights(gan=0.1), "alexnet.safetensors", gan_start_step=200_000)
    terms = loss_fn.generator_terms(recon, target, feats, teacher_feats, discriminator, step)
    d_loss = loss_fn.discriminator_loss(recon.detach(), target, discriminator)

Images are in [-1, 1]. LPIPS uses the `lpips` package: on clusters its backbone weights
come from a configured path (torchvision's download is impossible offline); a randomly
initialised backbone is only for tests (`lpips_backbone="random"`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ReconstructionWeights:
    mse: float = 1.0
    lpips: float = 1.0
    distill: float = 1.0  # self-distillation lambda (stage 2)
    gan: float = 0.1


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator: strided convs -> a map of per-patch real/fake logits."""

    def __init__(self, channels: int = 64, layers: int = 3):
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = channels
        for i in range(1, layers):
            out = channels * min(2**i, 8)
            blocks += [nn.Conv2d(width, out, 4, 2, 1), nn.GroupNorm(8 if out % 8 == 0 else 1, out), nn.LeakyReLU(0.2)]
            width = out
        blocks.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.net = nn.Sequential(*blocks)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


def build_lpips(backbone: str) -> nn.Module:
    """LPIPS (AlexNet) with its shipped linear heads; backbone weights from a safetensors or
    torch state-dict file of torchvision's AlexNet, or "random" (tests only)."""
    import lpips

    net = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)
    if backbone != "random":
        if backbone.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(backbone)
        else:
            state = torch.load(backbone, map_location="cpu", weights_only=True)
        convs = [m for m in net.net.modules() if isinstance(m, nn.Conv2d)]
        keys = sorted({k.split(".")[1] for k in state if k.startswith("features.")}, key=int)
        if len(keys) != len(convs):
            raise ValueError(f"{backbone}: expected AlexNet weights with {len(convs)} feature convs, found {len(keys)}")
        for conv, idx in zip(convs, keys):
            conv.weight.data.copy_(state[f"features.{idx}.weight"])
            conv.bias.data.copy_(state[f"features.{idx}.bias"])
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval()


class ReconstructionLoss(nn.Module):
    def __init__(self, weights: ReconstructionWeights, lpips_backbone: str, gan_start_step: int | None = None):
        super().__init__()
        self.weights = weights
        self.gan_start_step = gan_start_step
        self.lpips = build_lpips(lpips_backbone) if weights.lpips else None

    def gan_active(self, step: int) -> bool:
        return self.gan_start_step is not None and self.weights.gan > 0 and step >= self.gan_start_step

    def generator_terms(self, recon: torch.Tensor, target: torch.Tensor, feats: torch.Tensor | None = None,
                        teacher_feats: torch.Tensor | None = None, discriminator: nn.Module | None = None,
                        step: int = 0) -> dict[str, torch.Tensor]:  # fmt: skip
        """Each weighted term and their sum under "loss"."""
        w = self.weights
        terms = {"mse": F.mse_loss(recon, target)}
        if self.lpips is not None:
            terms["lpips"] = self.lpips(recon, target).mean()
        if teacher_feats is not None and w.distill:
            terms["distill"] = F.mse_loss(feats, teacher_feats.detach())
        if discriminator is not None and self.gan_active(step):
            logits = discriminator(recon)
            terms["gan"] = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
        terms["loss"] = sum(getattr(w, k) * v for k, v in terms.items())
        return terms

    def discriminator_loss(self, fake: torch.Tensor, real: torch.Tensor, discriminator: nn.Module) -> torch.Tensor:
        real_logits, fake_logits = discriminator(real), discriminator(fake.detach())
        return 0.5 * (
            F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
            + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
        )
