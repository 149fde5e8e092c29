"""Model directories from wherever they live: a local path, S3, or the MLflow registry.

    path = fetch_model("models:/unilip-tiny-gen-stage3/2", s3)   # or models:/NAME@alias, s3://..., runs:/..., DIR
    model = UniLIP.from_pretrained(path)
    weights = fetch_file("s3://bucket/weights/inception.pth", s3)  # one file: s3:// or a local path

Remote models are downloaded once into the cache (`$UNILIP_CACHE`, default ~/.cache/unilip),
keyed by the store and an immutable name: a registry alias or `latest` is first resolved
to its version.
Downloads land in a temporary directory that is renamed into place, so workers on one
machine fetching the same model at once never read a half-written copy.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from unilip.s3 import S3Access

MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


def cache_dir() -> Path:
    return Path(os.environ.get("UNILIP_CACHE", Path.home() / ".cache" / "unilip"))


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

    name, alias = m.groups()
    if alias:
        try:
            version = MlflowClient().get_model_version_by_alias(name, alias).version
        except Exception as e:  # MlflowException: unknown name or alias
            raise ValueError(f"cannot resolve {uri}: {e}") from None
    else:
        version = newest_version(name)
        if version is None:
            raise ValueError(f"cannot resolve {uri}: registered model {name!r} has no versions")
    return f"models:/{name}/{version}"


def cache_entry(kind: str, store: str, uri: str) -> Path:
    return cache_dir() / kind / hashlib.sha1(f"{store} {uri}".encode()).hexdigest()[:16]


def cached(dst: Path, fill: Callable[[Path], None], done: str = "config.json") -> Path:
    """`dst` (a directory, complete when it holds `done`), filled by `fill(tmpdir)` and
    renamed into place unless another process got there first."""
    if (dst / done).exists():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}-"))
    try:
        fill(tmp)
        if not (tmp / done).exists():
            raise ValueError(f"the download has no {done}")
        os.rename(tmp, dst)
    except OSError:  # dst appeared meanwhile: a concurrent download won
        if not (dst / done).exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


def fetch_file(uri: str, s3: S3Access | None = None) -> Path:
    """A local copy of one file: `s3://` objects are downloaded into the cache once."""
    if not uri.startswith("s3://"):
        if not Path(uri).is_file():
            raise ValueError(f"{uri} does not exist")
        return Path(uri)
    if s3 is None:
        raise ValueError(f"{uri}: an S3 access point is needed to fetch it")
    name = uri.rsplit("/", 1)[1]
    return cached(cache_entry("s3", s3.endpoint_url or "aws", uri), lambda tmp: (tmp / name).write_bytes(s3.get_bytes(uri)), name) / name


def fetch_model(uri: str, s3: S3Access | None = None) -> Path:
    """A local directory holding the model at `uri` (downloaded into the cache if remote)."""
    if uri.startswith(MLFLOW_SCHEMES):
        import mlflow

        uri = pinned(uri)

        def download(tmp: Path) -> None:
            try:
                mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp))
            except Exception as e:  # MlflowException, or a storage error
                raise ValueError(f"cannot fetch model {uri}: {e}") from None

        return cached(cache_entry("mlflow", mlflow.get_tracking_uri(), uri), download)
    if uri.startswith("s3://"):
        if s3 is None:
            raise ValueError(f"{uri}: an S3 access point is needed to fetch it")
        prefix = uri.rstrip("/") + "/"

        def download(tmp: Path) -> None:
            keys = s3.list_keys(prefix)
            if not keys:
                raise ValueError(f"no model at {uri}: the prefix is empty")
            for key in keys:
                out = tmp / key[len(prefix) :]
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(s3.get_bytes(key))

        return cached(cache_entry("s3", s3.endpoint_url or "aws", uri), download)
    path = Path(uri)
    if not (path / "config.json").exists():
        raise ValueError(f"{uri} is not a model directory (no config.json)")
    return path
