"""The reconstruction objective against hand-computed values: hinge + LeCam, BCE, the
discriminator's shape, weights loaded from files, the weighted sum."""

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from unilip.config import LossConfig
from unilip.encoder import IMAGENET_MEAN, IMAGENET_STD
from unilip.errors import UserError
from unilip.losses import ConvNeXtLogits, NLayerDiscriminator, ReconstructionLoss, build_lpips


class Fixed(nn.Module):
    """A stand-in discriminator: logit `real` for images whose mean is above 0.5, else `fake`."""

    def __init__(self, real: float, fake: float):
        super().__init__()
        self.real, self.fake, self.w = real, fake, nn.Parameter(torch.zeros(()))

    def forward(self, x):
        value = self.real if x.mean() > 0.5 else self.fake
        return torch.full((x.shape[0], 1, 16, 16), value) + self.w


def pixels_of(images01: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images01 - mean) / std


def test_nlayer_discriminator_gives_a_16x16_logit_map():
    d = NLayerDiscriminator(32)
    assert d(torch.randn(2, 3, 224, 224)).shape == (2, 1, 16, 16)
    assert d(torch.randn(1, 3, 448, 448)).shape == (1, 1, 16, 16)
    assert sum(p.numel() for p in NLayerDiscriminator(128).parameters()) == 1_909_889  # 128-128-256-512, as released
    with pytest.raises(UserError, match="multiple of 32"):
        NLayerDiscriminator(48)


def test_hinge_with_lecam_and_the_generator_term():
    loss = ReconstructionLoss(LossConfig(lpips=0.0, gan=0.1, gan_start_step=0, lecam=0.001, lecam_decay=0.9))
    loss.discriminator.net = Fixed(real=0.5, fake=-2.0)
    real, fake = pixels_of(torch.full((2, 3, 32, 32), 0.9)), torch.full((2, 3, 32, 32), -0.8)  # fake in [-1, 1]: 0.1
    terms = loss.discriminator_terms(fake, real)
    hinge = 0.5 * (max(0, 1 - 0.5) + max(0, 1 - 2.0))  # = 0.25
    lecam = 0.001 * (max(0, 0.5 - 0.0) ** 2 + max(0, 0.0 - (-2.0)) ** 2)  # EMAs start at 0
    assert terms["critic"].item() == pytest.approx(hinge + lecam) and terms["lecam"].item() == pytest.approx(lecam)
    assert loss.discriminator.ema_real.item() == pytest.approx(
        0.05
    ) and loss.discriminator.ema_fake.item() == pytest.approx(-0.2)
    g = loss.generator_terms(fake, real, step=0)
    assert g["gan"].item() == pytest.approx(2.0)  # -mean(D(fake))
    assert g["loss"].item() == pytest.approx(g["mse"].item() + 0.1 * 2.0)
    assert g["mse"].item() == pytest.approx(0.8**2, rel=1e-4)  # on [0, 1]: 0.1 against 0.9
    assert not loss.gan_active(-1) and ReconstructionLoss(LossConfig(lpips=0.0, gan=0.1)).discriminator is None


def test_bce_is_selectable():
    loss = ReconstructionLoss(LossConfig(lpips=0.0, gan=0.1, gan_start_step=0, gan_loss="bce"))
    loss.discriminator.net = Fixed(real=0.0, fake=0.0)
    real, fake = pixels_of(torch.full((1, 3, 32, 32), 0.9)), torch.full((1, 3, 32, 32), -0.8)
    assert loss.discriminator_terms(fake, real)["critic"].item() == pytest.approx(torch.log(torch.tensor(2.0)).item())
    assert loss.generator_terms(fake, real, step=0)["gan"].item() == pytest.approx(torch.log(torch.tensor(2.0)).item())


def test_backbone_weights_load_from_files(tmp_path):
    from torchvision.models import alexnet, convnext_small

    torch.manual_seed(0)
    net = alexnet()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "alexnet.safetensors"))
    lpips = build_lpips("alex", str(tmp_path / "alexnet.safetensors"))
    convs = [m for m in lpips.net.modules() if isinstance(m, nn.Conv2d)]
    assert torch.equal(convs[0].weight, net.features[0].weight) and torch.equal(convs[-1].bias, net.features[10].bias)
    assert not any(p.requires_grad for p in lpips.parameters())
    with pytest.raises(UserError, match="expected torchvision vgg weights with 13 feature convs, found 5"):
        build_lpips("vgg", str(tmp_path / "alexnet.safetensors"))
    cn = convnext_small()
    torch.save(cn.state_dict(), tmp_path / "convnext.pth")  # a torch state dict loads too (weights_only)
    loaded = ConvNeXtLogits(str(tmp_path / "convnext.pth"))
    assert torch.equal(loaded.net.classifier[2].weight, cn.classifier[2].weight)
    x = torch.rand(1, 3, 64, 64)
    assert loaded(x, x).item() == 0.0 and loaded(x, 1 - x).item() > 0
