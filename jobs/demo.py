"""The main job on the embedded default: everything on this machine, nothing left running.

    make demo                                     # installs on first use, then runs this
    unilip demo --gen 64 --edit 32 --results demo-results

Steps: start the embedded stack (Ray, S3, MLflow on 127.0.0.1); write the sample
dataset into the local S3 bucket as webdataset shards; stream it back through the Ray
Data pipeline that decodes every image; log a run (params, metrics, a sample grid) to
MLflow; print what happened; stop every service.

Results land in `--results` (default `demo-results/`): the sample grid, a summary, and
the stack's MLflow database and artifacts, so the `mlflow ui` command it prints shows
the run afterwards.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from PIL import Image

from cluster.connect import init_ray, quiet_ray_data
from cluster.local import LocalStack
from pipelines.decode import skip_counter
from pipelines.read import source_dataset
from pipelines.sample_data import build_sample_dataset
from pipelines.shards import join


def _step(n: int, text: str) -> None:
    print(f"\n== [{n}/4] {text}", flush=True)


def _sample_grid(rows: list[dict], path: Path, cell: int = 160) -> None:
    """A PNG grid of decoded rows: generation images, then edit inputs next to their outputs."""
    tiles = [Image.fromarray(row[col]).resize((cell, cell)) for row in rows for col in ("source", "image") if col in row]
    cols = 6
    grid = Image.new("RGB", (cols * cell, -(-len(tiles) // cols) * cell), "white")
    for i, tile in enumerate(tiles):
        grid.paste(tile, ((i % cols) * cell, (i // cols) * cell))
    grid.save(path)


def run_demo(n_gen: int = 64, n_edit: int = 32, size: int = 512, results: str = "demo-results") -> dict:
    import mlflow

    out_dir = Path(results).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    summary: dict = {}
    _step(1, "starting the embedded stack (S3 server, MLflow, Ray on 127.0.0.1)")
    with LocalStack(out_dir / "stack", artifacts="local") as stack:
        s3 = stack.s3()
        data_uri = f"s3://{stack.bucket}/sample"

        _step(2, f"writing {n_gen} generation + {n_edit} editing samples to {data_uri}")
        t0 = time.monotonic()
        manifests = build_sample_dataset(data_uri, s3, n_gen, n_edit, size=size, shard_size=max(8, (n_gen + n_edit) // 8))
        write_s = time.monotonic() - t0
        keys = s3.list_keys(data_uri)
        print(f"   bucket now holds {len(keys)} objects under {data_uri}")

        _step(3, "streaming the shards back through Ray Data (read tasks over s3://, decode in map_batches)")
        ray = init_ray()
        quiet_ray_data()
        read, preview = {}, []
        for task, manifest in manifests.items():
            t0 = time.monotonic()
            counter = skip_counter()
            samples = images = 0
            show = 6 if task == "generation" else 3  # grid rows: 6 images, then 3 edit pairs
            for batch in source_dataset(join(data_uri, task), task, s3, 224, counter).iter_batches(batch_size=16, batch_format="numpy"):
                take = min(show, len(batch["key"]))
                preview += [{k: v[i] for k, v in batch.items()} for i in range(take)]
                show -= take
                samples += len(batch["key"])
                images += len(batch["image"]) + len(batch.get("source", []))
            elapsed = time.monotonic() - t0
            read[task] = {"samples": samples, "images": images, "images_per_s": images / elapsed,
                          "expected": manifest.samples, "skipped": ray.get(counter.get.remote())}  # fmt: skip
            print(f"   {task}: {samples}/{manifest.samples} samples, {images} images decoded to 224 px "
                  f"({read[task]['images_per_s']:.0f} images/s), skipped: {read[task]['skipped'] or 'none'}")  # fmt: skip
            if samples != manifest.samples:
                raise RuntimeError(f"{task}: read {samples} samples, wrote {manifest.samples}")
        grid = out_dir / "samples.png"
        _sample_grid(preview, grid)
        ray.shutdown()

        _step(4, f"logging the run to MLflow at {stack.env()['MLFLOW_TRACKING_URI']}")
        mlflow.set_experiment("unilip-demo")
        with mlflow.start_run(run_name="sample-data") as run:
            mlflow.log_params({"gen_samples": n_gen, "edit_samples": n_edit, "image_size": size, "data_uri": data_uri})
            mlflow.log_metric("write_seconds", write_s)
            for task, r in read.items():
                mlflow.log_metrics({f"{task}_samples": r["samples"], f"{task}_images_per_s": r["images_per_s"]})
            mlflow.log_artifact(str(grid))
            summary = {
                "data_uri": data_uri,
                "objects_in_bucket": len(keys),
                "read": read,
                "mlflow_run_id": run.info.run_id,
                "mlflow_experiment": "unilip-demo",
                "sample_grid": str(grid),
            }
        print(f"   run {summary['mlflow_run_id']} logged with params, metrics and the sample grid")
    summary["seconds"] = round(time.monotonic() - t_start, 1)
    stack_dir = out_dir / "stack"
    summary["mlflow_ui"] = f"mlflow ui --backend-store-uri sqlite:///{stack_dir / 'mlflow.db'} --artifacts-destination {stack_dir / 'mlartifacts'}"
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\n== done in {summary['seconds']}s; every service stopped.")
    print(f"   sample grid:  {grid}")
    print(f"   summary:      {out_dir / 'summary.json'}")
    print(f"   MLflow run:   {summary['mlflow_run_id']}  (browse: {summary['mlflow_ui']})")
    return summary
