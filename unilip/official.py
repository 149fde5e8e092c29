"""The authors' released UniLIP checkpoints -> this project's model directory.

    unilip convert official --src ./UniLIP-1B --out ./unilip-1b-release
    unilip convert official --src s3://bucket/kanashi6/UniLIP-3B --out ./unilip-3b-release --register unilip-3b-release

    from unilip.official import convert_official
    report = convert_official("./UniLIP-1B", "./unilip-1b-release")

A release (Hugging Face kanashi6/UniLIP-1B, -3B) is one `save_pretrained` directory of
`UniLIP_InternVLForCausalLM`: config.json (`model_type` unilip_internvl, `n_query`,
`connect_layer`, `unilip_factor`, the hub ids of its upstream) and `model.safetensors`, or
shards listed in `model.safetensors.index.json`, holding every part in bf16 under the live
module names. The conversion (see `RULES`):

- InternViT in its original layout -> transformers' InternVL vision tower: renames, and the
  fused `attn.qkv` split into q, k, v (rows in that order);
- mlp1 and the down-projection's `nn.Sequential` indices -> named layers;
- the connector gains `model.` and an unused one-row `embed_tokens` (zeros: it takes
  embeddings); the DiT, the DC-AE decoder, the queries and the caption projector are copied;
- the frozen LLM and its head are not kept: they are the ones of `upstream.mllm`
  (InternVL3-*-hf), which the project loads, as for any model it trains. They are checked
  first to be that LLM's tensors (`check_frozen_llm`), so a release is never paired with
  another InternVL3;
- the DiT keeps the 2-D sincos positional embedding it was fine-tuned with
  (`model.dit_pos_embed: sincos`): the release's pinned diffusers 0.32.2 added it to
  SANA's DiT whatever its config said, and no weight file records it.

Every source tensor is mapped (name and shape checked against the model the preset builds,
on the meta device) or listed as deliberately unused; every tensor the model needs is found
or created as named. A wrong or partial checkpoint fails on its first unknown, missing or
mismatched key. Only safetensors are read: a directory with pickles only is refused.
bf16 -> fp32 is exact, so the converted parts hold the release's values.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from unilip.config import ModelConfig
from unilip.errors import UserError

MODEL_TYPE = "unilip_internvl"
# The release's InternVL3-*-hf source -> the preset built around it (a local copy's name works too).
PRESETS = {"InternVL3-1B-hf": "unilip-1b", "InternVL3-2B-hf": "unilip-3b", "tiny": "tiny"}
PICKLES = (".bin", ".pth", ".pt", ".ckpt", ".pkl")
# A copy re-saved by a transformers version whose VLM key mapping works has these prefixes.
LEGACY_PREFIXES = (
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
)

_VIT = r"model\.vision_tower\."
_LAYER = _VIT + r"encoder\.layers\.(\d+)\."
_WB = r"(weight|bias)"
# official key (full match) -> (component, key in the component's state_dict)
RULES: list[tuple[str, str, str]] = [
    (_VIT + r"embeddings\.class_embedding", "encoder", "vision_tower.embeddings.cls_token"),
    (_VIT + r"embeddings\.position_embedding", "encoder", "vision_tower.embeddings.position_embeddings"),
    (
        _VIT + r"embeddings\.patch_embedding\." + _WB,
        "encoder",
        r"vision_tower.embeddings.patch_embeddings.projection.\1",
    ),
    (_LAYER + r"attn\.proj\." + _WB, "encoder", r"vision_tower.encoder.layer.\1.attention.projection_layer.\2"),
    (_LAYER + r"ls([12])", "encoder", r"vision_tower.encoder.layer.\1.lambda_\2"),
    (_LAYER + r"norm1\." + _WB, "encoder", r"vision_tower.encoder.layer.\1.layernorm_before.\2"),
    (_LAYER + r"norm2\." + _WB, "encoder", r"vision_tower.encoder.layer.\1.layernorm_after.\2"),
    (_LAYER + r"mlp\.(fc[12])\." + _WB, "encoder", r"vision_tower.encoder.layer.\1.mlp.\2.\3"),
    (r"model\.multi_modal_projector\.0\." + _WB, "encoder", r"projector.layer_norm.\1"),
    (r"model\.multi_modal_projector\.1\." + _WB, "encoder", r"projector.linear_1.\1"),
    (r"model\.multi_modal_projector\.3\." + _WB, "encoder", r"projector.linear_2.\1"),
    (r"model\.vae_decoder\.down_blocks\.(\d+)\.mlp\.0\." + _WB, "down_proj", r"blocks.\1.norm.\2"),
    (r"model\.vae_decoder\.down_blocks\.(\d+)\.mlp\.1\." + _WB, "down_proj", r"blocks.\1.fc1.\2"),
    (r"model\.vae_decoder\.down_blocks\.(\d+)\.mlp\.3\." + _WB, "down_proj", r"blocks.\1.fc2.\2"),
    (r"model\.vae_decoder\.down_mlp\.0\." + _WB, "down_proj", r"norm.\1"),
    (r"model\.vae_decoder\.down_mlp\.1\." + _WB, "down_proj", r"fc1.\1"),
    (r"model\.vae_decoder\.down_mlp\.3\." + _WB, "down_proj", r"fc2.\1"),
    (r"model\.vae_decoder\.decoder\.(.+)", "pixel_decoder", r"\1"),
    (r"model\.latent_queries", "queries", "queries"),
    (r"model\.llm_connector\.(.+)", "connector", r"model.\1"),
    (r"model\.projector\." + _WB, "caption_projector", r"\1"),
    (r"model\.dit\.(.+)", "dit", r"\1"),
]
# the fused qkv: one source tensor -> three, split in thirds along rows (q, k, v)
QKV = (
    _LAYER + r"attn\.qkv\." + _WB,
    "encoder",
    [rf"vision_tower.encoder.layer.\1.attention.{p}_proj.\2" for p in "qkv"],
)
FROZEN_LLM = r"model\.language_model\..+|lm_head\.weight"
UNUSED = [
    (FROZEN_LLM, "the frozen LLM and its head: the model loads them from upstream.mllm, as for every model it trains")
]
CREATED = {("connector", "model.embed_tokens.weight"): "zeros: the connector takes embeddings, never token ids"}
# What a converted model takes from elsewhere (the end-of-conversion report).
ELSEWHERE = {
    "frozen LLM (Qwen2) and tokenizer": "upstream.mllm",
    "DC-AE encoder (gen stage 1's dcae targets)": "upstream.dcae",
    "distillation teacher (reconstruction stages)": "the source InternViT and projector of upstream.mllm",
    "discriminator (reconstruction stages)": "fresh: each reconstruction stage builds its own; the release has none",
}


class ConversionError(UserError):
    """A release directory that cannot be converted, with the first reason."""


@dataclass
class Move:
    src: str  # the official key
    component: str
    key: str
    part: int | None = None  # third of a fused qkv tensor, or None (the whole tensor)


@dataclass
class Mapping:
    moves: list[Move] = field(default_factory=list)
    unused: dict[str, str] = field(default_factory=dict)  # official key -> why
    created: dict[tuple[str, str], str] = field(default_factory=dict)


def normalise(key: str) -> str:
    for old, new in LEGACY_PREFIXES:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def targets(key: str) -> list[tuple[str, str, int | None]] | str:
    """Where an official key goes: [(component, key, third)], or why it is not used."""
    pattern, component, names = QKV
    if m := re.fullmatch(pattern, key):
        return [(component, m.expand(n), i) for i, n in enumerate(names)]
    for pattern, component, name in RULES:
        if m := re.fullmatch(pattern, key):
            return [(component, m.expand(name), None)]
    for pattern, why in UNUSED:
        if re.fullmatch(pattern, key):
            return why
    raise ConversionError(f"unrecognised key {key!r}: not part of a UniLIP release checkpoint")


def map_keys(official: dict[str, tuple[int, ...]], expected: dict[str, dict[str, tuple[int, ...]]]) -> Mapping:
    """Map every official key (name -> shape) onto the model's components (component ->
    key -> shape), or fail on the first unknown, mismatched or missing key."""
    out, found = Mapping(), set()
    for src, shape in official.items():
        where = targets(normalise(src))
        if isinstance(where, str):
            out.unused[src] = where
            continue
        for component, key, third in where:
            want = expected[component].get(key)
            if want is None:
                raise ConversionError(f"{src} maps to {component}/{key}, which the model does not have")
            got = tuple(shape) if third is None else (shape[0] // 3, *shape[1:])
            if third is not None and shape[0] % 3:
                raise ConversionError(f"{src}: fused qkv of shape {list(shape)} does not split in three")
            if got != tuple(want):
                raise ConversionError(f"{src} -> {component}/{key}: shape {list(got)}, the model expects {list(want)}")
            if (component, key) in found:
                raise ConversionError(f"{src}: {component}/{key} is given twice")
            found.add((component, key))
            out.moves.append(Move(src, component, key, third))
    for component, keys in expected.items():
        for key in keys:
            if (component, key) in found:
                continue
            if (component, key) not in CREATED:
                raise ConversionError(
                    f"missing key: nothing in the checkpoint gives {component}/{key} (shape {list(keys[key])})"
                )
            out.created[(component, key)] = CREATED[(component, key)]
    return out


# ------------------------------------------------------------------------ reading


@dataclass
class Release:
    """An official checkpoint directory: its config and where each tensor lives."""

    root: Path
    config: dict
    files: dict[str, Path]  # key -> safetensors file
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]


def read_release(root: str | Path) -> Release:
    from safetensors import safe_open

    root = Path(root)
    try:
        config = json.loads((root / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConversionError(f"{root}: no readable config.json ({e}); expected a UniLIP release directory") from None
    if config.get("model_type") != MODEL_TYPE:
        raise ConversionError(
            f"{root}/config.json: model_type {config.get('model_type')!r}, a UniLIP release has {MODEL_TYPE!r}"
        )
    index = root / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text()).get("weight_map") or {}
        names = sorted(set(weight_map.values()))
    else:
        weight_map, names = None, ["model.safetensors"]
    if not all((root / n).exists() for n in names):
        pickles = sorted(p.name for p in root.iterdir() if p.suffix in PICKLES)
        if pickles and not any(p.suffix == ".safetensors" for p in root.iterdir()):
            raise ConversionError(
                f"{root} holds only pickle weights ({', '.join(pickles)}), which are never loaded "
                "(they can run code): convert them to safetensors where they came from"
            )
        missing = next(n for n in names if not (root / n).exists())
        raise ConversionError(
            f"{root}: weight file {missing} missing" + (f" (listed in {index.name})" if weight_map else "")
        )
    files, shapes, dtypes = {}, {}, {}
    for name in names:
        with safe_open(str(root / name), framework="pt") as f:
            for key in f.keys():
                if weight_map is not None and weight_map.get(key) != name:
                    raise ConversionError(f"{root}/{name}: key {key} is not listed for this file in {index.name}")
                sl = f.get_slice(key)
                files[key], shapes[key], dtypes[key] = root / name, tuple(sl.get_shape()), sl.get_dtype()
    if weight_map is not None and (absent := sorted(set(weight_map) - set(files))):
        raise ConversionError(f"{root}: {absent[0]} is listed in {index.name} but in no file ({len(absent)} such keys)")
    return Release(root, config, files, shapes, dtypes)


def preset_of(config: dict) -> str:
    source = str(config.get("mllm_hf_path", ""))
    name = source.rstrip("/").rsplit("/", 1)[-1]
    if name not in PRESETS:
        raise ConversionError(
            f"config.json mllm_hf_path {source!r}: not a known release source ({', '.join(PRESETS)}); pass --preset"
        )
    return PRESETS[name]


def release_model_config(config: dict, preset: str) -> ModelConfig:
    """The converted model's config: the release's architecture fields, its sampling
    (guidance 4.5, 20 DPM-Solver++ steps, shift 3: the release's `generate_image`) and the
    DiT's positional embedding it was trained with (diffusers 0.32.2's sincos)."""
    return ModelConfig(
        preset=preset,
        num_queries=int(config.get("n_query", 256)),
        connector_layers=int(config.get("connect_layer", 6)),
        condition="both",
        guidance_scale=4.5,
        num_inference_steps=20,
        solver="dpm",
        shift=3.0,
        latent_space="unilip",
        dit_pos_embed="sincos",
    )


def expected_shapes(cfg: ModelConfig) -> dict[str, dict[str, tuple[int, ...]]]:
    """Every component's keys and shapes, from the model the preset builds (meta: no weights)."""
    from unilip.model import UniLIP, component_state

    model = UniLIP.from_preset(cfg.preset, replace(cfg, init="random"), device="meta")
    return {
        name: {k: tuple(v.shape) for k, v in component_state(part).items()} for name, part in model.components().items()
    }


# ------------------------------------------------------------------------ writing


@dataclass
class Report:
    out: str
    preset: str
    tensors: dict[str, int]  # component -> tensors written
    parameters: dict[str, int]
    unused: dict[str, int]  # reason -> source tensors
    created: dict[str, str]
    elsewhere: dict[str, str]

    def lines(self) -> list[str]:
        out = [f"converted to {self.out} (preset {self.preset}):"]
        out += [f"  {c:<18} {n:>5} tensors {self.parameters[c]:>14,} parameters" for c, n in self.tensors.items()]
        out += [f"  unused: {n} source tensors, {why}" for why, n in self.unused.items()]
        out += [f"  created: {key}: {why}" for key, why in self.created.items()]
        out += [f"  from elsewhere: {what}: {where}" for what, where in self.elsewhere.items()]
        return out


def convert_official(
    src: str,
    out: str | Path,
    preset: str | None = None,
    upstream: dict[str, str] | None = None,
    check_llm: bool = True,
    log=print,
) -> Report:
    """Convert a release directory (local, or an s3:// prefix fetched to the local cache)
    into a model directory. `upstream` overrides the preset's mllm/dit/dcae (local copies,
    s3:// mirrors). `check_llm`: first check the release's frozen LLM against upstream.mllm."""
    from unilip.presets import PRESETS as REGISTRY
    from unilip.presets import UPSTREAM, resolve_pretrained

    release = read_release(resolve_pretrained(src))
    preset = preset or preset_of(release.config)
    if preset not in REGISTRY:
        raise ConversionError(f"unknown preset {preset!r}; available: {', '.join(sorted(REGISTRY))}")
    cfg = release_model_config(release.config, preset)
    log(
        f"[convert] {src}: {len(release.shapes)} tensors in {len(set(release.files.values()))} file(s) -> preset {preset}"
    )
    expected = expected_shapes(cfg)
    mapping = map_keys(release.shapes, expected)
    mllm = (upstream or {}).get("mllm") or UPSTREAM[preset].mllm
    if check_llm:
        log(f"[convert] checking the release's frozen LLM against upstream.mllm = {mllm} (--skip-llm-check to skip)")
        log(f"[convert] frozen LLM: {check_frozen_llm(release, mapping, mllm)} tensors equal")
    return _write(release, mapping, expected, cfg, Path(out), upstream or {})


# ------------------------------------------------------------------ the frozen LLM

LLM_KEY = re.compile(FROZEN_LLM)
VOCAB_ROWS = ("model.language_model.embed_tokens.weight", "lm_head.weight")  # the release adds rows for its tokens


def check_frozen_llm(release: Release, mapping: Mapping, mllm: str) -> int:
    """The release's frozen LLM, tensor by tensor, against the LLM of `mllm` (the source the
    converted model loads it from): equal at the release's dtype, over the source's
    vocabulary rows. Fails on the first difference, naming it; returns the tensors compared."""
    from safetensors import safe_open

    mine = {normalise(k): k for k in mapping.unused if LLM_KEY.fullmatch(normalise(k))}
    with source_llm(mllm) as theirs:
        if absent := sorted(set(theirs) - set(mine)):
            raise ConversionError(
                f"{absent[0]}: in upstream.mllm ({mllm}) but not in the release "
                f"({len(absent)} such tensors): not the LLM the release was trained with"
            )
        with contextlib.ExitStack() as files:
            handles = {p: files.enter_context(safe_open(str(p), framework="pt")) for p in set(release.files.values())}
            for key in sorted(mine):
                src = mine[key]
                if key not in theirs:
                    raise ConversionError(f"{src}: the release's frozen LLM has it, upstream.mllm ({mllm}) does not")
                got, want = handles[release.files[src]].get_tensor(src), theirs[key]()
                if key in VOCAB_ROWS and got.shape[1:] == want.shape[1:] and got.shape[0] >= want.shape[0]:
                    got = got[: want.shape[0]]
                if got.shape != want.shape:
                    raise ConversionError(
                        f"{src}: shape {list(got.shape)} in the release, {list(want.shape)} in "
                        f"upstream.mllm ({mllm}): another LLM than the release was trained with"
                    )
                want = want.to(got.dtype)
                if not torch.equal(got, want):
                    diff = (got.float() - want.float()).abs()
                    raise ConversionError(
                        f"{src}: the release's frozen LLM differs from upstream.mllm ({mllm}): {int((diff > 0).sum()):,} "
                        f"of {diff.numel():,} values, by up to {diff.max().item():.3g}; the release was trained with "
                        "another InternVL3. Name the right one with --mllm, or pass --skip-llm-check"
                    )
    return len(mine)


@contextlib.contextmanager
def source_llm(mllm: str):
    """The frozen LLM tensors of an MLLM source, by normalised key -> a loader of the tensor:
    the tiny preset's built weights, or the safetensors of a local directory, an s3://
    prefix (fetched to the cache) or a hub id (through huggingface_hub's cache)."""
    from safetensors import safe_open

    from unilip.presets import build_backbones, resolve_pretrained

    if mllm == "tiny":
        state = build_backbones("tiny").mllm.state_dict()
        yield {k: (lambda v=v: v) for k, v in state.items() if LLM_KEY.fullmatch(k)}
        return
    root = Path(resolve_pretrained(mllm))
    if not root.is_dir():
        root = Path(hub_snapshot(mllm))
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise ConversionError(f"upstream.mllm {mllm}: no safetensors weights in {root}")
    with contextlib.ExitStack() as stack:
        out = {}
        for path in files:
            f = stack.enter_context(safe_open(str(path), framework="pt"))
            out |= {
                normalise(k): (lambda f=f, k=k: f.get_tensor(k)) for k in f.keys() if LLM_KEY.fullmatch(normalise(k))
            }
        config = json.loads((root / "config.json").read_text()) if (root / "config.json").exists() else {}
        if config.get("tie_word_embeddings") and "lm_head.weight" not in out and VOCAB_ROWS[0] in out:
            out["lm_head.weight"] = out[VOCAB_ROWS[0]]  # tied: saved once, as the embeddings
        yield out


def hub_snapshot(repo_id: str) -> str:
    """A hub repository's weights and configs in huggingface_hub's cache (its token, cache
    and offline settings apply)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, allow_patterns=["*.safetensors", "*.json"])
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as e:
        raise ConversionError(
            f"upstream.mllm {repo_id}: neither a local directory nor a reachable hub repository "
            f"({type(e).__name__}: {e}); point --mllm at a local copy, or pass --skip-llm-check"
        ) from None


def _write(
    release: Release, mapping: Mapping, expected: dict, cfg: ModelConfig, out: Path, overrides: dict[str, str]
) -> Report:
    from safetensors import safe_open
    from safetensors.torch import save_file

    from unilip.model import FORMAT_VERSION, OWN_PARTS, PRETRAINED
    from unilip.presets import UPSTREAM
    from unilip.prompts import prompt_format

    out.mkdir(parents=True, exist_ok=True)
    by_component: dict[str, list[Move]] = {}
    for move in mapping.moves:
        by_component.setdefault(move.component, []).append(move)
    tensors, parameters = {}, {}
    with contextlib.ExitStack() as files:
        handles = {p: files.enter_context(safe_open(str(p), framework="pt")) for p in set(release.files.values())}
        for component in expected:  # one component in memory at a time (the 3B DiT: 6.4 GB in fp32)
            state = {}
            for move in by_component.get(component, []):
                if not release.dtypes[move.src].startswith(("BF16", "F16", "F32")):
                    raise ConversionError(
                        f"{move.src}: dtype {release.dtypes[move.src]}, expected a floating-point tensor"
                    )
                t = handles[release.files[move.src]].get_tensor(move.src)
                if move.part is not None:
                    t = t.chunk(3, dim=0)[move.part]
                state[move.key] = t.float().contiguous()  # bf16 -> fp32 is exact
            for c, key in mapping.created:
                if c == component:
                    state[key] = torch.zeros(expected[c][key])
            save_file(state, str(out / f"{component}.safetensors"))
            tensors[component], parameters[component] = len(state), sum(t.numel() for t in state.values())
    upstream = asdict(UPSTREAM[cfg.preset])
    upstream["unilip_factor"] = float(release.config.get("unilip_factor", upstream["unilip_factor"]))
    upstream.update({k: v for k, v in overrides.items() if v})
    parts = [*OWN_PARTS, *PRETRAINED]
    config = {
        "format": "unilip",
        "version": FORMAT_VERSION,
        "model": asdict(cfg),
        "upstream": upstream,
        "trained_parts": sorted(parts),
        "saved_parts": parts,
        # what the release was trained and sampled with (its training data code and `generate_image`)
        "prompt_format": prompt_format(),
        "converted_from": {
            "source": str(release.root),
            "files": sorted({p.name for p in release.files.values()}),
            **{
                k: release.config.get(k)
                for k in (
                    "n_query",
                    "connect_layer",
                    "unilip_factor",
                    "mllm_path",
                    "mllm_hf_path",
                    "dit_path",
                    "vae_path",
                )
            },
            "tensors": len(release.shapes),
            "unused_tensors": len(mapping.unused),
        },
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    _write_tokenizer(release.root, out / "tokenizer")
    unused: dict[str, int] = {}
    for why in mapping.unused.values():
        unused[why] = unused.get(why, 0) + 1
    created = {f"{c}/{k}": why for (c, k), why in mapping.created.items()}
    elsewhere = {
        what: (f"{where} = {upstream[where.split('.')[1]]}" if where.startswith("upstream.") else where)
        for what, where in ELSEWHERE.items()
    }
    return Report(str(out), cfg.preset, tensors, parameters, unused, created, elsewhere)


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)


def _write_tokenizer(root: Path, out: Path) -> None:
    """The release's tokenizer files, checked to give this project's chat and image tokens
    (the model itself loads the tokenizer of upstream.mllm; this copy is for reference)."""
    import shutil

    from transformers import AutoTokenizer

    from unilip.tokenizer import SPECIAL_TOKENS

    out.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (root / name).exists():
            shutil.copy2(root / name, out / name)
    try:  # from the copy: the release's config.json names a model type transformers does not know
        tok = AutoTokenizer.from_pretrained(str(out))
    except (OSError, ValueError) as e:
        raise ConversionError(f"{root}: the release's tokenizer does not load: {e}") from None
    unknown = [t for t in SPECIAL_TOKENS if tok.convert_tokens_to_ids(t) in (None, tok.unk_token_id)]
    if unknown:
        raise ConversionError(f"{root}: the tokenizer lacks {', '.join(unknown)}: not a UniLIP release tokenizer")
