"""`unilip demo`, shortened (two of the five stages, 2 steps each, small data): the whole
pipeline end to end, from data in S3 to answers over HTTP."""

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from cluster.local import LocalStack
from jobs.demo import STAGES, loss_trend, plot_losses, stage_curves
from tests.conftest import run_cli

SHORT = ("recon-stage1", "gen-stage2")  # one stage of each kind; the second trains on generation and editing


@pytest.mark.stack
def test_demo_end_to_end_leaves_nothing_running(tmp_path):
    results = tmp_path / "results"
    r = run_cli(
        "demo",
        "--stages",
        ",".join(SHORT),
        "--steps",
        "2",
        "--workers",
        "1",
        "--gen",
        "16",
        "--edit",
        "8",
        "--size",
        "96",
        "--results",
        str(results),
        timeout=1200,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    for n in range(1, 8):
        assert f"== [{n}/7]" in r.stdout
    assert "every service stopped" in r.stdout
    # the terminal shows the demo's own lines; the workers' and Ray Data's go to the logs it names
    assert "(RayTrainWorker" not in r.stdout + r.stderr and "Starting execution of Dataset" not in r.stdout + r.stderr
    assert f"logs:           Ray workers {results / 'logs' / 'ray'}" in r.stdout
    assert any((results / "logs" / "ray").glob("worker-*.out"))
    summary = json.loads((results / "summary.json").read_text())

    assert list(summary["stages"]) == list(SHORT)
    for name, stage in summary["stages"].items():
        assert re.fullmatch(r"[0-9a-f]{32}", stage["mlflow_run_id"]) and stage["steps"] == 2
        assert re.fullmatch(rf"models:/unilip-tiny-{name}/\d+", stage["model"])
    assert summary["served_model"] == summary["stages"]["gen-stage2"]["model"]  # deployed from the registry

    responses = summary["responses"]
    for key in ("generated", "edited"):
        with Image.open(responses[key]["path"]) as im:
            assert im.size == (448, 448)
    with Image.open(responses["reconstruction"]["path"]) as im:
        assert im.size == (2 * 448, 448)  # input | reconstruction
    assert isinstance(json.loads(open(responses["understanding"]["path"]).read())["answer"], str)
    with Image.open(summary["loss_curves"]) as im:
        assert im.size[0] > im.size[1] > 0
    listed = [summary["loss_curves"], summary["serve_log"], *(v["path"] for v in responses.values())]
    for path in listed:
        assert Path(path).is_file() and Path(path).stat().st_size > 0, path
    for path in listed[:1] + [responses[k]["path"] for k in ("generated", "edited", "reconstruction")]:
        assert path in r.stdout  # the summary names it
    assert summary["mlflow_ui"] in r.stdout
    # the picture: input | reconstruction | generated | edited, captioned; named by the last line
    with Image.open(responses["picture"]["path"]) as im:
        assert im.size[0] == 4 * 448 and im.size[1] > 448
    assert r.stdout.rstrip().splitlines()[-1].endswith(responses["picture"]["path"])
    psnr = summary["reconstruction_psnr_db"]
    assert set(psnr) == {"served_photo", "recon-stage1"} and all(0 < v < 60 for v in psnr.values())
    assert psnr["served_photo"] == responses["reconstruction"]["psnr_db"]
    assert "INFO worker.py" not in r.stdout + r.stderr and "(raylet)" not in r.stdout

    stack = LocalStack(results / "stack")
    assert stack.services() == {} and stack.leftover_processes() == []


def test_demo_refuses_stages_it_cannot_serve():
    for stages, message in (
        ("recon-stage1,nope", "--stages takes recipes from"),
        ("gen-stage2,recon-stage1", "training order"),
        ("recon-stage1,recon-stage2", "must end with a generation stage"),
        ("gen-stage2", "must start with recon-stage1: gen-stage2 starts from gen-stage1's export"),
    ):
        r = run_cli("demo", "--stages", stages)
        assert r.returncode == 2 and message in r.stderr, r.stderr
    assert STAGES == ("recon-stage1", "recon-stage2", "gen-stage1", "gen-stage2", "gen-stage3")


def test_learning_curves_have_one_panel_per_stage_and_the_right_metrics(tmp_path):
    curves = stage_curves(("recon-stage1", "gen-stage2"))
    assert curves == {
        "recon-stage1": (("train/mse", "train/lpips"), "MSE + LPIPS"),
        "gen-stage2": (("train/loss",), "flow-matching loss"),
    }
    histories = {
        "recon-stage1": [(i, 1 / i) for i in range(1, 13)],
        "gen-stage2": [(i, 2 - i / 10) for i in range(1, 13)],
    }
    plot_losses(histories, curves, tmp_path / "curves.png")
    with Image.open(tmp_path / "curves.png") as im:
        assert im.size == (800, 320)  # two 4 x 3.2 inch panels at 100 dpi
    assert loss_trend([4, 3, 2, 1, 1, 0, 0, 0]) == (3.5, 0.0)  # means of the first and the last quarter
