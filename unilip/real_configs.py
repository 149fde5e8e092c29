"""The published architectures of the real presets' parts, as constructor keyword dicts.

    InternVLForConditionalGeneration(InternVLConfig(**INTERNVL3_1B))   # 938,193,024 parameters
    SanaTransformer2DModel(**SANA_600M_512PX)                          # 591,747,872
    AutoencoderDC(**DCAE_F32C32_SANA_1_1)                              # 312,250,275

They let a real preset be built without a download (`model.init: random`): on the meta
device for shapes, counts and memory, on a GPU for speed. Sources per value:
`shared/notes/REAL_CONFIGS.md` (the converters that produced the hub repos, their
published configs; the counts match the checkpoints' sizes). Three things differ from
the classes' defaults and matter:
- `tie_word_embeddings=False` at the top level: transformers 5 ties by the top-level flag
  (default True), which would drop the untied lm_head (802 M parameters instead of 938 M);
- InternViT's published `initializer_range` is 1e-10, a vision tower of zeros when
  initialised at random: random builds use 0.02 (`random_init`);
- DC-AE needs its block types spelled out (the defaults give 352 M parameters).
SANA's published `interpolation_scale: None` means no positional embedding in the pinned
diffusers (0.32.2 added one anyway): every build overrides it from `model.dit_pos_embed`
(`unilip.presets.dit_kwargs`).
"""

from __future__ import annotations

import copy

INTERNVL3_1B = {
    "vision_config": {
        "model_type": "internvl_vision",
        "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096,
        "hidden_act": "gelu", "attention_bias": True, "use_qk_norm": False,
        "norm_type": "layer_norm", "layer_norm_eps": 1e-06,
        "image_size": [448, 448], "patch_size": [14, 14], "num_channels": 3,
        "use_absolute_position_embeddings": True, "use_mask_token": False, "use_mean_pooling": True,
        "layer_scale_init_value": 0.1,
        "attention_dropout": 0.0, "projection_dropout": 0.0, "hidden_dropout_prob": 0.0,
        "initializer_range": 1e-10,
    },
    "text_config": {
        "model_type": "qwen2",
        "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
        "num_attention_heads": 14, "num_key_value_heads": 2, "hidden_act": "silu",
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "rope_scaling": {"factor": 2.0, "rope_type": "dynamic", "type": "dynamic"},
        "vocab_size": 151674, "tie_word_embeddings": False,
        "bos_token_id": 151643, "eos_token_id": 151645,
        "use_sliding_window": False, "sliding_window": None, "max_window_layers": 70,
        "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
    },
    "image_token_id": 151667, "image_seq_length": 256, "downsample_ratio": 0.5,
    "projector_hidden_act": "gelu", "vision_feature_layer": -1, "vision_feature_select_strategy": "default",
    "tie_word_embeddings": False,
}  # fmt: skip

INTERNVL3_2B = {
    **INTERNVL3_1B,
    "text_config": {**INTERNVL3_1B["text_config"], "hidden_size": 1536, "intermediate_size": 8960,
                    "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2},
}  # fmt: skip

SANA_600M_512PX = {
    "in_channels": 32, "out_channels": 32,
    "num_attention_heads": 36, "attention_head_dim": 32,
    "num_layers": 28,
    "num_cross_attention_heads": 16, "cross_attention_head_dim": 72, "cross_attention_dim": 1152,
    "caption_channels": 2304, "mlp_ratio": 2.5, "dropout": 0.0, "attention_bias": False,
    "sample_size": 16, "patch_size": 1,
    "norm_elementwise_affine": False, "norm_eps": 1e-06, "interpolation_scale": None,
    "guidance_embeds": False, "guidance_embeds_scale": 0.1, "qk_norm": None, "timestep_scale": 1.0,
}  # fmt: skip

SANA_1600M_512PX = {
    **SANA_600M_512PX,
    "num_attention_heads": 70, "attention_head_dim": 32, "num_layers": 20,
    "num_cross_attention_heads": 20, "cross_attention_head_dim": 112, "cross_attention_dim": 2240,
}  # fmt: skip

_BLOCKS = ["ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock", "EfficientViTBlock"]
DCAE_F32C32_SANA_1_1 = {
    "in_channels": 3, "latent_channels": 32, "attention_head_dim": 32,
    "encoder_block_types": _BLOCKS, "decoder_block_types": _BLOCKS,
    "encoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
    "decoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
    "encoder_layers_per_block": [2, 2, 2, 3, 3, 3],
    "decoder_layers_per_block": [3, 3, 3, 3, 3, 3],
    "encoder_qkv_multiscales": [[], [], [], [5], [5], [5]],
    "decoder_qkv_multiscales": [[], [], [], [5], [5], [5]],
    "downsample_block_type": "Conv", "upsample_block_type": "interpolate",
    "decoder_norm_types": "rms_norm", "decoder_act_fns": "silu",
    "scaling_factor": 0.41407,
    "encoder_out_shortcut": True, "decoder_in_shortcut": True, "decoder_conv_act_fn": "relu",
}  # fmt: skip

# The published parameter counts (each checkpoint's file size agrees).
PUBLISHED_PARAMETERS = {
    "InternVL3-1B": 938_193_024,
    "InternVL3-2B": 2_088_957_440,
    "SANA-600M-512px": 591_747_872,
    "SANA-1600M-512px": 1_604_462_752,
    "DC-AE-f32c32-SANA-1.1": 312_250_275,
}


def random_init(mllm_config: dict) -> dict:
    """The MLLM config for a random build: InternViT's 1e-10 initializer range replaced by
    0.02, so the vision tower is not all zeros (shapes and counts unchanged)."""
    out = copy.deepcopy(mllm_config)
    out["vision_config"]["initializer_range"] = 0.02
    return out
