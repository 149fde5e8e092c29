"""The reconstruction objective, as the authors' release computes it, always in fp32.

    loss = ReconstructionLoss(LossConfig(distill=1.0, gan=0.1, gan_start_step=0), teacher=encoder_copy)
    terms = loss.generator_terms(recon, pixel_values, feats, step)    # each weighted term + "loss"
    d_terms = loss.discriminator_terms(recon.detach(), pixel_values)  # "critic" (+ "lecam")

Terms (images in [0, 1]): MSE; LPIPS (VGG16 by default, AlexNet selectable); optionally
0.1 x the MSE of ConvNeXt-S logits (both images resized to 224, ImageNet-normalised);
self-distillation, the MSE between the trained encoder's features and a frozen copy of
the original encoder's; the adversarial term of an `NLayerDiscriminator` with hinge loss
(the paper's BCE selectable), whose own loss carries LeCam regularisation.

The module holds the frozen LPIPS, ConvNeXt and teacher networks and the trainable
discriminator, all fp32: training keeps it out of the DeepSpeed module, so nothing in it
is cast to bf16 (`unilip.numerics`). Pretrained backbone weights come from files
(safetensors or a torch state dict of the torchvision model): nothing is downloaded.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from unilip.config import ConfigError, LossConfig
from unilip.encoder import IMAGENET_MEAN, IMAGENET_STD, denormalize
from unilip.errors import UserError
from unilip.numerics import full_precision
from unilip.weights import load_state

TERMS = ("mse", "lpips", "convnext", "distill", "gan")


def frozen(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    return module.eval()


# --------------------------------------------------------------------- perceptual


def build_lpips(net: str, weights: str | None) -> nn.Module:
    """LPIPS with the linear heads the `lpips` package ships; the backbone (torchvision
    VGG16 or AlexNet `features`) from `weights`, or random (None: tests only)."""
    import lpips

    model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    if weights is not None:
        state = load_state(weights)
        convs = [m for m in model.net.modules() if isinstance(m, nn.Conv2d)]
        keys = sorted({k.split(".")[1] for k in state if k.startswith("features.") and k.endswith(".weight")}, key=int)
        if len(keys) != len(convs):
            raise UserError(
                f"{weights}: expected torchvision {net} weights with {len(convs)} feature convs, found {len(keys)}"
            )
        for conv, idx in zip(convs, keys):
            conv.weight.data.copy_(state[f"features.{idx}.weight"])
            conv.bias.data.copy_(state[f"features.{idx}.bias"])
    return frozen(model)


class ConvNeXtLogits(nn.Module):
    """MSE between ConvNeXt-S logits of two images (224 px, ImageNet-normalised)."""

    def __init__(self, weights: str | None):
        super().__init__()
        from torchvision.models import convnext_small

        self.net = convnext_small(weights=None)
        if weights is not None:
            self.net.load_state_dict(load_state(weights))
        frozen(self.net)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        def logits(im):
            im = F.interpolate(im, size=224, mode="bilinear", align_corners=False, antialias=True)
            return self.net((im - self.mean) / self.std)

        return F.mse_loss(logits(x), logits(y))


# ------------------------------------------------------------------ discriminator


class BlurDownsample(nn.Module):
    """A fixed [1, 3, 3, 1] binomial blur with stride 2 ("same" padding), per channel."""

    def __init__(self):
        super().__init__()
        k = torch.tensor([1.0, 3.0, 3.0, 1.0])
        k = torch.outer(k, k)
        self.register_buffer("kernel", (k / k.sum())[None, None], persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ph, pw = max((math.ceil(h / 2) - 1) * 2 + 4 - h, 0), max((math.ceil(w / 2) - 1) * 2 + 4 - w, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.kernel.expand(x.shape[1], -1, -1, -1), stride=2, groups=x.shape[1])


class NLayerDiscriminator(nn.Module):
    """The release's discriminator: a 5x5 stem, three stages of [3x3 conv, blur
    downsample, GroupNorm(32), LeakyReLU(0.1)] at width x (1, 2, 4), an adaptive max-pool
    to 16x16, then 1x1 and 5x5 convs to one logit per cell."""

    def __init__(self, width: int = 128, stages: int = 3):
        super().__init__()
        if width % 32:
            raise ConfigError(f"discriminator width must be a multiple of 32 (GroupNorm(32)), got {width}")
        act = lambda: nn.LeakyReLU(0.1)  # noqa: E731
        self.stem = nn.Sequential(nn.Conv2d(3, width, 5, padding=2), act())
        widths = [width] + [width * 2**i for i in range(stages)]
        self.stages = nn.Sequential(
            *(
                nn.Sequential(nn.Conv2d(a, b, 3, padding=1), BlurDownsample(), nn.GroupNorm(32, b), act())
                for a, b in zip(widths, widths[1:])
            )
        )
        self.pool = nn.AdaptiveMaxPool2d(16)
        self.head = nn.Sequential(nn.Conv2d(widths[-1], widths[-1], 1), act(), nn.Conv2d(widths[-1], 1, 5, padding=2))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.stages(self.stem(images))))


class Critic(nn.Module):
    """What the adversarial loss trains: the discriminator and its LeCam running means of
    the real and fake logits (checkpointed together)."""

    def __init__(self, width: int = 128):
        super().__init__()
        self.net = NLayerDiscriminator(width)
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


# ------------------------------------------------------------------------- the loss


class ReconstructionLoss(nn.Module):
    def __init__(self, cfg: LossConfig, teacher: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        self.lpips = build_lpips(cfg.lpips_net, cfg.lpips_weights) if cfg.lpips else None
        self.convnext = ConvNeXtLogits(cfg.convnext_weights) if cfg.convnext else None
        if cfg.distill and teacher is None:
            raise ValueError("loss.distill needs the frozen original encoder (build the model with teacher=True)")
        # kept without distillation too: the understanding signal compares against it
        self.teacher = frozen(teacher).float() if teacher is not None else None
        self.discriminator = Critic(cfg.discriminator_width) if self.has_gan else None

    @property
    def has_gan(self) -> bool:
        return self.cfg.gan_start_step is not None and self.cfg.gan > 0

    def gan_active(self, step: int) -> bool:
        return self.has_gan and step >= self.cfg.gan_start_step

    def generator_terms(
        self, recon: torch.Tensor, pixel_values: torch.Tensor, feats: torch.Tensor | None = None, step: int = 0
    ) -> dict[str, torch.Tensor]:
        """Each weighted term and their sum under "loss". `recon` in [-1, 1] (any dtype),
        `pixel_values` the InternVL-normalised input, `feats` the trained encoder's output."""
        cfg = self.cfg
        with full_precision(recon.device):
            fake, real = (recon.float() + 1) / 2, denormalize(pixel_values.float())
            terms = {"mse": F.mse_loss(fake, real)}
            if self.lpips is not None:
                terms["lpips"] = self.lpips(fake * 2 - 1, real * 2 - 1).mean()
            if self.convnext is not None:
                terms["convnext"] = self.convnext(fake, real)
            if cfg.distill:
                with torch.no_grad():
                    target = self.teacher(pixel_values.float())
                terms["distill"] = F.mse_loss(feats.float(), target)
            if self.gan_active(step):
                self.discriminator.requires_grad_(False)  # this term trains the generator only
                logits = self.discriminator(fake)
                terms["gan"] = (
                    -logits.mean()
                    if cfg.gan_loss == "hinge"
                    else F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
                )
            terms["loss"] = sum(getattr(cfg, k) * v for k, v in terms.items())
        return terms

    def discriminator_terms(self, recon: torch.Tensor, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """The discriminator's loss on real and reconstructed images: "critic" (with the
        LeCam term included) and "lecam" on its own when on. Updates the LeCam EMAs."""
        cfg, critic = self.cfg, self.discriminator
        with full_precision(recon.device):
            critic.requires_grad_(True)
            real = critic(denormalize(pixel_values.float()))
            fake = critic((recon.detach().float() + 1) / 2)
            if cfg.gan_loss == "bce":
                loss = 0.5 * (
                    F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
                    + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))
                )
                return {"critic": loss}
            loss = 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())
            if not cfg.lecam:
                return {"critic": loss}
            real_mean, fake_mean = real.mean(), fake.mean()
            lecam = cfg.lecam * (F.relu(real_mean - critic.ema_fake) ** 2 + F.relu(critic.ema_real - fake_mean) ** 2)
            critic.ema_real.lerp_(real_mean.detach(), 1 - cfg.lecam_decay)
            critic.ema_fake.lerp_(fake_mean.detach(), 1 - cfg.lecam_decay)
            return {"critic": loss + lecam, "lecam": lecam}
