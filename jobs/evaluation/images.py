"""`unilip eval BENCH`: a benchmark's images, laid out as its official scorer reads them,
by Ray Data batch inference; resumable.

    unilip eval geneval --model models:/unilip-1b-release/1 --out ./eval/unilip-1b --gpus 8
    unilip eval wise    --model ./unilip-1b-release --bench ~/src/WISE --out ./eval/unilip-1b
    unilip eval imgedit --model ./unilip-1b-release --bench ~/data/ImgEdit/Benchmark/singleturn --out s3://bucket/eval/unilip-1b
    unilip eval check geneval ./eval/unilip-1b
    unilip eval summarize geneval ./eval/unilip-1b

How a run goes:
1. The driver expands the benchmark (`jobs.evaluation.suites`) into one item per image with its
   seed, sorts the items by (task, prompt length, key, k) and cuts them into fixed batches
   of `--batch` images of one task.
2. A batch whose images all exist under OUT is skipped (resume); the others go through
   `map_batches` to actors that each load the model once (one GPU each with `--gpus`).
   A batch is always computed whole, so an image depends on the batch size alone: never on
   the number of actors, nor on what an earlier, interrupted run finished.
3. Images are written atomically as they are made (local directory or s3://); the driver
   records each in `OUT/BENCH.manifest.jsonl` (key, k, seed, path, sha256, seconds) and
   prints progress. Then what the scorer reads besides the images is written (GenEval's
   metadata, DPG's grids), the layout is checked, and `OUT/BENCH.run.json` records the
   model, sampling, prompt format, bench file hashes and package versions; with
   `MLFLOW_TRACKING_URI` set, an MLflow run (experiment `unilip-eval`) gets the same.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from jobs.evaluation.suites import BenchError, Benchmark, Item, Output
from unilip.s3 import is_s3

EXPERIMENT = "unilip-eval"


@dataclass
class Sampling:
    """The papers' conventions: guidance 4.5, 20 steps, the release's DPM-Solver++."""

    guidance_scale: float = 4.5
    steps: int = 20
    solver: str = "dpm"


def batches(items: list[Item], size: int) -> list[list[Item]]:
    """Fixed batches of one task each, in a deterministic order (short prompts together)."""
    ordered = sorted(items, key=lambda it: (it.task, len(it.prompt), it.key, it.k))
    out = []
    for task in sorted({it.task for it in ordered}):
        same = [it for it in ordered if it.task == task]
        out += [same[i : i + size] for i in range(0, len(same), size)]
    return out


class EvalWorker:
    """A Ray Data actor: one model; each call renders whole batches and writes them."""

    def __init__(self, model_uri: str, sampling: dict, out: str, dtype: str = "auto"):
        import torch

        from cluster.registry import load_model
        from unilip.s3 import s3_access

        torch.set_grad_enabled(False)
        self.s3 = s3_access()
        self.model = load_model(model_uri, self.s3, dtype=dtype)
        self.sampling, self.out = sampling, Output(out, self.s3)

    def _reference(self, uri: str):
        from unilip.images import read_image

        return read_image(self.s3.read_bytes(uri))

    def __call__(self, batch: dict) -> dict:
        rows = []
        for payload in batch["items"]:
            items = [Item(**d) for d in json.loads(payload)]
            start = time.perf_counter()
            prompts, seeds = [it.prompt for it in items], [it.seed for it in items]
            if items[0].task == "editing":
                images = self.model.edit(
                    [self._reference(it.ref) for it in items], prompts, seed=seeds, **self.sampling
                )
            else:
                images = self.model.generate(prompts, seed=seeds, **self.sampling)
            seconds = (time.perf_counter() - start) / len(items)
            for it, image in zip(items, images):
                buf = io.BytesIO()
                image.save(buf, format="PNG")
                self.out.write(it.path, buf.getvalue())
                rows.append(
                    json.dumps(
                        {
                            "key": it.key,
                            "k": it.k,
                            "seed": it.seed,
                            "path": it.path,
                            "sha256": hashlib.sha256(buf.getvalue()).hexdigest(),
                            "seconds": round(seconds, 4),
                        }
                    )
                )
        return {"row": rows}


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("unilip", "torch", "transformers", "diffusers", "ray"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def run_eval(
    bench: Benchmark,
    model: str,
    out: str,
    bench_path: str | None = None,
    sampling: Sampling | None = None,
    n: int | None = None,
    seed: int = 42,
    batch: int = 8,
    gpus: int = 0,
    actors: int = 1,
    limit: int | None = None,
    dtype: str = "auto",
    allow_unpinned: bool = False,
    log=print,
) -> dict:
    """Render `bench` with `model` into `out`; returns the run record (also OUT/BENCH.run.json)."""
    from cluster.connect import init_ray, quiet_ray_data
    from cluster.registry import pinned
    from unilip.prompts import prompt_format

    sampling = sampling or Sampling()
    files = bench.locate(bench_path)
    hashes = bench.verify(files, allow_unpinned)
    items = bench.items(files, n, seed)
    if limit:
        keys = list(dict.fromkeys(it.key for it in items))[:limit]
        items = [it for it in items if it.key in set(keys)]
    output = Output(out)
    done = output.keys()
    plan = batches(items, batch)
    todo = [b for b in plan if not all(it.path in done for it in b)]
    model_uri = pinned(model) if model.startswith("models:/") else model
    log(
        f"[eval] {bench.name}: {len(items)} images of {len({it.key for it in items})} prompts in {len(plan)} batches of {batch}; "
        f"{len(plan) - len(todo)} batches already done, {len(todo)} to render with {model_uri}"
    )
    manifest = _Manifest(output, f"{bench.name}.manifest.jsonl")
    started = time.monotonic()
    if todo:
        ray = init_ray()
        quiet_ray_data()
        ds = ray.data.from_items(
            [{"items": json.dumps([asdict(it) for it in b])} for b in todo], override_num_blocks=len(todo)
        )
        ds = ds.map_batches(
            EvalWorker,
            batch_size=1,
            concurrency=gpus or actors,
            num_gpus=1 if gpus else 0,
            num_cpus=1,
            fn_constructor_kwargs={
                "model_uri": model_uri,
                "sampling": asdict(sampling),
                "out": output.root,
                "dtype": dtype,
            },
        )
        total, made, last = sum(len(b) for b in todo), 0, 0.0
        for row in ds.iter_rows():
            manifest.add(json.loads(row["row"]))
            made += 1
            now = time.monotonic() - started
            if now - last > 10 or made == total:
                rate = made / max(now, 1e-9)
                log(
                    f"[eval] {bench.name}: {made}/{total} images, {rate:.2f} images/s, ETA {(total - made) / max(rate, 1e-9) / 60:.1f} min"
                )
                last = now
    bench.finalize(output, files, items)
    manifest.complete(items)
    record = {
        "bench": bench.name,
        "source": bench.source,
        "bench_files": {rel: str(p) for rel, p in files.items()},
        "bench_sha256": hashes,
        "model": model_uri,
        "sampling": asdict(sampling),
        "seed_rule": f"image k of a prompt: seed {seed} + k, drawn per image",
        "images_per_prompt": n or bench.images_per_prompt,
        "batch": batch,
        "images": len(items),
        "dtype": dtype,
        "prompt_format": prompt_format(),
        "seconds": round(time.monotonic() - started, 1),
        "versions": package_versions(),
        "limit": limit,
    }
    if not is_s3(out):  # the scorers read a local layout
        problems = bench.check(Path(out), files, n)
        record["check"] = problems[:20] or "ok"
        if limit is None and problems:
            raise BenchError(
                f"{bench.name}: the layout fails the scorer's reading: {problems[0]} ({len(problems)} problems)"
            )
    record["mlflow_run"] = _track(record, output)
    output.write(f"{bench.name}.run.json", json.dumps(record, indent=2).encode())
    log(f"[eval] {bench.name}: done in {record['seconds']:.0f} s -> {out}; score it with:")
    for cmd in bench.score_commands(Path(out), files):
        log(f"  {cmd}")
    return record


def bench_files(bench: Benchmark, out: str, path: str | None) -> dict[str, Path]:
    """The bench files at `path`, or else those the eval in OUT was made from (its run.json)."""
    output = Output(out)
    name = f"{bench.name}.run.json"
    if path is None and output.exists(name):
        return {rel: Path(p) for rel, p in json.loads(output.read(name))["bench_files"].items()}
    return bench.locate(path)


class _Manifest:
    """OUT/BENCH.manifest.jsonl: one row per image, appended as images are made."""

    def __init__(self, output: Output, name: str):
        self.output, self.name = output, name
        self.rows: dict[str, dict] = {}
        if output.exists(name):
            for line in output.read(name).decode().splitlines():
                row = json.loads(line)
                self.rows[row["path"]] = row

    def add(self, row: dict) -> None:
        self.rows[row["path"]] = row
        if len(self.rows) % 64 == 0:
            self.save()

    def complete(self, items: list[Item]) -> None:
        """Rows for images written before a driver was lost (hashed from the files), then saved."""
        for it in items:
            if it.path not in self.rows:
                data = self.output.read(it.path)
                self.rows[it.path] = {
                    "key": it.key,
                    "k": it.k,
                    "seed": it.seed,
                    "path": it.path,
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "seconds": None,
                }
        self.save()

    def save(self) -> None:
        self.output.write(
            self.name,
            "".join(json.dumps(r) + "\n" for r in sorted(self.rows.values(), key=lambda r: r["path"])).encode(),
        )


def _track(record: dict, output: Output) -> str | None:
    """An MLflow run for the eval (one per bench and OUT: a re-run continues it)."""
    tracking = os.environ.get("MLFLOW_TRACKING_URI")
    if not tracking:
        return None
    from jobs.tracking import Tracker, flatten

    name = f"{record['bench']}:{output.root}"
    tracker = Tracker(
        tracking, EXPERIMENT, name, None, {k: v for k, v in record.items() if k not in ("check", "versions")}
    )
    try:
        tracker.mlflow.log_dict(record, f"{record['bench']}.run.json")
        tracker.mlflow.set_tags(flatten({"versions": record["versions"]}))
        return tracker.run_id
    finally:
        tracker.end()


def log_scores(bench: str, out: str, scores: dict[str, float]) -> str | None:
    """Scores into the eval's MLflow run (the one its run.json names), if tracking is on."""
    tracking = os.environ.get("MLFLOW_TRACKING_URI")
    if not tracking:
        return None
    import mlflow

    output = Output(out)
    name = f"{bench}.run.json"
    run_id = json.loads(output.read(name)).get("mlflow_run") if output.exists(name) else None
    mlflow.set_tracking_uri(tracking)
    mlflow.set_experiment(EXPERIMENT)
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else f"{bench}:{output.root}") as run:
        mlflow.log_metrics(scores)
        return run.info.run_id


def check(bench: Benchmark, out: str, bench_path: str | None = None, n: int | None = None, log=print) -> list[str]:
    """OUT's layout as the official scorer reads it: the problems found (printed, the first 50)."""
    problems = bench.check(Path(out), bench_files(bench, out, bench_path), n)
    for p in problems[:50]:
        log(f"  {p}")
    log(f"{bench.name}: {'layout ok' if not problems else f'{len(problems)} problems'} ({out})")
    return problems


def summarize(bench: Benchmark, out: str, bench_path: str | None = None, log=print) -> dict[str, float]:
    """The scorer's outputs -> the benchmark's scores, printed and logged to the eval's MLflow run."""
    scores = bench.summarize(Path(out), bench_files(bench, out, bench_path))
    for k, v in scores.items():
        log(f"{k:<28} {v:.4f}")
    if run := log_scores(bench.name, out, scores):
        log(f"logged to MLflow run {run}")
    return scores


def score(
    bench: Benchmark, out: str, bench_path: str | None, repo: str | None, python: str, options: dict, log=print
) -> dict[str, float]:
    """Run the benchmark's official scorer in its own environment as a subprocess, then summarize."""
    import subprocess

    if not repo:
        raise BenchError(
            f"--score needs --scorer-repo (the official {bench.source.split('@')[0]} checkout) and --scorer-python"
        )
    argv = bench.score_argv(Path(out), bench.locate(bench_path), Path(repo), python, options)
    if argv is None:
        raise BenchError(f"{bench.name} is scored by an API judge: run the commands printed above with your key")
    cmd, cwd = argv
    log(f"[eval] scoring: {' '.join(cmd)}")
    if subprocess.run(cmd, cwd=cwd).returncode != 0:
        raise BenchError(f"the {bench.name} scorer failed (its output is above)")
    return summarize(bench, out, bench_path, log)
