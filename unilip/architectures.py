"""The architectures the presets build, from `architectures.yaml` (the one description).

    InternVLForConditionalGeneration(InternVLConfig(**INTERNVL3_1B))   # 938,193,024 parameters
    SanaTransformer2DModel(**SANA_600M_512PX)                          # 591,747,872
    AutoencoderDC(**DCAE_F32C32_SANA_1_1)                              # 312,250,275

The real ones let a real preset be built without a download (`model.init: random`): on
the meta device for shapes, counts and memory, on a GPU for speed; `jobs.performance.plan`
counts their FLOPs. The tiny ones are the tiny preset's.
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

_ALL = yaml.safe_load(Path(__file__).with_name("architectures.yaml").read_text())

INTERNVL3_1B = _ALL["internvl3-1b"]
INTERNVL3_2B = _ALL["internvl3-2b"]
SANA_600M_512PX = _ALL["sana-600m-512px"]
SANA_1600M_512PX = _ALL["sana-1600m-512px"]
DCAE_F32C32_SANA_1_1 = _ALL["dc-ae-f32c32-sana-1.1"]
TINY_INTERNVL, TINY_SANA, TINY_DCAE = _ALL["tiny-internvl"], _ALL["tiny-sana"], _ALL["tiny-dc-ae"]

# The real presets' MLLM and DiT (`unilip.presets` builds them, `jobs.performance.plan` counts their FLOPs)
REAL_PRESETS = {"unilip-1b": (INTERNVL3_1B, SANA_600M_512PX), "unilip-3b": (INTERNVL3_2B, SANA_1600M_512PX)}

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
