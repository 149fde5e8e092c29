"""Model references: where a model directory lives, as every command and Serve name it.

    path = fetch_model("models:/unilip-tiny-gen-stage3/2", s3)   # or models:/NAME@alias, runs:/..., s3://..., DIR
    model = UniLIP.from_pretrained(path)

A registered model (MLflow's registry, the cluster's tracking server) is downloaded once
into the cache, keyed by the server and an immutable name: an alias or `latest` is first
resolved to its version. An s3:// prefix goes through the S3 access point's one download
(`S3Access.fetch`); a directory is used in place.
"""

from __future__ import annotations

import re
from pathlib import Path

from unilip.errors import UserError
from unilip.s3 import S3Access, cache_entry, cached, s3_access

MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")
CONFIG = "config.json"  # what makes a directory a model directory


def newest_version(name: str) -> int | None:
    """The newest version number of registered model `name` (None: no such model or no versions)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        versions = MlflowClient().search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    return max((int(v.version) for v in versions), default=None)


def pinned(uri: str) -> str:
    """`models:/NAME@ALIAS` or `models:/NAME/latest` -> `models:/NAME/VERSION`; other URIs unchanged."""
    m = re.fullmatch(r"models:/([^/@]+)(?:@([^/]+)|/latest)", uri)
    if not m:
        return uri
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    name, alias = m.groups()
    if alias:
        try:
            version = MlflowClient().get_model_version_by_alias(name, alias).version
        except MlflowException as e:  # unknown name or alias
            raise UserError(f"cannot resolve {uri}: {e}") from None
    else:
        version = newest_version(name)
        if version is None:
            raise UserError(f"cannot resolve {uri}: registered model {name!r} has no versions")
    return f"models:/{name}/{version}"


def fetch_model(uri: str, s3: S3Access | None = None) -> Path:
    """A local directory holding the model at `uri` (downloaded into the cache if remote)."""
    if uri.startswith(MLFLOW_SCHEMES):
        import mlflow
        from mlflow.exceptions import MlflowException

        uri = pinned(uri)

        def download(tmp: Path) -> None:
            try:
                mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp))
            except (MlflowException, OSError) as e:
                raise UserError(f"cannot fetch model {uri}: {e}") from None

        return cached(cache_entry("mlflow", mlflow.get_tracking_uri(), uri), download, CONFIG)
    path = (s3 or s3_access()).fetch(uri, done=CONFIG)
    if not (path / CONFIG).exists():
        raise UserError(f"{uri} is not a model directory (no {CONFIG})")
    return path
