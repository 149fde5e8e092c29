"""Evaluation during training: reconstruction PSNR/SSIM on held-out images, and sample
generations and edits for fixed prompts, as numbers and PNG grids.

PSNR and SSIM as `jobs.evaluation.metrics` defines them; rFID (`jobs.evaluation.fid`'s
network) is added when a FID feature network is given (`data.fid_weights`).

Where the reconstruction stages train the encoder, the understanding signal: how far the
trained encoder has moved what InternVL3's frozen LLM reads from the held-out images
(`understanding_drift`). The paper's understanding scores are the LLM's answers given the
encoder's features; its ablations (Tables 6, 10, 11) show them fall exactly when those
features leave the original's (without self-distillation MMBench drops 54 points), while
the feature MSE (`train/distill`) weighs every direction alike, whether the LLM reads it or
not. The signal measures the change where the benchmarks do, in the LLM's next-token
distributions: 0 when the LLM would answer every question as the original InternVL3 does;
by Pinsker's inequality, sqrt(KL/2) bounds the mean total variation between them.
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
QUESTIONS = [  # asked of every held-out image: the understanding signal
    "Describe this image in detail.",
    "What is the main object in this picture, and what colour is it?",
]


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
def understanding_drift(model, teacher, images: np.ndarray) -> dict[str, float]:
    """For each held-out image and each of QUESTIONS: the frozen LLM's next-token
    distributions at every text position after the image (the question's tokens and the
    answer's first), given the original encoder's features (`teacher`) and the trained
    one's. Returns KL(original || trained) in nats per position, and the share of positions
    whose most likely token is the same, over all of them."""
    from PIL import Image

    kls, same = [], []
    for image in map(Image.fromarray, images):
        _, pixels = model.understanding_inputs(image, QUESTIONS[0])
        original, trained = teacher(pixels), model.encoder(pixels)  # an image's, whatever the question
        for question in QUESTIONS:
            ids, _ = model.understanding_inputs(image, question)
            after = int((ids[0] == model.mllm.config.image_token_id).nonzero().max()) + 1
            ref = model.understanding_logits(ids, original)[0, after:].float().log_softmax(-1)
            got = model.understanding_logits(ids, trained)[0, after:].float().log_softmax(-1)
            kls.append((ref.exp() * (ref - got)).sum(-1))
            same.append(ref.argmax(-1) == got.argmax(-1))
    return {
        "eval/understanding_kl": torch.cat(kls).mean().item(),
        "eval/understanding_top1": torch.cat(same).float().mean().item(),
    }


@torch.no_grad()
def evaluate(
    model, kind: str, images: np.ndarray, seed: int = 0, fid=None, teacher=None
) -> tuple[dict[str, float], list[list]]:
    """Metrics and image rows for a grid. Reconstruction: originals over reconstructions
    (PSNR, SSIM, and rFID with `fid`, a `FIDFeatures`), and the understanding signal with
    `teacher` (the original encoder). Generation: samples for the fixed prompts, then edits
    of held-out images."""
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
        if teacher is not None:
            metrics |= understanding_drift(model, teacher, images)
        return metrics, [originals, recon]
    generated = model.generate(PROMPTS, seed=seed)
    refs = originals[: len(INSTRUCTIONS)]
    edited = model.edit(refs, INSTRUCTIONS[: len(refs)], seed=seed)
    return {}, [generated, refs + edited]
