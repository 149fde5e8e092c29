"""Images from untrusted bytes (training shards, HTTP requests, benchmark files): one
decoder, with its limits. Anything PIL cannot read, a truncated file, a decompression bomb
or an image outside the size limits raises `ImageError` with its reason, never PIL's own
exception zoo."""

from __future__ import annotations

import io
import warnings

from PIL import Image

from unilip.errors import InputError

MAX_PIXELS = 64 * 1024 * 1024  # larger is a decompression bomb, not a photo
REASONS = ("missing", "bad_image", "image_too_small", "image_too_large")


class ImageError(InputError):
    def __init__(self, reason: str, message: str):
        assert reason in REASONS, reason
        super().__init__(message)
        self.reason = reason


def read_image(
    data: bytes | None, min_side: int = 1, max_pixels: int = MAX_PIXELS, draft: int | None = None
) -> Image.Image:
    """Bytes -> an RGB PIL image. `draft`: a JPEG is decoded at the smallest scale that
    still covers draft x draft (libjpeg's reduced-scale decode: much less work)."""
    if not data:
        raise ImageError("missing", "no image data")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise ImageError("image_too_large", f"the image is {w}x{h}; the limit is {max_pixels:,} pixels")
                if min(w, h) < min_side:
                    raise ImageError(
                        "image_too_small", f"the image is {w}x{h}; each side must be at least {min_side} px"
                    )
                if draft:
                    im.draft("RGB", (draft, draft))
                return im.convert("RGB")
    except ImageError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError("bad_image", "not a readable image (PNG, JPEG or WebP)") from None
