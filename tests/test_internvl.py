"""`unilip export internvl`: the understanding half of a model as a standard InternVL3
checkpoint, loaded with plain `transformers` (as someone who has never heard of this project,
or a tool that evaluates InternVL3, loads it) and answering as `unilip understand` does."""

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from pipelines.sample_data import generation_sample
from tests.conftest import run_inline
from tests.release_fixture import perturbed_tiny
from unilip.images import read_image
from unilip.model import UniLIP

QUESTION = "What is in this picture?"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A model whose encoder moved off the preset's weights (as training moves it), saved,
    then exported by the command line."""
    root = tmp_path_factory.mktemp("internvl")
    model_dir = perturbed_tiny().save_pretrained(root / "model")
    out = run_inline("export", "internvl", str(model_dir), "--out", str(root / "internvl"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert str(root / "internvl") in out.stdout
    return model_dir, root / "internvl"


def photo(i: int) -> Image.Image:
    """A sample photo at 448 x 448: neither processor resizes it (PIL's bicubic, which
    `UniLIP.preprocess` uses as InternVL's training did, and torchvision's, the default of
    `transformers`' processor, differ by a level here and there)."""
    return read_image(generation_sample(0, i, 448)["jpg"]).resize((448, 448), Image.Resampling.BICUBIC)


def test_the_export_is_a_plain_transformers_internvl3_with_the_trained_encoder(exported):
    model_dir, export = exported
    assert sorted(p.name for p in export.glob("*.safetensors")) == ["model.safetensors"]
    assert not list(export.glob("*.bin")) and not list(export.glob("*.py"))  # no pickles, no remote code
    hf = AutoModelForImageTextToText.from_pretrained(export)
    assert type(hf).__name__ == "InternVLForConditionalGeneration"
    ours, preset = UniLIP.from_pretrained(model_dir), UniLIP.from_preset("tiny")
    exported_state = hf.state_dict()
    for name, module in (
        ("vision_tower", ours.encoder.vision_tower),
        ("multi_modal_projector", ours.encoder.projector),
    ):
        for key, value in module.state_dict().items():
            assert torch.equal(exported_state[f"model.{name}.{key}"], value), key
    trained = preset.encoder.vision_tower.state_dict()
    assert not all(torch.equal(exported_state[f"model.vision_tower.{k}"], v) for k, v in trained.items())
    llm = preset.mllm.model.language_model.state_dict()  # frozen: the preset's
    assert all(torch.equal(exported_state[f"model.language_model.{k}"], v) for k, v in llm.items())


def test_the_export_answers_as_unilip_understand(exported, tmp_path):
    model_dir, export = exported
    hf = AutoModelForImageTextToText.from_pretrained(export).eval()
    processor = AutoProcessor.from_pretrained(export)
    ours = UniLIP.from_pretrained(model_dir).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)

    def inputs(image):  # one 448 px image, as `unilip understand` reads it (InternVL3 tiles larger ones)
        return processor(images=[image], text=text, return_tensors="pt", crop_to_patches=False)

    # the same tokens and pixels as UniLIP's own understanding path
    ids, pixels = ours.understanding_inputs(photo(0), QUESTION)
    got = inputs(photo(0))
    assert got["input_ids"].tolist() == ids.tolist()
    assert (got["pixel_values"] - pixels).abs().max() < 1e-5
    # the same next-token distribution, which depends on the image
    with torch.no_grad():
        logits = hf(**got).logits[0, -1]
        want = ours.mllm(input_ids=ids, pixel_values=pixels).logits[0, -1]
        other = hf(**inputs(photo(1))).logits[0, -1]
    assert torch.allclose(logits, want, atol=1e-5) and not torch.allclose(logits, other, atol=1e-3)
    # and the same answer, token for token, as the command
    path = tmp_path / "photo.png"
    photo(0).save(path)
    cli = run_inline("understand", "--model", str(model_dir), "--image", str(path), "--question", QUESTION)
    assert cli.returncode == 0, cli.stderr[-3000:]
    with torch.no_grad():
        out = hf.generate(**got, max_new_tokens=64, do_sample=False)
    answer = processor.decode(out[0, got["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    assert answer == cli.stdout.strip()


def test_export_errors_name_the_problem(tmp_path):
    missing = run_inline("export", "internvl", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"))
    assert missing.returncode == 2 and "nowhere" in missing.stderr
