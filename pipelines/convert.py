"""Converters from published layouts to the project's shards (see README, "Data formats").

    unilip data convert --from gpt-image-edit --src /data/gpt-image-edit --out s3://b/gpt-image-edit
    unilip data convert --from sharegpt-4o --src /data/sharegpt-4o-image --out s3://b/sharegpt-4o-image
    unilip data convert --from wds --src s3://b/raw-tars --out s3://b/blip3o/pretrain-long [--task generation]

- gpt-image-edit: every `*.json` annotation file under --src; items with `image` (paths
  relative to --src, the last one the output) and `conversations[0].value` (the
  instruction, `<image>` markers removed). Single-turn pairs only (two images).
- sharegpt-4o: `text_to_image.json` -> OUT/generation, `text_and_image_to_image.json`
  -> OUT/editing (one input image per item).
- wds: existing webdataset tars under --src, validated and resharded.

Work is split into one Ray task per output shard (wds: per input shard), a few in flight
at a time, each streaming its samples: memory is bounded by one annotation file in the
driver and one sample per task. Every finished shard gets a sidecar `NAME.tar.json`
written after the tar is complete; a rerun skips shards that have one (resumable). The
manifest is written from the sidecars at the end. Every sample is checked with training's
own decoder checks (`pipelines.decode`: text present, UTF-8, not empty, captions up to
1,000 characters; images present, decodable, 32 px a side or more, not a decompression
bomb), so a converted source holds only samples training uses; bad ones are skipped and
counted in the decoder's vocabulary (`missing_text`, `bad_text`, `empty_text`,
`caption_too_long`, `missing_image`, `missing_edit_input`, `bad_image`, `image_too_small`,
`image_too_large`), multi-turn edits as `not_single_turn`/`not_single_image`.
"""

from __future__ import annotations

import io
import json
import time
from collections import Counter
from pathlib import PurePosixPath

from PIL import Image

from pipelines.decode import BadSample, decode_text, open_image
from pipelines.shards import MANIFEST, Manifest, ShardInfo, ShardWriter, join
from unilip.errors import UserError
from unilip.s3 import S3Access, S3Error

FORMATS = ("gpt-image-edit", "sharegpt-4o", "wds")


# --------------------------------------------------------------------------- items


def _list(s3: S3Access, uri: str, suffix: str) -> list[str]:
    """Files under a directory or s3:// prefix ending in `suffix`, sorted, as URIs."""
    return [u for u in s3.list_files(uri) if u.endswith(suffix)]


def _key(*parts) -> str:
    return "-".join(str(p) for p in parts).replace(".", "_").replace("/", "_")


def gpt_image_edit_items(src: str, s3: S3Access):
    """(annotation file, items) per file: items are (key, task, {member: uri | text})."""
    for ann in _list(s3, src, ".json"):
        data = json.loads(s3.read_bytes(ann))
        items, skipped = [], Counter()
        for i, item in enumerate(data):
            images = item.get("image") or []
            if len(images) != 2:
                skipped["not_single_turn"] += 1
                continue
            text = " ".join(
                str((item.get("conversations") or [{}])[0].get("value", "")).replace("<image>", " ").split()
            )
            members = {"input.jpg": join(src, images[0]), "output.jpg": join(src, images[-1]), "txt": text}
            items.append((_key(PurePosixPath(ann).stem, i), members))
        yield ann, "editing", items, skipped


def sharegpt_4o_items(src: str, s3: S3Access):
    for name, task in (("text_to_image.json", "generation"), ("text_and_image_to_image.json", "editing")):
        data = json.loads(s3.read_bytes(join(src, name)))
        items, skipped = [], Counter()
        for i, item in enumerate(data):
            members = {"txt": str(item.get("input_prompt", "")), "output": join(src, item.get("output_image", ""))}
            if task == "editing":
                inputs = item.get("input_image") or []
                if len(inputs) != 1:
                    skipped["not_single_image"] += 1
                    continue
                members = {"input.jpg": join(src, inputs[0]), "output.jpg": members["output"], "txt": members["txt"]}
            items.append((_key(task, i), members))
        yield name, task, items, skipped


# -------------------------------------------------------------------------- shards


def _image_member(data: bytes, missing: str, as_jpeg: bool) -> tuple[bytes, str]:
    """An image that passes training's checks (`open_image`); edits are stored as JPEG
    (re-encoded if needed)."""
    im = open_image(data, missing)
    fmt = (Image.open(io.BytesIO(data)).format or "").lower()
    if as_jpeg and fmt != "jpeg":
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=95)
        return buf.getvalue(), "jpg"
    return data, {"jpeg": "jpg", "png": "png", "webp": "webp"}.get(fmt, "jpg")


def _sample(s3: S3Access, task: str, members: dict) -> dict[str, bytes]:
    """Fetch one sample's files and check them as training's decoder does, so a converted
    source holds only samples training uses; raises BadSample(reason) in its vocabulary."""
    text = members["txt"]
    text = text.strip().encode() if isinstance(text, str) else text  # None: no caption
    decode_text(text, task)
    out = {"txt": text.strip()}
    for name in ("input.jpg", "output.jpg") if task == "editing" else ("output",):
        missing = "missing_edit_input" if name == "input.jpg" else "missing_image"
        try:
            data = members[name] if isinstance(members[name], bytes | None) else s3.read_bytes(members[name])
        except (OSError, S3Error, KeyError):
            raise BadSample(missing) from None
        data, ext = _image_member(data, missing, as_jpeg=task == "editing")
        out[name if task == "editing" else ext] = data
    return out


def write_shard(out: str, s3: S3Access, name: str, task: str, items: list) -> dict:
    """Write one shard of `items` (a Ray task); returns its sidecar record."""
    skipped: Counter = Counter()
    count = 0
    writer = ShardWriter(out, s3, "", task, shard_size=max(1, len(items)), name=name, manifest=False)
    with writer:
        for key, members in items:
            try:
                writer.write(key, _sample(s3, task, members))
                count += 1
            except BadSample as e:
                skipped[e.reason] += 1
    record = {
        "path": writer.manifest.shards[0].path if writer.manifest.shards else None,
        "samples": count,
        "skipped": dict(skipped),
    }
    if record["path"]:
        fs, root = s3.resolve(out)
        with fs.open_output_stream(f"{root}/{record['path']}.json") as f:  # written last: marks the shard complete
            f.write(json.dumps(record).encode())
    return record


def reshard_tar(out: str, s3: S3Access, src_uri: str, task: str, shard_size: int) -> list[dict]:
    """Validate and reshard one input tar into `STEM-NNNNNN.tar` shards (a Ray task)."""
    from pipelines.shard_source import read_shard

    fs, path = s3.resolve(src_uri)
    stem = _key(PurePosixPath(src_uri).stem)
    items, records, part, reasons = [], [], 0, Counter()

    def flush():
        nonlocal items, part
        if items:
            record = write_shard(out, s3, f"{stem}-{part:06d}.tar", task, items)
            records.append(record)
            part += 1
            items = []

    for row in read_shard(fs, path, src_uri, task):
        if row["skip"]:
            reasons[row["skip"]] += 1
            continue
        members = {"txt": row["text"]}  # None when the sample has no caption
        if task == "editing":
            members.update({"input.jpg": row.get("source"), "output.jpg": row["image"]})
        else:
            members["output"] = row["image"]
        items.append((_key(row["key"]), members))
        if len(items) >= shard_size:
            flush()
    flush()
    if reasons and records:
        records[-1]["skipped"] = dict(Counter(records[-1]["skipped"]) + reasons)
    out_fs, root = s3.resolve(out)
    with out_fs.open_output_stream(f"{root}/_{stem}.done") as f:  # every part written: the input is done
        f.write(json.dumps({"parts": part, "skipped": dict(reasons)}).encode())
    return records


# ---------------------------------------------------------------------------- driver


def convert(
    fmt: str,
    src: str,
    out: str,
    s3: S3Access,
    shard_size: int = 1000,
    task: str = "generation",
    max_in_flight: int | None = None,
    log=print,
) -> dict[str, Manifest]:
    """Convert `src` in layout `fmt` to shards under `out` (see the module doc). Returns manifests."""
    import ray

    if fmt not in FORMATS:
        raise UserError(f"unknown source format {fmt!r}; known: {', '.join(FORMATS)}")
    if shard_size < 1:
        raise UserError(f"--shard-size must be >= 1, got {shard_size}")
    max_in_flight = max_in_flight or max(2, int(ray.cluster_resources().get("CPU", 2)) * 2)
    remote_write = ray.remote(write_shard)
    remote_reshard = ray.remote(reshard_tar)
    dest = {"gpt-image-edit": lambda t: out, "sharegpt-4o": lambda t: join(out, t), "wds": lambda t: out}[fmt]
    done = {}  # destination -> existing sidecars (resume)
    pending, tasks_of, skipped, t0 = [], {}, Counter(), time.monotonic()

    def existing(uri: str) -> set[str]:
        if uri not in done:
            done[uri] = {u.rsplit("/", 1)[-1].removesuffix(".json") for u in _list(s3, uri, ".tar.json")}
        return done[uri]

    def submit(ref):
        pending.append(ref)
        while len(pending) >= max_in_flight:
            _, rest = ray.wait(pending, num_returns=1)
            pending[:] = rest

    resumed = 0
    if fmt == "wds":
        tasks_of[out] = task
        finished = {u.rsplit("/", 1)[-1] for u in _list(s3, out, ".done")}
        for tar in _list(s3, src, ".tar"):
            if f"_{_key(PurePosixPath(tar).stem)}.done" in finished:
                resumed += 1
                continue
            submit(remote_reshard.remote(out, s3, tar, task, shard_size))
    else:
        items_of = gpt_image_edit_items if fmt == "gpt-image-edit" else sharegpt_4o_items
        counters: Counter = Counter()
        for ann, item_task, items, bad in items_of(src, s3):
            skipped.update(bad)
            uri = dest(item_task)
            tasks_of[uri] = item_task
            prefix = "gen" if item_task == "generation" else "edit"
            for start in range(0, len(items), shard_size):
                name = f"{prefix}-{counters[uri]:06d}.tar"
                counters[uri] += 1
                if name in existing(uri):
                    resumed += 1
                    continue
                submit(remote_write.remote(uri, s3, name, item_task, items[start : start + shard_size]))
            log(f"[convert] {ann}: {len(items)} items queued")
    ray.get(pending)
    manifests = {}
    for uri, t in tasks_of.items():
        records = [json.loads(s3.read_bytes(u)) for u in _list(s3, uri, ".tar.json")]
        manifest = Manifest(t, [ShardInfo(r["path"], r["samples"]) for r in sorted(records, key=lambda r: r["path"])])
        for r in records:
            skipped.update(r.get("skipped", {}))
        fs, root = s3.resolve(uri)
        with fs.open_output_stream(f"{root}/{MANIFEST}") as f:
            f.write(manifest.to_json().encode())
        manifests[t] = manifest
        log(f"[convert] {uri}: {manifest.samples} samples in {len(manifest.shards)} shards")
    log(
        f"[convert] done in {time.monotonic() - t0:.1f}s; {resumed} shard task(s) already complete; skipped: {dict(skipped) or 'none'}"
    )
    return manifests
