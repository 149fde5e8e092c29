"""`unilip demo`: the whole system end to end on the embedded stack (what `make demo` runs)."""

from __future__ import annotations


def add(sub) -> None:
    p = sub.add_parser("demo", help="the whole system end to end on the embedded default (what `make demo` runs)")
    p.add_argument("--steps", type=int, default=30, help="training steps per stage (default 30)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of every stage (default 1e-3)")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers (default 2)")
    p.add_argument(
        "--stages",
        help="comma-separated stages to train, in order, the last one generating "
        "(default recon-stage1,recon-stage2,gen-stage1,gen-stage2,gen-stage3)",
    )
    p.add_argument("--gen", type=int, default=64, help="generation samples (default 64)")
    p.add_argument("--edit", type=int, default=32, help="editing samples (default 32)")
    p.add_argument("--size", type=int, default=512, help="longest image side of the sample data (default 512)")
    p.add_argument("--results", default="demo-results", help="results directory (default demo-results)")
    p.add_argument(
        "--verbose", action="store_true", help="show the Ray workers' lines (default: the logs the summary names)"
    )
    p.set_defaults(func=demo)


def demo(args) -> int:
    from jobs.demo import run_demo

    stages = {"stages": tuple(args.stages.split(","))} if args.stages else {}
    run_demo(
        args.steps, args.gen, args.edit, args.size, args.results, args.lr, args.workers, verbose=args.verbose, **stages
    )
    return 0
