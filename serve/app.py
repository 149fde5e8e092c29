"""The Ray Serve application: UniLIP behind OpenAI-compatible endpoints.

    unilip serve --model models:/unilip-tiny-gen-stage3/1              # http://127.0.0.1:8000
    unilip serve --model ./unilip-tiny --config serve/serve.yaml --port 8100
    serve deploy serve/serve.yaml                                      # a running Ray cluster
    # KubeRay: the same file's applications go into a RayService's serveConfigV2

`serve/serve.yaml` is a Ray Serve config file in the documented format: `import_path:
serve.app:build` with the application's `args`, and per-deployment autoscaling, request
limits and resources. `unilip serve` runs that file on a local Ray (127.0.0.1), with
`--model` and the command-line options overriding it, and stops cleanly on Ctrl-C.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

from serve.api import Api
from serve.model_server import UniLIPModel
from unilip.config import ConfigError

DEFAULT_CONFIG = Path(__file__).with_name("serve.yaml")


def model_name(uri: str) -> str:
    """What /v1/models lists: the registry name, or the directory's name."""
    if uri.startswith("models:/"):
        return uri[len("models:/") :].split("/")[0].split("@")[0]
    return Path(uri.rstrip("/")).name or uri


def build(args: dict):
    """The application builder named by the config's `import_path` (`serve deploy` applies
    the config's per-deployment options itself)."""
    return application(args)


def application(args: dict, options: dict[str, dict] | None = None):
    """The bound application: the model deployment and the HTTP ingress in front of it."""
    model = args.get("model")
    if not model:
        raise ConfigError(
            "the Serve application needs args.model: models:/NAME/VERSION, models:/NAME@ALIAS, DIR or s3://..."
        )
    options = options or {}
    handle = UniLIPModel.options(**options.get("UniLIPModel", {})).bind(
        model,
        int(args.get("max_batch_size", 4)),
        float(args.get("batch_wait_timeout_s", 0.05)),
        str(args.get("dtype", "auto")),
    )
    return Api.options(**options.get("Api", {})).bind(
        handle,
        args.get("model_name") or model_name(model),
        int(args.get("max_body_bytes", 20 * 2**20)),
        args.get("api_key_env"),
        args.get("api_key_file"),
    )


def load_config(
    path: str | Path = DEFAULT_CONFIG, overrides: dict | None = None, host: str | None = None, port: int | None = None
) -> dict:
    """The Serve config file, checked against Ray's schema, with args and HTTP overrides."""
    from ray.serve.schema import ServeDeploySchema

    from unilip.config import ConfigError, read_yaml

    config = read_yaml(path)
    apps = config.get("applications") or []
    if len(apps) != 1:
        raise ConfigError(f"{path}: expected one application, found {len(apps)}")
    apps[0].setdefault("args", {}).update({k: v for k, v in (overrides or {}).items() if v is not None})
    http = config.setdefault("http_options", {})
    if host:
        http["host"] = host
    if port:
        http["port"] = port
    try:
        ServeDeploySchema.model_validate(config)
    except Exception as e:
        raise ConfigError(f"{path} is not a valid Ray Serve config: {e}") from None
    unknown = unknown_keys(config, ServeDeploySchema)
    if unknown:
        raise ConfigError(
            f"{path}: unknown Ray Serve config key(s) {', '.join(unknown)} (Ray would ignore them silently)"
        )
    return config


def unknown_keys(data: dict, schema, where: str = "") -> list[str]:
    """Keys of `data` that the pydantic `schema` and the schemas nested in it do not define.
    Ray's Serve schemas ignore unknown keys, so a misspelt `max_ongoing_request` would pass."""
    fields = {f.alias or name: f for name, f in schema.model_fields.items()} | dict(schema.model_fields)
    out = []
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            out.append(path)
            continue
        for sub in _schemas(fields[key].annotation):
            items = enumerate(value) if isinstance(value, list) else [(None, value)]
            out += [
                k
                for i, item in items
                if isinstance(item, dict)
                for k in unknown_keys(item, sub, path if i is None else f"{path}.{i}")
            ]
    return out


def _schemas(annotation) -> list:
    """The pydantic models in a field's type (through Optional, Union and List)."""
    import typing

    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _schemas(arg)]


def deployment_options(app_config: dict) -> dict[str, dict]:
    """Per-deployment options of the config (autoscaling, limits, resources), by name."""
    return {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in app_config.get("deployments", [])}


def wait_ready(url: str, timeout: float = 600, alive=lambda: True, why=lambda: "") -> None:
    """Poll /readyz until 200; fail early if the model failed to load or `alive()` turns false."""
    import requests

    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if not alive():
            raise RuntimeError(f"the server exited before it was ready{why()}")
        try:
            r = requests.get(f"{url}/readyz", timeout=5)
            if r.status_code == 200:
                return
            if r.headers.get("content-type", "").startswith("application/json") and r.json().get("error"):
                raise RuntimeError(f"the model failed to load: {r.json()['error']}")
        except requests.RequestException:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} not ready after {timeout:.0f} s{why()}")


class ServeProcess:
    """`unilip serve ARGS` in a child process on a free port (benchmarks, tests): ready on
    enter, stopped with Ctrl-C (SIGINT) on exit; `returncode` then holds its exit status."""

    def __init__(self, model: str, *args: str, env: dict | None = None, log: Path | None = None):
        import subprocess
        import sys

        from cluster.local import free_port

        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = log
        out = open(log, "w") if log else subprocess.DEVNULL
        cmd = [sys.executable, "-m", "cli", "serve", "--model", model, "--port", self.url.rsplit(":", 1)[1], *args]
        self.proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=out, stderr=subprocess.STDOUT)
        self.returncode: int | None = None

    def tail(self) -> str:
        return f"; log:\n{self.log.read_text()[-4000:]}" if self.log else ""

    def __enter__(self) -> ServeProcess:
        try:
            wait_ready(self.url, alive=lambda: self.proc.poll() is None, why=self.tail)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        import subprocess

        self.proc.send_signal(signal.SIGINT)
        try:
            self.returncode = self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.returncode = self.proc.wait()


def run_local(config: dict, log=print, stop: threading.Event | None = None) -> None:
    """Serve `config` on this machine's Ray until Ctrl-C / SIGTERM (or `stop` is set)."""
    from ray import serve

    from cluster.connect import init_ray

    http = config.get("http_options", {})
    host, port = http.get("host", "127.0.0.1"), int(http.get("port", 8000))
    init_ray()
    app_config = config["applications"][0]
    serve.start(http_options={"host": host, "port": port})
    url = f"http://{host}:{port}"
    log(f"[serve] deploying {app_config['args']['model']} at {url} ...")
    options = deployment_options(app_config)
    key_env = app_config["args"].get("api_key_env")
    if key_env and os.environ.get(key_env):  # the ingress replicas read the key where they run
        actor = options.setdefault("Api", {}).setdefault("ray_actor_options", {})
        actor.setdefault("runtime_env", {}).setdefault("env_vars", {})[key_env] = os.environ[key_env]
    serve.run(
        application(app_config["args"], options),
        name=app_config.get("name", "unilip"),
        route_prefix=app_config.get("route_prefix", "/"),
        blocking=False,
    )
    stop = stop or threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        wait_ready(url)
        log(
            f"[serve] ready: {url}/v1/images/generations, /v1/images/edits, /v1/chat/completions, "
            f"/v1/reconstructions, /v1/models, /healthz, /readyz (Ctrl-C stops)"
        )
        stop.wait()
    finally:
        log("[serve] shutting down")
        serve.shutdown()
        import ray

        ray.shutdown()
