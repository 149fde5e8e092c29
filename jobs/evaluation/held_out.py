"""Evaluation during training: reconstruction PSNR/SSIM on held-out images, and sample
generations and edits for fixed prompts, as numbers and PNG grids.

PSNR and SSIM as `jobs.evaluation.metrics` defines them; rFID (`jobs.evaluation.fid`'s
network) is added when a FID feature network is given (`data.fid_weights`).
"""

from __future__ import annotations

import numpy as np
import torch

from jobs.evaluation.metrics import psnr_ssim
from unilip.errors import UserError
from unilip.s3 import S3Access

PROMPTS = [
    "A red fox standing in fresh snow, golden hour light.",
    "A bowl of ramen with a soft-boiled egg, top view.",
    "A lighthouse on a rocky coast under a stormy sky.",
    "A watercolor painting of a small village by a river.",
]
INSTRUCTIONS = ["Make it black and white.", "Turn it into a pencil sketch."]


def load_eval_images(uri: str, s3: S3Access, n: int, resolution: int, preprocess: str = "center_crop") -> np.ndarray:
    """The first `n` good images of a generation source, framed by `preprocess` (centre
    crops for reconstruction, as the release evaluates): uint8 (n, res, res, 3), read once."""
    from pipelines.decode import BadSample, decode_image
    from pipelines.read import shard_uris
    from pipelines.shard_source import read_shard

    images = []
    for url in shard_uris(uri, s3):
        fs, path = s3.resolve(url)
        for row in read_shard(fs, path, url, "generation"):
            try:
                images.append(decode_image(row["image"], resolution, preprocess))
            except BadSample:
                continue
            if len(images) == n:
                return np.stack(images)
    if not images:
        raise UserError(f"eval source {uri} has no readable images")
    return np.stack(images)


@torch.no_grad()
def evaluate(model, kind: str, images: np.ndarray, seed: int = 0, fid=None) -> tuple[dict[str, float], list[list]]:
    """Metrics and image rows for a grid. Reconstruction: originals over reconstructions
    (PSNR, SSIM, and rFID with `fid`, a `FIDFeatures`). Generation: samples for the fixed
    prompts, then edits of held-out images."""
    from PIL import Image

    originals = [Image.fromarray(im) for im in images]
    if kind == "reconstruction":
        res = images.shape[1]
        recon = model.reconstruct(originals, size=res)
        out = np.stack([np.asarray(im) for im in recon])
        psnr, ssim = psnr_ssim(images, out)
        metrics = {"eval/psnr": psnr, "eval/ssim": ssim}
        if fid is not None:
            from jobs.evaluation.metrics import frechet_distance

            metrics["eval/rfid"] = frechet_distance(fid(images), fid(out))
        return metrics, [originals, recon]
    generated = model.generate(PROMPTS, seed=seed)
    refs = originals[: len(INSTRUCTIONS)]
    edited = model.edit(refs, INSTRUCTIONS[: len(refs)], seed=seed)
    return {}, [generated, refs + edited]
