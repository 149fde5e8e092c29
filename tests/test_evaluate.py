"""Evaluation metrics against hand-computed values: PSNR, SSIM, the Fréchet distance, rFID."""

import numpy as np
import pytest
import torch

from jobs.evaluation.fid import FIDFeatures, inception_network
from jobs.evaluation.metrics import frechet_distance, psnr_ssim
from unilip.errors import UserError


def test_psnr_is_the_standard_definition_with_data_range_255():
    ref = np.full((1, 16, 16, 3), 100, np.uint8)
    test = ref.copy()
    test[0, 0, 0, 0] = 110  # one value off by 10: MSE = 100 / 768
    psnr, ssim = psnr_ssim(ref, test)
    assert psnr == pytest.approx(10 * np.log10(255**2 / (100 / 768)), rel=1e-9)
    assert psnr_ssim(ref, ref)[1] == pytest.approx(1.0) and ssim < 1.0


def test_frechet_distance_matches_the_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    # Shifted by (1, 2, 0) and scaled by (1, 2, 3): for diagonal covariances
    # FID = |mu_a - mu_b|^2 + sum(var_a + var_b - 2 sqrt(var_a var_b)) on the sample moments.
    b = a * np.array([1.0, 2.0, 3.0]) + np.array([1.0, 2.0, 0.0])
    va, vb = a.var(0, ddof=1), b.var(0, ddof=1)
    cov_a = np.cov(a, rowvar=False)
    assert np.abs(cov_a - np.diag(va)).max() < 0.1  # nearly diagonal; the closed form is approximate
    expected = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.sum(va + vb - 2 * np.sqrt(va * vb))
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.02)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(UserError, match="at least 2 images"):
        frechet_distance(a[:1], b)


@pytest.mark.parametrize("n", [5, 40, 600])  # fewer images than dimensions (singular covariances), and more
def test_frechet_distance_is_pytorch_fids(n):
    from pytorch_fid.fid_score import calculate_frechet_distance

    rng = np.random.default_rng(n)
    dim = 256
    a = rng.normal(size=(n, dim)) * rng.random(dim)
    b = rng.normal(size=(n, dim)) * rng.random(dim) + 0.1
    reference = calculate_frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert frechet_distance(a, b) == pytest.approx(reference, rel=1e-6)


def test_fid_features_load_configured_weights(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    weights = tmp_path / "inception.safetensors"
    save_file({k: v.contiguous() for k, v in inception_network().state_dict().items()}, str(weights))
    features = FIDFeatures(weights)
    images = np.random.default_rng(0).integers(0, 256, (3, 40, 40, 3), dtype=np.uint8)
    out = features(images, batch_size=2)
    assert out.shape == (3, 2048) and np.isfinite(out).all()
    np.testing.assert_allclose(features(images[:1]), out[:1], rtol=1e-5, atol=1e-8)  # batching does not change a row
    with pytest.raises(UserError, match="does not exist"):
        FIDFeatures(tmp_path / "missing.pth")
