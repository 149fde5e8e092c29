"""The understanding half of a UniLIP model as a standard InternVL3 checkpoint.

    from unilip.internvl import export_internvl
    export_internvl(UniLIP.from_pretrained("unilip-1b"), "unilip-1b-internvl")

    # then, with nothing of this project installed:
    from transformers import AutoModelForImageTextToText, AutoProcessor
    model = AutoModelForImageTextToText.from_pretrained("unilip-1b-internvl")
    processor = AutoProcessor.from_pretrained("unilip-1b-internvl")

UniLIP's encoder is InternVL3's vision tower and projector (the same modules, trained by the
reconstruction stages), and InternVL3's LLM stays frozen: together they are a `transformers`
`InternVLForConditionalGeneration`, saved as one (config, safetensors, tokenizer, processor).
It is the model of the paper's understanding tables ("we replace InternViT in InternVL3 with
our UniLIP"), in the format the tools that evaluate or serve InternVL3 load.

The processor is the upstream checkpoint's where the MLLM came from one (its image
processor, tokenizer and chat template as published). For the tiny preset and random
real-size builds it is made here: InternVL3's image processor at 448 px with ImageNet
normalisation, the tokenizer with InternVL's image tokens named as the processor reads
them, and InternVL3's chat template (an image item renders as `<IMG_CONTEXT>\\n`, which the
processor expands to `<img>`, the context tokens, `</img>`). Like InternVL3's, the processor
tiles a large image into up to 12 crops of 448 px plus a thumbnail; with
`crop_to_patches=False` it feeds the one 448 px image `UniLIP.understand` does, and answers
as `unilip understand` does, token for token.
"""

from __future__ import annotations

from pathlib import Path

from unilip.encoder import IMAGENET_MEAN, IMAGENET_STD
from unilip.tokenizer import IMG_CONTEXT, IMG_END, IMG_START

IMAGE_SIZE = 448  # InternVL3's tile, the size `UniLIP.understand` reads
MAX_PATCHES = 12  # InternVL3's default tiling
# The processor needs a video token; InternVL's vocabulary has one, the tiny fixture's
# none (the processor then adds it past the model's embeddings: only images are read).
VIDEO = "<video>"


def export_internvl(model, out_dir: str | Path) -> Path:
    """Write `model`'s MLLM (trained vision tower and projector, frozen LLM) and its
    processor to `out_dir` as a `transformers` InternVL3 checkpoint (safetensors)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.mllm.save_pretrained(str(out))  # safetensors; the encoder's modules are the MLLM's own
    model.tokenizer.save_pretrained(str(out))  # the processor's, which replaces it, reads it back
    processor(model, out).save_pretrained(str(out))
    return out


def processor(model, tokenizer_dir: Path):
    """The model's `InternVLProcessor`: the upstream's if the MLLM was loaded from a
    checkpoint, else one built around the tokenizer saved in `tokenizer_dir`."""
    from transformers import AutoProcessor, AutoTokenizer, InternVLProcessor, InternVLVideoProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    from unilip.presets import resolve_pretrained

    if model.upstream.mllm != "tiny" and model.cfg.init != "random":
        return AutoProcessor.from_pretrained(resolve_pretrained(model.upstream.mllm))
    named = {
        "start_image_token": IMG_START,
        "end_image_token": IMG_END,
        "context_image_token": IMG_CONTEXT,
        "video_token": VIDEO,
    }
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), extra_special_tokens=named)
    images = GotOcr2ImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        crop_to_patches=True,
        max_patches=MAX_PATCHES,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
    )
    return InternVLProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        video_processor=InternVLVideoProcessor(),
        image_seq_length=model.mllm.config.image_seq_length,
        chat_template=tokenizer.chat_template,
    )
