"""A converted release against the authors' own code, side by side (a script, not a test).

Our side, in this project's environment: a release checkpoint laid out by
`tests/release_fixture.py` (the tiny preset's shapes, every weight perturbed), converted by
`unilip convert official`; it writes the DiT's output on fixed inputs, a flow loss, and the
20-step DPM-Solver++ generation and edit (guidance 4.5), with the conditions the DiT saw,
the DiT as SANA publishes it (`transformer/` without `interpolation_scale`, `scheduler/`)
and the DC-AE holding the converted pixel decoder.

    .venv/bin/python -m tests.release_sidebyside ours --dir /tmp/side

Their side, in the authors' environment (transformers 4.52.1, diffusers 0.32.2, opencv;
nnnth/UniLIP at 299817d on PYTHONPATH, and not this project): the DiT built as their
`build_sana` builds it (in fp32), their `UniLIP_InternVLForCausalLM.sample_images` with
the scheduler their `generate_image` loads, their `DCAE_Decoder.vae_decode`, and the clamp
and cv2 resize of `generate_image`; it prints how far apart the two sides are.

    PYTHONPATH=UNILIP_CHECKOUT python tests/release_sidebyside.py theirs --dir /tmp/side
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

CAPTION, INSTRUCTION, SEED = "a red fox in the snow", "Make it black and white.", 0


def ours(out: Path) -> None:
    import numpy as np
    from PIL import Image
    from safetensors.torch import save_file

    from tests.release_fixture import perturbed_tiny, write_release
    from unilip.model import UniLIP
    from unilip.official import convert_official
    from unilip.prompts import NULL_EDIT, NULL_GENERATION, edit_prompt, generation_prompt
    from unilip.sampler import concat_conditions, make_scheduler

    convert_official(str(write_release(perturbed_tiny(), out / "release")), out / "converted", log=lambda m: None)
    model = UniLIP.from_pretrained(out / "converted").eval()
    g, photo = (
        model.generator,
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)),
    )
    tensors = {}
    with torch.no_grad():
        gen = [g.condition_states([p]) for p in (NULL_GENERATION, generation_prompt(CAPTION))]
        ref = model.encoder(model.preprocess([photo], 448))
        edit = [g.condition_states([p], ref) for p in (NULL_EDIT, edit_prompt(INSTRUCTION))]
        for task, (null, cond) in (("generation", gen), ("editing", edit)):
            both = concat_conditions(null, cond)  # the null prompt first, as their generate_image orders them
            tensors |= {f"{task}.states": both.states, f"{task}.mask": both.mask}
        x = torch.randn(2, 32, 16, 16, generator=torch.Generator().manual_seed(1))
        t = torch.tensor([0.25, 0.8])
        tensors |= {"dit.x": x, "dit.t": t, "dit.out": g.velocity(x, t, concat_conditions(*gen))}
        x0 = model.target_latent(model.preprocess([photo], 448))
        eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
        flow_t = torch.tensor([0.6])
        x_t = (1 - flow_t) * x0 + flow_t * eps
        loss = torch.nn.functional.mse_loss(g.velocity(x_t, flow_t, gen[1]).float(), eps - x0)
        tensors |= {"flow.x_t": x_t, "flow.t": flow_t, "flow.target": eps - x0, "flow.loss": loss.reshape(1)}
        tensors["generation.image"] = model.generate_tensors([CAPTION], seed=SEED)
        tensors["editing.image"] = model.edit_tensors([photo], [INSTRUCTION], seed=SEED)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "ours.safetensors"))
    g.dit.save_pretrained(out / "sana" / "transformer")
    config = json.loads((out / "sana" / "transformer" / "config.json").read_text())
    (out / "sana" / "transformer" / "config.json").write_text(json.dumps(config | {"interpolation_scale": None}))
    make_scheduler(model.cfg.solver, model.cfg.shift).save_pretrained(out / "sana" / "scheduler")
    model.pixel_decoder.dcae.save_pretrained(out / "dcae")
    (out / "meta.json").write_text(json.dumps({"unilip_factor": model.upstream.unilip_factor, "width": ref.shape[-1]}))
    print(f"wrote {out}: run the other side in the authors' environment")


def theirs(out: Path) -> None:
    import types

    import cv2
    from diffusers import DPMSolverMultistepScheduler, SanaTransformer2DModel
    from omegaconf import OmegaConf
    from safetensors.torch import load_file

    from unilip.model.language_model.unilip_internvl import UniLIP_InternVLForCausalLM
    from unilip.model.vae_modules import DCAE_Decoder

    mine, meta = load_file(str(out / "ours.safetensors")), json.loads((out / "meta.json").read_text())
    dit = SanaTransformer2DModel.from_pretrained(
        str(out / "sana"), subfolder="transformer", torch_dtype=torch.float32
    ).eval()
    decoder = DCAE_Decoder(OmegaConf.create({"model": {"dc_ae_path": str(out / "dcae")}}), meta["width"]).eval()
    shim = types.SimpleNamespace(get_model=lambda: types.SimpleNamespace(dit=dit))

    def report(name, got, want):
        rel = ((got.float() - want.float()).norm() / want.float().norm()).item()
        print(
            f"{name:<22} relative difference {rel:.2e}   max |diff| {(got.float() - want.float()).abs().max().item():.2e}"
        )

    with torch.no_grad():

        def run(x, t, key):
            return dit(
                x,
                timestep=t * 1000,
                encoder_hidden_states=mine[f"{key}.states"],
                encoder_attention_mask=mine[f"{key}.mask"],
                return_dict=False,
            )[0]

        report("DiT output", run(mine["dit.x"], mine["dit.t"], "generation"), mine["dit.out"])
        pred = dit(
            mine["flow.x_t"],
            timestep=mine["flow.t"] * 1000,
            encoder_hidden_states=mine["generation.states"][1:],
            encoder_attention_mask=mine["generation.mask"][1:],
            return_dict=False,
        )[0]
        report(
            "flow loss",
            torch.nn.functional.mse_loss(pred.float(), mine["flow.target"].float()).reshape(1),
            mine["flow.loss"],
        )
        for task in ("generation", "editing"):
            scheduler = DPMSolverMultistepScheduler.from_pretrained(str(out / "sana"), subfolder="scheduler")
            latents = UniLIP_InternVLForCausalLM.sample_images(
                shim,
                mine[f"{task}.states"],
                scheduler,
                encoder_attention_mask=mine[f"{task}.mask"].bool(),
                generator=torch.Generator().manual_seed(SEED),
                num_inference_steps=20,
                guidance_scale=4.5,
            )
            image = decoder.vae_decode(latents.float() / meta["unilip_factor"])
            image = (image[0].permute(1, 2, 0).clamp(-1, 1).float().numpy() + 1) / 2  # their generate_image's tail
            image = torch.from_numpy(cv2.resize(image, (448, 448), interpolation=cv2.INTER_LINEAR)).permute(2, 0, 1)
            want = (mine[f"{task}.image"][0] + 1) / 2
            report(f"{task} sample", image, want)
            eight = lambda im: (im * 255).round().clamp(0, 255)  # noqa: E731
            differ = (eight(image) != eight(want)).float()
            print(
                f"{'':<22} 8-bit values that differ: {differ.mean().item():.2%}, by up to {(eight(image) - eight(want)).abs().max().item():.0f}"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("side", choices=["ours", "theirs"])
    parser.add_argument("--dir", required=True, type=Path, help="where our side writes and their side reads")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    ours(args.dir) if args.side == "ours" else theirs(args.dir)
