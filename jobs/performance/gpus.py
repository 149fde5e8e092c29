"""The GPUs the performance code knows, one table: dense bf16 peak, memory, list price.

`unilip plan` and its memory table use the ones with a price (rented by the hour: AWS
us-east-1 on-demand, p4d.24xlarge $32.77/h, p4de.24xlarge $40.97/h, p5.48xlarge $98.32/h,
8 GPUs each); `unilip bench model` finds the peak of the GPU it runs on by its name.
"""

from __future__ import annotations

from dataclasses import dataclass

GiB = 1024**3


@dataclass(frozen=True)
class GPU:
    name: str  # as --gpu names it
    device_name: str  # what torch.cuda.get_device_name() contains
    peak_tflops: float  # dense bf16
    memory: float  # bytes a process can use
    price: float | None = None  # on-demand USD per GPU-hour


GPUS = {
    g.name: g
    for g in (
        GPU("a100-40g", "A100", 312.0, 40 * GiB, 32.77 / 8),
        GPU("a100-80g", "A100", 312.0, 80 * GiB, 40.97 / 8),
        GPU("h100-80g", "H100", 989.0, 79.6 * GiB, 98.32 / 8),
        GPU("h100-pcie", "H100 PCIe", 756.0, 79.6 * GiB),
        GPU("h200", "H200", 989.0, 139 * GiB),
        GPU("l40s", "L40S", 362.0, 44.5 * GiB),
        GPU("a10g", "A10G", 125.0, 22 * GiB),
        GPU("l4", "L4", 121.0, 22 * GiB),
    )
}
RENTED = {name: g for name, g in GPUS.items() if g.price is not None}


def by_device_name(device_name: str) -> GPU | None:
    """The table's GPU a CUDA device name names (the longest match: "H100 PCIe" before "H100")."""
    matches = [g for g in GPUS.values() if g.device_name in device_name]
    return max(matches, key=lambda g: len(g.device_name), default=None)
