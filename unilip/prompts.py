"""Prompt formats: the release's, in training and at inference alike.

    generation_prompt("a red fox")        -> "Generate an image: a red fox"
    edit_prompt("Make it black and white.") -> "Edit the image: Make it black and white.\n<image>"

`<image>` marks where the reference image goes: `<img>` + 256 `<IMG_CONTEXT>` + `</img>`,
filled with its UniLIP features. It comes after the text in the conditional and in the
null edit prompt alike. Classifier-free guidance replaces a prompt by its task's null
prompt (10% of training prompts; the unconditional half at inference).

The data plane formats captions and instructions with these functions, and
`UniLIP.generate`/`edit` (so Serve and the eval commands) format user text with the same
ones: the model never sees a format at inference that it did not train on.
"""

from __future__ import annotations

IMAGE = "<image>"
NULL_GENERATION = "Generate an image."
NULL_EDIT = f"Edit the image.\n{IMAGE}"
MAX_CAPTION_CHARS = 1000  # the release drops longer generation captions
# The chat sequence before the query slots, in tokens: the release's model_max_length
# (1024) less the 257 query slots (<img> + 256).
MAX_PROMPT_TOKENS = 1024 - 257


def generation_prompt(caption: str) -> str:
    return f"Generate an image: {caption}"


def edit_prompt(instruction: str) -> str:
    # an instruction's own `<image>` markers (GPT-Image-Edit has them) go: the template places the image
    return f"Edit the image: {instruction.replace(IMAGE, '').strip()}\n{IMAGE}"


def training_prompt(task: str, text: str) -> str:
    """A training sample's caption (generation) or instruction (editing), formatted."""
    return edit_prompt(text) if task == "editing" else generation_prompt(text)


def prompt_format() -> dict[str, str]:
    """The templates, as a model directory's config records them (`{prompt}` for the text)."""
    return {
        "generation": generation_prompt("{prompt}"),
        "editing": edit_prompt("{prompt}"),
        "null_generation": NULL_GENERATION,
        "null_editing": NULL_EDIT,
    }
