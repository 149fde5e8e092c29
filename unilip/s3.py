"""The project's one S3 access point.

Every S3 connection (boto3 clients, the pyarrow `S3FileSystem` that Ray Data and Ray
Train use, the environment handed to child processes) is built by `s3_access()` from an
`S3Config`. Unset fields fall back to the usual AWS environment variables; with no
endpoint anywhere it talks to AWS S3. The embedded local stack only sets the endpoint (and
throwaway keys, or a rotating credentials endpoint) through the environment.

Credentials are never resolved here: each boto3 client and each pyarrow filesystem, in
whatever process it is built, asks the SDK's own default chain (explicit
`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, `AWS_PROFILE`, web identity (IRSA), the
container provider (ECS, EKS Pod Identity), the instance profile), which refreshes
temporary credentials before they expire. Nothing copies a key anywhere: a run that lasts
days outlives every key it started with. So an `S3Access` holds no key either: it uses
whatever the environment of the process using it provides (pyarrow reads
`AWS_ACCESS_KEY_ID` when a request is signed), and unpickled on a Ray worker it uses the
worker's.

    s3 = s3_access()
    s3.put_bytes("s3://bucket/key", b"...")
    fs, path = s3.resolve("s3://bucket/prefix")   # pyarrow filesystem + path
    s3.write_bytes(uri, data); s3.read_bytes(uri)  # uri: s3:// or a local path, one way
    path = s3.fetch("s3://bucket/weights/vgg.pth")  # a local copy, downloaded once (or a local path as is)

Every "s3:// or local" decision is made here (`resolve`, the file helpers, `fetch`).
Downloads land in the cache (`$UNILIP_CACHE`, default ~/.cache/unilip) through a temporary
directory renamed into place, so processes on one machine fetching the same thing at once
never read a half-written copy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from urllib.parse import urlparse

from unilip.config import S3Config
from unilip.errors import UserError


class S3Error(UserError):
    """An S3 operation that failed (a missing key or bucket, access denied, no endpoint);
    the message names the bucket/key and the cause."""


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """`s3://bucket/key` -> (bucket, key)."""
    if not is_s3(uri):
        raise S3Error(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise S3Error(f"s3 URI without a bucket: {uri!r}")
    return bucket, key


def _env_first(*names: str) -> str | None:
    return next((os.environ[n] for n in names if os.environ.get(n)), None)


@dataclass(frozen=True)
class S3Access:
    """Resolved S3 settings; builds clients and filesystems that share them."""

    endpoint_url: str | None
    region: str
    max_attempts: int
    connect_timeout: float
    read_timeout: float

    def __getstate__(self):  # clients are rebuilt wherever the object lands (Ray tasks)
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def __setstate__(self, state):
        self.__dict__.update(state)  # frozen dataclass: bypass __setattr__

    # ------------------------------------------------------------------ builders

    @cached_property
    def client(self):
        """A boto3 S3 client (standard retry mode with backoff), its credentials from the
        default chain of a session of its own (boto3's default session would keep whatever
        it resolved first in this process)."""
        import boto3
        from botocore.config import Config

        return boto3.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            config=Config(
                retries={"max_attempts": self.max_attempts, "mode": "standard"},
                connect_timeout=self.connect_timeout,
                read_timeout=self.read_timeout,
                s3={"addressing_style": "path" if self.endpoint_url else "auto"},
            ),
        )

    @cached_property
    def filesystem(self):
        """A pyarrow S3FileSystem (for Ray Data reads/writes and Ray Train storage), its
        credentials from the AWS C++ SDK's default chain."""
        from pyarrow import fs

        kwargs = {}
        if self.endpoint_url:
            url = urlparse(self.endpoint_url)
            kwargs.update(endpoint_override=url.netloc or url.path, scheme=url.scheme or "https")
        return fs.S3FileSystem(
            region=self.region,
            connect_timeout=self.connect_timeout,
            request_timeout=self.read_timeout,
            retry_strategy=fs.AwsStandardS3RetryStrategy(max_attempts=self.max_attempts),
            **kwargs,
        )

    def refreshed(self) -> S3Access:
        """The same settings, its clients not built yet: their SDKs resolve the credentials
        anew (after a refused request, when keys cached by a client were revoked early)."""
        return dataclasses.replace(self)

    def env(self) -> dict[str, str]:
        """Environment for child processes (Ray workers, the MLflow server) to reach the same
        S3: where it is, never a credential (each process asks its own chain)."""
        env = {"AWS_REGION": self.region, "AWS_DEFAULT_REGION": self.region}
        if self.endpoint_url:
            env.update(AWS_ENDPOINT_URL_S3=self.endpoint_url, MLFLOW_S3_ENDPOINT_URL=self.endpoint_url)
        return env

    def resolve(self, uri: str):
        """`s3://b/k` or a local path -> (pyarrow filesystem, path on it)."""
        if is_s3(uri):
            bucket, key = split_s3(uri)
            return self.filesystem, f"{bucket}/{key}".rstrip("/")
        from pyarrow import fs

        return fs.LocalFileSystem(), os.path.abspath(uri)

    # ------------------------------------------------------------ object helpers

    def _call(self, what: str, uri: str, fn, *args, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(*args, **kwargs)
        except ClientError as e:
            err = e.response.get("Error", {})
            raise S3Error(f"{what} {uri}: {err.get('Code', '?')} {err.get('Message', '')}".rstrip()) from e
        except BotoCoreError as e:
            raise S3Error(f"{what} {uri}: {e}") from e

    def put_bytes(self, uri: str, data: bytes) -> None:
        bucket, key = split_s3(uri)
        self._call("put", uri, self.client.put_object, Bucket=bucket, Key=key, Body=data)

    def get_bytes(self, uri: str) -> bytes:
        bucket, key = split_s3(uri)
        resp = self._call("get", uri, self.client.get_object, Bucket=bucket, Key=key)
        return resp["Body"].read()

    def list_keys(self, uri: str) -> list[str]:
        """Keys under a prefix, as s3:// URIs, sorted."""
        bucket, prefix = split_s3(uri)
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        keys: list[str] = []
        for page in self._call("list", uri, list, pages):
            keys += [f"s3://{bucket}/{o['Key']}" for o in page.get("Contents", [])]
        return sorted(keys)

    # ------------------------------------------------- files: s3:// or a local path

    def read_bytes(self, uri: str) -> bytes:
        """The file's bytes (S3Error from S3, OSError from a local file)."""
        return self.get_bytes(uri) if is_s3(uri) else Path(uri).read_bytes()

    def write_bytes(self, uri: str, data: bytes) -> None:
        """Whole or not at all: an S3 object appears complete; a local file is written
        beside its place and renamed into it."""
        if is_s3(uri):
            self.put_bytes(uri, data)
            return
        path = Path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.part")
        tmp.write_bytes(data)
        tmp.replace(path)

    def open_output(self, uri: str):
        """A stream writing the file `uri` (an S3 multipart upload, visible when closed;
        a local file, its directory created)."""
        fs, path = self.resolve(uri)
        if not is_s3(uri):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        return fs.open_output_stream(path)

    def exists(self, uri: str) -> bool:
        """Whether the file `uri` exists."""
        return uri in self.list_keys(uri) if is_s3(uri) else Path(uri).is_file()

    def list_files(self, uri: str) -> list[str]:
        """Every file under a prefix or directory, as URIs (s3://... or paths), sorted."""
        if is_s3(uri):
            return self.list_keys(uri.rstrip("/") + "/")
        root = Path(uri)
        return sorted(str(p) for p in root.rglob("*") if p.is_file()) if root.is_dir() else []

    def fetch(self, uri: str, done: str | None = None) -> Path:
        """A local path for `uri`: a local path as is (it must exist); an s3:// object, or
        every object under an s3:// prefix, downloaded once into the cache. `done`: the file
        that completes a downloaded prefix (a model directory's config.json)."""
        if not is_s3(uri):
            if not Path(uri).exists():
                raise UserError(f"{uri} does not exist")
            return Path(uri)
        prefix = uri.rstrip("/") + "/"
        keys = [k for k in self.list_keys(prefix) if not k.endswith("/")]
        entry = cache_entry("s3", self.endpoint_url or "aws", uri)
        if not keys:  # one object
            name = uri.rsplit("/", 1)[1]
            return cached(entry, lambda tmp: (tmp / name).write_bytes(self.get_bytes(uri)), name) / name

        def download(tmp: Path) -> None:
            for key in keys:
                out = tmp / key[len(prefix) :]
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(self.get_bytes(key))

        return cached(entry, download, done or keys[-1][len(prefix) :])

    def bucket_exists(self, bucket: str) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=bucket)
            return True
        except (ClientError, BotoCoreError):
            return False

    def ensure_bucket(self, bucket: str) -> None:
        if self.bucket_exists(bucket):
            return
        kwargs = {"Bucket": bucket}
        if self.region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        self._call("create bucket", f"s3://{bucket}", self.client.create_bucket, **kwargs)


def s3_access(cfg: S3Config | None = None) -> S3Access:
    """`cfg` with the AWS environment filling its unset fields. The only S3 factory."""
    import boto3

    cfg = cfg or S3Config()
    return S3Access(
        endpoint_url=cfg.endpoint_url or _env_first("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
        region=cfg.region
        or _env_first("AWS_REGION", "AWS_DEFAULT_REGION")
        or boto3.Session().region_name  # the profile's region
        or "us-east-1",
        max_attempts=cfg.max_attempts,
        connect_timeout=cfg.connect_timeout,
        read_timeout=cfg.read_timeout,
    )


# --------------------------------------------------------------------------- the cache


def cache_dir() -> Path:
    return Path(os.environ.get("UNILIP_CACHE", Path.home() / ".cache" / "unilip"))


def cache_entry(kind: str, store: str, uri: str) -> Path:
    """The cache directory of `uri` in `store` (an S3 endpoint, an MLflow tracking server)."""
    return cache_dir() / kind / hashlib.sha1(f"{store} {uri}".encode()).hexdigest()[:16]


def cached(dst: Path, fill: Callable[[Path], None], done: str) -> Path:
    """`dst` (a directory, complete when it holds `done`), filled by `fill(tmpdir)` and
    renamed into place unless another process got there first."""
    if (dst / done).exists():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}-"))
    try:
        fill(tmp)
        if not (tmp / done).exists():
            raise UserError(f"the download into {dst} has no {done}")
        os.rename(tmp, dst)
    except OSError:  # dst appeared meanwhile: a concurrent download won
        if not (dst / done).exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst
