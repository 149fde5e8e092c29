"""The `unilip` command line.

    unilip --help
    unilip local up|status|env|down [--home DIR]
    unilip data sample --out s3://unilip/sample --gen 200 --edit 100
    unilip recipe list
    unilip recipe show gen-stage2 --set train.lr=2e-4
    unilip demo

Each subcommand imports what it needs when it runs, so `unilip --help` stays fast and
the model library never pulls in Ray. Errors in user input print one line and exit 2.
"""

from __future__ import annotations

import argparse
import shlex
import sys


def _local(args) -> int:
    from cluster.local import LocalStack

    stack = LocalStack(args.home, bucket=args.bucket, artifacts=args.artifacts)
    if args.action == "up":
        stack.up()
        args.action = "status"
    if args.action == "status":
        rows = stack.status()
        if not rows:
            print(f"nothing running (state in {stack.home})")
        for row in rows:
            state = "running" if row["alive"] else "DEAD"
            extra = f"  buckets: {row['buckets']}" if "buckets" in row else ""
            extra += f"  dashboard: {row['dashboard']}" if "dashboard" in row else ""
            print(f"{row['name']:<7} {state:<8} pid {row['pid']:<8} {row['address']}{extra}")
        return 0 if all(r["alive"] for r in rows) else 1
    if args.action == "env":
        for key, value in stack.env().items():
            print(f"export {key}={shlex.quote(value)}")
        return 0
    stack.down()
    left = stack.leftover_processes()
    if left:
        print(f"error: processes still running: {left}", file=sys.stderr)
        return 1
    return 0


def _data_sample(args) -> int:
    from pipelines.sample_data import build_sample_dataset
    from unilip.s3 import s3_access

    build_sample_dataset(args.out, s3_access(), args.gen, args.edit, args.seed, args.shard_size, args.size)
    return 0


def _recipe(args) -> int:
    from jobs.recipes import load_recipe, recipe_names
    from unilip.config import to_dict

    if args.action == "list":
        for name in recipe_names():
            recipe = load_recipe(name)
            print(f"{name:<18} {recipe.description}")
        return 0
    if not args.name:
        raise ValueError("recipe show needs a recipe name")
    import yaml

    print(yaml.safe_dump(to_dict(load_recipe(args.name, args.set)), sort_keys=False), end="")
    return 0


def _demo(args) -> int:
    from jobs.demo import run_demo

    run_demo(args.gen, args.edit, args.size, args.results)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unilip", description="UniLIP training and serving system.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("local", help="the embedded local stack (Ray, S3 server, MLflow on 127.0.0.1)")
    p.add_argument("action", choices=["up", "status", "env", "down"])
    p.add_argument("--home", help="state directory (default: $UNILIP_HOME or ~/.unilip)")
    p.add_argument("--bucket", default="unilip", help="bucket created in the S3 server (default: unilip)")
    p.add_argument("--artifacts", choices=["bucket", "local"], default="bucket", help="where MLflow stores artifacts")
    p.set_defaults(func=_local)

    data = sub.add_parser("data", help="datasets: sample builder").add_subparsers(dest="data_command", required=True, metavar="ACTION")
    p = data.add_parser("sample", help="write the sample dataset (real photos, real edits) as webdataset shards")
    p.add_argument("--out", required=True, help="s3://BUCKET/PREFIX or a directory")
    p.add_argument("--gen", type=int, default=200, help="generation samples (default 200)")
    p.add_argument("--edit", type=int, default=100, help="editing samples (default 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-size", type=int, default=100, help="samples per shard (default 100)")
    p.add_argument("--size", type=int, default=1024, help="longest image side in pixels (default 1024)")
    p.set_defaults(func=_data_sample)

    p = sub.add_parser("recipe", help="training recipes: list them, show one with overrides")
    p.add_argument("action", choices=["list", "show"])
    p.add_argument("name", nargs="?", help="recipe name or YAML path (for show)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field, e.g. train.lr=2e-4")
    p.set_defaults(func=_recipe)

    p = sub.add_parser("demo", help="the main job on the embedded default (what `make demo` runs)")
    p.add_argument("--gen", type=int, default=64)
    p.add_argument("--edit", type=int, default=32)
    p.add_argument("--size", type=int, default=512, help="longest image side of the sample data")
    p.add_argument("--results", default="demo-results", help="results directory")
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    from cluster.local import StackError
    from unilip.config import ConfigError
    from unilip.s3 import S3Error

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, ValueError, S3Error, StackError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
