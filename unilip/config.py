"""Typed configuration: dataclasses for storage, model, data and training (serving: serve/serve.yaml).

A training stage is a `Recipe` loaded from a YAML file (`jobs/training/recipes/NAME.yaml`); any
field can be overridden with dotted keys, as the CLI's `--set train.lr=2e-4` does.
Values are checked against the field types, and an unknown key or a value of the wrong
type raises `ConfigError` naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from unilip.errors import UserError


class ConfigError(UserError):
    """A configuration key or value that does not fit the schema, or a setting that cannot work."""


# ----------------------------------------------------------------------------- schema


@dataclass
class S3Config:
    """How to reach S3. Unset fields come from the usual AWS environment variables; the
    credentials always come from the SDK's default chain, in every process (`unilip.s3`)."""

    endpoint_url: str | None = None  # None: AWS S3 (or AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL)
    region: str | None = None  # None: AWS_REGION / AWS_DEFAULT_REGION / profile / us-east-1
    max_attempts: int = 10  # per request, with exponential backoff (standard retry mode)
    connect_timeout: float = 10.0
    read_timeout: float = 60.0


@dataclass
class ModelConfig:
    preset: str = "tiny"  # name in the preset registry: tiny | unilip-1b | unilip-3b
    # pretrained: the preset's published weights; random: its architecture, random weights (no download)
    init: Literal["pretrained", "random"] = "pretrained"
    num_queries: int = 256  # learnable query tokens appended after <img>
    condition: Literal["hidden", "queries", "both"] = "both"  # paper Table 7 ablation
    connector_layers: int = 6  # initialised from the LLM's last layers
    cfg_drop_rate: float = 0.1  # training-time prompt drop to the null prompt
    guidance_scale: float = 4.5
    num_inference_steps: int = 20
    solver: Literal["euler", "dpm"] = "dpm"  # the release samples with DPM-Solver++ (flow)
    shift: float = 3.0  # flow-matching timestep shift (SANA 512 px)
    latent_space: Literal["unilip", "dcae"] = "unilip"  # diffusion space: dcae in gen stage 1 (DiT frozen)
    # The DiT's positional embedding, a property of the weights trained with it (a
    # non-persistent buffer: no key, shape or count shows it). none: SANA's 512 px
    # pretraining (use_pe: false); sincos: the 2-D sincos embedding diffusers <= 0.32.2
    # added whatever the config said, which the release's DiT was fine-tuned with.
    dit_pos_embed: Literal["none", "sincos"] = "none"


@dataclass
class SourceConfig:
    name: str
    uri: str  # s3://bucket/prefix or a local directory holding shards + manifest.json
    task: Literal["generation", "editing"] = "generation"
    multiplier: float = 1.0  # sampling weight = multiplier x source size
    # Or a fixed share of all samples (the release's reconstruction mix: 0.6 / 0.2 / 0.2);
    # a recipe gives every source a proportion, or none.
    proportion: float | None = None


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    resolution: int = 448  # training images: 224 or 448; 512 for gen stage 1's DC-AE targets
    # random_crop: shorter side to `resolution`, a random crop and flip, seeded per sample
    # (reconstruction); squash: the whole image resized to a square, as InternVL's
    # processor does (generation and editing); center_crop: the evaluation framing.
    preprocess: Literal["random_crop", "center_crop", "squash"] = "squash"
    # single_task: each worker's micro batch is one task, a global step mixes the tasks at
    # their ratio (the release's); lockstep: every worker the same task at each micro step
    # (what ZeRO-3 needs when tasks run different modules); mixed: tasks within a batch.
    batch_mode: Literal["single_task", "lockstep", "mixed"] = "single_task"
    # The order of every epoch (pipelines/order.py): shards permuted per epoch; each read
    # task reads `shard_interleave` of them interleaved and emits its samples through a
    # shuffle window of `shuffle_buffer` raw samples. Memory per active read task: that
    # many open shards x 4 MB of read buffer + the window's undecoded samples (1,000
    # BLIP3o JPEGs: about 150 MB). `shuffle: false` reads in manifest order.
    shuffle: bool = True
    shard_interleave: int = 16
    shuffle_buffer: int = 1000
    # Ray Data's own buffer on each worker (`iter_batches(local_shuffle_buffer_size=)`):
    # more mixing, at the price of decoded pixels held on the worker (about 0.6 GB per
    # 1,000 generation rows at 448 px, twice that for editing, per source). 0: off.
    worker_shuffle_buffer: int = 0
    # Micro batches each worker prepares ahead of the step, in a thread (pinned on a GPU
    # node, 19 MB each at 448 px x 32 images, twice that for editing). 0: on the step's path.
    worker_prefetch: int = 4
    seed: int = 0  # the order, the crops and the step schedule
    # Object-store bytes each source's pipeline keeps in flight (None: Ray Data's default
    # share of the object store). Bounds memory: peak use stops growing with dataset size.
    inflight_mb: int | None = 192
    eval_uri: str | None = None  # held-out generation source for reconstruction metrics
    eval_samples: int = 64
    fid_weights: str | None = None  # FID Inception weights (path or s3://): adds rFID to the eval
    # The bad-data budget (pipelines/budget.py): past it the run stops after a checkpoint.
    # Per source and epoch: samples skipped (bad ones, and the unread rest of broken shards)
    # as a fraction of the epoch, and unreadable shards in a row (each after its read retries).
    max_skip_fraction: float = 0.01
    max_unreadable_shards: int = 3


@dataclass
class LossConfig:
    """The reconstruction objective (reconstruction stages), as the release computes it:
    every term in fp32 on images in [0, 1], whatever the training precision."""

    mse: float = 1.0
    lpips: float = 1.0
    lpips_net: Literal["vgg", "alex"] = "vgg"  # the release: VGG16 LPIPS
    lpips_weights: str | None = None  # torchvision VGG16/AlexNet weights (path or s3://); None: random (tiny only)
    convnext: float = 0.0  # the release: 0.1 x MSE of ConvNeXt-S logits
    convnext_weights: str | None = None  # torchvision ConvNeXt-S weights (path or s3://)
    distill: float = 0.0  # self-distillation against the frozen original encoder
    gan: float = 0.0  # adversarial weight; on from `gan_start_step`
    gan_start_step: int | None = None  # None: no adversarial loss
    gan_loss: Literal["hinge", "bce"] = "hinge"  # hinge: the release; bce: the paper (App. A.4)
    lecam: float = 0.001  # LeCam regularisation of the discriminator (0: off)
    lecam_decay: float = 0.999
    discriminator_width: int = 128  # NLayerDiscriminator channels (128-128-256-512)


@dataclass
class TrainConfig:
    steps: int = 1000
    global_batch: int = 64  # = workers x micro_batch x gradient accumulation
    micro_batch: int = 16
    lr: float = 1e-4
    min_lr: float = 1e-5  # cosine schedule floor
    warmup_steps: int = 0
    weight_decay: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0
    ema_decay: float = 0.999  # the ceiling: the decay warms up as min((1 + n) / (10 + n), ema_decay)
    lr_scales: dict[str, float] = field(default_factory=dict)  # parameter group -> lr factor
    trainable: list[str] = field(default_factory=list)  # component names; the rest is frozen
    # Components whose blocks recompute their activations in the backward pass (less
    # memory, about a third more compute for them): encoder, llm, connector, dit, pixel_decoder.
    activation_checkpointing: list[str] = field(default_factory=list)
    precision: Literal["fp32", "bf16"] = "bf16"
    zero_stage: Literal[0, 1, 2, 3] = 2
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2  # the newest K stay in storage
    # async: the workers write a checkpoint locally and train on while it uploads (Ray
    # Train's ASYNC mode; the resume point moves only once an upload is complete); sync:
    # every worker waits for the upload.
    checkpoint_upload: Literal["async", "sync"] = "async"
    eval_every: int = 1000
    log_every: int = 10
    max_failures: int = 3  # worker failures survived by resuming from the last checkpoint
    seed: int = 0
    # Testing recovery: rank 1 kills its own process (SIGKILL) once at the start of each of
    # `fault_steps`, and once halfway through uploading the checkpoint of each of
    # `fault_uploads`; each worker writes the keys it trained on per step to STORAGE/RUN/samples/.
    fault_steps: list[int] = field(default_factory=list)
    fault_uploads: list[int] = field(default_factory=list)
    record_samples: bool = False


@dataclass
class Recipe:
    """One training stage, as data."""

    name: str
    kind: Literal["reconstruction", "generation"]
    description: str = ""
    after: str | None = None  # the recipe whose exported weights this stage starts from
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    s3: S3Config = field(default_factory=S3Config)
    # Named partial recipes merged over this one, e.g. `tiny`: CPU-sized steps and data.
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)


# ------------------------------------------------------------------- build and check


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass `cls` from plain data (as parsed from YAML), checking every key."""
    return _coerce(data, cls, where)


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


def read_yaml(path: str | Path) -> dict:
    """A YAML mapping from a file; unreadable or invalid files raise ConfigError."""
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None


def load_yaml(cls: type, path: str | Path, overrides: list[str] | None = None) -> Any:
    """Load `cls` from a YAML file, then apply `key=value` overrides."""
    return apply_overrides(from_dict(cls, read_yaml(path)), overrides or [])


def apply_overrides(obj: Any, overrides: list[str]) -> Any:
    """Apply `a.b.c=value` strings (values parsed as YAML) to a dataclass, returning a new one."""
    data = to_dict(obj)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        _set_path(data, key.strip().split("."), yaml.safe_load(raw) if raw.strip() else "")
    return from_dict(type(obj), data)


def _set_path(data: Any, parts: list[str], value: Any) -> None:
    # Unknown keys are created here and rejected by the typed rebuild with a full message.
    head, rest = parts[0], parts[1:]
    if isinstance(data, list):
        if not head.isdigit() or int(head) >= len(data):
            raise ConfigError(f"list index {head!r} out of range (0..{len(data) - 1})")
        if rest:
            _set_path(data[int(head)], rest, value)
        else:
            data[int(head)] = value
    elif isinstance(data, dict):
        if rest:
            if not isinstance(data.get(head), (dict, list)):
                data[head] = {}
            _set_path(data[head], rest, value)
        else:
            data[head] = value
    else:
        raise ConfigError(f"cannot set {'.'.join(parts)!r} inside a {type(data).__name__}")


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    label = where or "config"
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{label}: expected a mapping for {tp.__name__}, got {value!r}")
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp)}
        unknown = sorted(set(value) - set(fields))
        if unknown:
            key = f"{where}.{unknown[0]}" if where else unknown[0]
            raise ConfigError(f"unknown key {key!r}; allowed under {label!r}: {', '.join(fields)}")
        kwargs = {}
        for name, f in fields.items():
            sub = f"{where}.{name}" if where else name
            if name in value:
                kwargs[name] = _coerce(value[name], hints[name], sub)
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"missing required key {sub!r}")
        return tp(**kwargs)

    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{label}: expected {_type_name(tp)}, got {value!r}")

    if origin is Literal:
        if value not in args:
            allowed = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{label}: expected one of {allowed}, got {value!r}")
        return value

    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{label}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}.{i}") for i, v in enumerate(value)]

    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{label}: expected a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}

    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        # YAML reads "2e-4" as a string (YAML 1.1 floats need a dot): accept numeric strings.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Any:
        return value
    raise ConfigError(f"{label}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
