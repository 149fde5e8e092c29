"""Model references: where a model directory lives, as every command and Serve name it.

    model = load_model("models:/unilip-tiny-gen-stage3/2")   # for inference, on its device and precision
    path = fetch_model("owner/name@revision", s3)            # or models:/NAME@alias, runs:/..., s3://..., DIR
    model = UniLIP.from_pretrained(path)

A registered model (MLflow's registry, the cluster's tracking server) is downloaded once
into the cache, keyed by the server and an immutable name: an alias or `latest` is first
resolved to its version. An s3:// prefix goes through the S3 access point's one download
(`S3Access.fetch`); a directory is used in place. A Hugging Face hub id (`owner/name`,
`@revision` optional) that is not a local path is a snapshot of the repository through
`huggingface_hub`, which keeps its own cache and honours its token and offline settings
(`HF_TOKEN`, `HF_HOME`/`HF_HUB_CACHE`, `HF_HUB_OFFLINE`).
"""

from __future__ import annotations

import re
from pathlib import Path

from unilip.errors import UserError
from unilip.s3 import S3Access, cache_entry, cached, s3_access

MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")
CONFIG = "config.json"  # what makes a directory a model directory
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")
RELEASE_TYPE = "unilip_internvl"  # the authors' release (unilip.official): converted, not loaded


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


def is_hub_id(ref: str) -> bool:
    return HUB_ID.fullmatch(ref) is not None and not Path(ref.split("@")[0]).exists()


def fetch_hub(ref: str) -> Path:
    """The local snapshot of hub repository `owner/name[@revision]`."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo, _, revision = ref.partition("@")
    try:
        return Path(snapshot_download(repo, revision=revision or None))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise UserError(f"cannot fetch {ref} from the Hugging Face hub: {e}") from None


def fetch_dir(ref: str, s3: S3Access | None = None, done: str | None = None) -> Path:
    """A local directory for a directory, an s3:// prefix or a hub id (no registry)."""
    if is_hub_id(ref):
        return fetch_hub(ref)
    return (s3 or s3_access()).fetch(ref, done=done)


def fetch_model(uri: str, s3: S3Access | None = None) -> Path:
    """A local directory holding the model at `uri` (downloaded into the cache if remote)."""
    path = _fetch_model(uri, s3)
    if not (path / CONFIG).exists():
        raise UserError(f"{uri} is not a UniLIP model directory (no {CONFIG})")
    if f'"{RELEASE_TYPE}"' in (path / CONFIG).read_text():
        raise UserError(
            f"{uri} is the authors' release checkpoint: convert it first, "
            f"`unilip convert official --src {uri} --out DIR`, and use DIR"
        )
    return path


def _fetch_model(uri: str, s3: S3Access | None) -> Path:
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
    return fetch_dir(uri, s3, done=CONFIG)


def load_model(uri: str, s3: S3Access | None = None, device=None, dtype: str = "auto"):
    """The model at `uri` (any reference above) for inference: on `device` (default: CUDA if
    there is one) in its precision (`unilip.numerics`), eval mode. Every command, eval actor
    and Serve replica loads through here."""
    from unilip.model import UniLIP

    return UniLIP.from_pretrained(fetch_model(uri, s3)).for_inference(device, dtype)
