"""`unilip bench model` on the tiny preset and the CPU: a smoke test of the benchmark a
bare GPU machine runs, with Ray, DeepSpeed, MLflow, pyarrow and boto3 made unimportable."""

import json
import subprocess
import sys

import pytest

from jobs.training.recipes import chain

BLOCKED = ("ray", "deepspeed", "mlflow", "pyarrow", "boto3")


# 81 s alone; 384 s beside the stack's tests (`make test` runs them side by side): the
# benchmark's CPU-bound steps get a fifth of the two cores while a training test runs
@pytest.mark.timeout(1500)
def test_bench_model_runs_without_the_cluster_stack(tmp_path):
    out = tmp_path / "bench.json"
    argv = [
        "bench",
        "model",
        "--preset",
        "tiny",
        "--device",
        "cpu",
        "--batches",
        "1,2",
        "--inference-steps",
        "2",
        "--train-steps",
        "1",
        "--warmup",
        "1",
        "--repeats",
        "1",
        "--json",
        str(out),
    ]
    code = (
        f"import sys\nfor m in {BLOCKED!r}: sys.modules[m] = None  # import raises\n"
        f"from cli import main\nsys.exit(main({argv!r}))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1400)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [row["recipe"] for row in report["train"]] == chain()
    for row in report["train"]:
        assert (
            row["step_s"] > 0
            and row["samples_per_s"] == row["micro_batch"] / row["step_s"]
            and row["trained_params"] > 0
        )
    gen = {row["recipe"]: row for row in report["train"]}["gen-stage2"]
    assert set(gen["task_step_s"]) == {"generation", "editing"}  # both tasks of the stage timed
    assert [(r["task"], r["batch"]) for r in report["inference"]] == [
        ("generation", 1),
        ("generation", 2),
        ("editing", 1),
        ("editing", 2),
    ]
    assert all(r["s_per_image"] > 0 and r["steps"] == 2 for r in report["inference"])
    assert "recon-stage2-448" in r.stdout and "s/image" in r.stdout  # the table on stdout


def test_mfu_counts_the_model_s_flops_and_hfu_the_recompute_too():
    from jobs.performance.model import step_flops
    from jobs.performance.plan import estimate_run
    from jobs.training.recipes import load_recipe

    recipe = load_recipe("gen-stage2")  # the LLM, connector and DiT checkpointed, as shipped
    model, executed = step_flops(recipe, "unilip-1b", prompt_tokens=64)
    assert executed == estimate_run("gen-stage2").flops_per_sample  # the planner counts what runs
    plain = estimate_run("gen-stage2", overrides=["train.activation_checkpointing=[]"])
    assert model == plain.flops_per_sample and 1.2 < executed / model < 1.4  # one more forward of most of the step


def test_bench_model_refuses_what_it_cannot_run():
    from tests.conftest import run_inline

    r = run_inline("bench", "model", "--preset", "tiny", "--device", "cuda")
    assert r.returncode == 2 and "--device cuda: this machine's torch sees no CUDA device" in r.stderr
    r = run_inline("bench", "model", "--preset", "tiny", "--device", "cpu", "--recipes", "gen-stage9")
    assert r.returncode == 2 and "unknown recipe(s) ['gen-stage9']" in r.stderr
