"""`unilip serve`: the model behind OpenAI-compatible HTTP endpoints (Ray Serve), on this machine."""

from __future__ import annotations

from cli.options import MODEL


def add(sub) -> None:
    p = sub.add_parser(
        "serve", help="serve a model over HTTP (OpenAI-compatible) with Ray Serve, on 127.0.0.1; Ctrl-C stops"
    )
    p.add_argument("--model", required=True, help=MODEL)
    p.add_argument("--config", help="Ray Serve config file (default: the project's serve/serve.yaml)")
    p.add_argument("--host", help="HTTP host (default 127.0.0.1; the config's 0.0.0.0 is for clusters)")
    p.add_argument("--port", type=int, help="HTTP port (default from the config: 8000)")
    p.add_argument(
        "--api-key-env", help="require `Authorization: Bearer $VAR` with the key in this environment variable"
    )
    p.add_argument("--max-batch-size", type=int, help="generation/edit requests per model call")
    p.add_argument(
        "--dtype",
        choices=["auto", "bf16", "fp32"],
        help="model precision (default from the config: auto, bf16 on GPUs)",
    )
    p.set_defaults(func=serve)


def serve(args) -> int:
    from serve.app import DEFAULT_CONFIG, load_config, run_local

    overrides = {
        "model": args.model,
        "api_key_env": args.api_key_env,
        "max_batch_size": args.max_batch_size,
        "dtype": args.dtype,
    }
    # On this machine only, unless asked: the config's 0.0.0.0 is for clusters (`serve deploy`, RayService)
    run_local(load_config(args.config or DEFAULT_CONFIG, overrides, args.host or "127.0.0.1", args.port))
    return 0
