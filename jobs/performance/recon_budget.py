"""How many images the tiny model's reconstruction needs for a given held-out PSNR.

    python -m jobs.performance.recon_budget --steps 300 --batch 8 --lr 1e-3 --lpips 0
    python -m jobs.performance.recon_budget --steps 150 --batch 4 --lr 1e-3 --parts down_proj,pixel_decoder

One process, no Ray, fp32, one thread: the reconstruction stages' trainable parts trained
with AdamW on the sample dataset's generation images (random crops at --res), and every
--every steps the PSNR of 4 held-out samples (seed 1, centre crops at --res and at 448 px)
with the images seen so far. The demo's budget question (BENCHMARKS.md): what a
recognisable reconstruction would cost, against what two 30-step stages give.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--res", type=int, default=224)
    p.add_argument("--lpips", type=float, default=0.0, help="LPIPS weight (the tiny recipes: 1.0, random AlexNet)")
    p.add_argument("--parts", default="down_proj,pixel_decoder,encoder", help="trainable components")
    p.add_argument("--every", type=int, default=50)
    args = p.parse_args(argv)

    from jobs.evaluation.metrics import psnr_ssim
    from pipelines.decode import decode_image, sample_rng
    from pipelines.sample_data import generation_sample
    from unilip.config import LossConfig
    from unilip.encoder import pixel_values_from_uint8
    from unilip.model import UniLIP

    torch.set_num_threads(1)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    train = [generation_sample(0, i, 512)["jpg"] for i in range(64)]  # the demo's training images
    held = {
        r: np.stack([decode_image(generation_sample(1, i, 512)["jpg"], r, "center_crop") for i in range(4)])
        for r in (args.res, 448)
    }
    model = UniLIP.from_preset("tiny")
    model.set_trainable(args.parts.split(","))
    loss = model.reconstruction_loss(LossConfig(mse=1.0, lpips=args.lpips, lpips_net="alex", convnext=0.0))
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)

    def heldout(res: int) -> float:
        model.eval()
        out = np.stack([np.asarray(im) for im in model.reconstruct(list(held[res]), size=res)])
        model.train()
        return psnr_ssim(held[res], out)[0]

    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        picks = rng.integers(0, len(train), args.batch)
        images = np.stack(
            [decode_image(train[i], args.res, "random_crop", sample_rng(0, "budget", int(i), step)) for i in picks]
        )
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, step / 5)
        terms = model.reconstruction_terms(pixel_values_from_uint8(torch.from_numpy(images)), loss, step)
        opt.zero_grad()
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % args.every == 0 or step == args.steps:
            print(
                f"step {step} ({step * args.batch} images, {time.perf_counter() - started:.0f}s): mse {float(terms['mse'].detach()):.4f}  "
                f"held-out PSNR {heldout(args.res):.2f} dB at {args.res} px, {heldout(448):.2f} dB at 448 px",
                flush=True,
            )


if __name__ == "__main__":
    main()
