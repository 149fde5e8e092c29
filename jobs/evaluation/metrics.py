"""The image metrics, one definition each: PSNR, SSIM and FID statistics.

- PSNR on uint8 RGB (data range 255): 10 log10(255^2 / MSE).
- SSIM (Wang et al. 2004): scikit-image's, Gaussian window (sigma 1.5), population
  covariance, data range 255, averaged over channels. `ssim_release` is the release's call
  (scikit-image's default 7x7 uniform window and sample covariance, `data_range=2.0` on
  [0, 1] floats), which is inflated: reported beside it, to compare with the paper.
- FID: the Fréchet distance of two feature sets' Gaussians, from their moments (n, sum f,
  sum f f^T in float64), which merge across batches and actors, so memory stays flat.
"""

from __future__ import annotations

import warnings

import numpy as np

from unilip.errors import UserError


def image_metrics(real: np.ndarray, fake: np.ndarray) -> dict[str, float]:
    """PSNR, SSIM and the release's SSIM of one uint8 pair (H, W, 3)."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    psnr = peak_signal_noise_ratio(real, fake, data_range=255)
    ssim = structural_similarity(
        real, fake, data_range=255, channel_axis=-1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )
    with warnings.catch_warnings():  # the release's call passes the deprecated multichannel too
        warnings.simplefilter("ignore")
        release = structural_similarity(
            fake.astype(np.float32) / 255, real.astype(np.float32) / 255, data_range=2.0, channel_axis=-1
        )
    return {"psnr": float(psnr), "ssim": float(ssim), "ssim_release": float(release)}


def psnr_ssim(reference: np.ndarray, test: np.ndarray) -> tuple[float, float]:
    """Mean PSNR and SSIM over uint8 image pairs (N, H, W, 3)."""
    rows = [image_metrics(r, t) for r, t in zip(reference, test)]
    return float(np.mean([r["psnr"] for r in rows])), float(np.mean([r["ssim"] for r in rows]))


class FeatureMoments:
    """n, sum f and sum f f^T in float64: FID statistics that merge across batches and actors."""

    def __init__(self, dim: int = 2048):
        self.n, self.sum, self.outer = 0, np.zeros(dim), np.zeros((dim, dim))

    def add(self, feats: np.ndarray) -> FeatureMoments:
        f = np.asarray(feats, dtype=np.float64)
        self.n += len(f)
        self.sum += f.sum(0)
        self.outer += f.T @ f
        return self

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        mu = self.sum / self.n
        cov = (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)  # the unbiased covariance, as np.cov
        return mu, cov


def frechet(a: FeatureMoments, b: FeatureMoments) -> float:
    """|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2)."""
    from pytorch_fid.fid_score import calculate_frechet_distance

    if a.n < 2 or b.n < 2:
        raise UserError(f"FID needs at least 2 images per set, got {a.n} and {b.n}")
    with warnings.catch_warnings():  # fewer images than dimensions: singular covariances are expected
        warnings.simplefilter("ignore")
        return float(calculate_frechet_distance(*a.mean_cov(), *b.mean_cov()))


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FID between two feature sets (rows are samples)."""
    return frechet(FeatureMoments(a.shape[1]).add(a), FeatureMoments(b.shape[1]).add(b))
