"""UniLIP: one CLIP encoder for understanding, reconstruction, generation and editing.

    model = UniLIP.from_preset("tiny")                  # or UniLIP.from_pretrained(DIR)
    model.for_inference()                               # bf16 on CUDA, fp32 on the CPU
    images = model.generate(["a red fox in the snow"], seed=0)
    edited = model.edit([image], ["Make it black and white."], seed=0)
    recon = model.reconstruct([image])
    answer = model.understand(image, "What is in the picture?")
    model.save_pretrained(DIR)

Components (names used by recipes for `trainable`): encoder (InternViT + projector, the
MLLM's own modules), down_proj, pixel_decoder (the DC-AE decoder), queries, connector,
caption_projector, dit. The LLM, the DC-AE encoder and the distillation teacher are
always frozen; the discriminator belongs to the reconstruction loss (`unilip.losses`).

Checkpoint format: a directory with config.json (model config, the upstream checkpoints of
the frozen parts, the latent space, which parts were trained), one fp32 safetensors file per saved
component, and the tokenizer. UniLIP's own parts are always saved; pretrained parts
(encoder, pixel_decoder, dit) once they were trained. The model config includes the DiT's
positional embedding (`dit_pos_embed`), which no weight file can show: v3 directories
must state it; a v2 directory (written before it was recorded) is read as it was trained,
"sincos" if it was converted from the release (diffusers 0.32.2 added the embedding),
"none" otherwise (the project has only ever pinned diffusers versions without it).
"""

from __future__ import annotations

import copy
import json
import random
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from unilip.activation_checkpointing import enable_checkpointing
from unilip.config import ConfigError, LossConfig, ModelConfig, from_dict
from unilip.encoder import PATCH_MULTIPLE, UniLIPEncoder, denormalize, pixel_values_from_uint8
from unilip.errors import InputError, UserError
from unilip.generator import Condition, DualConditionGenerator
from unilip.losses import ReconstructionLoss
from unilip.numerics import default_device, inference_dtype, resize_images
from unilip.pixel_decoder import PixelDecoder
from unilip.presets import Backbones, Upstream, build_backbones, dit_kwargs, dit_pos_embed_of, pretrained_backbones
from unilip.prompts import IMAGE, NULL_EDIT, NULL_GENERATION, edit_prompt, generation_prompt
from unilip.sampler import check_sampling_args, sample
from unilip.tokenizer import SPECIAL_TOKENS

# v2: the release's prompt templates (v1 models were trained on bare captions);
# v3: the model config states the DiT's positional embedding
FORMAT_VERSION = 3
READS = (2, 3)
OWN_PARTS = ("down_proj", "queries", "connector", "caption_projector")
GENERATOR = ("queries", "connector", "caption_projector", "dit")  # trained against the DiT's positional embedding
PRETRAINED = ("encoder", "pixel_decoder", "dit")
MIN_IMAGE_SIDE = 16
DCAE_SIZE = 512  # DC-AE's space: 512 px <-> a 16x16 latent
OUTPUT_SIZE = 448  # generated and edited images (decoded at 512, resized)
LATENT_SIDE = OUTPUT_SIZE // PATCH_MULTIPLE  # 16: 256 UniLIP tokens, or 512 px / DC-AE's 32


class UniLIP(nn.Module):
    def __init__(self, backbones: Backbones, cfg: ModelConfig, teacher: bool = False):
        super().__init__()
        if dit_pos_embed_of(backbones.dit) != cfg.dit_pos_embed:
            raise ValueError(
                f"the DiT was built with positional embedding {dit_pos_embed_of(backbones.dit)!r}, "
                f"the config says model.dit_pos_embed={cfg.dit_pos_embed!r}"
            )
        self.cfg = cfg
        self.upstream = backbones.upstream
        self.tokenizer = backbones.tokenizer
        self.mllm = backbones.mllm
        inner = backbones.mllm.model
        width = inner.language_model.config.hidden_size
        self.encoder = UniLIPEncoder(
            inner.vision_tower, inner.multi_modal_projector, backbones.mllm.config.downsample_ratio
        )
        # The teacher is the encoder as upstream has it, copied before any trained weights load.
        self.teacher = copy.deepcopy(self.encoder) if teacher else None
        self.pixel_decoder = PixelDecoder(width, backbones.dcae)
        self.generator = DualConditionGenerator(
            backbones.mllm, backbones.tokenizer, backbones.dit, cfg.num_queries, cfg.connector_layers, cfg.condition
        )
        self.latent_space = cfg.latent_space
        self.trained_parts: set[str] = set()
        self.set_trainable([])

    # ------------------------------------------------------------ construction

    @classmethod
    def from_preset(
        cls,
        preset: str = "tiny",
        cfg: ModelConfig | None = None,
        teacher: bool = False,
        device: str | torch.device | None = None,
    ) -> UniLIP:
        """The preset's parts with UniLIP's own around them, all on `device` (`meta`: shapes only)."""
        cfg = cfg or ModelConfig(preset=preset)
        backbones = build_backbones(preset, cfg.init, device, cfg.dit_pos_embed)
        with torch.device(device or "cpu"):
            return cls(backbones, cfg, teacher)

    def components(self) -> dict[str, nn.Module | nn.Parameter]:
        g = self.generator
        return {
            "encoder": self.encoder,
            "down_proj": self.pixel_decoder.down_proj,
            "pixel_decoder": self.pixel_decoder.dcae.decoder,
            "queries": g.queries,
            "connector": g.connector,
            "caption_projector": g.caption_projector,
            "dit": g.dit,
        }

    def set_trainable(self, names: list[str]) -> None:
        """Freeze everything, then unfreeze the named components (a recipe's `trainable`)."""
        parts = self.components()
        unknown = sorted(set(names) - set(parts))
        if unknown:
            raise ConfigError(f"unknown component(s) {unknown}; trainable components: {', '.join(parts)}")
        self.requires_grad_(False)
        for name in names:
            parts[name].requires_grad_(True)
        self.trained_parts |= set(names)

    def checkpoint_blocks(self) -> dict[str, nn.ModuleList]:
        """The repeated blocks activation checkpointing wraps, per component (`train.activation_checkpointing`)."""
        return {
            "encoder": self.encoder.vision_tower.encoder.layer,
            "llm": self.mllm.model.language_model.layers,
            "connector": self.generator.connector.model.layers,
            "dit": self.generator.dit.transformer_blocks,
            "pixel_decoder": self.pixel_decoder.dcae.decoder.up_blocks,
        }

    def set_activation_checkpointing(self, names: list[str]) -> None:
        blocks = self.checkpoint_blocks()
        unknown = sorted(set(names) - set(blocks))
        if unknown:
            raise ConfigError(
                f"unknown component(s) {unknown} for activation checkpointing; choose from: {', '.join(blocks)}"
            )
        for name in names:
            enable_checkpointing(blocks[name])

    def param_groups(self, lr_scales: dict[str, float] | None = None) -> list[dict]:
        """Trainable parameters by component (with their names, for weight-decay rules)."""
        lr_scales = lr_scales or {}
        groups = []
        for name, part in self.components().items():
            named = [(name, part)] if isinstance(part, nn.Parameter) else list(part.named_parameters())
            named = [(n, p) for n, p in named if p.requires_grad]
            if named:
                groups.append(
                    {
                        "name": name,
                        "params": [p for _, p in named],
                        "named": named,
                        "lr_scale": lr_scales.get(name, 1.0),
                    }
                )
        return groups

    # ---------------------------------------------------------------- training

    def reconstruction_loss(self, cfg: LossConfig, allow_random_backbones: bool = False) -> ReconstructionLoss:
        """The reconstruction objective (fp32). It takes over the distillation teacher, so
        that what trains (this model) and the frozen loss networks stay apart."""
        if self.upstream.mllm != "tiny" and not allow_random_backbones:
            for weight, path, key in (
                (cfg.lpips, cfg.lpips_weights, "lpips_weights"),
                (cfg.convnext, cfg.convnext_weights, "convnext_weights"),
            ):
                if weight and path is None:
                    raise ConfigError(
                        f"loss.{key} must name the pretrained backbone weights file: "
                        f"a real model does not train against random perceptual weights"
                    )
        teacher, self.teacher = self.teacher, None
        return ReconstructionLoss(cfg, teacher)

    def reconstruct_tensors(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """InternVL pixel values -> (reconstruction in [-1, 1], fp32; UniLIP features)."""
        feats = self.encoder(pixel_values)
        return self.pixel_decoder.decode(self.pixel_decoder.encode(feats), pixel_values.shape[-1]), feats

    def reconstruction_terms(self, pixel_values: torch.Tensor, loss: ReconstructionLoss, step: int) -> dict:
        """Loss terms of one batch (fp32 pixel values in), with the reconstruction under "recon"."""
        recon, feats = self.reconstruct_tensors(pixel_values)
        terms = loss.generator_terms(recon, pixel_values, feats, step)
        terms["recon"] = recon
        return terms

    @torch.no_grad()
    def target_latent(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The diffusion target: the DC-AE latent of a 512 px image (gen stage 1), or the
        UniLIP latent x unilip_factor."""
        if self.latent_space == "dcae":
            if pixel_values.shape[-1] != DCAE_SIZE:
                raise ConfigError(
                    f"DC-AE targets come from {DCAE_SIZE} px images (data.resolution), got {pixel_values.shape[-1]}"
                )
            dcae = self.pixel_decoder.dcae
            images = (denormalize(pixel_values.float()) * 2 - 1).to(dcae.dtype)
            return dcae.encode(images).latent * dcae.config.scaling_factor
        return self.pixel_decoder.encode(self.encoder(pixel_values)) * self.upstream.unilip_factor

    def decode_latent(self, latent: torch.Tensor, size: int) -> torch.Tensor:
        """A sampled latent -> (B, 3, size, size) images in [-1, 1], fp32: decoded at 512 px,
        clamped, then resized, as the release's `generate_image` does (a reconstruction
        resizes the unclamped decode: `reconstruct_tensors`)."""
        if self.latent_space == "dcae":
            dcae = self.pixel_decoder.dcae
            images = dcae.decode((latent / dcae.config.scaling_factor).to(dcae.dtype)).sample
        else:
            images = self.pixel_decoder.decode(latent / self.upstream.unilip_factor)
        return resize_images(images.float().clamp(-1, 1), size)

    def drop_prompts(self, prompts: list[str], editing: bool, rng: random.Random) -> list[str]:
        """Classifier-free guidance training: replace a `cfg_drop_rate` share by the null prompt.

        This is the one place the drop happens. Edits keep their reference image."""
        null = NULL_EDIT if editing else NULL_GENERATION
        return [null if rng.random() < self.cfg.cfg_drop_rate else p for p in prompts]

    def generation_loss(
        self,
        prompts: list[str],
        target_pixels: torch.Tensor,
        ref_pixels: torch.Tensor | None = None,
        rng: random.Random | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Rectified-flow loss of one batch (generation, or editing when `ref_pixels` is given).
        `prompts` are formatted (`unilip.prompts`); overlong ones are cut to the token limit."""
        if rng is not None:
            prompts = self.drop_prompts(prompts, ref_pixels is not None, rng)
        ref = None
        if ref_pixels is not None:
            with torch.no_grad():
                ref = self.encoder(ref_pixels)
        cond = self.generator.condition_states(prompts, ref, truncate=True)
        return self.generator.flow_loss(self.target_latent(target_pixels), cond, generator)

    # --------------------------------------------------------------- inference

    def preprocess(self, images, size: int) -> torch.Tensor:
        """PIL images or uint8 arrays -> fp32 InternVL pixel values (B, 3, size, size): RGB,
        squash-resized (bicubic), as InternVL's image processor does and training does."""
        tensors = [
            torch.from_numpy(np.array(to_rgb(im).resize((size, size), Image.Resampling.BICUBIC))) for im in images
        ]
        return pixel_values_from_uint8(torch.stack(tensors).to(self.device))

    def for_inference(self, device: str | torch.device | None = None, dtype: str = "auto") -> UniLIP:
        """On `device` (default: CUDA if there is one) in its precision (`unilip.numerics`), eval mode."""
        device = torch.device(device) if device is not None else default_device()
        return self.to(device=device, dtype=inference_dtype(device, dtype)).eval()

    @property
    def device(self) -> torch.device:
        return self.generator.queries.device

    def check_prompts(self, texts: list[str], n_ref: int = 0) -> list[str]:
        """User captions (or instructions, with `n_ref` reference-image tokens) -> the
        formatted prompts, or a ValueError naming what is wrong."""
        if not texts:
            raise InputError("no prompts given")
        formatted = []
        for text in texts:
            check_text(text)
            prompt = edit_prompt(text) if n_ref else generation_prompt(text)
            self.generator.tokens(prompt, n_ref)  # refuses what is over the token limit
            formatted.append(prompt)
        return formatted

    def _sample(
        self,
        cond: Condition,
        uncond: Condition,
        guidance_scale: float | None = None,
        steps: int | None = None,
        seed: int | list[int] | None = None,
        solver: str | None = None,
    ) -> torch.Tensor:
        """Sampled 448 px images (B, 3, 448, 448) in [-1, 1], fp32. The sampling options (the
        model config's where None): guidance_scale, steps, solver, and `seed`: one for the
        batch, or one per image (batching then does not change an image)."""
        guidance_scale = self.cfg.guidance_scale if guidance_scale is None else float(guidance_scale)
        steps = self.cfg.num_inference_steps if steps is None else steps
        check_sampling_args(guidance_scale, steps)
        shape = (cond.states.shape[0], self.pixel_decoder.dcae.config.latent_channels, LATENT_SIDE, LATENT_SIDE)
        gen, noise = None, None
        if isinstance(seed, list):  # one seed per image: the same image whatever else is in the batch
            if len(seed) != shape[0]:
                raise InputError(f"{len(seed)} seeds for {shape[0]} images")
            noise = torch.stack([torch.randn(shape[1:], generator=torch.Generator().manual_seed(s)) for s in seed])
        elif seed is not None:
            gen = torch.Generator(device="cpu").manual_seed(seed)
        latent = sample(
            self.generator.velocity,
            cond,
            uncond,
            shape,
            steps,
            guidance_scale,
            solver or self.cfg.solver,
            self.cfg.shift,
            gen,
            noise,
        )
        return self.decode_latent(latent, OUTPUT_SIZE)

    @torch.no_grad()
    def generate_tensors(self, prompts: list[str], **sampling) -> torch.Tensor:
        """`generate`, returning the (B, 3, 448, 448) images in [-1, 1] as a tensor."""
        g = self.generator
        cond = g.condition_states(self.check_prompts(prompts))
        uncond = g.condition_states([NULL_GENERATION] * len(prompts))
        return self._sample(cond, uncond, **sampling)

    def generate(self, prompts: list[str], **sampling) -> list[Image.Image]:
        """Captions -> 448x448 images, with classifier-free guidance against the null prompt
        (sampling options: `_sample`)."""
        return to_pil(self.generate_tensors(prompts, **sampling))

    @torch.no_grad()
    def edit_tensors(self, images: list, instructions: list[str], **sampling) -> torch.Tensor:
        """`edit`, returning the (B, 3, 448, 448) images in [-1, 1] as a tensor."""
        g = self.generator
        prompts = self.check_prompts(instructions, n_ref=LATENT_SIDE**2)  # a 448 px reference: 256 tokens
        if len(images) != len(instructions):
            raise InputError(f"{len(images)} images but {len(instructions)} instructions")
        ref = self.encoder(self.preprocess(images, OUTPUT_SIZE))
        cond = g.condition_states(prompts, ref)
        uncond = g.condition_states([NULL_EDIT] * len(images), ref)
        return self._sample(cond, uncond, **sampling)

    def edit(self, images: list, instructions: list[str], **sampling) -> list[Image.Image]:
        """Reference images + instructions -> edited 448x448 images (the null prompt keeps the image)."""
        return to_pil(self.edit_tensors(images, instructions, **sampling))

    @torch.no_grad()
    def reconstruct(self, images: list, size: int = 448) -> list[Image.Image]:
        if size % PATCH_MULTIPLE:
            raise InputError(f"size must be a multiple of {PATCH_MULTIPLE}, got {size}")
        recon, _ = self.reconstruct_tensors(self.preprocess(images, size))
        return to_pil(recon)

    def understanding_inputs(self, image, question: str) -> tuple[torch.Tensor, torch.Tensor]:
        """InternVL3's input for one image and question: the chat's token ids, the image's
        256 context tokens between `<img>` and `</img>` on the user's first line, and its
        pixel values at 448 px (the one tile `understand` reads)."""
        from unilip.tokenizer import IM_END, IM_START, IMG_CONTEXT, IMG_END, IMG_START

        check_text(question)
        pixels = self.preprocess([image], 448)
        n = self.mllm.config.image_seq_length
        text = f"{IM_START}user\n{IMG_START}{IMG_CONTEXT * n}{IMG_END}\n{question}{IM_END}\n{IM_START}assistant\n"
        ids = torch.tensor([self.tokenizer.encode(text, add_special_tokens=False)], device=self.device)
        return ids, pixels.to(self.mllm.dtype)

    def understanding_logits(self, ids: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """The frozen LLM's logits for `ids` (as `understanding_inputs` makes them) with
        `features` (B, 256, D) in place of the `<IMG_CONTEXT>` tokens, as InternVL3 merges
        its encoder's output: how the LLM reads any encoder's features (a teacher's, say)."""
        embeds = self.mllm.get_input_embeddings()(ids)
        image = (ids == self.mllm.config.image_token_id)[..., None]
        return self.mllm(inputs_embeds=embeds.masked_scatter(image, features.to(embeds.dtype))).logits

    @torch.no_grad()
    def understand(self, image, question: str, max_new_tokens: int = 64) -> str:
        """Answer a question about an image with InternVL3, the UniLIP encoder in place."""
        ids, pixels = self.understanding_inputs(image, question)
        out = self.mllm.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values=pixels,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        return self.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()

    # -------------------------------------------------------------- checkpoints

    def saved_parts(self) -> list[str]:
        return [*OWN_PARTS, *(p for p in PRETRAINED if p in self.trained_parts)]

    def save_pretrained(self, out_dir: str | Path) -> Path:
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        parts = self.components()
        for name in self.saved_parts():
            state = {
                k: (v.float() if v.is_floating_point() else v).detach().contiguous().cpu()
                for k, v in component_state(parts[name]).items()
            }
            save_file(state, str(out / f"{name}.safetensors"))  # fp32, whatever the training precision
        config = {
            "format": "unilip",
            "version": FORMAT_VERSION,
            "model": asdict(self.cfg) | {"latent_space": self.latent_space},
            "upstream": asdict(self.upstream),
            "trained_parts": sorted(self.trained_parts),
            "saved_parts": self.saved_parts(),
        }
        (out / "config.json").write_text(json.dumps(config, indent=2))
        self.tokenizer.save_pretrained(str(out / "tokenizer"))
        return out

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, teacher: bool = False, cfg: ModelConfig | None = None) -> UniLIP:
        """Load a model directory. `cfg` replaces its saved model config (a next training
        stage's), except the DiT's positional embedding once the generator was trained with it."""
        model_dir = Path(model_dir)
        try:
            config = json.loads((model_dir / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{model_dir} is not a UniLIP model directory: {e}") from None
        if config.get("format") != "unilip" or config.get("version") not in READS:
            raise UserError(
                f"{model_dir}: unsupported checkpoint format {config.get('format')!r} v{config.get('version')} "
                f"(this version reads v{', v'.join(map(str, READS))})"
            )
        saved = from_dict(ModelConfig, saved_model_config(config, model_dir))
        cfg = cfg or saved
        if set(config["trained_parts"]) & set(GENERATOR):  # a property of the weights trained with it
            cfg = replace(cfg, dit_pos_embed=saved.dit_pos_embed)
        upstream = Upstream(**config["upstream" if "upstream" in config else "sources"])  # v2: "sources"
        if upstream.mllm == "tiny" or saved.init == "random":  # frozen parts: the preset's seeded weights
            backbones = build_backbones(
                "tiny" if upstream.mllm == "tiny" else saved.preset, saved.init, None, cfg.dit_pos_embed
            )
        else:
            backbones = pretrained_backbones(upstream, dit_args=dit_kwargs(cfg.dit_pos_embed))
        model = cls(backbones, cfg, teacher)
        model.trained_parts = set(config["trained_parts"])
        model.load_parts(model_dir, config["saved_parts"])
        return model

    def load_parts(self, model_dir: str | Path, names: list[str]) -> None:
        """Load the named components' safetensors from a model directory (strict)."""
        from safetensors.torch import load_file

        parts = self.components()
        for name in names:
            path = Path(model_dir) / f"{name}.safetensors"
            if not path.exists():
                raise UserError(f"{path} missing: the model directory has no {name!r} weights")
            state = load_file(str(path))
            part = parts[name]
            if isinstance(part, nn.Parameter):
                part.data.copy_(state["queries"])
            else:
                part.load_state_dict(state, strict=True)

    def load_reconstruction(self, recon_dir: str | Path) -> list[str]:
        """Load the reconstruction-trained encoder and pixel decoder (explicitly, and say so)."""
        config = json.loads((Path(recon_dir) / "config.json").read_text())
        names = [n for n in ("encoder", "down_proj", "pixel_decoder") if n in config["saved_parts"]]
        if "pixel_decoder" not in names:
            raise UserError(f"{recon_dir} holds no trained pixel decoder: not a reconstruction checkpoint")
        self.load_parts(recon_dir, names)
        self.trained_parts |= set(names)
        return names


def saved_model_config(config: dict, model_dir) -> dict:
    """A model directory's model config, with the DiT's positional embedding it was trained
    with: stated (v3), or for a v2 directory the only one it can have been trained with."""
    model = dict(config["model"])
    if "dit_pos_embed" not in model:
        if config["version"] >= 3:
            raise ConfigError(
                f"{model_dir}/config.json does not state model.dit_pos_embed (none or sincos), the DiT's "
                "positional embedding its weights were trained with; no weight file records it"
            )
        model["dit_pos_embed"] = "sincos" if "converted_from" in config else "none"
    return model


def component_state(part: nn.Module | nn.Parameter) -> dict[str, torch.Tensor]:
    """A component's tensors as its safetensors file holds them (the queries: one tensor)."""
    return {"queries": part} if isinstance(part, nn.Parameter) else part.state_dict()


def check_text(text) -> None:
    if not isinstance(text, str) or not text.strip():
        raise InputError("prompt is empty")
    reserved = (*SPECIAL_TOKENS, IMAGE)
    if any(t in text for t in reserved):
        raise InputError(f"prompt contains a reserved token ({', '.join(reserved)})")


def to_rgb(image) -> Image.Image:
    """A PIL image or an HxW / HxWx3 uint8 array -> RGB PIL image; anything else is rejected."""
    if isinstance(image, np.ndarray):
        if image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8:
            image = Image.fromarray(image)
        elif image.ndim == 2 and image.dtype == np.uint8:
            image = Image.fromarray(image, mode="L")
        else:
            raise InputError(f"image array must be HxWx3 (or HxW) uint8, got shape {image.shape} dtype {image.dtype}")
    if not isinstance(image, Image.Image):
        raise InputError(f"expected a PIL image or a uint8 array, got {type(image).__name__}")
    if min(image.size) < MIN_IMAGE_SIDE:
        raise InputError(f"image of {image.size[0]}x{image.size[1]} is too small (at least {MIN_IMAGE_SIDE} px a side)")
    if image.mode not in ("RGB", "L", "RGBA", "LA", "P", "CMYK", "YCbCr", "I;16", "I", "F"):
        raise InputError(f"unsupported image mode {image.mode!r}")
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    if image.mode in ("I;16", "I", "F"):
        arr = np.asarray(image, dtype=np.float32)
        arr = (arr - arr.min()) / max(float(arr.max() - arr.min()), 1e-6) * 255
        return Image.fromarray(arr.astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL images."""
    arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]
