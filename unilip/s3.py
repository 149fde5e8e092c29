"""The project's one S3 access point.

Every S3 connection (boto3 clients, the pyarrow `S3FileSystem` that Ray Data and Ray
Train use, the environment handed to child processes) is built by `s3_access()` from an
`S3Config`. Unset fields fall back to the usual AWS environment variables and profiles;
with no endpoint anywhere it talks to AWS S3. The embedded local stack only sets the
endpoint (and throwaway credentials) through the environment.

    s3 = s3_access()
    s3.put_bytes("s3://bucket/key", b"...")
    fs, path = s3.resolve("s3://bucket/prefix")   # pyarrow filesystem + path
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from functools import cached_property
from urllib.parse import urlparse

from unilip.config import S3Config


class S3Error(RuntimeError):
    """An S3 operation that failed; the message names the bucket/key and the cause."""


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """`s3://bucket/key` -> (bucket, key)."""
    if not is_s3(uri):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"s3 URI without a bucket: {uri!r}")
    return bucket, key


def _env_first(*names: str) -> str | None:
    return next((os.environ[n] for n in names if os.environ.get(n)), None)


@dataclass(frozen=True)
class S3Access:
    """Resolved S3 settings; builds clients and filesystems that share them."""

    endpoint_url: str | None
    region: str
    access_key: str | None
    secret_key: str | None
    session_token: str | None
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
        """A boto3 S3 client (standard retry mode with backoff)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            aws_session_token=self.session_token,
            config=Config(
                retries={"max_attempts": self.max_attempts, "mode": "standard"},
                connect_timeout=self.connect_timeout,
                read_timeout=self.read_timeout,
                s3={"addressing_style": "path" if self.endpoint_url else "auto"},
            ),
        )

    @cached_property
    def filesystem(self):
        """A pyarrow S3FileSystem (for Ray Data reads/writes and Ray Train storage)."""
        from pyarrow import fs

        kwargs = {}
        if self.endpoint_url:
            url = urlparse(self.endpoint_url)
            kwargs.update(endpoint_override=url.netloc or url.path, scheme=url.scheme or "https")
        if self.access_key:
            kwargs.update(access_key=self.access_key, secret_key=self.secret_key, session_token=self.session_token)
        return fs.S3FileSystem(
            region=self.region,
            connect_timeout=self.connect_timeout,
            request_timeout=self.read_timeout,
            retry_strategy=fs.AwsStandardS3RetryStrategy(max_attempts=self.max_attempts),
            **kwargs,
        )

    def env(self) -> dict[str, str]:
        """Environment for child processes (Ray workers, the MLflow server) to reach the same S3."""
        env = {"AWS_REGION": self.region, "AWS_DEFAULT_REGION": self.region}
        if self.endpoint_url:
            env.update(AWS_ENDPOINT_URL_S3=self.endpoint_url, MLFLOW_S3_ENDPOINT_URL=self.endpoint_url)
        if self.access_key:
            env.update(AWS_ACCESS_KEY_ID=self.access_key, AWS_SECRET_ACCESS_KEY=self.secret_key or "")
        if self.session_token:
            env["AWS_SESSION_TOKEN"] = self.session_token
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
    """Resolve `cfg` against the AWS environment/profile chain. The only S3 factory."""
    import boto3

    cfg = cfg or S3Config()
    session = boto3.Session(profile_name=cfg.profile) if cfg.profile else boto3.Session()
    creds = session.get_credentials()
    frozen = creds.get_frozen_credentials() if creds else None
    return S3Access(
        endpoint_url=cfg.endpoint_url or _env_first("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
        region=cfg.region or _env_first("AWS_REGION", "AWS_DEFAULT_REGION") or session.region_name or "us-east-1",
        access_key=frozen.access_key if frozen else None,
        secret_key=frozen.secret_key if frozen else None,
        session_token=frozen.token if frozen else None,
        max_attempts=cfg.max_attempts,
        connect_timeout=cfg.connect_timeout,
        read_timeout=cfg.read_timeout,
    )
