"""A training run's settings: how the user launches it (`Launch`, what `unilip train` takes),
and the run built from it once by the driver (`Run`), handed whole to every Ray Train
worker (`train_loop_config={"run": run}`), read as typed fields."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipelines.ingest import SourceSpec, layout
from unilip.config import Recipe


@dataclass
class Launch:
    """How to run a stage on the cluster: the same for every stage of `unilip train all`."""

    preset: str = "tiny"  # tiny | unilip-1b | unilip-3b (tiny also picks each recipe's tiny variant)
    workers: int = 2  # Ray Train workers
    gpu: bool = False  # one GPU per worker
    overrides: list[str] = field(default_factory=list)  # recipe fields, as `--set key=value`
    storage: str | None = None  # checkpoint storage (None: s3://$UNILIP_BUCKET/runs)
    cpus_per_worker: float | None = None  # None: 1 with GPUs, else half the cluster's CPUs shared


@dataclass
class Run:
    recipe: Recipe  # the stage, with the run's overrides and its data URIs expanded
    name: str  # the run name: its checkpoints are under storage/name, its MLflow run is tagged with it
    storage: str  # s3://BUCKET/runs or a directory
    init_from: str | None  # the model the stage starts from (a model reference); None: the preset
    model_name: str  # the registered model its export becomes a version of
    tracking_uri: str | None  # MLflow
    experiment: str
    sources: dict[str, SourceSpec]  # each data source's task, weight, size and shards (the manifests)
    fingerprint: dict  # what a checkpoint's data position depends on (`pipelines.ingest.fingerprint`)
    counter: object  # the run's DataLedger actor: bad data by source, reason and epoch, and the budget

    @property
    def path(self) -> str:
        """Where the run's checkpoints and records live."""
        return f"{self.storage}/{self.name}"

    def layout(self) -> dict[str, list[tuple[str, int]]]:
        """The sources' shards, as a data position records them."""
        return layout(self.sources)
