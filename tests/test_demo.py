import json

from cluster.local import LocalStack
from tests.conftest import run_cli


def test_demo_end_to_end_leaves_nothing_running(tmp_path):
    results = tmp_path / "results"
    r = run_cli("demo", "--gen", "10", "--edit", "6", "--size", "96", "--results", str(results), timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for step in ("[1/4]", "[2/4]", "[3/4]", "[4/4]", "every service stopped"):
        assert step in r.stdout
    summary = json.loads((results / "summary.json").read_text())
    assert summary["read"]["generation"]["samples"] == 10 and summary["read"]["editing"]["samples"] == 6
    assert summary["read"]["editing"]["images"] == 12  # input and output of every pair decoded
    assert (results / "samples.png").stat().st_size > 0
    assert len(summary["mlflow_run_id"]) == 32
    assert list((results / "stack" / "mlartifacts").rglob("samples.png"))  # the run's artifact
    stack = LocalStack(results / "stack")
    assert stack.services() == {} and stack.leftover_processes() == []
