"""`unilip data sample|convert`: the sample dataset, and converters of published datasets to shards."""

from __future__ import annotations


def add(sub) -> None:
    data = sub.add_parser("data", help="datasets: the sample builder, converters").add_subparsers(
        dest="data_command", required=True, metavar="ACTION"
    )
    p = data.add_parser("sample", help="write the sample dataset (real photos, real edits) as webdataset shards")
    p.add_argument("--out", required=True, help="s3://BUCKET/PREFIX or a directory")
    p.add_argument("--gen", type=int, default=200, help="generation samples (default 200)")
    p.add_argument("--edit", type=int, default=100, help="editing samples (default 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-size", type=int, default=100, help="samples per shard (default 100)")
    p.add_argument("--size", type=int, default=1024, help="longest image side in pixels (default 1024)")
    p.set_defaults(func=sample)
    p = data.add_parser(
        "convert", help="convert GPT-Image-Edit / ShareGPT-4o-Image / webdataset tars to shards (on Ray)"
    )
    p.add_argument("--from", dest="source_format", required=True, choices=["gpt-image-edit", "sharegpt-4o", "wds"])
    p.add_argument("--src", required=True, help="source directory or s3:// prefix")
    p.add_argument("--out", required=True, help="s3://BUCKET/PREFIX or a directory")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--task", choices=["generation", "editing"], default="generation", help="task of --from wds tars")
    p.set_defaults(func=convert)


def sample(args) -> int:
    from pipelines.sample_data import build_sample_dataset
    from unilip.s3 import s3_access

    build_sample_dataset(args.out, s3_access(), args.gen, args.edit, args.seed, args.shard_size, args.size)
    return 0


def convert(args) -> int:
    from cluster.connect import init_ray, quiet_ray_data
    from pipelines.convert import convert
    from unilip.s3 import s3_access

    init_ray()
    quiet_ray_data()
    convert(args.source_format, args.src, args.out, s3_access(), args.shard_size, args.task)
    return 0
