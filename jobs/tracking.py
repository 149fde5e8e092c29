"""MLflow for training: one run per stage (continued across resumes), metrics, images, the
loss plot, and the exported model registered with its lineage. Rank 0 only."""

from __future__ import annotations

from pathlib import Path

RUN_TAG = "unilip.run"


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out |= flatten(v, key + ".")
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for i, x in enumerate(v):
                out |= flatten(x, f"{key}.{i}.")
        else:
            out[key] = str(v)[:6000]
    return out


class Tracker:
    def __init__(self, tracking_uri: str | None, experiment: str, run_name: str, run_id: str | None, params: dict):
        import mlflow

        self.mlflow = mlflow
        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_experiment(experiment)
        if run_id is None:  # restarted before the first checkpoint: continue the run of that name
            found = find_run(experiment, run_name)
            run_id = found.info.run_id if found else None
        self.run = mlflow.start_run(
            run_id=run_id, run_name=None if run_id else run_name, tags={RUN_TAG: run_name}, log_system_metrics=False
        )
        self.run_id = self.run.info.run_id
        if run_id is None:
            mlflow.log_params(flatten(params))

    def metrics(self, values: dict[str, float], step: int) -> None:
        # queued, sent by MLflow's logging thread: a training step does not wait on the
        # tracking server (`end` flushes the queue)
        self.mlflow.log_metrics({k: float(v) for k, v in values.items()}, step=step, synchronous=False)

    def image(self, image, name: str) -> None:
        self.mlflow.log_image(image, name)

    def loss_plot(self, key: str = "train/loss") -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        self.mlflow.flush_async_logging()  # the queued metrics first
        history = self.mlflow.MlflowClient().get_metric_history(self.run_id, key)
        if not history:
            return
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([m.step for m in history], [m.value for m in history])
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        self.mlflow.log_figure(fig, "loss.png")
        plt.close(fig)

    def register(self, model_dir: Path, name: str, lineage: dict[str, str]) -> str:
        """Log the model directory as artifacts and register it: returns `models:/NAME/VERSION`."""
        self.mlflow.log_artifacts(str(model_dir), "model")
        client = self.mlflow.MlflowClient()
        try:
            client.get_registered_model(name)
        except self.mlflow.exceptions.MlflowException:
            client.create_registered_model(name, description="UniLIP model directories exported by `unilip train`")
        version = client.create_model_version(
            name,
            f"{self.run.info.artifact_uri}/model",
            run_id=self.run_id,
            tags=lineage,
            description=lineage.get("summary"),
        )
        self.mlflow.set_tag("unilip.registered", f"models:/{name}/{version.version}")
        return f"models:/{name}/{version.version}"

    def registered(self) -> str | None:
        """The model this run registered, if it got that far."""
        return self.mlflow.get_run(self.run_id).data.tags.get("unilip.registered")

    def end(self, stopped: str | None = None) -> None:
        """Finish the run; `stopped`: why it stopped before its end (a re-run continues it)."""
        if stopped:
            self.mlflow.set_tag("unilip.stopped", stopped[:5000])
        self.mlflow.end_run(status="FAILED" if stopped else "FINISHED")


def find_run(experiment: str, run_name: str):
    """The MLflow run of training run `run_name` (tag `unilip.run`), or None."""
    import mlflow

    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        return None
    found = mlflow.search_runs(
        [exp.experiment_id], filter_string=f"tags.`{RUN_TAG}` = '{run_name}'", max_results=1, output_format="list"
    )
    return found[0] if found else None


def latest_model(tracking_uri: str | None, name: str) -> str | None:
    """`models:/NAME/VERSION` of the newest registered version, or None."""
    import mlflow

    from cluster.registry import newest_version

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    version = newest_version(name)
    return None if version is None else f"models:/{name}/{version}"


def register_converted(model_dir: str | Path, name: str, src: str) -> str:
    """Log a converted model directory (`unilip convert official`) as an MLflow run's
    artifacts and register it as `name`; returns `models:/NAME/VERSION`."""
    import json
    import os

    release = json.loads((Path(model_dir) / "config.json").read_text())["converted_from"]
    tracker = Tracker(os.environ.get("MLFLOW_TRACKING_URI"), "unilip-convert", f"convert-{name}", None, release)
    try:
        return tracker.register(
            Path(model_dir), name, {"source": src, "summary": f"converted from the release checkpoint {src}"}
        )
    finally:
        tracker.end()


def image_grid(rows: list[list], cell: int = 128):
    """PIL images in rows -> one PIL image."""
    from PIL import Image

    grid = Image.new("RGB", (cell * max(len(r) for r in rows), cell * len(rows)), "white")
    for y, row in enumerate(rows):
        for x, im in enumerate(row):
            grid.paste(im.convert("RGB").resize((cell, cell)), (x * cell, y * cell))
    return grid
