"""Options several command groups share."""

from __future__ import annotations

import argparse

# Every command's model reference (cluster.registry.fetch_model)
MODEL = "DIR, s3://..., models:/NAME/VERSION or models:/NAME@ALIAS, or a Hugging Face hub id (owner/name[@revision])"


def overrides(p: argparse.ArgumentParser, what: str = "a recipe field, e.g. train.zero_stage=3") -> None:
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=f"override {what}")


def inference(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if there is one)")
    p.add_argument(
        "--dtype", choices=["auto", "bf16", "fp32"], default="auto", help="default auto: bf16 on CUDA, fp32 on the CPU"
    )


def training(p: argparse.ArgumentParser) -> None:
    """The options of `unilip train`, shared with `unilip submit` (which passes them on)."""
    p.add_argument("recipe", help="recipe name (unilip recipe list) or `all` for the whole chain")
    p.add_argument(
        "--preset", default="tiny", help="tiny | unilip-1b | unilip-3b (tiny also picks the recipe's tiny variant)"
    )
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers (default 2)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (nccl, bf16)")
    overrides(p)
    p.add_argument("--from", dest="from_uri", help=f"start from this model: {MODEL}")
    p.add_argument("--run-name", help="run name (default RECIPE-PRESET); the same name resumes")
    p.add_argument("--storage", help="checkpoint storage (default s3://$UNILIP_BUCKET/runs)")
    p.add_argument(
        "--cpus-per-worker",
        type=float,
        help="CPUs reserved per worker (default: 1 with GPUs, else half the cluster's CPUs shared)",
    )


def training_argv(args) -> list[str]:
    """The parsed training options back as command-line arguments."""
    argv = ["--preset", args.preset, "--workers", str(args.workers)]
    argv += ["--gpu"] if args.gpu else []
    argv += [a for item in args.set for a in ("--set", item)]
    for dest, flag in (
        ("from_uri", "--from"),
        ("run_name", "--run-name"),
        ("storage", "--storage"),
        ("cpus_per_worker", "--cpus-per-worker"),
    ):
        if getattr(args, dest) is not None:
            argv += [flag, str(getattr(args, dest))]
    return argv
