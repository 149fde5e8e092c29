"""Flow-matching sampling with classifier-free guidance.

The conditional and unconditional (null-prompt) conditions run through the DiT as one
batch; the guided velocity is v_u + g (v_c - v_u). Solvers: diffusers'
DPMSolverMultistepScheduler in flow mode ("dpm", DPM-Solver++ 2M, the release's default)
or FlowMatchEulerDiscreteScheduler ("euler"), both with the timestep shift (3.0 by
default). The latent state and the solver arithmetic are fp32; the DiT runs in its dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from unilip.errors import InputError
from unilip.generator import Condition

MAX_STEPS = 1000
MAX_GUIDANCE = 30.0


def check_sampling_args(guidance_scale: float, steps: int) -> None:
    if not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise InputError(f"num_inference_steps must be an integer from 1 to {MAX_STEPS}, got {steps!r}")
    if not math.isfinite(guidance_scale) or not 0.0 <= guidance_scale <= MAX_GUIDANCE:
        raise InputError(f"guidance_scale must be a finite number from 0 to {MAX_GUIDANCE}, got {guidance_scale!r}")


def make_scheduler(solver: str, shift: float):
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

    if solver == "euler":
        return FlowMatchEulerDiscreteScheduler(shift=shift)
    if solver == "dpm":
        return DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift)
    raise InputError(f"solver must be 'euler' or 'dpm', got {solver!r}")


def concat_conditions(a: Condition, b: Condition) -> Condition:
    """Stack two conditions along the batch, right-padding the shorter (masked out)."""
    length = max(a.states.shape[1], b.states.shape[1])

    def pad(c: Condition) -> Condition:
        extra = length - c.states.shape[1]
        return Condition(F.pad(c.states, (0, 0, 0, extra)), F.pad(c.mask, (0, extra)))

    a, b = pad(a), pad(b)
    return Condition(torch.cat([a.states, b.states]), torch.cat([a.mask, b.mask]))


@torch.no_grad()
def sample(
    velocity,
    cond: Condition,
    uncond: Condition | None,
    shape: tuple[int, ...],
    steps: int,
    guidance_scale: float,
    solver: str = "dpm",
    shift: float = 3.0,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Integrate from noise (t=1) to data (t=0). `velocity(x, t, cond)` predicts eps - x0.
    The starting noise is `noise` if given, else drawn from `generator`."""
    check_sampling_args(guidance_scale, steps)
    scheduler = make_scheduler(solver, shift)
    scheduler.set_timesteps(steps)
    device = cond.states.device
    if noise is None:
        noise = torch.randn(shape, generator=generator)  # on the CPU: a seed gives the same image on any device
    x = noise.to(device, torch.float32)
    guided = uncond is not None and guidance_scale != 1.0
    both = concat_conditions(cond, uncond) if guided else cond
    for t in scheduler.timesteps:
        x_in = torch.cat([x, x]) if guided else x
        t01 = (t / scheduler.config.num_train_timesteps).expand(x_in.shape[0]).to(device)
        v = velocity(x_in, t01, both).float()
        if guided:
            v_c, v_u = v.chunk(2)
            v = v_u + guidance_scale * (v_c - v_u)
        x = scheduler.step(v, t, x).prev_sample
    return x
