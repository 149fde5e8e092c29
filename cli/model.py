"""`unilip model init|summary`, `unilip convert official` and `unilip export internvl`: model directories."""

from __future__ import annotations

from cli.options import MODEL, overrides


def add(sub) -> None:
    p = sub.add_parser(
        "model", help="models: create a model directory from a preset (init), or count a preset's parameters (summary)"
    )
    p.add_argument("action", choices=["init", "summary"])
    p.add_argument("--preset", default="tiny", help="tiny | unilip-1b | unilip-3b")
    p.add_argument("--out", help="model directory to write (init)")
    overrides(p, "a ModelConfig field, e.g. init=random, dit_pos_embed=sincos")
    p.set_defaults(func=model)

    convert = sub.add_parser(
        "convert", help="convert other checkpoints to this project's model directory"
    ).add_subparsers(dest="convert_command", required=True, metavar="FORMAT")
    p = convert.add_parser(
        "official", help="the authors' released UniLIP-1B/3B (kanashi6/UniLIP-*) -> a model directory"
    )
    p.add_argument(
        "--src",
        required=True,
        help="the release: a directory (config.json + safetensors), an s3:// prefix, or a hub id (kanashi6/UniLIP-1B)",
    )
    p.add_argument("--out", required=True, help="model directory to write")
    p.add_argument("--preset", help="tiny | unilip-1b | unilip-3b (default: from the release's mllm_hf_path)")
    p.add_argument(
        "--register", metavar="NAME", help="also register the result in MLflow as NAME ($MLFLOW_TRACKING_URI)"
    )
    for part in ("mllm", "dit", "dcae"):
        p.add_argument(
            f"--{part}", help=f"where the frozen {part} comes from (default: the preset's hub id; a directory or s3://)"
        )
    p.add_argument(
        "--skip-llm-check", action="store_true", help="do not check the release's frozen LLM against --mllm's"
    )
    p.set_defaults(func=convert_official)

    export = sub.add_parser("export", help="write a model's parts in another project's format").add_subparsers(
        dest="export_command", required=True, metavar="FORMAT"
    )
    p = export.add_parser(
        "internvl",
        help="the understanding half (trained encoder, frozen LLM) as a transformers InternVL3 checkpoint",
    )
    p.add_argument("model", help=f"the model: {MODEL}")
    p.add_argument("--out", required=True, help="directory to write (AutoModelForImageTextToText loads it)")
    p.set_defaults(func=export_internvl)


def model(args) -> int:
    from unilip.config import ModelConfig, apply_overrides
    from unilip.errors import UserError

    cfg = apply_overrides(ModelConfig(preset=args.preset), args.set)
    if args.action == "summary":
        from unilip.summary import format_summary, parameter_summary

        print(format_summary(args.preset, parameter_summary(args.preset, cfg.dit_pos_embed), cfg.dit_pos_embed))
        return 0
    from unilip.model import UniLIP

    if not args.out:
        raise UserError("model init needs --out DIR (the model directory to write)")
    out = UniLIP.from_preset(args.preset, cfg).save_pretrained(args.out)
    print(f"wrote an untrained {args.preset} model to {out}")
    return 0


def convert_official(args) -> int:
    from cluster.registry import fetch_dir
    from unilip.official import convert_official

    upstream = {"mllm": args.mllm, "dit": args.dit, "dcae": args.dcae}
    src = str(fetch_dir(args.src))  # a directory, an s3:// prefix or a hub id
    report = convert_official(src, args.out, args.preset, upstream, check_llm=not args.skip_llm_check)
    print("\n".join(report.lines()))
    if args.register:
        from jobs.tracking import register_converted

        print(f"registered {register_converted(args.out, args.register, args.src)}")
    return 0


def export_internvl(args) -> int:
    from cluster.registry import fetch_model
    from unilip.internvl import export_internvl
    from unilip.model import UniLIP

    out = export_internvl(UniLIP.from_pretrained(fetch_model(args.model)), args.out)
    print(f"wrote {args.model}'s InternVL3 (trained encoder, frozen LLM) and its processor to {out}")
    return 0
