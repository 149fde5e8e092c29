"""`unilip eval`: the paper's benchmarks on the tiny model, with synthetic bench files in
the official formats (no benchmark data is copied here; GenEval's metadata ships with the
project under its MIT licence).

Layouts pass each scorer's reading logic (`unilip eval check`); an image depends on its
seed and the batch size, never on the actor count; a killed run resumes without redoing
finished images and ends with the files of an uninterrupted run; summarize applies each
benchmark's published formula to synthetic scorer outputs; recon's merged FID moments
equal a one-shot computation.
"""

import io
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from skimage.metrics import structural_similarity

from jobs.evaluation.fid import inception_network
from jobs.evaluation.images import Sampling, run_eval
from jobs.evaluation.metrics import FeatureMoments, frechet, frechet_distance, image_metrics
from jobs.evaluation.recon import eval_crop, run_recon
from jobs.evaluation.suites import DPG, SUITE_FILES, BenchError, GenEval, ImgEdit, Output, Wise, WiseVerified, benchmark
from tests.conftest import ROOT, run_cli, run_inline
from unilip.model import UniLIP

QUIET = dict(log=lambda m: None)
FAST = Sampling(steps=2)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(UniLIP.from_preset("tiny").save_pretrained(tmp_path_factory.mktemp("eval-model") / "unilip-tiny"))


def geneval_file(root: Path, n: int = 3) -> Path:
    rows = [
        {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"},
        {
            "tag": "two_object",
            "include": [{"class": "dog", "count": 1}, {"class": "cup", "count": 1}],
            "prompt": "a photo of a dog and a cup",
        },
        {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a photo of a red car"},
    ][:n]
    path = root / "prompts" / "evaluation_metadata.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def wise_checkout(root: Path) -> Path:
    data = root / "WISE_legacy" / "data"
    data.mkdir(parents=True)
    for name, ids in (
        ("cultural_common_sense", [1, 2]),
        ("spatio-temporal_reasoning", [401, 600]),
        ("natural_science", [701]),
    ):
        rows = [
            {"Prompt": f"synthetic prompt {i}", "Explanation": "-", "Category": "-", "Subcategory": "-", "prompt_id": i}
            for i in ids
        ]
        (data / f"{name}.json").write_text(json.dumps(rows))
    return root


def imgedit_dir(root: Path) -> Path:
    rng = np.random.default_rng(0)
    edits = {}
    for key, folder, kind in (("22", "animal", "add"), ("1082", "style", "style")):
        (root / folder).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)).save(root / folder / f"{key}.jpg")
        edits[key] = {"id": f"{folder}/{key}.jpg", "prompt": f"Make image {key} blue.", "edit_type": kind}
    (root / "basic_edit.json").write_text(json.dumps(edits))
    return root


def dpg_checkout(root: Path) -> Path:
    prompts = root / "dpg_bench" / "prompts"
    prompts.mkdir(parents=True)
    for key in ("0", "partiprompts7"):
        (prompts / f"{key}.txt").write_text(f"A long synthetic description number {key} of a scene with a red barn.")
    return root


def test_layouts_pass_each_scorers_reading(ray_session, model_dir, tmp_path):
    runs = {
        "geneval": (GenEval(), geneval_file(tmp_path / "geneval")),
        "wise": (Wise(), wise_checkout(tmp_path / "wise")),
        "imgedit": (ImgEdit(), imgedit_dir(tmp_path / "imgedit")),
        "dpg": (DPG(), dpg_checkout(tmp_path / "ella")),
    }
    out = tmp_path / "out"
    for name, (bench, files) in runs.items():
        with pytest.raises(BenchError, match="--allow-unpinned"):  # synthetic files are not the pinned ones
            bench.verify(bench.locate(str(files)))
        record = run_eval(bench, model_dir, str(out), str(files), FAST, batch=3, allow_unpinned=True, **QUIET)
        assert record["check"] == "ok", (name, record["check"])
        assert record["mlflow_run"]  # the stack's MLflow: one run per bench and OUT
        assert record["sampling"] == {"guidance_scale": 4.5, "steps": 2, "solver": "dpm"}
        assert record["prompt_format"]["generation"] == "Generate an image: {prompt}"
        manifest = [json.loads(line) for line in (out / f"{name}.manifest.jsonl").read_text().splitlines()]
        assert len(manifest) == record["images"] and all(len(r["sha256"]) == 64 for r in manifest)
    # GenEval: <i:05d>/metadata.jsonl (one JSON object, the prompt's line) + samples/<k:05d>.png, seed 42 + k
    meta = json.loads((out / "geneval" / "00001" / "metadata.jsonl").read_text())
    assert meta["prompt"] == "a photo of a dog and a cup"
    assert sorted(p.name for p in (out / "geneval" / "00001" / "samples").iterdir()) == [
        f"{k:05d}.png" for k in range(4)
    ]
    rows = {(r["key"], r["k"]): r for r in map(json.loads, (out / "geneval.manifest.jsonl").read_text().splitlines())}
    assert [rows[("00002", k)]["seed"] for k in range(4)] == [42, 43, 44, 45]
    assert sorted(p.name for p in (out / "wise").iterdir()) == ["1.png", "2.png", "401.png", "600.png", "701.png"]
    assert sorted(p.name for p in (out / "imgedit").iterdir()) == ["1082.png", "22.png"]
    with Image.open(out / "dpg" / "partiprompts7.png") as grid:  # a 2x2 grid of 448 px samples, tile k=1 top right
        assert grid.size == (896, 896)
        tile = np.asarray(Image.open(out / "dpg.tiles" / "partiprompts7" / "1.png"))
        assert np.array_equal(np.asarray(grid)[:448, 448:], tile)
    # check as the CLI runs it, then a planted mistake for each
    for name in runs:
        ok = run_inline("eval", "check", name, str(out))  # the bench files its run.json names
        assert ok.returncode == 0 and "layout ok" in ok.stdout, (name, ok.stdout + ok.stderr)
    (out / "geneval" / "00000" / "samples" / "00003.png").unlink()
    (out / "wise" / "401.png").rename(out / "wise" / "4010.png")
    (out / "dpg" / "notes.txt").write_text("x")
    assert GenEval().check(out, GenEval().locate(str(runs["geneval"][1]))) == ["00000/samples: 3 images, expected 4"]
    assert Wise().check(out, Wise().locate(str(runs["wise"][1]))) == [
        "wise/401.png missing",
        "wise/4010.png: no such prompt_id",
    ]
    assert DPG().check(out, DPG().locate(str(runs["dpg"][1]))) == [
        "dpg/notes.txt: not a prompt's name (the scorer would fail on it)"
    ]
    bad = run_inline("eval", "check", "geneval", str(out), "--bench", str(runs["geneval"][1]))
    assert bad.returncode == 1 and "00000/samples: 3 images, expected 4" in bad.stdout


def test_an_image_depends_on_its_seed_and_batch_not_on_the_actor_count(ray_session, model_dir, tmp_path):
    files = str(geneval_file(tmp_path / "bench"))
    one = run_eval(
        GenEval(), model_dir, str(tmp_path / "one"), files, FAST, n=2, batch=2, actors=1, allow_unpinned=True, **QUIET
    )
    two = run_eval(
        GenEval(), model_dir, str(tmp_path / "two"), files, FAST, n=2, batch=2, actors=2, allow_unpinned=True, **QUIET
    )
    assert one["images"] == two["images"] == 6
    assert (tmp_path / "one" / "geneval.manifest.jsonl").read_text() != ""

    def hashes(d):
        return {
            r["path"]: r["sha256"] for r in map(json.loads, (d / "geneval.manifest.jsonl").read_text().splitlines())
        }

    assert hashes(tmp_path / "one") == hashes(tmp_path / "two")  # bit-equal PNGs
    # another batch size may move a value by one level (batched kernels, padding), no more
    four = run_eval(
        GenEval(), model_dir, str(tmp_path / "four"), files, FAST, n=2, batch=4, allow_unpinned=True, **QUIET
    )
    assert four["batch"] == 4
    for path in hashes(tmp_path / "one"):
        a = np.asarray(Image.open(tmp_path / "one" / path)).astype(int)
        b = np.asarray(Image.open(tmp_path / "four" / path)).astype(int)
        assert np.abs(a - b).max() <= 1, path


def test_a_killed_run_resumes_and_ends_with_the_files_of_an_uninterrupted_run(stack, model_dir, tmp_path):
    files = str(geneval_file(tmp_path / "bench"))
    args = [
        "eval",
        "geneval",
        "--model",
        model_dir,
        "--bench",
        files,
        "--steps",
        "2",
        "--batch",
        "2",
        "--allow-unpinned",
    ]
    cmd = [sys.executable, "-m", "cli", *args, "--out", str(tmp_path / "killed")]
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=os.environ.copy(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 300
        samples = lambda: list((tmp_path / "killed" / "geneval").rglob("*.png"))  # noqa: E731
        while len(samples()) < 4 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert proc.poll() is None and len(samples()) >= 4, "the run ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its actors' session
    finally:
        proc.wait()
        log.close()
    done = len(samples())
    assert 4 <= done < 12
    again = run_cli(*args, "--out", str(tmp_path / "killed"))
    assert again.returncode == 0, again.stderr[-3000:]
    skipped = int(again.stdout.split(" batches already done")[0].rsplit(" ", 1)[1])
    assert skipped == done // 2  # whole batches of 2 that were finished were not rendered again
    full = run_cli(*args, "--out", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr[-3000:]
    for p in sorted((tmp_path / "full" / "geneval").rglob("*")):
        if p.is_file():
            assert (tmp_path / "killed" / p.relative_to(tmp_path / "full")).read_bytes() == p.read_bytes(), p
    killed = (tmp_path / "killed" / "geneval.manifest.jsonl").read_text().splitlines()
    assert len(killed) == 12 and {json.loads(r)["sha256"] for r in killed} == {
        json.loads(r)["sha256"] for r in (tmp_path / "full" / "geneval.manifest.jsonl").read_text().splitlines()
    }


def test_summarize_applies_each_benchmarks_published_formula(tmp_path):
    out = tmp_path / "out"
    # GenEval: the mean of the tag means (summary_scores.py)
    out.mkdir()
    rows = [
        ("single_object", True),
        ("single_object", True),
        ("two_object", False),
        ("two_object", True),
        ("colors", True),
    ]
    (out / "geneval.results.jsonl").write_text(
        "".join(json.dumps({"tag": t, "correct": c, "metadata": "{}"}) + "\n" for t, c in rows)
    )
    s = GenEval().summarize(out, GenEval().locate(None))
    assert s["geneval/overall"] == pytest.approx((1 + 0.5 + 1) / 3) and s["geneval/two_object"] == 0.5
    # WISE legacy: WiScore per image, category means by id range, 0.4/0.167/0.133/0.1/0.1/0.1
    results = out / "wise" / "Results"
    results.mkdir(parents=True)
    lines = [
        {"prompt_id": i, "consistency": i % 3, "realism": (i // 3) % 3, "aesthetic_quality": (i // 9) % 3}
        for i in range(1, 1001)
    ]
    (results / "all_scores_results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    s = Wise().summarize(out, {})
    per = {
        r["prompt_id"]: (0.7 * r["consistency"] + 0.2 * r["realism"] + 0.1 * r["aesthetic_quality"]) / 2 for r in lines
    }
    mean = lambda lo, hi: np.mean([per[i] for i in range(lo, hi + 1)])  # noqa: E731
    expected = (
        0.4 * mean(1, 400)
        + 0.167 * mean(401, 567)
        + 0.133 * mean(568, 700)
        + 0.1 * mean(701, 800)
        + 0.1 * mean(801, 900)
        + 0.1 * mean(901, 1000)
    )
    assert s["wise/overall"] == pytest.approx(expected) and s["wise/time"] == pytest.approx(mean(401, 567))
    (results / "all_scores_results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines[:-1]))
    with pytest.raises(BenchError, match="1 prompt_ids have no score"):
        Wise().summarize(out, {})
    # WISE verified: binary, 0.4 + 5 x 0.12 over its own id ranges
    results = out / "wise-verified" / "Results-qwen35"
    results.mkdir(parents=True)
    (results / "x_scores_results.jsonl").write_text(
        "".join(json.dumps({"prompt_id": i, "score": int(i % 3 == 0)}) + "\n" for i in range(1, 1001))
    )
    s = WiseVerified().summarize(out, {})
    b = lambda lo, hi: np.mean([float(i % 3 == 0) for i in range(lo, hi + 1)])  # noqa: E731
    assert s["wise-verified/overall"] == pytest.approx(
        0.4 * b(1, 400) + 0.12 * (b(401, 520) + b(521, 640) + b(641, 760) + b(761, 880) + b(881, 1000))
    )
    # ImgEdit: per edit the mean of its `Name: N` lines (2 decimals), per type means (2 decimals), overall the mean of 9
    bench = tmp_path / "imgedit"
    bench.mkdir()
    types = ImgEdit.TYPES
    edits = {str(i): {"id": "x.jpg", "prompt": "p", "edit_type": types[i % 9]} for i in range(27)}
    (bench / "basic_edit.json").write_text(json.dumps(edits))
    (out / "imgedit").mkdir()
    judged = {
        str(
            i
        ): f"Brief reasoning: ok.\nPrompt Compliance: {1 + i % 5}\nVisual Seamlessness: {1 + (i * 2) % 5}\nPhysical & Detail Fidelity: 4"
        for i in range(27)
    }
    judged["26"] = {"error": "rate limited"}  # an API error, stored as a dict: no score
    (out / "imgedit" / "result.json").write_text(json.dumps(judged))
    s = ImgEdit().summarize(out, {"Benchmark/Basic/basic_edit.json": bench / "basic_edit.json"})
    per_edit = {k: round(((1 + int(k) % 5) + (1 + (int(k) * 2) % 5) + 4) / 3, 2) for k in judged if k != "26"}
    of_type = {t: [v for k, v in per_edit.items() if edits[k]["edit_type"] == t] for t in types}
    per_type = {t: round(sum(v) / len(v), 2) for t, v in of_type.items()}  # step2_typescore.py's arithmetic
    assert s["imgedit/scored"] == 26 and s["imgedit/overall"] == pytest.approx(np.mean(list(per_type.values())))
    # DPG: 100 x the mean of the per-image scores (compute_dpg_bench.py's results file)
    (out / "dpg.results.txt").write_text(
        "/x/dpg/0.png, 1.0, 0.5, 1.0, 0.5, 0.75\n/x/dpg/1.png, 0.5, 0.5, 0.5, 0.5, 0.5\n"
        "L1 category scores:\n\tentity: 60.0\nDPG-Bench score: 62.5\n"
    )
    s = DPG().summarize(out, {})
    assert s["dpg/overall"] == pytest.approx(62.5) and s["dpg/reported"] == 62.5


def test_the_shipped_geneval_file_is_the_pinned_one_and_bench_errors_are_clear(tmp_path):
    bench = benchmark("geneval")
    files = bench.locate(None)
    assert bench.verify(files) == {
        "prompts/evaluation_metadata.jsonl": bench.pinned["prompts/evaluation_metadata.jsonl"]
    }
    assert len(bench.items(files)) == 553 * 4 and (SUITE_FILES / "GENEVAL_LICENSE").read_text().startswith(
        "MIT License"
    )
    # the metadata file itself, under any name (as --help says)
    renamed = tmp_path / "my_prompts.jsonl"
    renamed.write_bytes(files["prompts/evaluation_metadata.jsonl"].read_bytes())
    assert bench.locate(str(renamed)) == {"prompts/evaluation_metadata.jsonl": renamed} and bench.verify(
        bench.locate(str(renamed))
    )
    with pytest.raises(BenchError, match="wise needs --bench"):
        Wise().locate(None)
    with pytest.raises(BenchError, match=r"WISE_legacy/data/cultural_common_sense.json not found"):
        Wise().locate(str(tmp_path))
    out = run_inline("eval", "imgedit", "--model", "x", "--out", str(tmp_path / "o"), "--bench", str(tmp_path))
    assert out.returncode == 2 and "basic_edit.json not found" in out.stderr
    with pytest.raises(BenchError, match="unknown benchmark"):
        benchmark("gedit")


def test_geneval_score_drives_the_official_scorer_as_a_subprocess(ray_session, model_dir, tmp_path):
    """`--score` runs evaluate_images.py's command line in the scorer's environment, then
    summarizes. The detector cannot run here (CUDA, Mask2Former weights): a stand-in script
    at the official path reads the layout as the scorer does and writes its results format."""
    repo = tmp_path / "geneval-repo"
    (repo / "evaluation").mkdir(parents=True)
    (repo / "evaluation" / "evaluate_images.py").write_text("""
import argparse, json, os, re
p = argparse.ArgumentParser(); p.add_argument("imagedir"); p.add_argument("--outfile"); p.add_argument("--model-path")
a = p.parse_args()
rows = []
for sub in os.listdir(a.imagedir):
    folder = os.path.join(a.imagedir, sub)
    if not os.path.isdir(folder) or not sub.isdigit():
        continue
    meta = json.load(open(os.path.join(folder, "metadata.jsonl")))
    for name in os.listdir(os.path.join(folder, "samples")):
        if re.match(r"\\d+\\.png", name):
            rows.append({"filename": name, "tag": meta["tag"], "correct": name.startswith("00000"), "metadata": json.dumps(meta)})
open(a.outfile, "w").write("".join(json.dumps(r) + "\\n" for r in rows))
""")
    bench = geneval_file(tmp_path / "bench")
    out = run_cli(
        "eval",
        "geneval",
        "--model",
        model_dir,
        "--bench",
        str(bench),
        "--out",
        str(tmp_path / "out"),
        "--steps",
        "1",
        "--n",
        "2",
        "--allow-unpinned",
        "--score",
        "--scorer-repo",
        str(repo),
        "--scorer-python",
        sys.executable,
        "--detector-dir",
        str(tmp_path),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "evaluate_images.py" in out.stdout and "geneval/overall" in out.stdout
    assert float(out.stdout.split("geneval/overall")[1].split()[0]) == pytest.approx(
        0.5
    )  # sample 0 of 2 correct per prompt
    run_id = json.loads((tmp_path / "out" / "geneval.run.json").read_text())["mlflow_run"]
    assert f"logged to MLflow run {run_id}" in out.stdout
    assert mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_run(run_id).data.metrics[
        "geneval/overall"
    ] == pytest.approx(0.5)
    missing = run_inline(
        "eval", "wise", "--model", model_dir, "--bench", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")
    )
    assert missing.returncode == 2


def test_recon_metrics_and_merged_fid_moments(ray_session, model_dir, tmp_path):
    rng = np.random.default_rng(0)
    real = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    fake = np.clip(real.astype(int) + rng.integers(-8, 9, real.shape), 0, 255).astype(np.uint8)
    m = image_metrics(real, fake)
    mse = np.mean((real.astype(float) - fake) ** 2)
    assert m["psnr"] == pytest.approx(10 * np.log10(255**2 / mse))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        verbatim = structural_similarity(
            fake.astype(np.float32) / 255,
            real.astype(np.float32) / 255,
            multichannel=True,
            data_range=2.0,
            channel_axis=-1,
        )  # the release's evaluator.py:190
    assert m["ssim_release"] == pytest.approx(verbatim) and m["ssim_release"] > m["ssim"]
    # moments merged batch by batch = the one-shot FID
    a, b = rng.normal(size=(300, 8)), rng.normal(size=(300, 8)) * 1.5 + 0.3
    ma, mb = FeatureMoments(8), FeatureMoments(8)
    for i in range(0, 300, 64):
        ma.add(a[i : i + 64]), mb.add(b[i : i + 64])
    assert frechet(ma, mb) == pytest.approx(frechet_distance(a, b), rel=1e-9)
    # torchvision's Resize(R) + CenterCrop(R) framing
    im = Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    assert eval_crop(buf.getvalue(), 56).shape == (56, 56, 3)
    # the command on an image folder, with FID weights (random: none can be downloaded)
    torch.manual_seed(0)
    weights = tmp_path / "inception.safetensors"
    save_file({k: v.contiguous() for k, v in inception_network().state_dict().items()}, str(weights))
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (70, 60, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    record = run_recon(
        model_dir, str(folder), str(tmp_path / "out"), size=56, fid_weights=str(weights), batch=2, **QUIET
    )
    assert record["images"] == 4 and set(record["metrics"]) == {
        "recon/psnr",
        "recon/ssim",
        "recon/ssim_release",
        "recon/rfid",
    }
    assert np.isfinite(record["metrics"]["recon/rfid"])
    per_image = (tmp_path / "out" / "recon-56.per_image.jsonl").read_text().splitlines()
    assert sorted(json.loads(r)["key"] for r in per_image) == ["0.jpg", "1.jpg", "2.jpg", "3.jpg"]
    assert Output(str(tmp_path / "out")).keys() == {"recon-56.json", "recon-56.per_image.jsonl"}


def test_eval_writes_to_s3_and_recon_reads_a_source(ray_session, sample, s3, model_dir, tmp_path):
    """OUT as an s3:// prefix (the layout, the manifest, the run record); recon over a
    project source (manifest.json + webdataset shards on S3)."""
    bench = wise_checkout(tmp_path / "wise")
    out = f"{sample}/eval/tiny"
    record = run_eval(Wise(), model_dir, out, str(bench), FAST, batch=4, allow_unpinned=True, **QUIET)
    keys = {k[len(out) + 1 :] for k in s3.list_keys(out + "/")}
    assert {"wise/1.png", "wise/701.png", "wise.manifest.jsonl", "wise.run.json"} <= keys
    again = run_eval(
        Wise(), model_dir, out, str(bench), FAST, batch=4, allow_unpinned=True, **QUIET
    )  # nothing left to do
    assert again["images"] == record["images"] == 5 and again["seconds"] < record["seconds"]
    result = run_recon(model_dir, f"{sample}/sample-eval/generation", str(tmp_path / "recon"), size=56, **QUIET)
    assert result["images"] == 4 and set(result["metrics"]) == {"recon/psnr", "recon/ssim", "recon/ssim_release"}
