"""Converters from the published layouts, on small fixtures, through Ray, resumable."""

import io
import json

import pytest
from PIL import Image

from pipelines.convert import convert
from pipelines.read import source_dataset
from pipelines.sample_data import build_sample_dataset
from pipelines.shards import ShardWriter, join
from unilip.s3 import s3_access


def _png(path, color):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (80, 64), color).save(path)


def _keys(uri, task, s3):
    return [
        k for b in source_dataset(uri, task, s3, 56).iter_batches(batch_size=8, batch_format="numpy") for k in b["key"]
    ]


def test_gpt_image_edit_layout(tmp_path, ray_session):
    src = tmp_path / "gpt-image-edit"
    items = []
    for i in range(7):
        _png(src / "imgs" / f"in{i}.png", (i * 30, 10, 10))
        _png(src / "imgs" / f"out{i}.png", (10, i * 30, 10))
        items.append(
            {
                "image": [f"imgs/in{i}.png", f"imgs/out{i}.png"],
                "conversations": [
                    {"from": "human", "value": f"<image>\nMake it green {i}."},
                    {"from": "gpt", "value": ""},
                ],
            }
        )
    items.append({"image": ["imgs/in0.png", "imgs/in1.png", "imgs/out2.png"], "conversations": [{"value": "multi"}]})
    items.append({"image": ["imgs/missing.png", "imgs/out1.png"], "conversations": [{"value": "gone"}]})
    (src / "hqedit.json").write_text(json.dumps(items))
    s3 = s3_access()
    out = tmp_path / "out"
    logs = []
    manifests = convert("gpt-image-edit", str(src), str(out), s3, shard_size=3, log=logs.append)
    assert manifests["editing"].samples == 7 and len(manifests["editing"].shards) == 3
    assert "not_single_turn" in logs[-1] and "missing_edit_input" in logs[-1]  # the input image is the missing one
    rows = source_dataset(str(out), "editing", s3, 56).take_all()
    assert len(rows) == 7 and all(r["prompt"].startswith("Edit the image: Make it green") for r in rows)
    first = next(r for r in rows if r["key"] == "hqedit-3")  # input red-ish, output green-ish
    assert first["source"][0, 0, 0] == pytest.approx(90, abs=3) and first["image"][0, 0, 1] == pytest.approx(90, abs=3)
    # resumable: remove one finished shard; a rerun writes only that one again
    (out / "edit-000001.tar").unlink()
    (out / "edit-000001.tar.json").unlink()
    logs.clear()
    convert("gpt-image-edit", str(src), str(out), s3, shard_size=3, log=logs.append)
    assert "2 shard task(s) already complete" in logs[-1]
    assert sorted(_keys(str(out), "editing", s3)) == sorted(r["key"] for r in rows)


def test_sharegpt_4o_layout_both_files(tmp_path, ray_session, stack, s3):
    src = tmp_path / "sharegpt"
    t2i, ti2i = [], []
    for i in range(5):
        _png(src / "out" / f"g{i}.png", (200, 20 * i, 0))
        t2i.append({"input_prompt": f"A red square number {i}", "output_image": f"out/g{i}.png"})
    for i in range(3):
        _png(src / "in" / f"e{i}.png", (0, 0, 200))
        ti2i.append(
            {"input_prompt": f"Turn it red {i}", "input_image": [f"in/e{i}.png"], "output_image": f"out/g{i}.png"}
        )
    ti2i.append({"input_prompt": "two inputs", "input_image": ["in/e0.png", "in/e1.png"], "output_image": "out/g0.png"})
    (src / "text_to_image.json").write_text(json.dumps(t2i))
    (src / "text_and_image_to_image.json").write_text(json.dumps(ti2i))
    out = f"s3://{stack.bucket}/sharegpt-out"  # straight to the bucket
    manifests = convert("sharegpt-4o", str(src), out, s3, shard_size=2, log=lambda m: None)
    assert manifests["generation"].samples == 5 and manifests["editing"].samples == 3
    assert len(_keys(join(out, "generation"), "generation", s3)) == 5
    assert len(_keys(join(out, "editing"), "editing", s3)) == 3


def test_wds_validate_and_reshard(tmp_path, ray_session):
    s3 = s3_access()
    src = tmp_path / "wds"
    build_sample_dataset(str(src), s3, 10, 0, shard_size=5, size=96, log=lambda m: None)
    with ShardWriter(str(src / "extra"), s3, "bad", "generation") as w:
        w.write("broken", {"jpg": b"not an image", "txt": b"x"})
        w.write("fine", {"jpg": _jpeg(), "txt": b"a black square"})
    out = tmp_path / "resharded"
    logs = []
    manifest = convert("wds", str(src), str(out), s3, shard_size=3, log=logs.append)["generation"]
    assert manifest.samples == 11  # 10 + the good one; the broken image is skipped
    assert "bad_image" in logs[-1]
    assert max(s.samples for s in manifest.shards) <= 3
    assert len(_keys(str(out), "generation", s3)) == 11


def _jpeg():
    buf = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buf, format="JPEG")
    return buf.getvalue()


def _gpt_image_edit_fixture(src, n=3):
    items = []
    for i in range(n):
        _png(src / "imgs" / f"in{i}.png", (i * 30, 10, 10))
        _png(src / "imgs" / f"out{i}.png", (10, i * 30, 10))
        items.append(
            {
                "image": [f"imgs/in{i}.png", f"imgs/out{i}.png"],
                "conversations": [{"value": f"<image>\nMake it green {i}."}],
            }
        )
    (src / "hqedit.json").write_text(json.dumps(items))


def _sharegpt_fixture(src, n=3):
    t2i, ti2i = [], []
    for i in range(n):
        _png(src / "out" / f"g{i}.png", (200, 20 * i, 0))
        _png(src / "in" / f"e{i}.png", (0, 0, 200))
        t2i.append({"input_prompt": f"A red square number {i}", "output_image": f"out/g{i}.png"})
        ti2i.append(
            {"input_prompt": f"Turn it red {i}", "input_image": [f"in/e{i}.png"], "output_image": f"out/g{i}.png"}
        )
    (src / "text_to_image.json").write_text(json.dumps(t2i))
    (src / "text_and_image_to_image.json").write_text(json.dumps(ti2i))


def test_every_recipe_plans_against_what_the_converters_write(tmp_path, stack, s3, ray_session):
    """The published layouts converted into the bucket the full recipes name; then every
    recipe's sources and eval set are planned from the manifests the converters wrote."""
    from jobs.training.recipes import load_recipe, recipe_names
    from pipelines.ingest import source_specs
    from pipelines.shards import read_manifest

    s3.ensure_bucket("unilip-data")
    data = "s3://unilip-data"
    build_sample_dataset(str(tmp_path / "tars"), s3, 4, 0, shard_size=4, size=64, log=lambda m: None)
    for out in ("blip3o/pretrain-long", "blip3o/pretrain-short", "blip3o/journeydb", "blip3o/sft-60k", "imagenet/val"):
        convert("wds", str(tmp_path / "tars" / "generation"), join(data, out), s3, log=lambda m: None)
    _gpt_image_edit_fixture(tmp_path / "gpt-image-edit")
    convert(
        "gpt-image-edit", str(tmp_path / "gpt-image-edit"), join(data, "gpt-image-edit-1.5m"), s3, log=lambda m: None
    )
    _sharegpt_fixture(tmp_path / "sharegpt")
    convert("sharegpt-4o", str(tmp_path / "sharegpt"), join(data, "sharegpt-4o-image"), s3, log=lambda m: None)
    for name in recipe_names():
        recipe = load_recipe(name)
        plan = source_specs(recipe.data, s3)  # reads every manifest and checks its task
        assert set(plan) == {s.name for s in recipe.data.sources} and all(p.samples > 0 for p in plan.values()), name
        assert read_manifest(recipe.data.eval_uri, s3).task == "generation", name
    stage3 = source_specs(load_recipe("gen-stage3").data, s3)
    assert {n: p.task for n, p in stage3.items()} == {
        "blip3o-60k": "generation",
        "sharegpt-4o-t2i": "generation",
        "sharegpt-4o-image": "editing",
    }


def test_wds_conversion_keeps_only_what_training_uses_and_counts_it_as_training_does(tmp_path, ray_session):
    s3 = s3_access()
    src = tmp_path / "bad-wds"
    tiny = io.BytesIO()
    Image.new("RGB", (2, 2)).save(tiny, format="PNG")
    with ShardWriter(str(src), s3, "mixed", "generation") as w:
        w.write("good", {"jpg": _jpeg(), "txt": b"a black square"})
        w.write("blank", {"jpg": _jpeg(), "txt": b"   \n\t "})
        w.write("latin1", {"jpg": _jpeg(), "txt": b"caf\xe9 au lait"})
        w.write("tiny", {"png": tiny.getvalue(), "txt": b"a 2x2 image"})
        w.write("mute", {"jpg": _jpeg()})
        w.write("long", {"jpg": _jpeg(), "txt": b"x" * 1001})
    logs = []
    manifest = convert("wds", str(src), str(tmp_path / "out"), s3, shard_size=10, log=logs.append)["generation"]
    assert manifest.samples == 1
    for reason in ("empty_text", "bad_text", "image_too_small", "missing_text", "caption_too_long"):
        assert f"'{reason}': 1" in logs[-1], (reason, logs[-1])
    rows = source_dataset(str(tmp_path / "out"), "generation", s3, 56).take_all()
    assert [r["key"] for r in rows] == ["good"]  # and training reads all of it
