"""The embedded local stack: Ray, an S3-compatible server and MLflow, all on 127.0.0.1.

    unilip local up                # start whatever is not running, print the addresses
    unilip local up --rotating-credentials   # S3 with authentication and keys that expire
    unilip local status            # what runs: PID, address, buckets
    eval "$(unilip local env)"     # point this shell (aws, mlflow, ray, unilip) at it
    unilip local down              # stop everything by PID

In Python (the demo and the tests), `with LocalStack(home) as stack:` starts it, puts its
environment into `os.environ` and stops it again on exit.

State lives in `$UNILIP_HOME` (default `~/.unilip`): `state.json` with each service's
PID and address, the logs, the MLflow sqlite file. Each service runs in a process group
of its own led by the recorded PID; `down` signals that group (SIGTERM, then SIGKILL
after a grace period) and sweeps any process still naming the stack's directories.
The S3 server is moto's `moto_server` (in memory: a restart empties it). MLflow stores
runs in sqlite and proxies artifacts to the bucket (or a local directory).

Credentials: by default one throwaway key in the environment, which moto accepts without
checking. With `credentials="rotating"` the S3 server enforces authentication and a
credentials endpoint (`cluster/credentials.py`) hands every process short-lived keys that
it rotates and revokes, as an instance profile or Pod Identity does, only faster.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from unilip.errors import UserError

SERVICES = ("s3", "credentials", "mlflow", "ray")  # start order: each may need the ones before it
DEFAULT_BUCKET = "unilip"
LOCAL_CREDENTIAL = "unilip-local"  # moto accepts any key; never a real one
HOST = "127.0.0.1"
# the ports a Ray node listens on (`ray start --NAME-port`), each a free one on HOST
NODE_PORTS = (
    "node-manager",
    "object-manager",
    "metrics-export",
    "dashboard-agent-listen",
    "dashboard-agent-grpc",
    "runtime-env-agent",
)
HEAD_PORTS = ("dashboard", *NODE_PORTS, "ray-client-server")  # the head's own services too
# SIGTERM grace before SIGKILL. Ray's processes wait on each other for a long time when
# signalled together (`ray stop` allows 16 s); the local Ray holds nothing worth keeping.
STOP_GRACE_S = {"s3": 5.0, "credentials": 2.0, "mlflow": 10.0, "ray": 2.0}
# Ray resolves "127.0.0.1" to the machine's address unless told it is a single-node
# cluster (the switch is named for the platforms where that is the default). Token auth
# is pinned off: the stack listens on loopback only, and Ray would otherwise switch it on
# whenever ~/.ray/auth_token exists (any earlier `ray.init()` of a new cluster writes one).
RAY_LOCAL_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
# Ray Train's preemption watcher follows node drains (spot reclaims); one local node has
# none, and every training attempt would start one more process for it (a multinode
# stack, whose nodes are drained and killed, keeps it). A training stage
# starts about ten actor processes at once (controller, workers, dataset coordinators,
# counters): Ray's default startup concurrency, the CPU count, warns about that on every
# stage of a 2-CPU machine; 4 at a time (no slower, measured) is what this stack expects.
RAY_HEAD_ENV = {
    **RAY_LOCAL_ENV,
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_worker_maximum_startup_concurrency": "4",
}


class StackError(UserError):
    pass


@dataclass
class Service:
    name: str
    pid: int
    port: int
    log: str
    ports: dict[str, int] = field(default_factory=dict)  # secondary ports (ray)

    @property
    def address(self) -> str:
        scheme = "" if self.name == "ray" else "http://"
        return f"{scheme}{HOST}:{self.port}"


def default_home() -> Path:
    return Path(os.environ.get("UNILIP_HOME") or Path.home() / ".unilip")


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A free loopback port for a service to bind, below the kernel's ephemeral range and
    above Ray's worker ports (10002-19999). A port the kernel picked (bind to port 0) could
    be picked again for another process's bind to 0 before the service binds it: one of
    Ray's gRPC servers once took MLflow's port while MLflow was starting. Never the same
    port twice in one process."""
    import random

    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(200):
        if low - 20000 >= 1000:
            port = random.randrange(20000, low)
        else:  # no room below the ephemeral range: let the kernel pick
            with socket.socket() as s:
                s.bind((HOST, 0))
                port = s.getsockname()[1]
        if port not in _HANDED_OUT and _port_free(port):
            _HANDED_OUT.add(port)
            return port
    raise StackError(f"no free port on {HOST}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _bin(name: str) -> str:
    # Prefer the tool next to this interpreter (the project venv), then PATH.
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise StackError(f"{name!r} not found next to {sys.executable} or on PATH; run `make install`")
    return found


@contextlib.contextmanager
def patched_environ(updates: dict[str, str]):
    """Temporarily set environment variables (restored on exit)."""
    saved = {k: os.environ.get(k) for k in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class LocalStack:
    def __init__(
        self,
        home: str | Path | None = None,
        bucket: str = DEFAULT_BUCKET,
        artifacts: Literal["bucket", "local"] = "bucket",
        num_cpus: int | None = None,
        multinode: bool = False,
        credentials: Literal["static", "rotating"] = "static",
        rotation_s: float = 30.0,
        log=print,
    ):
        self.home = Path(home) if home else default_home()
        self.bucket = bucket
        self.artifacts = artifacts
        self.num_cpus = num_cpus
        self.credentials, self.rotation_s = credentials, rotation_s
        # More Ray nodes on this machine (`add_node`): the head must not be a single-node cluster.
        # Nodes that can be drained (a notice before a node goes) are watched for.
        self.ray_env = {
            **RAY_HEAD_ENV,
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1" if multinode else "0",
            "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1" if multinode else "0",
        }
        self.log = log
        self._children: dict[int, subprocess.Popen] = {}  # reaped by us when we stop them
        self._saved_env: contextlib.ExitStack | None = None

    # ----------------------------------------------------------------- state

    @property
    def state_file(self) -> Path:
        return self.home / "state.json"

    def _load(self) -> dict:
        try:
            state = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return {"services": {}}
        except (OSError, json.JSONDecodeError) as e:
            raise StackError(f"cannot read {self.state_file}: {e}") from None
        state["services"] = {k: Service(**v) for k, v in state.get("services", {}).items()}
        return state

    def _save(self, state: dict) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        data = dict(state, services={k: asdict(v) for k, v in state["services"].items()})
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(self.state_file)

    def services(self) -> dict[str, Service]:
        return self._load()["services"]

    # ----------------------------------------------------------- environment

    def env(self) -> dict[str, str]:
        """The environment that points S3, MLflow and Ray clients at this stack."""
        state = self._load()
        svc = state["services"]
        env = {"UNILIP_BUCKET": state.get("bucket", self.bucket)}
        if "s3" in svc:
            env.update(
                AWS_ENDPOINT_URL_S3=svc["s3"].address,
                MLFLOW_S3_ENDPOINT_URL=svc["s3"].address,
                AWS_ACCESS_KEY_ID=LOCAL_CREDENTIAL,
                AWS_SECRET_ACCESS_KEY=LOCAL_CREDENTIAL,
                AWS_REGION="us-east-1",
                AWS_DEFAULT_REGION="us-east-1",
            )
        if "credentials" in svc:
            from cluster.credentials import PATH

            # Empty keys are no keys to both SDKs' environment providers: the chain moves on
            # to the container provider, which asks the endpoint.
            env.update(AWS_ACCESS_KEY_ID="", AWS_SECRET_ACCESS_KEY="", AWS_SESSION_TOKEN="")
            env["AWS_CONTAINER_CREDENTIALS_FULL_URI"] = f"{svc['credentials'].address}{PATH}"
            # moto cannot check a presigned URL while it enforces authentication (it looks
            # for an Authorization header): MLflow clients then stream artifacts through the
            # MLflow server instead of presigned S3 URLs, as they can on any store.
            env.update(MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD="false", MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD="false")
        if "mlflow" in svc:
            env["MLFLOW_TRACKING_URI"] = svc["mlflow"].address
        if "ray" in svc:
            env.update(RAY_LOCAL_ENV, RAY_ADDRESS=svc["ray"].address)
            # a driver hands these to Ray Train's controller and workers: the stack's own, not Ray's defaults
            for key in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"):
                env[key] = self.ray_env[key]
            env["RAY_API_SERVER_ADDRESS"] = f"http://{HOST}:{svc['ray'].ports['dashboard']}"
        return env

    def s3(self):
        """The project's S3 access point, pointed at this stack's server."""
        from unilip.s3 import s3_access

        with patched_environ(self.env()):
            s3 = s3_access()
            s3.client, s3.filesystem  # noqa: B018  (built now: each SDK reads the environment it is built in)
        return s3

    def activate(self) -> None:
        """Put this stack's environment into os.environ (undone by `deactivate`)."""
        self.deactivate()
        self._saved_env = contextlib.ExitStack()
        self._saved_env.enter_context(patched_environ(self.env()))

    def deactivate(self) -> None:
        if self._saved_env is not None:
            self._saved_env.close()
            self._saved_env = None

    def __enter__(self) -> LocalStack:
        try:
            self.up()
        except BaseException:  # a service that failed to start must not leave the others running
            self.down()
            raise
        self.activate()
        return self

    def __exit__(self, *exc) -> None:
        self.deactivate()
        self.down()

    # ------------------------------------------------------------------- up

    def up(self, services: tuple[str, ...] = SERVICES) -> dict[str, Service]:
        unknown = set(services) - set(SERVICES)
        if unknown:
            raise StackError(f"unknown service(s) {sorted(unknown)}; known: {', '.join(SERVICES)}")
        self.home.mkdir(parents=True, exist_ok=True)
        state = self._load()
        state["bucket"] = self.bucket
        # A restarted S3 server forgets users and keys; the running credentials endpoint sets it up again.
        setups = self._credentials_status()["setups"] if "s3" in services and self._serving_credentials(state) else None
        # Spawn everything first, then wait: the services start in parallel.
        starting = []
        for name in SERVICES:
            if name not in services or (name == "credentials" and self.credentials != "rotating"):
                continue
            old = state["services"].get(name)
            if old and pid_alive(old.pid):
                self.log(f"[local] {name} already running (pid {old.pid}, {old.address})")
                continue
            svc, ready, timeout = getattr(self, f"_start_{name}")(old, state)
            state["services"][name] = svc
            self._save(state)
            starting.append((svc, ready, timeout))
        t0 = time.monotonic()
        for svc, ready, timeout in starting:
            self._wait_ready(svc, ready, timeout)
            self.log(f"[local] {svc.name} up (pid {svc.pid}, {svc.address}) after {time.monotonic() - t0:.1f}s")
        if setups is not None and any(svc.name == "s3" for svc, _, _ in starting):
            self._wait_set_up_again(setups)
        if "s3" in services:
            self.s3().ensure_bucket(self.bucket)
        return state["services"]

    def _serving_credentials(self, state: dict) -> bool:
        svc = state["services"].get("credentials")
        return svc is not None and pid_alive(svc.pid)

    def _wait_set_up_again(self, setups: int, timeout: float = 30.0) -> None:
        """Until the credentials endpoint has set the restarted S3 server up and serves a key
        it accepts (it checks every second)."""
        deadline = time.monotonic() + timeout
        while self._credentials_status()["setups"] <= setups:
            if time.monotonic() > deadline:
                raise StackError(f"the credentials endpoint did not set the restarted S3 server up in {timeout:.0f}s")
            time.sleep(0.2)

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> tuple[int, str]:
        log = self.home / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.home,
                # RAY_ADDRESS of an outer cluster must not leak into a new head.
                env={**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **(env or {})},
                start_new_session=True,  # its own process group, led by proc.pid
            )
        self._children[proc.pid] = proc
        return proc.pid, str(log)

    def _wait_ready(self, svc: Service, check, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not pid_alive(svc.pid):
                raise StackError(f"{svc.name} exited during start-up; last log lines:\n{_tail(svc.log)}")
            if check():
                return
            time.sleep(0.25)
        self._stop(svc)
        raise StackError(f"{svc.name} not ready after {timeout:.0f}s; last log lines:\n{_tail(svc.log)}")

    def _start_s3(self, old: Service | None, state: dict):
        port = old.port if old and _port_free(old.port) else free_port()
        pid, log = self._spawn("s3", [_bin("moto_server"), "-H", HOST, "-p", str(port)])
        svc = Service("s3", pid, port, log)
        return svc, lambda: _http_ok(f"{svc.address}/moto-api/"), 60.0

    def _start_credentials(self, old: Service | None, state: dict):
        if "s3" not in state["services"]:
            raise StackError("rotating credentials need the s3 service; start it too")
        from cluster.credentials import PATH

        port = free_port()
        cmd = [sys.executable, "-m", "cluster.credentials", "--s3", state["services"]["s3"].address]
        cmd += ["--port", str(port), "--period", str(self.rotation_s), "--admin", str(self.admin_keys_file)]
        pid, log = self._spawn("credentials", cmd)
        svc = Service("credentials", pid, port, log)
        return svc, lambda: _http_ok(f"{svc.address}{PATH}"), 60.0

    @property
    def admin_keys_file(self) -> Path:
        """With rotating credentials: the S3 server's admin keys (see cluster/credentials.py)."""
        return self.home / "credentials-admin.json"

    def iam(self):
        """With rotating credentials: an IAM client of the S3 server's admin, to change what
        the stack's processes may do (the policy `unilip-runner` of the user `unilip-runner`)."""
        from cluster.credentials import iam_client

        if "credentials" not in self.services():
            raise StackError("the stack runs without rotating credentials: nothing to administer")
        keys = json.loads(self.admin_keys_file.read_text())
        return iam_client(self.services()["s3"].address, (keys["AccessKeyId"], keys["SecretAccessKey"]))

    def credential_rotations(self) -> int:
        """Keys the rotating credentials endpoint has issued so far."""
        return self._credentials_status()["rotations"]

    def _credentials_status(self) -> dict:
        from cluster.credentials import STATUS_PATH

        with urllib.request.urlopen(f"{self.services()['credentials'].address}{STATUS_PATH}", timeout=10) as r:
            return json.loads(r.read())

    def _start_mlflow(self, old: Service | None, state: dict):
        port = old.port if old and _port_free(old.port) else free_port()
        if self.artifacts == "bucket":
            if "s3" not in state["services"]:
                raise StackError("MLflow artifacts in the bucket need the s3 service; start it too")
            dest = f"s3://{self.bucket}/mlflow"
        else:
            dest = str(self.home / "mlartifacts")
        cmd = [
            _bin("mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{self.home / 'mlflow.db'}",
            "--artifacts-destination",
            dest,
            "--host",
            HOST,
            "--port",
            str(port),
            "--workers",
            "1",
        ]
        # Job execution (huey workers for MLflow's GenAI jobs) is of no use here: 8 fewer processes.
        pid, log = self._spawn("mlflow", cmd, {**self.env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        svc = Service("mlflow", pid, port, log)
        return svc, lambda: _http_ok(f"{svc.address}/health"), 120.0

    def _ray_process_env(self) -> dict[str, str]:
        # Job drivers and workers run `python` from PATH: the project's interpreter comes first.
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        return {**self.env(), **self.ray_env, "PATH": path}

    def _start_ray(self, old: Service | None, state: dict):
        # Ray's unix sockets live under its temp dir and must stay under ~107 chars: keep it short.
        temp = tempfile.mkdtemp(prefix="unilip-ray-", dir="/tmp")
        gcs = old.port if old and _port_free(old.port) else free_port()
        ports = {name: free_port() for name in HEAD_PORTS}
        cmd = [
            _bin("ray"),
            "start",
            "--head",
            "--block",
            "--disable-usage-stats",
            "--node-ip-address",
            HOST,
            "--port",
            str(gcs),
            "--dashboard-host",
            HOST,
            "--include-dashboard",
            "true",
            "--temp-dir",
            temp,
            *[arg for name, port in ports.items() for arg in (f"--{name}-port", str(port))],
        ]
        if self.num_cpus:
            cmd += ["--num-cpus", str(self.num_cpus)]
        pid, log = self._spawn("ray", cmd, self._ray_process_env())
        svc = Service("ray", pid, gcs, log, ports=ports)
        state["ray_temp_dir"] = temp
        dashboard = f"http://{HOST}:{ports['dashboard']}/api/version"
        # Ready once the GCS, the raylet and the dashboard (job submission) all answer.
        ready = lambda: _tcp_open(gcs) and _tcp_open(ports["node-manager"]) and _http_ok(dashboard)  # noqa: E731
        return svc, ready, 120.0

    # ----------------------------------------------------- more Ray nodes

    def add_node(self, name: str, num_cpus: int, resources: dict[str, float] | None = None) -> Service:
        """Another Ray node on this machine joined to the stack's head: its own raylet
        (`ray start --address`) in its own session, with its own ports. Stopped by `down`."""
        state = self._load()
        head = state["services"].get("ray")
        if head is None:
            raise StackError("add_node needs the stack's Ray head: start the ray service first")
        ports = {name: free_port() for name in NODE_PORTS}
        cmd = [
            _bin("ray"),
            "start",
            "--address",
            head.address,
            "--block",
            "--disable-usage-stats",
            "--node-ip-address",
            HOST,
            "--num-cpus",
            str(num_cpus),
            *[arg for port_name, port in ports.items() for arg in (f"--{port_name}-port", str(port))],
        ]
        if resources:
            cmd += ["--resources", json.dumps(resources)]
        pid, log = self._spawn(name, cmd, self._ray_process_env())
        svc = Service(name, pid, ports["node-manager"], log, ports=ports)
        state.setdefault("nodes", {})[name] = asdict(svc)
        self._save(state)
        self._wait_ready(svc, lambda: _tcp_open(ports["node-manager"]), 120.0)
        self.log(f"[local] Ray node {name} up (pid {pid}, {num_cpus} CPUs{f', {resources}' if resources else ''})")
        return svc

    def kill_node(self, name: str) -> None:
        """SIGKILL a node added with `add_node`: its raylet and every process it started (its
        session), as when a machine dies."""
        state = self._load()
        svc = Service(**state.get("nodes", {}).pop(name))
        _kill_group_or_pid(svc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10.0
        while _group_alive(svc.pid, zombies=True) and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.1)
        self._save(state)
        self.log(f"[local] Ray node {name} killed (pid {svc.pid})")

    # --------------------------------------------------------------- status

    def ray_logs(self) -> Path | None:
        """The running Ray's session log folder (every worker's output); it goes with the stack."""
        temp = self._load().get("ray_temp_dir")
        return Path(temp) / "session_latest" / "logs" if temp else None

    def status(self) -> list[dict]:
        """One row per recorded service: name, pid, alive, address, and the buckets for s3."""
        rows = []
        for name, svc in self.services().items():
            row = {"name": name, "pid": svc.pid, "alive": pid_alive(svc.pid), "address": svc.address, "log": svc.log}
            if name == "ray":
                row["dashboard"] = f"http://{HOST}:{svc.ports['dashboard']}"
            if name == "s3" and row["alive"]:
                try:
                    row["buckets"] = [b["Name"] for b in self.s3().client.list_buckets()["Buckets"]]
                except Exception as e:  # status must report, not raise
                    row["buckets"] = f"unavailable: {e}"
            rows.append(row)
        return rows

    # ----------------------------------------------------------------- down

    def down(self) -> list[str]:
        """Stop every recorded service (reverse start order); returns what was stopped."""
        state = self._load()
        stopped = []
        for name, node in state.pop("nodes", {}).items():  # added nodes before their head
            if self._stop(Service(**node)):
                stopped.append(name)
        for name in reversed(SERVICES):
            svc = state["services"].pop(name, None)
            if svc is None:
                continue
            if self._stop(svc):
                stopped.append(name)
            self.log(f"[local] {name} stopped (pid {svc.pid})")
        temp = state.pop("ray_temp_dir", None)
        for pid in self.leftover_processes(extra=[temp] if temp else []):
            _kill_group_or_pid(pid, signal.SIGKILL)
            self.log(f"[local] killed leftover process {pid}")
        if temp:
            shutil.rmtree(temp, ignore_errors=True)
        self._save(state)
        return stopped

    def _stop(self, svc: Service) -> bool:
        was_alive = pid_alive(svc.pid)
        for sig, wait in ((signal.SIGTERM, STOP_GRACE_S.get(svc.name, STOP_GRACE_S["ray"])), (signal.SIGKILL, 5.0)):
            _kill_group_or_pid(svc.pid, sig)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and _group_alive(svc.pid):
                self._reap()
                time.sleep(0.1)
            self._reap()
            if not _group_alive(svc.pid):
                break
        # Orphans killed with the group are reaped by init a moment later; wait for that so
        # `ps` shows nothing of the stack once `down` returns.
        deadline = time.monotonic() + 5.0
        while _group_alive(svc.pid, zombies=True) and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.1)
        return was_alive

    def _reap(self) -> None:
        for pid, proc in list(self._children.items()):
            if proc.poll() is not None:
                del self._children[pid]

    def leftover_processes(self, extra: list[str] = ()) -> list[int]:
        """PIDs of live processes whose command line names this stack's directories."""
        marks = [str(self.home), *extra]
        found = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == os.getpid():
                continue
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if any(m and m in cmd for m in marks) and pid_alive(int(proc.name)):
                found.append(int(proc.name))
        return found


def _kill_group_or_pid(pid: int, sig: int) -> None:
    for kill in (os.killpg, os.kill):
        try:
            kill(pid, sig)
            return
        except ProcessLookupError:
            continue
        except PermissionError:
            return


def _group_alive(pgid: int, zombies: bool = False) -> bool:
    """True while a process (a live one, or with `zombies` also an unreaped one) is in the group."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and (zombies or fields[0] != "Z"):  # state, ppid, pgrp
            return True
    return False


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is no obstacle
        try:
            s.bind((HOST, port))
            return True
        except OSError:
            return False


def _tcp_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((HOST, port)) == 0


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy


def _http_ok(url: str) -> bool:
    try:
        with _DIRECT.open(url, timeout=2) as resp:
            return resp.status == 200
    except (OSError, http.client.HTTPException):  # not up yet, or not HTTP on that port
        return False


def _tail(path: str, lines: int = 20) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
