"""The line between the user's mistakes and ours: a `UserError` is one line and exit 2 on
the command line, a 4xx in OpenAI's shape over HTTP; any other exception is a bug, shown
with its traceback (exit 1), or answered 500 by Serve and logged with its traceback."""

import subprocess
import sys
import time
from pathlib import Path

import requests

from tests.conftest import ROOT, run_cli


def test_a_user_error_is_one_line_and_exit_2_a_bug_shows_its_traceback_and_exit_1():
    user = run_cli("model", "summary", "--preset", "nope")
    assert user.returncode == 2 and user.stderr.startswith("error: unknown model preset 'nope'"), user.stderr
    assert "Traceback" not in user.stderr and len(user.stderr.strip().splitlines()) == 1
    # a bug inside a room the command calls (a ValueError too: not the user's fault)
    for error in ("KeyError('a bug of ours')", "ValueError('a bug of ours')"):
        code = (
            "import sys\nimport unilip.summary\n"
            f"def broken(*args):\n    raise {error}\n"
            "unilip.summary.parameter_summary = broken\n"
            "from cli import main\nsys.exit(main(['model', 'summary', '--preset', 'tiny']))"
        )
        bug = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert bug.returncode == 1, bug.stderr[-2000:]
        assert "Traceback (most recent call last)" in bug.stderr and error.split("(")[0] in bug.stderr
        assert "a bug of ours" in bug.stderr.strip().splitlines()[-1]


def test_serve_answers_a_user_error_400_and_a_bug_500_and_logs_it(ray_session):
    """The real ingress on Ray Serve, in front of a stand-in model deployment whose image
    call raises what the model would raise: a bad prompt, or a bug."""
    from ray import serve

    from cluster.local import free_port
    from serve.api import Api

    port = free_port()

    @serve.deployment
    class Broken:
        def status(self) -> dict:
            return {"ready": True, "error": None, "model": "broken", "dtype": "float32", "dit_pos_embed": "none"}

        async def images(self, request: dict) -> dict:
            from unilip.errors import InputError

            if request["prompt"] == "a user error":
                raise InputError("prompt contains a reserved token (<img>)")
            raise KeyError("a bug of ours")

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(Api.bind(Broken.bind(), "broken", 2**20), name="errors", route_prefix="/")
        url = f"http://127.0.0.1:{port}/v1/images/generations"
        user = requests.post(url, json={"prompt": "a user error"}, timeout=60)
        assert user.status_code == 400, user.text
        assert (
            user.json()["error"]["type"] == "invalid_request_error"
            and "reserved token" in user.json()["error"]["message"]
        )
        bug = requests.post(url, json={"prompt": "anything"}, timeout=60)
        assert bug.status_code == 500 and bug.json()["error"] == {
            "message": "internal error: KeyError",
            "type": "server_error",
            "param": None,
            "code": "server_error",
        }
        assert requests.post(url, json={"prompt": "a user error"}, timeout=60).status_code == 400  # it keeps serving
        logs = ray_session._private.worker._global_node.get_logs_dir_path()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the replica's log is written asynchronously
            text = "".join(p.read_text(errors="replace") for p in Path(logs).rglob("*Api*.log"))
            if "POST /v1/images/generations failed" in text and "KeyError: 'a bug of ours'" in text:
                break
            time.sleep(1)
        assert "Traceback" in text and "KeyError: 'a bug of ours'" in text, text[-3000:]
    finally:
        serve.shutdown()
