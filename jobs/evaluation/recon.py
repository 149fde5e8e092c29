"""`unilip eval recon`: rFID, PSNR and SSIM of reconstructions, the paper's Table 2 protocol.

    unilip eval recon --model ./unilip-1b-release --data /data/imagenet/val --size 448 \\
        --fid-weights ./pt_inception-2015-12-05-6726825d.pth --out ./eval/unilip-1b --gpus 4

- Data: an image folder (JPEG/PNG, recursive, sorted) or a project source (manifest.json
  and shards, local or s3://), e.g. ImageNet-1k val (50,000 images).
- Framing: the full image decoded (no draft mode), its shorter side resized to the size
  (bicubic, antialiased) and a centre square cropped: torchvision's `Resize(R)` +
  `CenterCrop(R)` on PIL images, as the release evaluates.
- Reconstructions are rounded to uint8 (the release quantises them too).
- Metrics, per image then averaged: `psnr` (uint8, data range 255); `ssim` (Wang et al.
  2004: Gaussian window, sigma 1.5, data range 255); `ssim_release`, the release's call
  (scikit-image's default 7x7 uniform window and sample covariance, `data_range=2.0` on
  [0, 1] floats), which is inflated, reported beside it to compare with the paper's figure;
  `rfid`, Fréchet distance of the FID Inception's 2048-d features (`jobs/evaluation/fid.py`, weights
  from `--fid-weights`; its resize is pytorch-fid's bilinear one, not torch-fidelity's
  TF1 port, a small difference) between the crops and their reconstructions.
- On Ray: `map_batches` over actors (one model and one Inception each); every batch sends
  back its per-image metrics and features, and the driver accumulates n, sum f and
  sum f f^T in float64 per side, so memory stays flat at 50,000 images.
Writes OUT/recon-<size>.json (the figures and the run record) and
OUT/recon-<size>.per_image.jsonl.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from jobs.evaluation.metrics import FeatureMoments, frechet, image_metrics
from unilip.errors import UserError

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".webp")


def eval_crop(data: bytes, size: int) -> np.ndarray:
    """torchvision's Resize(size) (shorter side, bicubic, on PIL) + CenterCrop(size), uint8."""
    from PIL import Image

    from unilip.images import read_image

    im = read_image(data)
    w, h = im.size
    if w <= h:
        new = (size, int(size * h / w))
    else:
        new = (int(size * w / h), size)
    im = im.resize(new, Image.Resampling.BICUBIC)
    left, top = int(round((new[0] - size) / 2.0)), int(round((new[1] - size) / 2.0))
    return np.asarray(im.crop((left, top, left + size, top + size)))


def list_images(data: str, s3=None) -> list[dict]:
    """The evaluation images: [{"key", "uri"}] of a folder, or [{"key", "shard", "index"}] of a source."""
    from pipelines.shards import MANIFEST, join
    from unilip.s3 import s3_access

    if not (s3 or s3_access()).exists(join(data, MANIFEST)):  # an image folder
        paths = sorted(p for p in Path(data).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise UserError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {data}")
        return [{"key": str(p.relative_to(data)), "uri": str(p)} for p in paths]
    from pipelines.read import shard_uris

    return [{"key": f"{Path(u).name}", "shard": u} for u in shard_uris(data, s3)]


class ReconWorker:
    def __init__(self, model_uri: str, fid_weights: str, size: int, dtype: str = "auto"):
        import torch

        from cluster.registry import load_model
        from jobs.evaluation.fid import FIDFeatures
        from unilip.s3 import s3_access

        torch.set_grad_enabled(False)
        self.s3 = s3_access()
        self.model = load_model(model_uri, self.s3, dtype=dtype)
        self.fid = FIDFeatures(self.s3.fetch(fid_weights)).to(self.model.device) if fid_weights else None
        self.size = size

    def _images(self, row: dict) -> list[tuple[str, bytes]]:
        if row.get("uri"):
            return [(row["key"], Path(row["uri"]).read_bytes())]
        from pipelines.shard_source import read_shard

        fs, path = self.s3.resolve(row["shard"])
        return [
            (f"{row['key']}#{r['key']}", r["image"])
            for r in read_shard(fs, path, row["shard"], "generation")
            if r.get("image")
        ]

    def __call__(self, batch: dict) -> dict:
        from PIL import Image

        from unilip.images import ImageError

        keys, real = [], []
        for row in (json.loads(r) for r in batch["row"]):
            for key, data in self._images(row):
                try:
                    real.append(eval_crop(data, self.size))
                    keys.append(key)
                except ImageError as e:  # an undecodable image: counted by the driver, not fatal
                    print(f"[eval recon] skipped {key}: {type(e).__name__}: {e}")
        out: dict = {"row": []}
        if self.fid is not None:  # features as arrays: a 2048-d float32 row per image, no text encoding
            out["f_real"] = out["f_fake"] = np.zeros((0, 2048), np.float32)
        if not real:
            return out
        fake = [np.asarray(im) for im in self.model.reconstruct([Image.fromarray(r) for r in real], self.size)]
        out["row"] = [json.dumps({"key": key, **image_metrics(r, f)}) for key, r, f in zip(keys, real, fake)]
        if self.fid is not None:
            out["f_real"], out["f_fake"] = (
                self.fid(np.stack(real)).astype(np.float32),
                self.fid(np.stack(fake)).astype(np.float32),
            )
        return out


def run_recon(
    model: str,
    data: str,
    out: str,
    size: int = 448,
    fid_weights: str | None = None,
    batch: int = 16,
    gpus: int = 0,
    actors: int = 1,
    limit: int | None = None,
    dtype: str = "auto",
    log=print,
) -> dict:
    from cluster.connect import init_ray, quiet_ray_data
    from jobs.evaluation.images import package_versions
    from jobs.evaluation.suites import Output
    from unilip.encoder import PATCH_MULTIPLE
    from unilip.s3 import s3_access

    if size % PATCH_MULTIPLE:  # 256 (the paper's other size) needs the release's padded encoder, which this model lacks
        raise UserError(f"--size must be a multiple of {PATCH_MULTIPLE} (448, or 224), got {size}")
    started = time.monotonic()
    rows = list_images(data, s3_access())
    if not rows:
        raise UserError(f"no images in {data}")
    if limit and "uri" in rows[0]:
        rows = rows[:limit]
    ray = init_ray()
    quiet_ray_data()
    per_batch = batch if "uri" in rows[0] else 1  # a shard is a batch of its own
    ds = ray.data.from_items([{"row": json.dumps(r)} for r in rows])
    ds = ds.map_batches(
        ReconWorker,
        batch_size=per_batch,
        concurrency=gpus or actors,
        num_gpus=1 if gpus else 0,
        num_cpus=1,
        fn_constructor_kwargs={"model_uri": model, "fid_weights": fid_weights, "size": size, "dtype": dtype},
    )
    real, fake, metrics, lines, last = (
        FeatureMoments(),
        FeatureMoments(),
        {"psnr": [], "ssim": [], "ssim_release": []},
        [],
        0.0,
    )
    for block in ds.iter_batches(batch_size=None, batch_format="numpy"):  # one worker call's images at a time
        rows = list(block["row"])[: limit - len(lines) if limit else None]
        if "f_real" in block:
            real.add(block["f_real"][: len(rows)])
            fake.add(block["f_fake"][: len(rows)])
        for row in map(json.loads, rows):
            for k in metrics:
                metrics[k].append(row[k])
        lines += rows
        if limit and len(lines) >= limit:
            break
        if time.monotonic() - last > 10:
            log(f"[eval recon] {len(lines)} images, {len(lines) / (time.monotonic() - started):.1f} images/s")
            last = time.monotonic()
    if not lines:
        raise UserError(f"no image of {data} could be evaluated")
    result = {f"recon/{k}": float(np.mean(v)) for k, v in metrics.items()}
    if real.n:
        result["recon/rfid"] = frechet(real, fake)
    record = {
        "model": model,
        "data": data,
        "size": size,
        "images": len(lines),
        "fid_weights": fid_weights,
        "metrics": result,
        "notes": {
            "ssim": "Wang et al. 2004 (Gaussian, sigma 1.5, range 255)",
            "ssim_release": "the release's skimage call: 7x7 uniform window, data_range=2.0 on [0,1]: inflated",
        },
        "seconds": round(time.monotonic() - started, 1),
        "versions": package_versions(),
    }
    output = Output(out)
    output.write(f"recon-{size}.per_image.jsonl", ("\n".join(lines) + "\n").encode())
    output.write(f"recon-{size}.json", json.dumps(record, indent=2).encode())
    log(
        f"[eval recon] {len(lines)} images at {size} px: "
        + ", ".join(f"{k.split('/')[1]} {v:.4f}" for k, v in result.items())
    )
    return record
