"""Webdataset tar shards: writing them to S3 or a directory, with a manifest.

A shard is a plain tar whose members are `KEY.EXT` (webdataset's layout: the key runs to
the first dot). Next to the shards, `manifest.json` lists every shard with its sample
count; readers take source sizes (for task-balanced sampling) from it.

    with ShardWriter("s3://bucket/data/generation", s3, prefix="gen", task="generation") as w:
        w.write("gen00000000", {"jpg": jpeg_bytes, "txt": b"a cat"})
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass, field

from unilip.errors import UserError
from unilip.s3 import S3Access

MANIFEST = "manifest.json"


@dataclass
class ShardInfo:
    path: str  # relative to the manifest
    samples: int


@dataclass
class Manifest:
    task: str
    shards: list[ShardInfo] = field(default_factory=list)

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)

    def to_json(self) -> str:
        shards = [{"path": s.path, "samples": s.samples} for s in self.shards]
        return json.dumps({"task": self.task, "samples": self.samples, "shards": shards}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        data = json.loads(text)
        return cls(data["task"], [ShardInfo(s["path"], int(s["samples"])) for s in data["shards"]])


def join(uri: str, name: str) -> str:
    return f"{uri.rstrip('/')}/{name}"


def read_manifest(uri: str, s3: S3Access) -> Manifest:
    fs, path = s3.resolve(join(uri, MANIFEST))
    try:
        with fs.open_input_stream(path) as f:
            return Manifest.from_json(f.read().decode())
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"no readable {MANIFEST} under {uri}: {e}") from None


class ShardWriter:
    """Streams samples into `PREFIX-NNNNNN.tar` shards of `shard_size` samples under `uri`.

    Each shard is streamed straight to its destination (multipart upload on S3), so
    memory stays bounded by one sample. `close()` writes the manifest.
    """

    def __init__(
        self,
        uri: str,
        s3: S3Access,
        prefix: str,
        task: str,
        shard_size: int = 1000,
        name: str | None = None,
        manifest: bool = True,
    ):
        """`name`: one shard of that exact name (no numbering); `manifest`: write manifest.json on close."""
        if shard_size < 1:
            raise UserError(f"shard_size must be >= 1, got {shard_size}")
        self.uri, self.s3, self.prefix, self.shard_size = uri, s3, prefix, shard_size
        self._fixed_name, self._write_manifest = name, manifest
        self.manifest = Manifest(task)
        self._stream = self._tar = None

    def _open_next(self) -> None:
        name = self._fixed_name or f"{self.prefix}-{len(self.manifest.shards):06d}.tar"
        if self._fixed_name and self.manifest.shards:
            raise ValueError(f"shard {name} is full ({self.shard_size} samples)")
        self._stream = self.s3.open_output(join(self.uri, name))
        self._tar = tarfile.open(fileobj=self._stream, mode="w|", format=tarfile.USTAR_FORMAT)
        self.manifest.shards.append(ShardInfo(name, 0))

    def _close_current(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._stream.close()
            self._tar = self._stream = None

    def write(self, key: str, members: dict[str, bytes]) -> None:
        if "." in key or "/" in key:
            raise UserError(f"sample key {key!r} must not contain '.' or '/'")
        if self._tar is None or self.manifest.shards[-1].samples >= self.shard_size:
            self._close_current()
            self._open_next()
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mode, info.mtime = len(data), 0o644, 0  # mtime 0: reproducible bytes
            self._tar.addfile(info, io.BytesIO(data))
        self.manifest.shards[-1].samples += 1

    def close(self) -> Manifest:
        self._close_current()
        if self._write_manifest:
            with self.s3.open_output(join(self.uri, MANIFEST)) as f:
                f.write(self.manifest.to_json().encode())
        return self.manifest

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:  # leave no manifest for a half-written source
            self._close_current()
