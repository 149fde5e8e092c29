"""Prompt formats: what a training batch carries and what generate/edit build are the
release's token sequences, built here the way the release builds them (one chat-template
call per turn, the assistant turn's last two tokens cut, then <img> + 256 query slots)."""

from types import SimpleNamespace

import pytest
import torch

from pipelines.budget import DataLedger
from pipelines.decode import SampleDecoder
from pipelines.sample_data import generation_sample
from unilip.config import ModelConfig
from unilip.errors import UserError
from unilip.images import read_image
from unilip.model import UniLIP
from unilip.prompts import MAX_PROMPT_TOKENS, NULL_EDIT, NULL_GENERATION
from unilip.tokenizer import IMG_CONTEXT, IMG_END, IMG_START

QUERIES = 256
REF = f"{IMG_START}{IMG_CONTEXT * 256}{IMG_END}"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return UniLIP.from_preset("tiny", ModelConfig(preset="tiny", num_queries=QUERIES)).eval()


def release_ids(tok, user_content: str) -> list[int]:
    """train_stage2.py: apply_chat_template per turn (user, then the emptied assistant
    turn), [:-2], then <img> + 256 x <IMG_CONTEXT> for the queries."""
    ids = list(tok.apply_chat_template([{"role": "user", "content": user_content}], return_dict=False))
    ids += list(tok.apply_chat_template([{"role": "assistant", "content": ""}], return_dict=False))
    ids = list(ids[:-2])
    return ids + [tok.convert_tokens_to_ids(IMG_START)] + [tok.convert_tokens_to_ids(IMG_CONTEXT)] * QUERIES


def _jpeg(i: int) -> bytes:
    return generation_sample(0, i, 96)["jpg"]


def training_prompts() -> dict[str, str]:
    """The prompt column the data plane produces for one caption and one instruction."""
    gen = SampleDecoder("generation", 56)(
        {
            "key": ["g"],
            "url": ["u"],
            "index": [0],
            "skip": [""],
            "text": [b"a red fox in the snow\n"],
            "image": [_jpeg(0)],
        }
    )
    edit = SampleDecoder("editing", 56)(
        {
            "key": ["e"],
            "url": ["u"],
            "index": [1],
            "skip": [""],
            "text": [b"<image>\nMake it black and white."],
            "image": [_jpeg(1)],
            "source": [_jpeg(2)],
        }
    )
    return {"generation": gen["prompt"][0], "editing": edit["prompt"][0]}


def recorded_sequences(model, call) -> list[list[int]]:
    """The token ids every condition built during `call`: cond first, then uncond."""
    seen, original = [], model.generator.tokens

    def spy(prompt, n_ref, truncate=False):
        ids, slots = original(prompt, n_ref, truncate)
        seen.append(ids)
        return ids, slots

    model.generator.tokens = spy
    try:
        call()
    finally:
        model.generator.tokens = original
    return seen


def test_training_and_inference_prompts_are_the_release_token_sequences(model):
    tok = model.tokenizer
    batch = training_prompts()
    assert batch == {
        "generation": "Generate an image: a red fox in the snow",
        "editing": "Edit the image: Make it black and white.\n<image>",
    }
    gen_expected = release_ids(tok, "Generate an image: a red fox in the snow")
    edit_expected = release_ids(tok, f"Edit the image: Make it black and white.\n{REF}")  # the image after the text
    null_gen, null_edit = release_ids(tok, "Generate an image."), release_ids(tok, f"Edit the image.\n{REF}")
    # training: the batch's prompts through the generator
    assert model.generator.tokens(batch["generation"], 0, truncate=True)[0] == gen_expected
    assert model.generator.tokens(batch["editing"], 256, truncate=True)[0] == edit_expected
    assert model.generator.tokens(NULL_GENERATION, 0)[0] == null_gen
    assert model.generator.tokens(NULL_EDIT, 256)[0] == null_edit
    # inference: what generate and edit build from the user's text, conditional and null
    photo = read_image(_jpeg(3))
    generated = recorded_sequences(model, lambda: model.generate(["a red fox in the snow"], steps=1, seed=0))
    edited = recorded_sequences(model, lambda: model.edit([photo], ["Make it black and white."], steps=1, seed=0))
    # (the prompt is tokenized once more when it is checked against the length limit)
    assert generated[-2:] == [gen_expected, null_gen] and all(ids == gen_expected for ids in generated[:-2])
    assert edited[-2:] == [edit_expected, null_edit] and all(ids == edit_expected for ids in edited[:-2])
    # the reference image's feature slots sit right after the instruction, inside the user turn
    ids, slots = model.generator.tokens(batch["editing"], 256)
    assert len(slots) == 256 and ids[slots[0] - 1] == tok.convert_tokens_to_ids(IMG_START)
    assert ids[slots[-1] + 1] == tok.convert_tokens_to_ids(IMG_END)


def test_overlong_prompts_are_cut_in_training_and_refused_at_inference(model):
    tok = model.tokenizer
    long_edit = "Edit the image: " + "make the sky a little brighter " * 200 + "\n<image>"
    ids, slots = model.generator.tokens(long_edit, 256, truncate=True)
    assert len(ids) <= MAX_PROMPT_TOKENS + 1 + QUERIES and len(ids) > MAX_PROMPT_TOKENS - 8
    assert len(slots) == 256  # the reference image stays whole
    tail = tok.encode(f"{IMG_END}<|im_end|>\n<|im_start|>assistant\n{IMG_START}", add_special_tokens=False)
    assert ids[slots[-1] + 1 : slots[-1] + 1 + len(tail)] == tail  # so does the chat framing
    with pytest.raises(UserError, match="the limit is 767"):
        model.generator.tokens(long_edit, 256)


class InProcess:
    """An actor handle's `handle.method.remote(...)` calls, run on a local object (the
    run's ledger, here without Ray)."""

    def __init__(self, obj):
        self.obj = obj

    def __getattr__(self, name):
        return SimpleNamespace(remote=getattr(self.obj, name))


def test_long_captions_are_skipped_and_counted():
    ledger = DataLedger()
    out = SampleDecoder("generation", 56, InProcess(ledger), source="captions")(
        {
            "key": ["a", "b"],
            "url": ["u", "u"],
            "index": [0, 1],
            "skip": ["", ""],
            "image": [_jpeg(0), _jpeg(1)],
            "text": [("x" * 1000).encode(), ("x" * 1001).encode()],
        }
    )
    assert list(out["key"]) == ["a"]  # 1,000 characters pass, 1,001 do not
    assert ledger.get() == {"caption_too_long": 1} and ledger.epochs[("captions", 0)].skipped == 1
    edit = SampleDecoder("editing", 56)(
        {
            "key": ["e"],
            "url": ["u"],
            "index": [0],
            "skip": [""],
            "image": [_jpeg(0)],
            "source": [_jpeg(1)],
            "text": [("y" * 1500).encode()],
        }
    )
    assert list(edit["key"]) == ["e"]  # the release filters captions only, not instructions
