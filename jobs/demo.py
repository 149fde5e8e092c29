"""The main job on the embedded default: data -> five training stages -> registry -> HTTP.

    make demo                                     # installs on first use, then runs this
    unilip demo [--steps 30] [--gen 64] [--edit 32] [--size 512] [--results demo-results]

Steps: start the embedded stack (Ray, S3, MLflow on 127.0.0.1); write the sample
dataset into the local S3 bucket as webdataset shards; train recon-stage1 ->
recon-stage2 -> gen-stage1 -> gen-stage2 -> gen-stage3 with the tiny preset through Ray
Train + DeepSpeed, each stage registered in MLflow and started from the previous one's
export; deploy the Serve application with the model from the registry; send a
generation, an edit, a reconstruction and an understanding request over HTTP; write
everything under `--results`; stop every service.

The stages run the recipes' `tiny` variants with more steps and a larger learning rate
(`--steps`, `--lr`), so that the losses of a randomly initialised tiny model visibly fall
within minutes. The high-resolution stage (recon-stage2-448) is left out for time;
gen-stage1 starts from recon-stage2's export instead.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import time
from pathlib import Path

from PIL import Image

from unilip.errors import UserError

STAGES = ("recon-stage1", "recon-stage2", "gen-stage1", "gen-stage2", "gen-stage3")
PROMPT = "a tabby cat with green eyes looking into the camera"
EDIT = "make it black and white"
QUESTION = "What is in this image?"
N_STEPS = 7


def check_stages(stages: tuple[str, ...]) -> None:
    """Stages in training order, from the first (the only one that starts from the preset:
    every later stage needs an export, as the generator needs the trained encoder), ending
    with one that generates (it is what gets served)."""
    from jobs.training.recipes import chain, load_recipe

    order = chain()
    unknown = [s for s in stages if s not in order]
    if unknown or not stages:
        raise UserError(f"--stages takes recipes from: {', '.join(order)}; got {', '.join(unknown) or 'none'}")
    if list(stages) != sorted(stages, key=order.index) or len(set(stages)) != len(stages):
        raise UserError(f"--stages must be in training order ({' -> '.join(order)})")
    if stages[0] != order[0]:
        raise UserError(
            f"--stages must start with {order[0]}: {stages[0]} starts from {load_recipe(stages[0]).after}'s export"
        )
    if load_recipe(stages[-1]).kind != "generation":
        raise UserError("--stages must end with a generation stage: the served model generates and edits")


def _step(n: int, text: str) -> None:
    print(f"\n== [{n}/{N_STEPS}] {text}", flush=True)


# What each kind of stage learns: reconstruction error (the adversarial term of stage 2 is
# a game value that need not fall), and the flow-matching loss.
CURVES = {
    "reconstruction": (("train/mse", "train/lpips"), "MSE + LPIPS"),
    "generation": (("train/loss",), "flow-matching loss"),
}


def stage_curves(stages: tuple[str, ...]) -> dict[str, tuple[tuple[str, ...], str]]:
    """Per stage, the metrics summed into its learning curve and the curve's name (CURVES)."""
    from jobs.training.recipes import load_recipe

    return {stage: CURVES[load_recipe(stage).kind] for stage in stages}


def loss_histories(run_ids: dict[str, str], curves: dict) -> dict[str, list[tuple[int, float]]]:
    """Per stage, (step, value) of its learning curve from MLflow."""
    import mlflow

    client = mlflow.MlflowClient()
    histories = {}
    for stage, run_id in run_ids.items():
        by_step: dict[int, float] = {}
        for key in curves[stage][0]:
            for m in client.get_metric_history(run_id, key):
                by_step[m.step] = by_step.get(m.step, 0.0) + m.value
        histories[stage] = sorted(by_step.items())
    return histories


def loss_trend(values: list[float]) -> tuple[float, float]:
    """Mean loss over the first and the last quarter of the steps (single steps are noisy)."""
    k = max(1, len(values) // 4)
    return sum(values[:k]) / k, sum(values[-k:]) / k


def plot_losses(histories: dict[str, list[tuple[int, float]]], curves: dict, path: Path) -> None:
    """One panel per stage: the per-step loss and its running mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(histories), figsize=(4 * len(histories), 3.2), squeeze=False)
    for ax, (stage, points) in zip(axes[0], histories.items()):
        steps, values = zip(*points)
        ax.plot(steps, values, color="tab:blue", alpha=0.35, label="loss")
        window = max(1, len(values) // 6)
        spans = [values[max(0, i - window + 1) : i + 1] for i in range(len(values))]
        ax.plot(steps, [sum(v) / len(v) for v in spans], color="tab:blue", label=f"mean of {window}")
        ax.set_title(f"{stage}: {curves[stage][1]}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("training loss (per step)")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _png_b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _image(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")


def query_endpoints(url: str, photo: Image.Image, out_dir: Path, log=print) -> dict:
    """One request to each of the four model endpoints; images and answers saved in out_dir."""
    import requests

    from jobs.tracking import image_grid

    def post(path: str, **kw) -> dict:
        t0 = time.monotonic()
        r = requests.post(f"{url}{path}", timeout=600, **kw)
        if r.status_code != 200:
            raise RuntimeError(f"POST {path}: HTTP {r.status_code}: {r.text[:500]}")
        log(f"   POST {path}: 200 in {time.monotonic() - t0:.1f}s")
        return r.json()

    photo_b64 = _png_b64(photo)
    photo.save(out_dir / "input.png")
    generated = _image(
        post("/v1/images/generations", json={"prompt": PROMPT, "n": 1, "seed": 0})["data"][0]["b64_json"]
    )
    generated.save(out_dir / "generated.png")
    edit = post(
        "/v1/images/edits",
        files={"image": ("input.png", base64.b64decode(photo_b64), "image/png")},
        data={"prompt": EDIT, "n": "1", "seed": "0"},
    )
    edited = _image(edit["data"][0]["b64_json"])
    edited.save(out_dir / "edited.png")
    recon = _image(post("/v1/reconstructions", json={"image": photo_b64})["data"][0]["b64_json"])
    image_grid([[photo, recon]], cell=448).save(out_dir / "reconstruction.png")
    chat = post(
        "/v1/chat/completions",
        json={
            "model": "unilip",
            "max_tokens": 24,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": QUESTION},
                        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{photo_b64}"}},
                    ],
                }
            ],
        },
    )
    answer = chat["choices"][0]["message"]["content"]
    (out_dir / "understanding.json").write_text(json.dumps({"question": QUESTION, "answer": answer}, indent=2))
    psnr = reconstruction_psnr(photo, recon)
    picture = out_dir / "demo.png"
    grid = captioned_row(
        [
            (photo, "input"),
            (recon, f"reconstruction, {psnr:.1f} dB"),
            (generated, f"generated: {PROMPT}"),
            (edited, f"edited: {EDIT}"),
        ]
    )
    grid.save(picture)
    return {
        "generated": {"prompt": PROMPT, "path": str(out_dir / "generated.png"), "size": list(generated.size)},
        "edited": {"instruction": EDIT, "path": str(out_dir / "edited.png"), "size": list(edited.size)},
        "reconstruction": {
            "path": str(out_dir / "reconstruction.png"),
            "size": list(recon.size),
            "psnr_db": round(psnr, 2),
        },
        "understanding": {"question": QUESTION, "answer": answer, "path": str(out_dir / "understanding.json")},
        "picture": {"path": str(picture), "size": list(grid.size)},
    }


def reconstruction_psnr(photo: Image.Image, recon: Image.Image) -> float:
    """PSNR (dB) of a reconstruction against its input as the model saw it (squashed to its size)."""
    import numpy as np

    from jobs.evaluation.metrics import psnr_ssim

    seen = photo.convert("RGB").resize(recon.size, Image.Resampling.BICUBIC)
    return psnr_ssim(np.asarray(seen)[None], np.asarray(recon)[None])[0]


def captioned_row(cells: list[tuple[Image.Image, str]], cell: int = 448) -> Image.Image:
    """Images side by side, each with its caption underneath (wrapped to the cell)."""
    import textwrap

    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default(size=18)
    lines = [textwrap.wrap(text, width=cell // 10) or [""] for _, text in cells]
    band = 12 + 24 * max(len(block) for block in lines)
    out = Image.new("RGB", (cell * len(cells), cell + band), "white")
    draw = ImageDraw.Draw(out)
    for i, ((im, _), block) in enumerate(zip(cells, lines)):
        out.paste(im.convert("RGB").resize((cell, cell)), (i * cell, 0))
        draw.multiline_text((i * cell + 8, cell + 6), "\n".join(block), fill="black", font=font, spacing=6)
    return out


def run_demo(
    steps: int = 30,
    n_gen: int = 64,
    n_edit: int = 32,
    size: int = 512,
    results: str = "demo-results",
    lr: float = 1e-3,
    workers: int = 2,
    stages: tuple[str, ...] = STAGES,
    verbose: bool = False,
) -> dict:
    if steps < 2:
        raise UserError("--steps must be at least 2 (a loss trend needs two points)")
    check_stages(stages)  # before the heavy imports: a bad --stages fails at once
    from cluster.local import LocalStack
    from jobs.tracking import find_run
    from jobs.training.run import Launch
    from jobs.training.train import EXPERIMENT, run_stage
    from pipelines.sample_data import build_sample_dataset, load_photo
    from serve.app import ServeProcess

    out_dir = Path(results).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    timings: dict[str, float] = {}
    _step(1, "starting the embedded stack (S3 server, MLflow, Ray on 127.0.0.1)")
    with LocalStack(out_dir / "stack", artifacts="local") as stack:
        s3, env = stack.s3(), stack.env()
        data_uri = f"s3://{stack.bucket}/sample"
        print(f"   S3 {env['AWS_ENDPOINT_URL_S3']}, MLflow {env['MLFLOW_TRACKING_URI']}, Ray {env['RAY_ADDRESS']}")

        _step(2, f"writing {n_gen} generation + {n_edit} editing samples to {data_uri} (webdataset shards)")
        t0 = time.monotonic()
        written = build_sample_dataset(
            data_uri, s3, n_gen, n_edit, size=size, shard_size=max(8, (n_gen + n_edit) // 8), log=lambda m: None
        )
        build_sample_dataset(f"{data_uri}-eval", s3, 4, 0, seed=1, shard_size=4, size=size, log=lambda m: None)
        timings["data_s"] = time.monotonic() - t0
        print(
            f"   {', '.join(f'{m.samples} {task} samples in {len(m.shards)} shards' for task, m in written.items())}, "
            f"and 4 held-out samples for evaluation, in {timings['data_s']:.1f}s"
        )

        _step(
            3,
            f"training {' -> '.join(stages)} (tiny preset, {workers} Ray Train workers, DeepSpeed, {steps} steps each)",
        )
        overrides = [
            f"train.steps={steps}",
            f"train.lr={lr}",
            f"train.min_lr={lr / 10}",
            "train.warmup_steps=2",
            f"train.checkpoint_every={steps}",
            f"train.eval_every={steps}",
            "train.log_every=1",
        ]
        uri, models, run_ids = None, {}, {}
        t0 = time.monotonic()
        for i, name in enumerate(stages, 1):
            print(f"\n   -- stage {i}/{len(stages)}: {name}", flush=True)
            # the adversarial loss from half-way, as in the paper's stage 2 (200k of 400k steps)
            extra = [f"loss.gan_start_step={steps // 2}"] if name == "recon-stage2" else []
            uri = run_stage(
                name, Launch("tiny", workers, overrides=overrides + extra), uri, f"demo-{name}", quiet=not verbose
            )
            models[name] = uri
            run_ids[name] = find_run(EXPERIMENT, f"demo-{name}").info.run_id
        timings["train_s"] = time.monotonic() - t0

        _step(4, "learning curves from MLflow")
        curves = stage_curves(stages)
        histories = loss_histories(run_ids, curves)
        heldout = heldout_psnr(run_ids, stages)
        loss_png = out_dir / "loss_curves.png"
        plot_losses(histories, curves, loss_png)
        losses = {}
        for name, points in histories.items():
            first, last = loss_trend([v for _, v in points])
            label = curves[name][1]
            losses[name] = {
                "curve": label,
                "first_quarter_mean": first,
                "last_quarter_mean": last,
                "steps": len(points),
            }
            print(
                f"   {name:<16} {label:<18} {first:.4f} -> {last:.4f} "
                f"(mean of the first and last quarter: {'falling' if last < first else 'NOT falling'})"
            )

        _step(5, f"deploying the Serve application with {uri} from the MLflow registry")
        t0 = time.monotonic()
        with ServeProcess(uri, log=out_dir / "serve.log") as server:
            timings["deploy_s"] = time.monotonic() - t0
            print(f"   ready at {server.url}")
            _step(6, "one request to each endpoint: generation, edit, reconstruction, understanding")
            responses = query_endpoints(server.url, load_photo(1), out_dir)
            url = server.url
        if server.returncode != 0:
            raise RuntimeError(f"the server exited with {server.returncode}; see {out_dir / 'serve.log'}")
        ray_logs = out_dir / "logs" / "ray"
        shutil.copytree(stack.ray_logs(), ray_logs, dirs_exist_ok=True)  # kept: the stack's Ray folder goes with it

    _step(7, "summary")
    tracking = stack.home / "mlflow.db"
    summary = {
        "seconds": round(time.monotonic() - t_start, 1),
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "data_uri": data_uri,
        "stages": {name: {"mlflow_run_id": run_ids[name], "model": models[name], **losses[name]} for name in stages},
        "served_model": uri,
        "endpoints": {
            path: f"{url}{path}"
            for path in ("/v1/images/generations", "/v1/images/edits", "/v1/reconstructions", "/v1/chat/completions")
        },
        "responses": responses,
        "reconstruction_psnr_db": {"served_photo": responses["reconstruction"]["psnr_db"], **heldout},
        "loss_curves": str(loss_png),
        "serve_log": str(out_dir / "serve.log"),
        "logs": {"ray_workers": str(ray_logs), "stack": str(stack.home / "logs"), "serve": str(out_dir / "serve.log")},
        "mlflow_ui": f"mlflow ui --backend-store-uri sqlite:///{tracking} --artifacts-destination {stack.home / 'mlartifacts'}",
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"   done in {summary['seconds']}s; every service stopped.")
    print(f"   results:        {out_dir}")
    for key in ("generated", "edited", "reconstruction"):
        print(f"   {key + ':':<15} {responses[key]['path']}")
    print(f"   understanding:  {responses['understanding']['answer']!r} ({responses['understanding']['path']})")
    print(
        f"   PSNR:           {responses['reconstruction']['psnr_db']:.1f} dB, the served photo's reconstruction"
        + "".join(f", {v:.1f} dB on the held-out samples after {k}" for k, v in heldout.items())
    )
    print(f"   loss curves:    {loss_png}")
    for name in stages:
        print(f"   MLflow run:     {run_ids[name]}  {name} -> {models[name]}")
    print(f"   endpoints used: {', '.join(summary['endpoints'].values())} (the server is stopped now)")
    print(f"   browse MLflow:  {summary['mlflow_ui']}")
    print(f"   logs:           Ray workers {ray_logs}, the stack {stack.home / 'logs'}, Serve {out_dir / 'serve.log'}")
    print(f"   summary:        {out_dir / 'summary.json'}")
    print(f"   see the picture (input | reconstruction | generated | edited): {responses['picture']['path']}")
    return summary


def heldout_psnr(run_ids: dict[str, str], stages: tuple[str, ...]) -> dict[str, float]:
    """Per reconstruction stage, the PSNR of its last evaluation on the held-out samples (MLflow)."""
    import mlflow

    from jobs.training.recipes import load_recipe

    client = mlflow.MlflowClient()
    out = {}
    for stage in (s for s in stages if load_recipe(s).kind == "reconstruction"):  # the others score no PSNR
        history = client.get_metric_history(run_ids[stage], "eval/psnr")
        if history:
            out[stage] = round(max(history, key=lambda m: m.step).value, 2)
    return out
