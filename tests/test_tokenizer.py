from transformers import AutoTokenizer

from unilip.tokenizer import IMG_CONTEXT, IMG_END, IMG_START, SPECIAL_TOKENS, build_tiny_tokenizer


def test_tiny_tokenizer_special_tokens_and_round_trip(tmp_path):
    build_tiny_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)  # loads what save_pretrained wrote
    for t in SPECIAL_TOKENS:
        ids = tok.encode(t, add_special_tokens=False)
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids[0]) == t
    assert len({tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}) == len(SPECIAL_TOKENS)
    text = f"Edit the image.\n{IMG_START}{IMG_CONTEXT * 4}{IMG_END} Make it brighter."
    ids = tok.encode(text, add_special_tokens=False)
    assert ids.count(tok.convert_tokens_to_ids(IMG_CONTEXT)) == 4
    assert tok.decode(ids) == text
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "Generate an image."}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|im_start|>user\nGenerate an image.<|im_end|>\n<|im_start|>assistant\n"
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"
    assert len(tok) < 2048  # small: the tiny model's embedding table stays small


def test_tiny_tokenizer_is_deterministic(tmp_path):
    a = build_tiny_tokenizer(tmp_path / "a")
    b = build_tiny_tokenizer(tmp_path / "b")
    assert a.get_vocab() == b.get_vocab()
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (tmp_path / "b" / "tokenizer.json").read_text()
