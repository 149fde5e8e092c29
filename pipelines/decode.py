"""Decoding raw samples into training rows, in Ray Data `map_batches`.

Images: JPEGs are decoded in PIL's draft mode at the smallest scale still covering the
target (a 1024 px square JPEG becomes a 512 px decode for a 448 target), converted to
RGB, centre-cropped to a square and resized to the stage resolution: uint8 (res, res, 3). Normalisation for InternVL happens on the training worker (`collate`),
where it is one vectorised op and the object store carries 4x fewer bytes.

Text: UTF-8, whitespace-normalised, formatted with the task's prompt template.

Bad samples are dropped here and counted by reason (see `SKIP_REASONS`); the counts go
to a `SkipCounter` actor the trainer reads for logging.
"""

from __future__ import annotations

import io
import warnings
from collections import Counter

import numpy as np
from PIL import Image

SKIP_REASONS = (
    "truncated_tar", "unreadable_shard", "missing_image", "missing_text", "missing_edit_input",
    "bad_image", "bad_text", "empty_text", "image_too_small", "image_too_large",
)  # fmt: skip
MIN_SIDE = 32
MAX_PIXELS = 64 * 1024 * 1024  # larger is a decompression bomb, not a photo
TEMPLATES = {"generation": "{text}", "editing": "{text}"}


class BadSample(ValueError):
    def __init__(self, reason: str):
        assert reason in SKIP_REASONS, reason  # one vocabulary for every count the trainer logs
        super().__init__(reason)
        self.reason = reason


def decode_image(data: bytes | None, resolution: int, missing: str = "missing_image") -> np.ndarray:
    """Bytes -> (res, res, 3) uint8: draft-mode decode, shorter side to res, centre crop."""
    if not data:
        raise BadSample(missing)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                if w * h > MAX_PIXELS:
                    raise BadSample("image_too_large")
                if min(w, h) < MIN_SIDE:
                    raise BadSample("image_too_small")
                im.draft("RGB", (resolution, resolution))  # JPEG: decode at a reduced scale
                im = im.convert("RGB")
    except BadSample:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadSample("bad_image") from None
    return np.asarray(resize_crop(im, resolution))


def resize_crop(im: Image.Image, resolution: int) -> Image.Image:
    """Centre square of the shorter side, resized to resolution x resolution in one pass
    (cropping first resizes fewer pixels than resize-then-crop)."""
    w, h = im.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    box = (left, top, left + side, top + side)
    return im.resize((resolution, resolution), Image.Resampling.BICUBIC, box=box, reducing_gap=2.0)


def decode_text(data: bytes | None, task: str) -> str:
    if data is None:
        raise BadSample("missing_text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise BadSample("bad_text") from None
    text = " ".join(text.split())
    if not text:
        raise BadSample("empty_text")
    return TEMPLATES[task].format(text=text)


class SampleDecoder:
    """The `map_batches` function: raw rows -> decoded rows; bad rows dropped and counted."""

    def __init__(self, task: str, resolution: int, counter=None):
        self.task, self.resolution, self.counter = task, resolution, counter

    def __call__(self, batch: dict) -> dict:
        res = self.resolution
        keep, prompts, images, sources = [], [], [], []
        skipped: Counter = Counter()
        for i in range(len(batch["key"])):
            try:
                if batch["skip"][i]:
                    raise BadSample(batch["skip"][i])
                prompt = decode_text(batch["text"][i], self.task)
                if self.task == "editing":
                    source = decode_image(batch["source"][i], res, "missing_edit_input")
                image = decode_image(batch["image"][i], res)
            except BadSample as e:
                skipped[e.reason] += 1
                continue
            keep.append(i)
            prompts.append(prompt)
            images.append(image)
            if self.task == "editing":
                sources.append(source)
        if skipped and self.counter is not None:
            self.counter.add.remote(dict(skipped))
        out = {
            "key": np.asarray(batch["key"])[keep].astype(object),
            "url": np.asarray(batch["url"])[keep].astype(object),
            "index": np.asarray(batch["index"], dtype=np.int64)[keep],
            "prompt": np.array(prompts, dtype=object),
            "image": np.stack(images) if images else np.zeros((0, res, res, 3), np.uint8),
        }
        if self.task == "editing":
            out["source"] = np.stack(sources) if sources else np.zeros((0, res, res, 3), np.uint8)
        return out


def skip_counter(name: str | None = None):
    """A Ray actor that sums skip counts from every decode task (get_if_exists by name)."""
    import ray

    @ray.remote(num_cpus=0)
    class SkipCounter:
        def __init__(self):
            self.counts: Counter = Counter()

        def add(self, counts: dict) -> None:
            self.counts.update(counts)

        def get(self) -> dict:
            return dict(self.counts)

    options = {"name": name, "get_if_exists": True} if name else {}
    return SkipCounter.options(**options).remote()
