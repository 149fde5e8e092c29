"""The tiny tokenizer fixture: a small byte-level BPE with InternVL's special tokens.

No tokenizer ships in any installed package, so the tiny preset builds one: byte-level
BPE (like Qwen2's), trained on a small built-in English corpus, with the chat tokens and
the image tokens InternVL uses (`<img>`, `</img>`, `<IMG_CONTEXT>`), and a ChatML chat
template. Saved with `save_pretrained`, it loads back with `AutoTokenizer`.

    from unilip.tokenizer import build_tiny_tokenizer
    tok = build_tiny_tokenizer("/tmp/tiny-tokenizer")
    tok = build_tiny_tokenizer(layout=INTERNVL3)   # widened: InternVL3's vocabulary and ids

Widened (`layout=INTERNVL3`), the same merges sit in a vocabulary of InternVL3's size with
every special token at InternVL3's id (`<IMG_CONTEXT>` 151667, ...), the rest of the ids
held by unreachable filler entries: the tokenizer of a random-init real preset, so token
ids land where the real model's embedding rows and config (`image_token_id`) expect them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
IM_START, IM_END, PAD = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
SPECIAL_TOKENS = [PAD, IM_START, IM_END, IMG_START, IMG_END, IMG_CONTEXT]


@dataclass(frozen=True)
class VocabLayout:
    """Where a real tokenizer keeps its special tokens, and its vocabulary size."""

    size: int
    ids: dict[str, int]


# Qwen2.5's chat tokens and InternVL's image tokens (transformers' InternVL converter adds
# them in this order after Qwen2.5's 151,665 tokens); vocab_size 151674 in the configs.
INTERNVL3 = VocabLayout(
    151674,
    {
        PAD: 151643,
        IM_START: 151644,
        IM_END: 151645,
        IMG_START: 151665,
        IMG_END: 151666,
        IMG_CONTEXT: 151667,
        "<quad>": 151668,
        "</quad>": 151669,
        "<ref>": 151670,
        "</ref>": 151671,
        "<box>": 151672,
        "</box>": 151673,
    },
)

# InternVL3's chat template (ChatML): text content as is; an image item becomes the image
# placeholder on its own line, which InternVL's processor expands into the image's tokens.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<IMG_CONTEXT>\\n' }}"
    "{% elif item['type'] == 'video' %}{{ '<video>\\n' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Enough varied English for the merges to cover the prompts, captions and instructions
# the tiny model sees; the vocabulary stays small so the embedding table does too.
_CORPUS = """
You are a helpful assistant. Generate an image. Edit the image. Describe the image.
What is in this picture? Answer the question about the image in one sentence.
A photo of a cat, a dog, a cup of coffee, a rocket, a flower, a red motorcycle, the moon.
An astronaut in an orange flight suit smiling beside a helmet with a flag behind her.
A tabby cat with green eyes looking into the camera. A traditional pagoda above trees.
A black and white photo of coins, gravel, grass, a brick pavement, a man with a camera.
A deep space image of distant galaxies. A microscope image of stained tissue.
Make the photo black and white. Mirror the image horizontally. Turn the image upside down.
Rotate the image 90 degrees clockwise. Give the image a warm orange tint, a cool blue tint.
Zoom in on the centre of the picture. Blur the image. Make the image brighter or darker.
Increase the contrast. Reduce the contrast. Invert the colours. Give it a sepia look.
Reduce the image to a few flat colours. Replace the background with a beach at sunset.
Add a hat to the person. Remove the car from the street. Change the sky to night.
The quick brown fox jumps over the lazy dog. One two three four five six seven eight nine ten.
Red green blue yellow purple pink white black grey brown orange silver golden.
Small large tall short bright dark old new happy beautiful detailed realistic painting.
"""


def build_tiny_tokenizer(out_dir: str | Path | None = None, vocab_size: int = 1024, layout: VocabLayout | None = None):
    """Train the fixture tokenizer; save it to `out_dir` if given. Deterministic. With
    `layout`, widened to that vocabulary and those special-token ids (see the module doc)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([line for line in _CORPUS.splitlines() if line] * 4, trainer=trainer)
    if layout is not None:
        bpe = _widen(bpe, layout)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=IM_END,
        pad_token=PAD,
        additional_special_tokens=[IM_START, IMG_START, IMG_END, IMG_CONTEXT],
        model_max_length=4096,
    )
    tok.chat_template = CHAT_TEMPLATE
    if out_dir is not None:
        tok.save_pretrained(str(out_dir))
    return tok


def _widen(bpe, layout: VocabLayout):
    """The trained merges in `layout`'s vocabulary: ordinary tokens first (their order
    kept), special tokens at the layout's ids, fillers no merge can produce in between."""
    import json

    from tokenizers import AddedToken, Tokenizer, models

    state = json.loads(bpe.to_str())["model"]
    ordinary = [t for t, _ in sorted(state["vocab"].items(), key=lambda kv: kv[1]) if t not in SPECIAL_TOKENS]
    special = {t: i for t, i in layout.ids.items()}
    if len(ordinary) > min(special.values()):
        raise ValueError(
            f"{len(ordinary)} ordinary tokens do not fit below the first special id {min(special.values())}"
        )
    vocab = {t: i for i, t in enumerate(ordinary)}
    taken = set(special.values())
    vocab |= {f"<|filler_{i}|>": i for i in range(len(ordinary), layout.size) if i not in taken}
    vocab |= special
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    wide = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    wide.pre_tokenizer, wide.decoder = bpe.pre_tokenizer, bpe.decoder
    wide.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    return wide
