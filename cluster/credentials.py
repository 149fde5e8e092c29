"""Short-lived S3 keys for the local stack, served the way ECS and EKS Pod Identity serve them.

    unilip local up --rotating-credentials      # the stack starts this with its S3 server
    python -m cluster.credentials --s3 http://127.0.0.1:PORT --port PORT --period 30 --admin FILE

The S3 server then enforces authentication, and every process (the driver, Ray workers,
Serve replicas, MLflow) gets its keys from this endpoint through
`AWS_CONTAINER_CREDENTIALS_FULL_URI`: the container credentials provider that boto3 and the
AWS C++ SDK inside pyarrow both read and refresh by themselves. It is the condition of a run
on an instance profile, IRSA or Pod Identity, compressed from hours to seconds.

Every `period` seconds a new access key is issued to the IAM user `unilip-runner`; each key
is announced with an expiry `2 * period` after its issue and deleted from the server at that
moment. A client that refreshes before the expiry it was told never meets a dead key; one
that froze its keys fails within two periods. `--admin FILE` receives the keys of the user
`unilip-admin` (mode 0600), for a test that changes what the runner may do (its policy
`unilip-runner`).
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

RUNNER, ADMIN = "unilip-runner", "unilip-admin"
PATH = "/credentials"
STATUS_PATH = "/status"
ALLOW_ALL = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
ALLOW_S3 = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}


def iam_client(s3_url: str, keys: tuple[str, str]):
    import boto3

    return boto3.Session().client(
        "iam", endpoint_url=s3_url, region_name="us-east-1", aws_access_key_id=keys[0], aws_secret_access_key=keys[1]
    )


def bootstrap(s3_url: str) -> tuple[tuple[str, str], dict]:
    """Create the admin and runner users on a server that does not yet enforce authentication,
    then switch enforcement on. Returns the admin's keys and the runner's first key."""
    from botocore.exceptions import EndpointConnectionError

    iam = iam_client(s3_url, ("bootstrap", "bootstrap"))  # any key: authentication is still off
    deadline = time.monotonic() + 60  # the S3 server starts beside this process
    while True:
        try:
            iam.create_user(UserName=ADMIN)
            break
        except EndpointConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.25)
    iam.put_user_policy(UserName=ADMIN, PolicyName=ADMIN, PolicyDocument=json.dumps(ALLOW_ALL))
    key = iam.create_access_key(UserName=ADMIN)["AccessKey"]
    iam.create_user(UserName=RUNNER)
    iam.put_user_policy(UserName=RUNNER, PolicyName=RUNNER, PolicyDocument=json.dumps(ALLOW_S3))
    runner = iam.create_access_key(UserName=RUNNER)["AccessKey"]
    # moto's switch: authenticate every request from now on
    switch = urllib.request.Request(
        f"{s3_url}/moto-api/reset-auth", data=b"0", method="POST", headers={"Content-Type": "text/plain"}
    )
    urllib.request.urlopen(switch).read()
    return (key["AccessKeyId"], key["SecretAccessKey"]), runner


class Rotation:
    """The runner's keys: a new one every `period` seconds, each deleted `2 * period` after
    its issue. A restarted S3 server (it keeps users and keys in memory) is set up again."""

    def __init__(self, s3_url: str, period: float, admin_file: Path):
        self.s3_url, self.period, self.admin_file = s3_url, period, admin_file
        self.keys: list[tuple[dict, datetime]] = []  # (key, expiry), oldest first
        self.lock = threading.Lock()
        self.rotations = 0
        self.setups = 0  # times the server was set up (once, then once per restart)
        self.setup()

    def setup(self) -> None:
        """The users, and a runner's key that works from the moment authentication is on."""
        admin, key = bootstrap(self.s3_url)
        self.admin_file.write_text(json.dumps({"AccessKeyId": admin[0], "SecretAccessKey": admin[1]}))
        os.chmod(self.admin_file, 0o600)
        self.iam = iam_client(self.s3_url, admin)
        self.issue(key, replace=True)
        self.setups += 1

    def issue(self, key: dict | None = None, replace: bool = False) -> None:
        key = key or self.iam.create_access_key(UserName=RUNNER)["AccessKey"]
        with self.lock:
            self.keys = [] if replace else self.keys
            self.keys.append((key, datetime.now(UTC) + timedelta(seconds=2 * self.period)))
            self.rotations += 1

    def rotate(self) -> None:
        from botocore.exceptions import ClientError

        # IAM allows two keys per user: the one before the newest has reached its expiry
        # (two periods after its issue) and goes first.
        with self.lock:
            dead, self.keys = self.keys[:-1], self.keys[-1:]
        try:
            for k, _ in dead:
                self.iam.delete_access_key(UserName=RUNNER, AccessKeyId=k["AccessKeyId"])
            self.issue()
        except ClientError as e:  # the server forgot its users: it was restarted
            print(f"[credentials] {e}; setting the S3 server up again", flush=True)
            self.setup()

    def current(self) -> dict:
        with self.lock:
            key, expiry = self.keys[-1]
        return {
            "AccessKeyId": key["AccessKeyId"],
            "SecretAccessKey": key["SecretAccessKey"],
            "Token": "",  # IAM user keys carry no session token; both SDKs then send none
            "Expiration": expiry.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }

    def run(self, stop: threading.Event) -> None:
        """A new key every period; every second, a check that the server still knows its
        users (a restarted in-memory server is set up again at once)."""
        from botocore.exceptions import ClientError

        due = time.monotonic() + self.period
        while not stop.wait(1.0):
            try:
                try:
                    self.iam.get_user(UserName=RUNNER)
                except ClientError as e:
                    print(f"[credentials] {e}; setting the S3 server up again", flush=True)
                    self.setup()
                    due = time.monotonic() + self.period
                if time.monotonic() >= due:
                    self.rotate()
                    due = time.monotonic() + self.period
            except Exception as e:  # noqa: BLE001 - the S3 server is down (an outage): again soon
                print(f"[credentials] rotation failed ({e}); retrying in 1 s", flush=True)


def serve(s3_url: str, port: int, period: float, admin_file: Path) -> None:
    rotation = Rotation(s3_url, period, admin_file)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            path = self.path.split("?")[0]
            if path == PATH:
                body = rotation.current()
            elif path == STATUS_PATH:  # for the stack and tests: keys issued, servers set up
                body = {"rotations": rotation.rotations, "setups": rotation.setups, "period_s": rotation.period}
            else:
                self.send_error(404)
                return
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):  # one line per request would be every S3 call's
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    stop = threading.Event()
    threading.Thread(target=rotation.run, args=(stop,), daemon=True).start()
    print(f"[credentials] serving http://127.0.0.1:{port}{PATH}, a new key every {period:.0f}s", flush=True)
    try:
        server.serve_forever()
    finally:
        stop.set()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--s3", required=True, help="the S3 server (moto_server), authentication still off")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--period", type=float, default=30.0, help="seconds between keys (each lives two periods)")
    p.add_argument("--admin", type=Path, required=True, help="file that receives the admin user's keys")
    args = p.parse_args()
    serve(args.s3, args.port, args.period, args.admin)


if __name__ == "__main__":
    main()
