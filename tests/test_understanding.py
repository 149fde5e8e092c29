"""Understanding, measured. `unilip eval understanding`: the real harness (lmms-eval) end to
end on a tiny task in its own format, made here: SEED-Bench's prompts and scorer on four
local images, through the export of a tiny model whose encoder was trained to make InternVL3
answer them. And the signal the reconstruction stages log while the encoder trains."""

import copy
import csv
import json
import os
import shutil
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import datasets
import mlflow
import numpy as np
import pytest
import torch
from PIL import Image

from jobs.evaluation.held_out import QUESTIONS, understanding_drift
from pipelines.sample_data import generation_sample
from tests.conftest import ROOT, run_inline
from unilip.images import read_image
from unilip.model import UniLIP

TASK = "unilip_tiny_seed"
HARNESS_TASKS = Path(find_spec("lmms_eval").origin).parent / "tasks"


def seed_docs() -> list[dict]:
    """Four SEED-Bench questions, one per image; the right letter alternates A, B."""
    docs = []
    for i in range(4):
        image = read_image(generation_sample(0, i, 448)["jpg"]).resize((448, 448), Image.Resampling.BICUBIC)
        docs.append(
            {
                "question_id": str(i),
                "image": [image],
                "question": "Which kind of picture is this?",
                "choice_a": "the first",
                "choice_b": "the second",
                "choice_c": "neither",
                "choice_d": "both",
                "answer": "AB"[i % 2],
                "data_type": "image",
            }
        )
    return docs


def answering_model(docs: list[dict]) -> UniLIP:
    """The tiny preset with its encoder's projector trained through the frozen LLM until
    InternVL3's first answer token is each question's letter (its LLM answers with newlines
    before): the letter depends on the image alone, so a score of 1 needs every image to
    reach the model, and the harness's prompt (SEED-Bench's own) to be the one trained on."""
    from lmms_eval.tasks.seedbench.utils import seed_doc_to_text

    torch.manual_seed(0)
    model = UniLIP.from_preset("tiny")
    inputs = [model.understanding_inputs(d["image"][0], seed_doc_to_text(d)) for d in docs]
    ids, pixels = torch.cat([i for i, _ in inputs]), torch.cat([p for _, p in inputs])
    letters = torch.tensor([model.tokenizer.convert_tokens_to_ids(d["answer"]) for d in docs])
    model.requires_grad_(False)
    model.encoder.projector.requires_grad_(True)
    opt = torch.optim.Adam(model.encoder.projector.parameters(), lr=3e-2)
    for _ in range(40):
        logits = model.mllm(input_ids=ids, pixel_values=pixels).logits[:, -1]
        # each letter ahead of every other token by 0.25, a hundred times what the harness's
        # bf16 changes of these logits measure (0.002): its answers are these
        top = logits.topk(2, -1)
        if (top.indices[:, 0] == letters).all() and (top.values[:, 0] - top.values[:, 1]).min() > 0.25:
            break
        loss = torch.nn.functional.cross_entropy(logits, letters)
        opt.zero_grad()
        loss.backward()
        opt.step()
    else:
        raise AssertionError(f"the encoder did not learn the answers (loss {loss.item():.3f})")
    model.trained_parts |= {"encoder"}
    return model.eval()


@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory):
    """The model directory, and a task folder: a YAML that takes SEED-Bench's (prompts,
    scorer) and reads its four questions from a local parquet file instead of the hub."""
    root = tmp_path_factory.mktemp("understanding")
    docs = seed_docs()
    model_dir = answering_model(docs).save_pretrained(root / "model")
    tasks = root / "tasks"
    tasks.mkdir()
    features = datasets.Features(
        {k: datasets.Value("string") for k in docs[0] if k != "image"} | {"image": [datasets.Image()]}
    )
    datasets.Dataset.from_list(docs, features=features).to_parquet(str(tasks / "test.parquet"))
    (tasks / f"{TASK}.yaml").write_text(
        f"include: {HARNESS_TASKS / 'seedbench' / 'seedbench.yaml'}\n"
        f"task: {TASK}\n"
        "dataset_path: parquet\n"
        "dataset_kwargs:\n  data_files:\n    test: test.parquet\n"
        "generation_kwargs:\n  max_new_tokens: 4\n"  # the letter comes first; the scorer reads it alone
    )
    return model_dir, tasks, docs


def test_the_harness_scores_the_export_on_a_local_task_into_the_results_and_mlflow(tiny_task, tmp_path, monkeypatch):
    model_dir, tasks, docs = tiny_task
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)  # a sqlite store keeps artifacts in ./mlruns
    out = tmp_path / "eval"
    args = ("eval", "understanding", "--model", str(model_dir), "--tasks", TASK, "--include-path", str(tasks))
    result = run_inline(*args, "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]

    record = json.loads((out / "understanding.json").read_text())
    # SEED-Bench's own scorer: every letter right (seed_video and seed_all: the same docs)
    assert record["scores"][TASK]["seed_image"] == 1.0
    assert record["harness"]["name"] == "lmms-eval" and record["harness"]["version"]
    assert record["model"] == str(model_dir) and record["limited"] is False
    # the harness's own files: its results, and each answer it read, for every question
    (results,) = out.glob("harness/*/*/*_results.json")
    assert json.loads(results.read_text())["results"][TASK]["seed_image,none"] == 1.0
    (samples,) = out.glob(f"harness/*/*/*_samples_{TASK}.jsonl")
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert sorted(r["seed_image"]["pred"] for r in rows) == sorted(d["answer"] for d in docs)
    # MLflow: the eval's run, every score
    client = mlflow.MlflowClient()
    run = client.get_run(record["mlflow_run"])
    assert run.data.metrics[f"{TASK}/seed_image"] == 1.0
    assert run.data.params["model"] == str(model_dir)

    # Run again: a task already scored is not run again (the same MLflow run)
    again = run_inline(*args, "--out", str(out))
    assert again.returncode == 0 and "1 already scored, 0 to run" in again.stdout, again.stderr[-3000:]
    assert json.loads((out / "understanding.json").read_text())["mlflow_run"] == record["mlflow_run"]


def test_with_gpus_each_ray_task_scores_its_share_of_the_tasks(tiny_task, tmp_path):
    """`--gpus 2`: two Ray tasks of one GPU each (declared on this CPU-only machine, where the
    harness then runs on the CPU), one benchmark each, their files gathered under OUT."""
    model_dir, tasks, _ = tiny_task
    other = tmp_path / "tasks"
    shutil.copytree(tasks, other)
    (other / f"{TASK}_2.yaml").write_text((tasks / f"{TASK}.yaml").read_text().replace(TASK, f"{TASK}_2"))
    out = tmp_path / "eval"
    args = ["eval", "understanding", "--model", str(model_dir), "--tasks", f"{TASK},{TASK}_2", "--out", str(out)]
    args += ["--include-path", str(other), "--gpus", "2"]
    code = (
        "import sys\n"
        "from cluster.connect import init_ray\n"
        "init_ray(num_cpus=2, num_gpus=2)\n"
        "from cli import run\n"
        f"sys.exit(run({args!r}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 to run on" in done.stdout and "in 2 Ray task(s) of one GPU" in done.stdout
    record = json.loads((out / "understanding.json").read_text())
    assert {t: s["seed_image"] for t, s in record["scores"].items()} == {TASK: 1.0, f"{TASK}_2": 1.0}
    assert len(list(out.glob("harness/*/*/*_results.json"))) == 2  # one harness run per Ray task


def test_bad_understanding_requests_are_refused_with_a_message(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    judged = run_inline("eval", "understanding", "--model", "m", "--tasks", "MM-Vet", "--out", str(tmp_path))
    assert judged.returncode == 2 and "mmvet is scored by an LLM judge: set OPENAI_API_KEY" in judged.stderr
    remote = run_inline("eval", "understanding", "--model", "m", "--out", "s3://bucket/eval")
    assert remote.returncode == 2 and "writes a local directory" in remote.stderr
    missing = run_inline(
        "eval", "understanding", "--model", "m", "--out", str(tmp_path), "--harness-python", "/bin/false"
    )
    assert missing.returncode == 2 and "lmms-eval is not importable by /bin/false" in missing.stderr
    (tmp_path / "understanding.json").write_text(json.dumps({"model": "other", "scores": {"mme": {}}}))
    mixed = run_inline("eval", "understanding", "--model", "m", "--tasks", "mme", "--out", str(tmp_path))
    assert mixed.returncode == 2 and "holds the scores of other: give m another --out" in mixed.stderr


def test_the_understanding_signal_is_zero_for_the_original_encoder_and_grows_as_it_moves():
    torch.manual_seed(0)
    model = UniLIP.from_preset("tiny", teacher=True).eval()
    images = np.stack([np.asarray(d["image"][0]) for d in seed_docs()[:2]])
    # the LLM reads features as InternVL3 itself merges its encoder's output
    ids, pixels = model.understanding_inputs(Image.fromarray(images[0]), QUESTIONS[0])
    with torch.no_grad():
        via_features = model.understanding_logits(ids, model.encoder(pixels))
        assert torch.equal(via_features, model.mllm(input_ids=ids, pixel_values=pixels).logits)
    assert understanding_drift(model, model.teacher, images) == {
        "eval/understanding_kl": 0.0,
        "eval/understanding_top1": 1.0,
    }
    drifts = []
    for scale in (0.01, 0.1, 1.0):  # the encoder moved off the original by more and more
        moved = copy.deepcopy(model)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in moved.encoder.parameters():
                p.add_(scale * p.std() * torch.randn(p.shape, generator=g))
        drifts.append(understanding_drift(moved, moved.teacher, images))
    kl = [d["eval/understanding_kl"] for d in drifts]
    top1 = [d["eval/understanding_top1"] for d in drifts]
    assert 0 < kl[0] < kl[1] < kl[2] and 1.0 >= top1[0] > top1[1] > top1[2], drifts


def test_the_report_puts_evals_next_to_the_papers_rows_in_its_units(tmp_path):
    def eval_dir(name, scores, recon=None, limited=False):
        out = tmp_path / name
        out.mkdir()
        record = {"model": f"models:/{name}/1", "scores": scores, "limited": limited}
        (out / "understanding.json").write_text(json.dumps(record))
        if recon:
            (out / "recon-448.json").write_text(json.dumps({"model": f"models:/{name}/1", "metrics": recon}))
        return str(out)

    base = eval_dir("internvit", {"mme": {"mme_perception_score": 1490.0}, "seedbench": {"seed_image": 0.71}})
    run = eval_dir(
        "recon-s2",
        {"mme": {"mme_perception_score": 1470.0}, "seedbench": {"seed_image": 0.70}},
        {"recon/psnr": 24.1, "recon/ssim": 0.70, "recon/ssim_release": 0.77, "recon/rfid": 0.4},
    )
    short = eval_dir("smoke", {"mme": {"mme_perception_score": 900.0}}, limited=True)
    result = run_inline("eval", "report", base, run, short, "--baseline", base, "--out", str(tmp_path / "report"))
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {r["model"]: r for r in csv.DictReader((tmp_path / "report.csv").open())}
    assert rows["paper: UniLIP-1B"]["MME-P"] == "1499" and rows["paper: UniLIP-1B"]["SSIM (release's)"] == "0.788"
    assert rows["paper: InternVL3-1B (InternViT)"]["TextVQA"] == "74.1"
    mine = rows["recon-s2: models:/recon-s2/1"]
    assert float(mine["SEED"]) == pytest.approx(70.0) and float(mine["PSNR"]) == 24.1 and mine["MMMU"] == ""
    delta = rows["difference from the baseline: recon-s2: models:/recon-s2/1"]
    assert float(delta["MME-P"]) == -20.0 and float(delta["SEED"]) == pytest.approx(-1.0) and delta["PSNR"] == ""
    assert "smoke: models:/smoke/1 (--limit: not comparable)" in rows
    assert "| paper: UniLIP-3B | - | - | - | - | 1636 |" in (tmp_path / "report.md").read_text()
    assert "recon-s2: models:/recon-s2/1" in result.stdout  # the terminal's table
    empty = tmp_path / "empty"
    empty.mkdir()
    refused = run_inline("eval", "report", str(empty))
    assert refused.returncode == 2 and "holds neither recon-448.json nor understanding.json" in refused.stderr
