"""The `unilip` command line: a thin layer over the rooms, one module per command group.

    unilip --help
    unilip local up|status|env|down [--home DIR]
    unilip data sample --out s3://unilip/sample --gen 200 --edit 100
    unilip recipe show gen-stage2 --set train.lr=2e-4
    unilip train recon-stage1 --preset tiny --workers 2
    unilip submit recon-stage1 --preset unilip-1b --workers 4 --gpu --address http://HEAD:8265 --follow
    unilip model summary --preset unilip-1b
    unilip convert official --src ./UniLIP-1B --out ./unilip-1b-release --register unilip-1b-release
    unilip export internvl models:/unilip-1b-recon-stage2-448/1 --out ./unilip-1b-internvl
    unilip generate --model DIR --prompt "a red fox in the snow"
    unilip serve --model models:/unilip-1b-gen-stage3/1
    unilip eval geneval --model ./unilip-1b-release --out ./eval/unilip-1b --gpus 8
    unilip bench model|train|serve|data ...      unilip plan gen-stage2 --gpus 16
    unilip demo

Each command group registers its parsers (`add(subparsers)`) and its handlers, which parse
nothing themselves and call a room's function. Every module here imports what a command
needs when it runs, so `unilip --help` stays fast. A `UserError` (the project's one
user-error type) prints one line and exits 2; any other exception is a bug and shows its
traceback (exit 1).
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys

# command -> the module that defines it (its `add(subparsers)` registers its commands)
COMMANDS = {
    "local": "cli.local",  # the embedded stack: S3 server, MLflow, Ray on 127.0.0.1
    "data": "cli.data",  # datasets: the sample, converters
    "recipe": "cli.recipe",  # training recipes
    "train": "cli.train",  # train a stage on Ray
    "submit": "cli.train",  # ... as a Ray job on a cluster
    "jobs": "cli.train",  # the cluster's jobs
    "model": "cli.model",  # model directories: init, summary
    "convert": "cli.model",  # the authors' release -> a model directory
    "export": "cli.model",  # a model -> other formats (InternVL3 for understanding)
    "generate": "cli.infer",  # one model in this process
    "edit": "cli.infer",
    "reconstruct": "cli.infer",
    "understand": "cli.infer",
    "serve": "cli.serve",  # Ray Serve, OpenAI-compatible HTTP
    "eval": "cli.evaluate",  # the paper's benchmarks
    "bench": "cli.bench",  # performance: bench model|train|serve|data
    "plan": "cli.bench",  # performance: what a run costs
    "demo": "cli.demo",  # everything end to end
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unilip", description="UniLIP training and serving system.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in dict.fromkeys(COMMANDS.values()):
        importlib.import_module(module).add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # SIGTERM (kill, a stopped job, a CI timeout) unwinds like Ctrl-C, so `with` blocks stop
    # the services and servers they started.
    signal.signal(signal.SIGTERM, lambda signum, _: sys.exit(128 + signum))
    return run(argv)


def run(argv: list[str] | None = None) -> int:
    """One command, its exit status: what `main` runs, without the process-wide signal
    handling (the tests run quick commands in their own process)."""
    from unilip.errors import UserError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
