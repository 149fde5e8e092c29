"""`unilip local up|status|env|down`: the embedded stack (S3 server, MLflow, Ray on 127.0.0.1)."""

from __future__ import annotations

import shlex
import sys


def add(sub) -> None:
    p = sub.add_parser("local", help="the embedded local stack (Ray, S3 server, MLflow on 127.0.0.1)")
    p.add_argument("action", choices=["up", "status", "env", "down"])
    p.add_argument("--home", help="state directory (default: $UNILIP_HOME or ~/.unilip)")
    p.add_argument("--bucket", default="unilip", help="bucket created in the S3 server (default: unilip)")
    p.add_argument("--artifacts", choices=["bucket", "local"], default="bucket", help="where MLflow stores artifacts")
    p.add_argument(
        "--rotating-credentials",
        action="store_true",
        help="S3 with authentication enforced and keys that expire, served by a credentials endpoint",
    )
    p.add_argument("--rotation-s", type=float, default=30.0, help="seconds between keys (default: 30)")
    p.set_defaults(func=local)


def local(args) -> int:
    from cluster.local import LocalStack

    credentials = "rotating" if args.rotating_credentials else "static"
    stack = LocalStack(
        args.home, bucket=args.bucket, artifacts=args.artifacts, credentials=credentials, rotation_s=args.rotation_s
    )
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
