"""Sample dataset builder: real photographs shipped with installed packages, as shards.

    unilip data sample --out s3://unilip/sample --gen 200 --edit 100
    unilip data sample --out ./data/sample --gen 40 --edit 20 --size 512 --seed 1

Generation samples (`jpg`, `txt`, `json`) are crops, scalings and flips of the
photographs bundled with scikit-image and scikit-learn, each captioned by what it shows.
Editing samples (`input.jpg`, `output.jpg`, `txt`, `json`) pair such a photo with a real
edit of it (grayscale, mirror, rotation, tint, zoom, blur, brightness, ...) and a natural
instruction; `json` records the operation and its parameters, so every target can be
recomputed from its input with `apply_edit`. Everything is deterministic under `--seed`.

Layout: OUT/generation/gen-NNNNNN.tar and OUT/editing/edit-NNNNNN.tar, each folder with
its manifest.json.
"""

from __future__ import annotations

import io
import json
import random
import time
from dataclasses import dataclass
from functools import cache
from importlib.util import find_spec
from pathlib import Path

import yaml
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from pipelines.shards import Manifest, ShardWriter, join
from unilip.errors import UserError
from unilip.images import read_image
from unilip.s3 import S3Access, is_s3, split_s3

JPEG_QUALITY = 95


@dataclass(frozen=True)
class Photo:
    package: str  # the installed package that ships the file
    path: str  # inside the package
    caption: str

    @property
    def grayscale(self) -> bool:
        return self.caption.startswith("a black and white")


PHOTOS = [Photo(**p) for p in yaml.safe_load(Path(__file__).with_name("sample_photos.yaml").read_text())]


@cache
def load_photo(index: int) -> Image.Image:
    photo = PHOTOS[index]
    spec = find_spec(photo.package)  # locate without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {photo.package!r} (ships the sample photos) is not installed")
    with Image.open(Path(spec.submodule_search_locations[0]) / photo.path) as im:
        return im.convert("RGB")


# ----------------------------------------------------------------------------- edits

ENHANCERS = {"brightness": ImageEnhance.Brightness, "contrast": ImageEnhance.Contrast, "saturation": ImageEnhance.Color}
TINTS = {"warm orange": (255, 140, 0), "cool blue": (0, 90, 255), "green": (0, 190, 80), "pink": (255, 105, 180)}


def apply_edit(img: Image.Image, op: str, params: dict) -> Image.Image:
    """The edit `op` with `params` applied to `img` (RGB). Pure: recomputable from the json."""
    if op == "grayscale":
        return ImageOps.grayscale(img).convert("RGB")
    if op == "mirror":
        return ImageOps.mirror(img)
    if op == "flip":
        return ImageOps.flip(img)
    if op == "rotate":  # clockwise, exact (a transpose)
        turn = {90: Image.Transpose.ROTATE_270, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_90}
        return img.transpose(turn[params["angle"]])
    if op == "tint":
        return Image.blend(img, Image.new("RGB", img.size, TINTS[params["color"]]), params["strength"])
    if op == "zoom":
        w, h = img.size
        cw, ch = round(w / params["factor"]), round(h / params["factor"])
        box = ((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch)
        return img.resize((w, h), Image.Resampling.BICUBIC, box=box)
    if op == "blur":
        return img.filter(ImageFilter.GaussianBlur(params["radius"]))
    if op in ENHANCERS:
        return ENHANCERS[op](img).enhance(params["factor"])
    if op == "invert":
        return ImageOps.invert(img)
    if op == "sepia":
        return ImageOps.colorize(ImageOps.grayscale(img), black="#2b1d0e", white="#f3e3c3")
    raise ValueError(f"unknown edit op {op!r}")


EDIT_OPS = [
    "grayscale",
    "mirror",
    "flip",
    "rotate",
    "tint",
    "zoom",
    "blur",
    "brightness",
    "contrast",
    "saturation",
    "invert",
    "sepia",
]
COLOR_ONLY = {"grayscale", "saturation"}  # no visible change on a black and white photo


def _choose_edit(rng: random.Random, photo: Photo) -> tuple[str, dict, str]:
    """A random edit that visibly changes `photo`: (op, params, instruction)."""
    op = rng.choice([op for op in EDIT_OPS if not (op in COLOR_ONLY and photo.grayscale)])
    if op == "grayscale":
        return op, {}, rng.choice(["Make the photo black and white.", "Convert the image to grayscale."])
    if op == "mirror":
        return op, {}, rng.choice(["Mirror the image horizontally.", "Flip the picture from left to right."])
    if op == "flip":
        return op, {}, rng.choice(["Turn the image upside down.", "Flip the picture vertically."])
    if op == "rotate":
        angle = rng.choice([90, 180, 270])
        return op, {"angle": angle}, f"Rotate the image {angle} degrees clockwise."
    if op == "tint":
        color = rng.choice(sorted(TINTS))
        return op, {"color": color, "strength": round(rng.uniform(0.25, 0.45), 2)}, f"Give the image a {color} tint."
    if op == "zoom":
        factor = rng.choice([1.5, 2.0])
        return op, {"factor": factor}, f"Zoom in {factor:g}x on the centre of the picture."
    if op == "blur":
        return (
            op,
            {"radius": rng.choice([2, 3, 4, 6])},
            rng.choice(["Blur the image.", "Make the photo look out of focus."]),
        )
    if op == "brightness":
        brighter = rng.random() < 0.5
        factor = round(rng.uniform(1.4, 1.8), 2) if brighter else round(rng.uniform(0.4, 0.65), 2)
        return op, {"factor": factor}, "Make the image brighter." if brighter else "Make the image darker."
    if op == "contrast":
        more = rng.random() < 0.5
        factor = round(rng.uniform(1.6, 2.2), 2) if more else round(rng.uniform(0.35, 0.6), 2)
        return op, {"factor": factor}, "Increase the contrast." if more else "Reduce the contrast."
    if op == "invert":
        return op, {}, rng.choice(["Invert the colours of the image.", "Turn the photo into its negative."])
    if op == "sepia":
        return (
            op,
            {},
            rng.choice(
                ["Give the photo an old-fashioned sepia look.", "Make it look like an antique sepia photograph."]
            ),
        )
    if op == "saturation":
        vivid = rng.random() < 0.5
        factor = round(rng.uniform(1.6, 2.2), 2) if vivid else round(rng.uniform(0.2, 0.45), 2)
        return op, {"factor": factor}, "Make the colours more vivid." if vivid else "Mute the colours."
    raise AssertionError(op)


# --------------------------------------------------------------------------- samples


def _variant(rng: random.Random, size: int) -> tuple[int, Image.Image, dict]:
    """A random crop/scale/flip of a random photo, longest side `size`."""
    index = rng.randrange(len(PHOTOS))
    img = load_photo(index)
    w, h = img.size
    area = rng.uniform(0.35, 1.0)
    cw, ch = max(16, round(w * area**0.5)), max(16, round(h * area**0.5))
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    flip = rng.random() < 0.5
    scale = size / max(cw, ch)
    out_size = (max(1, round(cw * scale)), max(1, round(ch * scale)))
    img = img.resize(out_size, Image.Resampling.LANCZOS, box=(x, y, x + cw, y + ch))
    if flip:
        img = ImageOps.mirror(img)
    meta = {"source": Path(PHOTOS[index].path).stem, "crop": [x, y, cw, ch], "area": round(area, 3), "flip": flip}
    return index, img, meta


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def generation_sample(seed: int, i: int, size: int) -> dict[str, bytes]:
    rng = random.Random(f"{seed}:generation:{i}")  # str seeds hash with sha512: stable across runs
    index, img, meta = _variant(rng, size)
    caption = PHOTOS[index].caption
    if meta["area"] < 0.6:
        caption += ", seen up close"
    return {
        "jpg": _jpeg(img),
        "txt": (caption[0].upper() + caption[1:] + ".").encode(),
        "json": json.dumps(meta).encode(),
    }


def editing_sample(seed: int, i: int, size: int) -> dict[str, bytes]:
    rng = random.Random(f"{seed}:editing:{i}")
    index, img, meta = _variant(rng, size)
    op, params, instruction = _choose_edit(rng, PHOTOS[index])
    source = _jpeg(img)
    # Edit the decoded input, so the target is recomputable from input.jpg alone.
    target = apply_edit(read_image(source), op, params)
    meta.update(op=op, params=params)
    return {
        "input.jpg": source,
        "output.jpg": _jpeg(target),
        "txt": instruction.encode(),
        "json": json.dumps(meta).encode(),
    }


def build_sample_dataset(
    out: str,
    s3: S3Access,
    n_gen: int,
    n_edit: int,
    seed: int = 0,
    shard_size: int = 100,
    size: int = 1024,
    log=print,
) -> dict[str, Manifest]:
    """Write `n_gen` generation and `n_edit` editing samples under `out`; returns the manifests."""
    if n_gen < 0 or n_edit < 0 or n_gen + n_edit == 0:
        raise UserError(f"need --gen >= 0 and --edit >= 0 with at least one sample, got {n_gen} and {n_edit}")
    if shard_size < 1:
        raise UserError(f"--shard-size must be >= 1, got {shard_size}")
    if not 64 <= size <= 4096:
        raise UserError(f"--size must be between 64 and 4096 pixels, got {size}")
    if is_s3(out) and not s3.bucket_exists(split_s3(out)[0]):
        raise UserError(f"bucket of {out} does not exist or is not reachable at {s3.endpoint_url or 'AWS S3'}")
    manifests = {}
    for task, prefix, count, make in (
        ("generation", "gen", n_gen, generation_sample),
        ("editing", "edit", n_edit, editing_sample),
    ):
        if count == 0:
            continue
        t0 = time.monotonic()
        with ShardWriter(join(out, task), s3, prefix, task, shard_size) as writer:
            for i in range(count):
                writer.write(f"{prefix}{i:08d}", make(seed, i, size))
                if (i + 1) % max(1, count // 5) == 0 or i + 1 == count:
                    rate = (i + 1) / max(time.monotonic() - t0, 1e-9)
                    log(f"[sample] {task}: {i + 1}/{count} samples ({rate:.0f}/s)")
        manifests[task] = writer.manifest
        log(f"[sample] wrote {count} {task} samples in {len(writer.manifest.shards)} shard(s) to {join(out, task)}")
    return manifests
