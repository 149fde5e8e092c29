"""`unilip eval BENCH|recon|understanding|report|check|summarize`: the paper's benchmarks, as the official scorers read them."""

from __future__ import annotations

from cli.options import MODEL


def add(sub) -> None:
    from jobs.evaluation.suites import BENCHMARKS

    evals = sub.add_parser(
        "eval", help="the paper's benchmarks: images as the official scorers read them, check, summarize"
    ).add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    for name, bench in BENCHMARKS.items():
        p = evals.add_parser(name, help=f"{bench.source}: {bench.images_per_prompt} image(s) per prompt")
        p.add_argument("--model", required=True, help=MODEL)
        p.add_argument(
            "--out",
            required=True,
            help="output directory or s3:// prefix (the scorer's layout goes under OUT/" + name + ")",
        )
        p.add_argument("--bench", help=bench.bench_help)
        p.add_argument("--n", type=int, help=f"images per prompt (default {bench.images_per_prompt}, the papers')")
        p.add_argument("--seed", type=int, default=42, help="image k of a prompt gets seed + k (default 42)")
        p.add_argument(
            "--batch", type=int, default=8, help="images per model call (results depend on it, not on --gpus)"
        )
        p.add_argument("--gpus", type=int, default=0, help="GPU actors, one GPU each (default 0: CPU actors)")
        p.add_argument("--actors", type=int, default=1, help="CPU actors when --gpus is 0 (default 1)")
        p.add_argument(
            "--limit", type=int, help="only the first N prompts (a smoke test; the layout check then only reports)"
        )
        p.add_argument(
            "--guidance", type=float, default=4.5, help="classifier-free guidance (default 4.5, the papers')"
        )
        p.add_argument("--steps", type=int, default=20, help="sampling steps (default 20)")
        p.add_argument(
            "--solver", choices=["dpm", "euler"], default="dpm", help="default dpm: the release's DPM-Solver++"
        )
        p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto")
        p.add_argument(
            "--allow-unpinned", action="store_true", help="accept bench files whose sha256 is not the pinned one"
        )
        p.add_argument(
            "--score", action="store_true", help="then run the official scorer (geneval, dpg: offline) and summarize"
        )
        p.add_argument("--scorer-repo", help="--score: the official scorer's checkout")
        p.add_argument(
            "--scorer-python", default="python", help="--score: the scorer environment's python (default python)"
        )
        p.add_argument("--detector-dir", help="--score geneval: the folder with the Mask2Former checkpoint")
        p.set_defaults(func=render)
    p = evals.add_parser("recon", help="rFID, PSNR, SSIM (and the release's SSIM) of reconstructions")
    p.add_argument("--model", required=True, help=MODEL)
    p.add_argument(
        "--data", required=True, help="an image folder, or a source (manifest.json + shards; local or s3://)"
    )
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=int, default=448, help="evaluation resolution (default 448)")
    p.add_argument(
        "--fid-weights", help="pt_inception-2015-12-05-6726825d.pth (or .safetensors): rFID; without it, PSNR/SSIM only"
    )
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--gpus", type=int, default=0)
    p.add_argument("--actors", type=int, default=1)
    p.add_argument("--limit", type=int, help="only the first N images")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto")
    p.set_defaults(func=recon)
    p = evals.add_parser(
        "understanding", help="the paper's understanding benchmarks (MME-P, MMBench, ...) by lmms-eval"
    )
    p.add_argument("--model", required=True, help=MODEL)
    p.add_argument("--out", required=True, help="output directory (understanding.json, the harness's files)")
    p.add_argument(
        "--tasks",
        default="paper",
        help="comma list of lmms-eval tasks or the paper's columns (MME-P, MMBench, MMMU, MM-Vet, SEED, AI2D, "
        "MMVP, TextVQA); default paper: all of them (MM-Vet only with OPENAI_API_KEY, its judge)",
    )
    p.add_argument("--gpus", type=int, default=0, help="Ray tasks of one GPU each (default 0: this machine's CPU)")
    p.add_argument("--limit", type=int, help="only the first N questions of each task (a smoke test)")
    p.add_argument("--hf-home", help="a Hugging Face cache holding the benchmarks' data (read offline)")
    p.add_argument("--include-path", help="a folder of task YAMLs in the harness's format (local data)")
    p.add_argument("--harness-python", help="the python of an environment with lmms-eval (default: this one)")
    p.set_defaults(func=understanding)
    p = evals.add_parser("report", help="reconstruction and understanding next to the paper's Tables 1 and 3")
    p.add_argument("outs", nargs="+", metavar="OUT", help="eval directories (recon-448.json, understanding.json)")
    p.add_argument("--baseline", help="an OUT every other is compared with (the original InternViT, scored alike)")
    p.add_argument("--out", help="also write OUT.md and OUT.csv")
    p.set_defaults(func=report)
    for action, text in (
        ("check", "validate OUT's layout as the official scorer reads it"),
        ("summarize", "the official scorer's outputs -> the benchmark's scores (and MLflow)"),
    ):
        p = evals.add_parser(action, help=text)
        p.add_argument("name", choices=list(BENCHMARKS), metavar="BENCH")
        p.add_argument("out", help="the eval's output directory")
        p.add_argument("--bench", help="the bench files (default: those OUT/BENCH.run.json names)")
        p.add_argument("--n", type=int, help="images per prompt expected (check)")
        p.set_defaults(func=check if action == "check" else summarize)


def render(args) -> int:
    from jobs.evaluation.images import Sampling, run_eval, score
    from jobs.evaluation.suites import benchmark

    bench = benchmark(args.bench_command)
    sampling = Sampling(args.guidance, args.steps, args.solver)
    run_eval(
        bench,
        args.model,
        args.out,
        args.bench,
        sampling,
        args.n,
        args.seed,
        args.batch,
        args.gpus,
        args.actors,
        args.limit,
        args.dtype,
        args.allow_unpinned,
    )
    if args.score:
        score(bench, args.out, args.bench, args.scorer_repo, args.scorer_python, vars(args))
    return 0


def recon(args) -> int:
    from jobs.evaluation.recon import run_recon

    run_recon(
        args.model,
        args.data,
        args.out,
        args.size,
        args.fid_weights,
        args.batch,
        args.gpus,
        args.actors,
        args.limit,
        args.dtype,
    )
    return 0


def understanding(args) -> int:
    from jobs.evaluation.understanding import run_understanding

    run_understanding(
        args.model,
        args.out,
        args.tasks,
        args.gpus,
        args.limit,
        args.include_path,
        args.hf_home,
        args.harness_python,
    )
    return 0


def report(args) -> int:
    from jobs.evaluation.report import report

    report(args.outs, args.baseline, args.out)
    return 0


def check(args) -> int:
    from jobs.evaluation.images import check
    from jobs.evaluation.suites import benchmark

    return 1 if check(benchmark(args.name), args.out, args.bench, args.n) else 0


def summarize(args) -> int:
    from jobs.evaluation.images import summarize
    from jobs.evaluation.suites import benchmark

    summarize(benchmark(args.name), args.out, args.bench)
    return 0
