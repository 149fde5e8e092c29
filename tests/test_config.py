import pytest

from jobs.training.recipes import load_recipe, recipe_names
from tests.conftest import run_inline
from unilip.config import ConfigError, Recipe, S3Config, apply_overrides, from_dict, load_yaml

PAPER = {  # steps, global batch, lr, training image size (UNILIP_FACTS.md; gen stage 1: DC-AE's 512 px)
    "recon-stage1": (300_000, 64, 1e-4, 224),
    "recon-stage2": (400_000, 64, 1e-4, 224),
    "recon-stage2-448": (100_000, 64, 1e-4, 448),
    "gen-stage1": (50_000, 512, 1e-4, 512),
    "gen-stage2": (200_000, 512, 1e-4, 448),
    "gen-stage3": (30_000, 512, 1e-4, 448),
}


def test_all_six_recipes_load_with_the_paper_values():
    assert recipe_names() == sorted(PAPER)
    for name, (steps, batch, lr, res) in PAPER.items():
        r = load_recipe(name)
        assert isinstance(r, Recipe) and r.name == name
        assert (r.train.steps, r.train.global_batch, r.train.lr, r.data.resolution) == (steps, batch, lr, res)
        assert r.train.min_lr == 1e-5 and r.train.precision == "bf16"
        assert r.data.preprocess == ("random_crop" if r.kind == "reconstruction" else "squash")
        # the tiny variants train in fp32: a CPU without bf16 instructions emulates it, about 5x slower
        assert load_recipe(name, variant="tiny").train.precision == "fp32"
    assert load_recipe("recon-stage2").loss.gan_start_step == 200_000
    assert load_recipe("recon-stage2-448").loss.gan_start_step == 0
    assert load_recipe("recon-stage1").loss.gan == 0.0
    for name in ("recon-stage1", "recon-stage2", "recon-stage2-448"):  # the release's losses and mix
        loss = load_recipe(name).loss
        assert (loss.mse, loss.lpips, loss.lpips_net, loss.convnext) == (1.0, 1.0, "vgg", 0.1)
        assert (loss.gan_loss, loss.lecam, loss.discriminator_width) == ("hinge", 0.001, 128)
        assert [s.proportion for s in load_recipe(name).data.sources] == [0.6, 0.2, 0.2]
    assert load_recipe("recon-stage2").loss.distill == 1.0 and load_recipe("recon-stage2").loss.gan == 0.1
    assert load_recipe("recon-stage2").train.lr_scales["encoder"] == 0.1
    edit = {s.name: s.multiplier for s in load_recipe("gen-stage2").data.sources}
    assert edit["gpt-image-edit"] == 10.0
    stage3 = {s.name: (s.task, s.multiplier) for s in load_recipe("gen-stage3").data.sources}
    assert stage3 == {
        "blip3o-60k": ("generation", 1.0),
        "sharegpt-4o-t2i": ("generation", 1.0),
        "sharegpt-4o-image": ("editing", 3.0),
    }
    assert "dit" not in load_recipe("gen-stage1").train.trainable
    assert "dit" in load_recipe("gen-stage2").train.trainable


def test_overrides_are_typed():
    r = load_recipe(
        "gen-stage2",
        [
            "train.lr=2e-4",
            "train.steps=10",
            "model.condition=queries",
            "data.sources.3.multiplier=5",
            "loss.gan_start_step=null",
            "data.batch_mode=mixed",
        ],
    )
    assert r.train.lr == 2e-4 and isinstance(r.train.lr, float)
    assert r.train.steps == 10 and r.model.condition == "queries"
    assert r.data.sources[3].multiplier == 5.0 and r.data.batch_mode == "mixed"
    assert r.loss.gan_start_step is None
    r2 = apply_overrides(r, ["train.lr_scales.dit=0.5", "train.trainable=[dit]"])
    assert r2.train.lr_scales == {"dit": 0.5} and r2.train.trainable == ["dit"]
    assert r.train.trainable != r2.train.trainable  # the original is untouched


@pytest.mark.parametrize(
    "override, words",
    [
        ("train.lrr=1", ["'train.lrr'", "lr", "min_lr"]),
        ("nope=1", ["'nope'", "train"]),
        ("train.steps=abc", ["train.steps", "int", "'abc'"]),
        ("train.steps=1.5", ["train.steps", "int"]),
        ("model.condition=foo", ["model.condition", "'hidden'", "'queries'", "'both'"]),
        ("data.sources.9.uri=x", ["index", "9"]),
        ("train.lr", ["key=value"]),
        ("train.trainable=3", ["train.trainable", "list"]),
    ],
)
def test_bad_overrides_name_the_key_and_what_is_allowed(override, words):
    with pytest.raises(ConfigError) as e:
        load_recipe("recon-stage1", [override])
    for w in words:
        assert w in str(e.value)


def test_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nkind: generation\ntrain: {steps: 5, warmup: 3}\n")
    with pytest.raises(ConfigError, match="unknown key 'train.warmup'"):
        load_yaml(Recipe, bad)
    missing = tmp_path / "missing.yaml"
    missing.write_text("kind: generation\n")
    with pytest.raises(ConfigError, match="missing required key 'name'"):
        load_yaml(Recipe, missing)
    with pytest.raises(ConfigError, match="unknown recipe 'gen-stage9'"):
        load_recipe("gen-stage9")
    assert from_dict(S3Config, {"endpoint_url": None}).endpoint_url is None


def test_cli_recipe_show_and_bad_key():
    ok = run_inline("recipe", "show", "recon-stage1", "--set", "train.lr=2e-4")
    assert ok.returncode == 0, ok.stderr
    assert "lr: 0.0002" in ok.stdout
    bad = run_inline("recipe", "show", "recon-stage1", "--set", "train.lrr=2e-4")
    assert bad.returncode == 2
    assert "unknown key 'train.lrr'" in bad.stderr and "Traceback" not in bad.stderr


def test_zero3_with_two_tasks_needs_lockstep_batches():
    from jobs.training.train import prepare

    with pytest.raises(ConfigError, match="needs data.batch_mode lockstep"):
        prepare("gen-stage2", "unilip-1b", ["train.zero_stage=3"])
    assert (
        prepare("gen-stage2", "unilip-1b", ["train.zero_stage=3", "data.batch_mode=lockstep"]).data.batch_mode
        == "lockstep"
    )
    assert prepare("gen-stage1", "unilip-1b", ["train.zero_stage=3"]).train.zero_stage == 3  # one task: any mode
