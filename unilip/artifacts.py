"""Model directories from wherever they live: a local path, S3, or the MLflow registry.

    path = fetch_model("models:/unilip-tiny-gen-stage3/2", s3)   # or s3://..., runs:/..., DIR
    model = UniLIP.from_pretrained(path)
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from unilip.s3 import S3Access

MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


def cache_dir() -> Path:
    return Path(os.environ.get("UNILIP_CACHE", Path.home() / ".cache" / "unilip"))


def fetch_model(uri: str, s3: S3Access | None = None) -> Path:
    """A local directory holding the model at `uri` (downloaded into the cache if remote)."""
    if uri.startswith(MLFLOW_SCHEMES):
        import mlflow

        dst = cache_dir() / "mlflow" / hashlib.sha1(uri.encode()).hexdigest()[:16]
        if not (dst / "config.json").exists():
            dst.mkdir(parents=True, exist_ok=True)
            try:
                local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst))
            except Exception as e:  # MlflowException, or a storage error
                raise ValueError(f"cannot fetch model {uri}: {e}") from None
            return Path(local)
        return dst
    if uri.startswith("s3://"):
        if s3 is None:
            raise ValueError(f"{uri}: an S3 access point is needed to fetch it")
        dst = cache_dir() / "s3" / uri[5:].strip("/")
        prefix = uri.rstrip("/") + "/"
        keys = s3.list_keys(prefix)
        if not keys:
            raise ValueError(f"no model at {uri}: the prefix is empty")
        for key in keys:
            out = dst / key[len(prefix) :]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(s3.get_bytes(key))
        return dst
    path = Path(uri)
    if not (path / "config.json").exists():
        raise ValueError(f"{uri} is not a model directory (no config.json)")
    return path
