"""Decoding raw samples into training rows, in Ray Data `map_batches`.

Images: JPEGs are decoded in PIL's draft mode at the smallest scale still covering the
target (a 1024 px square JPEG becomes a 512 px decode for a 448 target), converted to
RGB, then framed as the release frames them (`data.preprocess`):
- random_crop (reconstruction training): the shorter side resized to the resolution
  (bicubic, antialiased), a random square crop and a random horizontal flip, drawn from a
  seed of (data.seed, shard url, index in shard, epoch): new each epoch, and a resumed
  run re-reads a sample with the same crop and flip;
- squash (generation and editing, training and inference): the whole image resized to
  resolution x resolution (bicubic), as InternVL's image processor does;
- center_crop (reconstruction evaluation): the centre square of the shorter side.
The result is uint8 (res, res, 3). Normalisation for InternVL happens on the training
worker (`collate`), where it is one vectorised op and the object store carries 4x fewer bytes.

Text: UTF-8, outer whitespace stripped, formatted with the release's prompt template
(`unilip.prompts`). Generation captions over 1,000 characters are dropped, as the release drops them.

Bad samples are dropped here and counted by reason (see `SKIP_REASONS`), per source and
epoch, in the run's ledger (`pipelines.budget`), which the trainer logs and judges.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
from PIL import Image

from pipelines.order import keyed_rng
from unilip.config import ConfigError
from unilip.images import ImageError, read_image
from unilip.prompts import MAX_CAPTION_CHARS, training_prompt

SKIP_REASONS = (
    "truncated_tar",
    "unreadable_shard",
    "missing_image",
    "missing_text",
    "missing_edit_input",
    "bad_image",
    "bad_text",
    "empty_text",
    "caption_too_long",
    "image_too_small",
    "image_too_large",
)
MIN_SIDE = 32
PREPROCESS = ("random_crop", "center_crop", "squash")


class BadSample(ValueError):
    def __init__(self, reason: str):
        assert reason in SKIP_REASONS, reason  # one vocabulary for every count the trainer logs
        super().__init__(reason)
        self.reason = reason


def sample_rng(seed: int, url: str, index: int, epoch: int = 0) -> np.random.Generator:
    """The augmentation randomness of one sample in one epoch: a function of the seed,
    where the sample lives and the epoch."""
    return keyed_rng(seed, url, index, epoch)


def open_image(data: bytes | None, missing: str = "missing_image", draft: int | None = None) -> Image.Image:
    """Bytes -> an RGB image, with training's checks (`BadSample`: `missing`, image_too_large,
    image_too_small, bad_image). `draft`: a JPEG is decoded at the smallest scale still
    covering draft x draft."""
    try:
        return read_image(data, min_side=MIN_SIDE, draft=draft)
    except ImageError as e:
        raise BadSample(missing if e.reason == "missing" else e.reason) from None


def decode_image(
    data: bytes | None,
    resolution: int,
    preprocess: str = "squash",
    rng: np.random.Generator | None = None,
    missing: str = "missing_image",
) -> np.ndarray:
    """Bytes -> (res, res, 3) uint8: draft-mode decode, then the `preprocess` framing
    (random_crop draws its crop and flip from `rng`)."""
    return np.asarray(frame(open_image(data, missing, draft=resolution), resolution, preprocess, rng))


def frame(im: Image.Image, resolution: int, preprocess: str, rng: np.random.Generator | None = None) -> Image.Image:
    """Resize (and crop, flip) to resolution x resolution in one resampling pass: a crop of
    the resized image is the resize of the matching box of the original."""
    if preprocess not in PREPROCESS:
        raise ValueError(f"preprocess must be one of {', '.join(PREPROCESS)}, got {preprocess!r}")
    if preprocess == "squash":
        return im.resize((resolution, resolution), Image.Resampling.BICUBIC, reducing_gap=2.0)
    w, h = im.size
    side = min(w, h)
    scale = side / resolution  # source pixels per output pixel
    if preprocess == "center_crop":
        left, top = (w - side) / 2, (h - side) / 2
    else:
        if rng is None:
            raise ValueError("random_crop needs the sample's rng")
        # offsets in the resized image (shorter side = resolution, the other one as Resize
        # rounds it), as RandomCrop draws them
        long = int(resolution * max(w, h) / side)
        span_x, span_y = (long - resolution, 0) if w > h else (0, long - resolution)
        left, top = rng.integers(0, span_x + 1) * scale, rng.integers(0, span_y + 1) * scale
    box = (left, top, left + side, top + side)
    out = im.resize((resolution, resolution), Image.Resampling.BICUBIC, box=box, reducing_gap=2.0)
    if preprocess == "random_crop" and rng.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return out


def decode_text(data: bytes | None, task: str) -> str:
    if data is None:
        raise BadSample("missing_text")
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise BadSample("bad_text") from None
    if not text:
        raise BadSample("empty_text")
    if task == "generation" and len(text) > MAX_CAPTION_CHARS:
        raise BadSample("caption_too_long")
    return training_prompt(task, text)


class SampleDecoder:
    """The `map_batches` function: raw rows -> decoded rows; bad rows dropped and counted."""

    def __init__(
        self,
        task: str,
        resolution: int,
        counter=None,
        preprocess: str = "squash",
        seed: int = 0,
        source: str | None = None,
    ):
        if preprocess not in PREPROCESS:
            raise ValueError(f"preprocess must be one of {', '.join(PREPROCESS)}, got {preprocess!r}")
        if task == "editing" and preprocess == "random_crop":
            raise ConfigError(
                "editing pairs are squash-resized: a random crop would frame input and output differently"
            )
        self.task, self.resolution, self.counter = task, resolution, counter
        self.preprocess, self.seed, self.source = preprocess, seed, source

    def __call__(self, batch: dict) -> dict:
        res = self.resolution
        # rows read outside a datasource (benchmarks, evaluation) have no epoch: 0
        epochs = np.asarray(batch["epoch"] if "epoch" in batch else [0] * len(batch["key"]), dtype=np.int64)
        keep, prompts, images, sources = [], [], [], []
        skipped: dict[int, Counter] = {}  # by epoch
        for i in range(len(batch["key"])):
            try:
                if batch["skip"][i]:
                    raise BadSample(batch["skip"][i])
                prompt = decode_text(batch["text"][i], self.task)
                rng = (
                    sample_rng(self.seed, batch["url"][i], int(batch["index"][i]), int(epochs[i]))
                    if self.preprocess == "random_crop"
                    else None
                )
                if self.task == "editing":
                    source = decode_image(batch["source"][i], res, self.preprocess, rng, "missing_edit_input")
                image = decode_image(batch["image"][i], res, self.preprocess, rng)
            except BadSample as e:
                skipped.setdefault(int(epochs[i]), Counter())[e.reason] += 1
                continue
            keep.append(i)
            prompts.append(prompt)
            images.append(image)
            if self.task == "editing":
                sources.append(source)
        if self.counter is not None:
            for epoch, counts in skipped.items():
                self.counter.add.remote(dict(counts), self.source, epoch)
        out = {
            "key": np.asarray(batch["key"])[keep].astype(object),
            "url": np.asarray(batch["url"])[keep].astype(object),
            "index": np.asarray(batch["index"], dtype=np.int64)[keep],
            "epoch": epochs[keep],
            "prompt": np.array(prompts, dtype=object),
            "image": np.stack(images) if images else np.zeros((0, res, res, 3), np.uint8),
        }
        if self.task == "editing":
            out["source"] = np.stack(sources) if sources else np.zeros((0, res, res, 3), np.uint8)
        return out
