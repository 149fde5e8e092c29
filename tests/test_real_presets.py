"""The real presets at their published size, without a download: architectures built on
the meta device, parameter counts against the checkpoints', the widened tokenizer."""

import pytest

from tests.conftest import run_inline
from unilip.architectures import PUBLISHED_PARAMETERS
from unilip.errors import UserError
from unilip.presets import build_backbones
from unilip.summary import count, parameter_summary
from unilip.tokenizer import IMG_CONTEXT, IMG_END, IMG_START, INTERNVL3, build_tiny_tokenizer


@pytest.fixture(scope="module")
def summaries():
    return {p: dict(parameter_summary(p)) for p in ("unilip-1b", "unilip-3b")}


def test_real_presets_have_the_published_parameter_counts(summaries):
    one, three = summaries["unilip-1b"], summaries["unilip-3b"]
    assert one["mllm (InternVL3)"] == PUBLISHED_PARAMETERS["InternVL3-1B"]
    assert three["mllm (InternVL3)"] == PUBLISHED_PARAMETERS["InternVL3-2B"]
    assert one["dit (SANA)"] == PUBLISHED_PARAMETERS["SANA-600M-512px"]
    assert three["dit (SANA)"] == PUBLISHED_PARAMETERS["SANA-1600M-512px"]
    assert one["dc-ae"] == three["dc-ae"] == PUBLISHED_PARAMETERS["DC-AE-f32c32-SANA-1.1"]
    # the untied lm_head (tied, InternVL3-1B would count 802,293,120)
    assert one["  lm_head"] == 151674 * 896 and three["  lm_head"] == 151674 * 1536
    # UniLIP's own parts at real size: the connector is the LLM's last 6 layers (14,912,384
    # each at 1B), its final norm and a one-row embedding table (it takes embeddings)
    assert one["component connector"] == 6 * 14_912_384 + 896 + 896
    assert one["component pixel_decoder"] == one["  decoder"] == 159_223_171


def test_a_random_real_preset_is_wired_for_the_real_token_ids():
    parts = build_backbones("unilip-1b", init="random", device="meta")
    config = parts.mllm.config
    assert config.vision_config.initializer_range == 0.02  # not InternViT's published 1e-10: a tower of zeros
    assert parts.mllm.lm_head.weight is not parts.mllm.model.language_model.embed_tokens.weight
    tok = parts.tokenizer
    assert len(tok) == config.text_config.vocab_size == INTERNVL3.size
    assert tok.convert_tokens_to_ids(IMG_CONTEXT) == config.image_token_id == 151667
    assert tok.pad_token_id == 151643 and tok.eos_token_id == config.text_config.eos_token_id == 151645
    assert count(parts.dit) == PUBLISHED_PARAMETERS["SANA-600M-512px"]


def test_the_widened_tokenizer_keeps_the_fixture_s_merges():
    small, wide = build_tiny_tokenizer(), build_tiny_tokenizer(layout=INTERNVL3)
    text = f"Edit the image: make it brighter.\n{IMG_START}{IMG_CONTEXT * 3}{IMG_END}"
    ids = wide.encode(text, add_special_tokens=False)
    assert wide.decode(ids) == text
    assert ids[-5:] == [151665, 151667, 151667, 151667, 151666]
    plain = "A red fox in the snow, a photo."
    assert len(wide.encode(plain, add_special_tokens=False)) == len(small.encode(plain, add_special_tokens=False))
    assert max(wide.encode(plain, add_special_tokens=False)) < 151643  # ordinary tokens below the special ids


def test_model_summary_cli():
    r = run_inline("model", "summary", "--preset", "unilip-1b")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "938,193,024" in r.stdout and "591,747,872" in r.stdout and "312,250,275" in r.stdout
    r = run_inline("model", "summary", "--preset", "unilip-7b")
    assert r.returncode == 2 and "unknown model preset 'unilip-7b'" in r.stderr


def test_an_unknown_init_is_refused():
    with pytest.raises(UserError, match="model.init must be one of pretrained, random"):
        build_backbones("tiny", init="zeros")
