import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.sample_data import PHOTOS, apply_edit, build_sample_dataset
from pipelines.shards import Manifest
from tests.conftest import run_inline
from unilip.errors import UserError
from unilip.images import read_image
from unilip.s3 import s3_access


def _samples(tar_bytes: bytes) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tf:
        for m in tf.getmembers():
            key, _, ext = m.name.partition(".")
            out.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return out


def _mean_abs(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, float) - np.asarray(b, float)).mean())


def _build_local(root: Path, **kw) -> dict:
    args = dict(n_gen=10, n_edit=24, seed=3, shard_size=7, size=160)
    args.update(kw)
    return build_sample_dataset(str(root), s3_access(), log=lambda m: None, **args)


def test_shards_manifests_and_generation_samples(tmp_path):
    manifests = _build_local(tmp_path)
    gen = Manifest.from_json((tmp_path / "generation" / "manifest.json").read_text())
    assert gen.samples == 10 and [s.samples for s in gen.shards] == [7, 3]
    assert manifests["editing"].samples == 24 and len(manifests["editing"].shards) == 4
    captions = {p.caption for p in PHOTOS}
    keys = []
    for shard in gen.shards:
        for key, members in _samples((tmp_path / "generation" / shard.path).read_bytes()).items():
            keys.append(key)
            assert set(members) == {"jpg", "txt", "json"}
            img = read_image(members["jpg"])
            assert max(img.size) == 160 and min(img.size) >= 16
            caption = members["txt"].decode()
            assert any(caption.lower().startswith(c.lower()) for c in captions), caption
            assert json.loads(members["json"])["source"]
    assert keys == [f"gen{i:08d}" for i in range(10)]


def test_every_edit_target_is_the_recomputed_edit_of_its_input(tmp_path):
    manifests = _build_local(tmp_path, n_gen=0, n_edit=60)
    assert "generation" not in manifests
    ops = set()
    for shard in manifests["editing"].shards:
        for key, members in _samples((tmp_path / "editing" / shard.path).read_bytes()).items():
            assert set(members) == {"input.jpg", "output.jpg", "txt", "json"}, key
            meta = json.loads(members["json"])
            ops.add(meta["op"])
            src, out = read_image(members["input.jpg"]), read_image(members["output.jpg"])
            recomputed = apply_edit(src, meta["op"], meta["params"])
            assert recomputed.size == out.size, key
            err = _mean_abs(recomputed, out)
            assert err < 3.0, (key, meta, err)  # only the output's JPEG encoding differs
            if src.size == out.size:  # the edit really changed the picture
                assert _mean_abs(src, out) > err + 2.0, (key, meta)
            assert members["txt"].decode().endswith(".")
    assert len(ops) >= 8  # many kinds of edits


def test_deterministic_under_seed(tmp_path):
    _build_local(tmp_path / "a", n_gen=6, n_edit=6)
    _build_local(tmp_path / "b", n_gen=6, n_edit=6)
    _build_local(tmp_path / "c", n_gen=6, n_edit=6, seed=4)
    for task, shard in (("generation", "gen-000000.tar"), ("editing", "edit-000000.tar")):
        a, b, c = ((tmp_path / x / task / shard).read_bytes() for x in "abc")
        assert a == b and a != c


def test_writes_to_s3(s3, stack):
    uri = f"s3://{stack.bucket}/sample-test"
    build_sample_dataset(uri, s3, 5, 3, shard_size=4, size=96, log=lambda m: None)
    keys = s3.list_keys(uri)
    assert keys == sorted(
        [
            f"{uri}/editing/edit-000000.tar",
            f"{uri}/editing/manifest.json",
            f"{uri}/generation/gen-000000.tar",
            f"{uri}/generation/gen-000001.tar",
            f"{uri}/generation/manifest.json",
        ]
    )
    samples = _samples(s3.get_bytes(f"{uri}/editing/edit-000000.tar"))
    assert len(samples) == 3


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"n_gen": -1}, "--gen >= 0"),
        ({"n_gen": 0, "n_edit": 0}, "at least one sample"),
        ({"shard_size": 0}, "--shard-size"),
        ({"size": 10}, "--size"),
    ],
)
def test_bad_arguments(tmp_path, kw, message):
    with pytest.raises(UserError, match=message):
        _build_local(tmp_path, **kw)


def test_cli_errors_are_clear(stack, tmp_path):
    r = run_inline("data", "sample", "--out", "s3://bucket-that-does-not-exist/x", "--gen", "2", "--edit", "0")
    assert r.returncode == 2 and "bucket-that-does-not-exist" in r.stderr and "Traceback" not in r.stderr
    r = run_inline("data", "sample", "--out", str(tmp_path), "--gen", "-3")
    assert r.returncode == 2 and "--gen" in r.stderr
    r = run_inline("data", "sample", "--out", str(tmp_path / "ok"), "--gen", "2", "--edit", "1", "--size", "64")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "ok" / "editing" / "manifest.json").exists()
