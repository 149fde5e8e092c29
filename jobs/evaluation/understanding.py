"""`unilip eval understanding`: a model's understanding half (its trained encoder inside
InternVL3) scored by lmms-eval on the paper's understanding benchmarks, with the harness's
own prompts and scoring.

    unilip eval understanding --model models:/unilip-1b-recon-stage2/3 --out ./eval/understanding --gpus 8
    unilip eval understanding --model ./unilip-1b-release --tasks mme,ai2d --hf-home /data/hf --out ./eval/u
    unilip eval understanding --model ./model --tasks my_task --include-path ./my_tasks --out ./eval/u --limit 8

The harness is lmms-eval (`lmms_eval`, PyPI), run as `python -m lmms_eval --model internvl_hf`:
its `internvl_hf` model loads a plain `transformers` InternVL3 checkpoint, which is what
`unilip.internvl` exports, so the harness evaluates exactly the weights and processor this
project trained, with no remote code; its tasks cover every benchmark of the paper's Tables 1
and 3, with their published prompts and scorers. VLMEvalKit, which InternVL's own reports use,
loads InternVL through the original repository's remote code instead, is not on PyPI, and its
scores for the same weights can differ by its prompts: scores here compare with the paper's
rows up to that difference (`unilip eval report` shows them side by side).

How a run goes:
1. The model is exported as an InternVL3 checkpoint (`unilip.internvl`) where the harness
   runs: in this process's machine (CPU), or, with `--gpus N`, in N Ray tasks of one GPU
   each, the benchmarks dealt out among them.
2. The harness runs on it in a subprocess (`--harness-python`, default this interpreter),
   reading the benchmarks' data from the Hugging Face cache (`--hf-home`: offline, a cache
   filled beforehand on a machine with a network) or from local tasks (`--include-path`:
   task YAMLs in the harness's format, e.g. `dataset_path: parquet` with local files).
3. Its results and per-sample files are kept under OUT/harness/; OUT/understanding.json
   holds every score by task and metric, and, with `MLFLOW_TRACKING_URI` set, an MLflow run
   (experiment `unilip-eval`) gets the same. A task already in understanding.json is not run
   again.

Judges: MM-Vet is scored by an LLM judge, and MMBench asks one for the answers its rules
cannot match; the harness reads `OPENAI_API_KEY` (and `OPENAI_API_URL`, `MODEL_VERSION` for
any OpenAI-compatible server, e.g. a local vLLM). Without a key, MM-Vet is left out (refused
if named) and every other benchmark runs; MMBench then gives an answer no rule matches a
random letter once the judge's retries fail (the harness's own fallback).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

from jobs.evaluation.suites import BenchError
from unilip.s3 import is_s3

EXPERIMENT = "unilip-eval"
RESULTS = "understanding.json"


@dataclass(frozen=True)
class Understanding:
    """One of the paper's understanding benchmarks as an lmms-eval task."""

    paper: str  # the column in the paper's tables
    task: str  # lmms-eval's task name
    metric: str  # the task's metric the paper reports
    scale: float  # harness value x scale = the paper's unit
    judge: bool = False  # scored by an LLM judge (needs OPENAI_API_KEY)


BENCHMARKS = {
    b.paper: b
    for b in (
        Understanding("MME-P", "mme", "mme_perception_score", 1.0),
        Understanding("MMBench", "mmbench_en_dev", "gpt_eval_score", 1.0),
        Understanding("MMMU", "mmmu_val", "mmmu_acc", 100.0),
        Understanding("MM-Vet", "mmvet", "gpt_eval_score", 1.0, judge=True),
        Understanding("SEED", "seedbench", "seed_image", 100.0),
        Understanding("AI2D", "ai2d", "exact_match", 100.0),
        Understanding("MMVP", "mmvp", "mmvp_accuracy", 100.0),
        Understanding("TextVQA", "textvqa_val", "exact_match", 100.0),
    )
}
BY_TASK = {b.task: b for b in BENCHMARKS.values()}


def resolve_tasks(tasks: str | None, log=print) -> list[str]:
    """`paper` (or nothing): every benchmark of the paper; else a comma list of lmms-eval
    task names or the paper's column names. MM-Vet needs a judge: without a key, left out
    of `paper` (said so), refused by name."""
    paper = tasks in (None, "", "paper")
    names = list(BY_TASK) if paper else [t.strip() for t in tasks.split(",") if t.strip()]
    out = [BENCHMARKS[n].task if n in BENCHMARKS else n for n in names]
    judged = [t for t in out if t in BY_TASK and BY_TASK[t].judge]
    if judged and not os.environ.get("OPENAI_API_KEY"):
        if not paper:
            raise BenchError(
                f"{', '.join(judged)} is scored by an LLM judge: set OPENAI_API_KEY (and OPENAI_API_URL and "
                f"MODEL_VERSION for an OpenAI-compatible server), or leave it out of --tasks"
            )
        log(f"[eval] understanding: {', '.join(judged)} left out: its LLM judge needs OPENAI_API_KEY")
        out = [t for t in out if t not in judged]
    return out


def harness_argv(python: str, model_dir: Path, tasks: list[str], out: Path, device: str, options: dict) -> list[str]:
    """The harness's command line for `tasks` on the exported checkpoint `model_dir`."""
    argv = [python, "-m", "lmms_eval", "--model", "internvl_hf"]
    argv += ["--model_args", f"pretrained={model_dir},device={device},device_map={device}"]
    argv += ["--tasks", ",".join(tasks), "--batch_size", "1", "--output_path", str(out), "--log_samples"]
    if options.get("limit"):
        argv += ["--limit", str(options["limit"])]
    if options.get("include_path"):
        argv += ["--include_path", str(options["include_path"])]
    return argv


def harness_env(options: dict) -> dict[str, str]:
    env = dict(os.environ)
    if options.get("hf_home"):  # a cache filled beforehand: read it, never reach for the hub
        env |= {"HF_HOME": str(options["hf_home"]), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return env


def run_harness(model_uri: str, tasks: list[str], options: dict) -> dict[str, bytes]:
    """Export the model, run the harness on `tasks` (on the GPU if there is one), return its
    output files (path under its output folder -> bytes). Runs where it is called: this
    process, or a Ray task."""
    import torch

    from cluster.registry import fetch_model
    from unilip.internvl import export_internvl
    from unilip.model import UniLIP

    with tempfile.TemporaryDirectory(prefix="unilip-understanding-") as tmp:
        model_dir = export_internvl(UniLIP.from_pretrained(fetch_model(model_uri)), Path(tmp) / "internvl")
        out = Path(tmp) / "harness"
        device = "cuda" if torch.cuda.is_available() else "cpu"
        argv = harness_argv(options["python"], model_dir, tasks, out, device, options)
        print(f"[eval] understanding: {' '.join(argv)}", flush=True)
        # in the temporary folder: some of the harness's scorers write files where they run
        if subprocess.run(argv, env=harness_env(options), cwd=tmp).returncode != 0:
            raise BenchError(f"the harness failed on {', '.join(tasks)} (its output is above)")
        return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def check_harness(python: str) -> None:
    if python == sys.executable:
        found = find_spec("lmms_eval") is not None
    else:
        found = subprocess.run([python, "-c", "import lmms_eval"], capture_output=True).returncode == 0
    if not found:
        raise BenchError(
            f"lmms-eval is not importable by {python}: install it with `bash cluster/env/install.sh .venv understanding`, "
            f"or pass --harness-python of an environment that has it"
        )


def scores_of(results: dict, tasks: list[str]) -> dict[str, dict[str, float]]:
    """The harness's results file -> {task: {metric: value}} (its default filter, numbers only)."""
    out = {}
    for task in tasks:
        values = results["results"].get(task)
        if values is None:
            raise BenchError(f"the harness's results hold no {task!r}")
        out[task] = {
            key.split(",")[0]: float(v)
            for key, v in values.items()
            if "," in key and "_stderr" not in key and isinstance(v, (int, float))
        }
    return out


def run_understanding(
    model: str,
    out: str,
    tasks: str | None = None,
    gpus: int = 0,
    limit: int | None = None,
    include_path: str | None = None,
    hf_home: str | None = None,
    python: str | None = None,
    log=print,
) -> dict:
    """Score `model` on `tasks` into `out`; returns the record (also OUT/understanding.json)."""
    from cluster.registry import pinned

    if is_s3(out):
        raise BenchError("eval understanding writes a local directory: --out DIR (copy it to S3 afterwards)")
    python = python or sys.executable
    check_harness(python)
    names = resolve_tasks(tasks, log)
    root = Path(out)
    path = root / RESULTS
    record = json.loads(path.read_text()) if path.exists() else {"scores": {}, "runs": []}
    model_uri = pinned(model) if model.startswith("models:/") else model
    if record.get("model", model_uri) != model_uri:
        raise BenchError(f"{path} holds the scores of {record['model']}: give {model_uri} another --out")
    todo = [t for t in names if t not in record["scores"]]
    log(
        f"[eval] understanding: {len(names)} task(s) ({', '.join(names)}); {len(names) - len(todo)} already scored, "
        f"{len(todo)} to run on {model_uri} {f'in {gpus} Ray task(s) of one GPU' if gpus else 'on this machine'}"
    )
    options = {"python": python, "limit": limit, "include_path": include_path, "hf_home": hf_home}
    started = time.monotonic()
    if todo:
        if gpus:  # one Ray task per GPU, the tasks dealt out among them
            from cluster.connect import init_ray

            ray = init_ray()
            remote = ray.remote(num_gpus=1, num_cpus=1)(run_harness)
            groups = [todo[i::gpus] for i in range(min(gpus, len(todo)))]
            outputs = ray.get([remote.remote(model_uri, g, options) for g in groups])
        else:
            outputs = [run_harness(model_uri, todo, options)]
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for files in outputs:
            for rel, data in files.items():
                dest = root / "harness" / stamp / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(data)
                if rel.endswith("_results.json"):
                    results = json.loads(data)
                    ran = list(results["results"])
                    record["scores"] |= scores_of(results, [t for t in todo if t in ran])
                    record["harness"] = {"name": "lmms-eval", "version": results.get("lmms_eval_version")}
        missing = [t for t in todo if t not in record["scores"]]
        if missing:
            raise BenchError(f"the harness wrote no results for {', '.join(missing)}")
        record["runs"].append(
            {"tasks": todo, "model": model_uri, "limit": limit, "seconds": round(time.monotonic() - started, 1)}
        )
    record |= {"model": model_uri, "limited": bool(limit) or record.get("limited", False)}
    record["mlflow_run"] = _track(record, root)
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))
    for task in names:
        log(f"  {task:<24} " + "  ".join(f"{m} {v:.4g}" for m, v in record["scores"][task].items()))
    log(f"[eval] understanding: done in {time.monotonic() - started:.0f} s -> {path}")
    return record


def _track(record: dict, root: Path) -> str | None:
    """The scores into an MLflow run (one per OUT: a later run continues it)."""
    tracking = os.environ.get("MLFLOW_TRACKING_URI")
    if not tracking:
        return None
    from jobs.tracking import Tracker

    params = {"model": record["model"], "harness": record.get("harness", {}), "limited": record["limited"]}
    tracker = Tracker(tracking, EXPERIMENT, f"understanding:{root.resolve()}", record.get("mlflow_run"), params)
    try:
        tracker.mlflow.log_metrics(
            {f"{task}/{metric}": v for task, values in record["scores"].items() for metric, v in values.items()}
        )
        tracker.mlflow.log_dict(record, RESULTS)
        return tracker.run_id
    finally:
        tracker.end()
