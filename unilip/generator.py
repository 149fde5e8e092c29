"""The dual-condition generator: frozen MLLM + learnable queries + connector + SANA DiT.

The prompt (and, for editing, the reference image as `<img>` + 256 `<IMG_CONTEXT>` +
`</img>` filled with its UniLIP features) runs through the frozen LLM with N learnable
queries appended after `<img>`. The last-layer hidden states of all tokens form the
condition, with the reference-image positions overwritten by the raw UniLIP features.
A connector (LLM-style layers initialised from the LLM's last layers, bidirectional with
a padding mask) and a linear projector map it to the DiT's caption width; the SANA DiT
cross-attends to it with the mask. Trained with rectified flow:
x_t = (1 - t) x0 + t eps, t ~ logit-normal(0, 1), predict eps - x0.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from unilip.config import ConfigError
from unilip.errors import InputError
from unilip.prompts import IMAGE, MAX_PROMPT_TOKENS
from unilip.tokenizer import IM_END, IM_START, IMG_CONTEXT, IMG_END, IMG_START


@dataclass
class Condition:
    """What the DiT cross-attends to."""

    states: torch.Tensor  # (B, L, caption_channels)
    mask: torch.Tensor  # (B, L), 1 = real token


def bidirectional_mask(pad_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L) padding mask -> (B, 1, L, L) additive mask: every token sees every real token."""
    allowed = pad_mask[:, None, None, :].bool()
    return torch.zeros(allowed.shape, dtype=dtype, device=pad_mask.device).masked_fill(~allowed, torch.finfo(dtype).min)


class Connector(nn.Module):
    """LLM-style layers (a real Qwen2Model) initialised from the LLM's last layers, bidirectional."""

    def __init__(self, llm: nn.Module, num_layers: int):
        super().__init__()
        from transformers import Qwen2Model

        total = llm.config.num_hidden_layers
        if not 1 <= num_layers <= total:
            raise ConfigError(f"connector_layers must be between 1 and the LLM's {total} layers, got {num_layers}")
        config = copy.deepcopy(llm.config)
        config.num_hidden_layers = num_layers
        config.layer_types = config.layer_types[-num_layers:] if getattr(config, "layer_types", None) else None
        config.vocab_size = 1  # inputs are embeddings; keep the unused table tiny
        self.model = Qwen2Model(config)
        self.model.layers.load_state_dict(nn.ModuleList(llm.layers[-num_layers:]).state_dict())
        self.model.norm.load_state_dict(llm.norm.state_dict())
        self.make_bidirectional()

    def make_bidirectional(self) -> None:
        # Not part of the saved config: re-applied whenever the connector is built.
        for layer in self.model.layers:
            layer.self_attn.is_causal = False

    def forward(self, states: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        mask = bidirectional_mask(pad_mask, states.dtype)
        positions = (pad_mask.long().cumsum(-1) - 1).clamp(min=0)
        return self.model(
            inputs_embeds=states, attention_mask={"full_attention": mask}, position_ids=positions, use_cache=False
        ).last_hidden_state


class DualConditionGenerator(nn.Module):
    def __init__(
        self,
        mllm: nn.Module,
        tokenizer,
        dit: nn.Module,
        num_queries: int = 256,
        connector_layers: int = 6,
        condition: str = "both",
    ):
        super().__init__()
        if condition not in ("hidden", "queries", "both"):
            raise ConfigError(f"condition must be 'hidden', 'queries' or 'both', got {condition!r}")
        llm = mllm.model.language_model
        width = llm.config.hidden_size
        self.mllm = [mllm]  # not a submodule: frozen, owned by the UniLIP model
        self.tokenizer = tokenizer
        self.condition = condition
        self.queries = nn.Parameter(torch.randn(1, num_queries, width))  # std 1, as the release initialises them
        self.connector = Connector(llm, connector_layers)
        self.caption_projector = nn.Linear(width, dit.config.caption_channels)
        self.dit = dit
        self.ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (IMG_START, IMG_END, IMG_CONTEXT)}

    # ------------------------------------------------------------------ sequence

    def tokens(self, prompt: str, n_ref: int, truncate: bool = False) -> tuple[list[int], list[int]]:
        """Token ids of one chat turn (+ `<img>` + query slots), and the reference-image slots.

        `prompt` is formatted (`unilip.prompts`); its `<image>` becomes the reference image.
        Past MAX_PROMPT_TOKENS the text before the image is cut short (`truncate`, training)
        or the prompt is refused (inference); the chat framing and the image stay whole."""
        if prompt.count(IMAGE) != (1 if n_ref else 0):
            raise InputError(
                f"a prompt {'with' if n_ref else 'without'} a reference image needs "
                f"{'one' if n_ref else 'no'} {IMAGE} marker, got {prompt!r}"
            )
        text, _, after = prompt.partition(IMAGE)
        image = f"{IMG_START}{IMG_CONTEXT * n_ref}{IMG_END}" if n_ref else ""
        encode = lambda t: self.tokenizer.encode(t, add_special_tokens=False)  # noqa: E731
        chat = lambda t: encode(f"{IM_START}user\n{t}{image}{after}{IM_END}\n{IM_START}assistant\n")  # noqa: E731
        ids = chat(text)
        if len(ids) > MAX_PROMPT_TOKENS:
            if not truncate:
                raise InputError(
                    f"prompt is {len(ids)} tokens long with the chat template"
                    f"{' and the reference image' if n_ref else ''}; the limit is {MAX_PROMPT_TOKENS}"
                )
            text_ids = encode(text)
            while len(ids) > MAX_PROMPT_TOKENS and text_ids:
                text_ids = text_ids[: max(0, len(text_ids) - (len(ids) - MAX_PROMPT_TOKENS))]
                ids = chat(self.tokenizer.decode(text_ids))
        ctx = self.ids[IMG_CONTEXT]
        ref_slots = [i for i, t in enumerate(ids) if t == ctx]
        if self.condition != "hidden":
            ids = ids + [self.ids[IMG_START]] + [ctx] * self.queries.shape[1]
        return ids, ref_slots

    def condition_states(
        self, prompts: list[str], ref_features: torch.Tensor | None = None, truncate: bool = False
    ) -> Condition:
        """Formatted prompts (+ reference image features for edits) -> the DiT's condition."""
        mllm = self.mllm[0]
        llm = mllm.model.language_model
        embed = llm.get_input_embeddings()
        device = self.queries.device
        seqs = [self.tokens(p, 0 if ref_features is None else ref_features.shape[1], truncate) for p in prompts]
        length = max(len(ids) for ids, _ in seqs)
        nq = self.queries.shape[1] if self.condition != "hidden" else 0
        # Left padding keeps the query slots aligned at the end of every row.
        input_ids = torch.full((len(seqs), length), self.tokenizer.pad_token_id, dtype=torch.long, device=device)
        pad_mask = torch.zeros(len(seqs), length, dtype=torch.long, device=device)
        ref_index = []
        for row, (ids, ref_slots) in enumerate(seqs):
            offset = length - len(ids)
            input_ids[row, offset:] = torch.tensor(ids, device=device)
            pad_mask[row, offset:] = 1
            ref_index.append([offset + s for s in ref_slots])
        embeds = embed(input_ids)
        if ref_features is not None:
            rows = torch.arange(len(seqs), device=device)[:, None]
            ref_index = torch.tensor(ref_index, device=device)
            embeds = embeds.index_put((rows, ref_index), ref_features.to(embeds.dtype))
        if nq:
            queries = self.queries.to(embeds.dtype).expand(len(seqs), -1, -1)
            embeds = torch.cat([embeds[:, :-nq], queries], dim=1)
        positions = (pad_mask.cumsum(-1) - 1).clamp(min=0)
        hidden = llm(
            inputs_embeds=embeds, attention_mask=pad_mask, position_ids=positions, use_cache=False
        ).last_hidden_state
        if ref_features is not None:  # the raw UniLIP features replace the LLM's outputs there
            hidden = hidden.index_put((rows, ref_index), ref_features.to(hidden.dtype))
        if self.condition == "queries":
            hidden, pad_mask = hidden[:, -nq:], pad_mask[:, -nq:]
        states = self.caption_projector(self.connector(hidden, pad_mask))
        return Condition(states, pad_mask)

    # ---------------------------------------------------------------- diffusion

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        """The DiT's prediction of eps - x0 at flow time t in [0, 1], in the DiT's dtype."""
        return self.dit(
            x_t.to(self.dit.dtype),
            encoder_hidden_states=cond.states,
            timestep=t * 1000,
            encoder_attention_mask=cond.mask,
        ).sample

    def flow_loss(self, x0: torch.Tensor, cond: Condition, generator: torch.Generator | None = None) -> torch.Tensor:
        """Rectified-flow loss for target latents x0; the interpolation and the MSE in fp32.
        t and the noise come from `generator` on its own device (the CPU's, checkpointed)."""
        x0 = x0.float()
        b = x0.shape[0]
        where = generator.device if generator is not None else x0.device
        t = torch.sigmoid(torch.randn(b, device=where, generator=generator)).to(x0.device)  # logit-normal(0, 1)
        eps = torch.randn(x0.shape, device=where, generator=generator).to(x0.device)
        tt = t.view(b, 1, 1, 1)
        x_t = (1 - tt) * x0 + tt * eps
        return F.mse_loss(self.velocity(x_t, t, cond).float(), eps - x0)
