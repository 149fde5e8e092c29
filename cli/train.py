"""`unilip train`, `unilip submit`, `unilip jobs`: training on the cluster this shell reaches,
or as a Ray job on a remote one."""

from __future__ import annotations

from cli.options import training, training_argv


def add(sub) -> None:
    p = sub.add_parser("train", help="train a stage (or `all` of them) on the Ray cluster: Ray Train + DeepSpeed")
    training(p)
    p.add_argument("--export-dir", help="also copy the final model directory here")
    p.set_defaults(func=train)

    p = sub.add_parser("submit", help="submit `unilip train RECIPE ...` to a Ray cluster as a Ray job")
    training(p)
    p.add_argument("--address", help="the cluster's dashboard, http://HEAD:8265 (default $RAY_API_SERVER_ADDRESS)")
    p.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE", help="extra environment variable for the job"
    )
    p.add_argument("--job-id", help="submission id (default: Ray picks one)")
    p.add_argument(
        "--follow", action="store_true", help="stream the job's log until it ends; exit 1 unless it SUCCEEDED"
    )
    p.set_defaults(func=submit)

    p = sub.add_parser("jobs", help="list Ray jobs, or show the status or log of one, or stop it")
    p.add_argument("action", choices=["list", "status", "logs", "stop"])
    p.add_argument("job_id", nargs="?", help="job id (status, logs, stop)")
    p.add_argument("--address", help="the cluster's dashboard, http://HEAD:8265 (default $RAY_API_SERVER_ADDRESS)")
    p.add_argument("--follow", action="store_true", help="logs: stream until the job ends")
    p.set_defaults(func=jobs)


def train(args) -> int:
    from jobs.training.run import Launch
    from jobs.training.train import run_all, run_stage
    from unilip.errors import UserError

    launch = Launch(args.preset, args.workers, args.gpu, args.set, args.storage, args.cpus_per_worker)
    if args.recipe == "all":
        if args.from_uri or args.run_name:
            raise UserError(
                "--from and --run-name apply to one stage, not to `train all` (each stage of `all` has its own "
                "run name); a RayJob runs one stage: apply cluster/kuberay/rayjob.yaml once per stage"
            )
        uri = run_all(launch)
    else:
        uri = run_stage(args.recipe, launch, args.from_uri, args.run_name)
    if args.export_dir:
        import shutil

        from cluster.registry import fetch_model

        shutil.copytree(fetch_model(uri), args.export_dir, dirs_exist_ok=True)
        print(f"model directory: {args.export_dir}")
    print(uri)
    return 0


def submit(args) -> int:
    from cluster.submit import follow, submit
    from jobs.training.recipes import load_recipe

    if args.recipe != "all":
        load_recipe(args.recipe)  # an unknown recipe fails here, not minutes later on the cluster
    job_id = submit(args.recipe, training_argv(args), args.address, args.env, args.job_id)
    print(
        f"submitted job {job_id}: unilip jobs status {job_id} --address {args.address or '$RAY_API_SERVER_ADDRESS'}",
        flush=True,
    )
    if not args.follow:
        return 0
    status = follow(args.address, job_id)
    print(f"job {job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


def jobs(args) -> int:
    from cluster import submit as cluster_jobs
    from unilip.errors import UserError

    if args.action == "list":
        print(f"{'JOB ID':<30} {'STATUS':<10} {'STARTED':<20} {'RECIPE':<18} ENTRYPOINT")
        for r in cluster_jobs.list_jobs(args.address):
            print(f"{r['id']:<30} {r['status']:<10} {r['start']:<20} {r['recipe']:<18} {r['entrypoint']}")
        return 0
    if not args.job_id:
        raise UserError(f"jobs {args.action} needs a JOB_ID (see `unilip jobs list`)")
    if args.action == "status":
        info = cluster_jobs.job_status(args.address, args.job_id)
        print(f"{info['id']}: {info['status']}" + (f" ({info['message']})" if info["message"] else ""))
        return 0
    if args.action == "logs":
        if args.follow:
            return 0 if cluster_jobs.follow(args.address, args.job_id) == "SUCCEEDED" else 1
        print(cluster_jobs.job_logs(args.address, args.job_id), end="")
        return 0
    stopped = cluster_jobs.stop_job(args.address, args.job_id)
    print(f"{args.job_id}: {'stop requested' if stopped else 'already finished'}")
    return 0
