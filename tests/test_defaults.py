"""The config defaults are MEKD's recipe, the settings that measured best on the dev split;
configs/demo.yaml only sizes the run for a CPU, and the bench files resolve as before."""

from pathlib import Path

import pytest
import yaml

from b2kd.core.config import Config, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

RECIPE = {
    "distill.method": "mekd",
    "distill.response": "soft",
    "distill.lr": 0.05,
    "distill.momentum": 0.9,
    "distill.weight_decay": 5e-4,
    "distill.schedule": "cosine",
    "distill.warmup_steps": 50,
    "distill.grad_clip": 5.0,
    "distill.tau": 5.0,
    "distill.tau_g": 5.0,
    "distill.beta": 1.0,
    "distill.hard_loss": "ce",
    "distill.crop_padding": 2,
    "distill.val_fraction": 0.05,
    "distill.select": "val",
    "distill.reuse_setup": True,
    "distill.local_unlabelled": True,
    "distill.unlabelled_threshold": 0.95,
    "distill.unlabelled_ratio": 2.0,
    "distill.domain_mixup": 1.0,
    "distill.pool": "balanced",
    "distill.balance_neighbours": 0.1,
    "distill.student": "lenet5",
    "deprivatize.lr": 8e-4,
    "deprivatize.betas": (0.5, 0.999),
    "deprivatize.alpha": 0.5,
    "deprivatize.query_every": 5,
    "deprivatize.query_batch": 16,
    "deprivatize.max_queries": 5000,
    "deprivatize.response": "soft",
    "deprivatize.spectral_norm": True,
    "deprivatize.d_lr": 3.2e-3,
    "deprivatize.d_dropout": 0.0,
}

# what configs/demo.yaml may set: the run's size, never the recipe
SIZING = {
    "seed", "threads", "device", "out", "data.dataset", "data.image_size", "data.channels",
    "data.local_fraction", "teacher.arch", "teacher.epochs", "deprivatize.epochs", "deprivatize.widths",
    "distill.budget", "distill.student", "distill.epochs", "distill.batch_size",
}


def _get(cfg: Config, dotted: str):
    node = cfg
    for key in dotted.split("."):
        node = getattr(node, key)
    return node


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize("key", sorted(RECIPE))
def test_default_is_the_recipe(key):
    assert _get(Config(), key) == RECIPE[key]


def test_demo_sets_only_its_size_and_keeps_the_recipe():
    tree = yaml.safe_load((CONFIGS / "demo.yaml").read_text())
    assert set(_flat(tree)) <= SIZING
    demo = load_config(CONFIGS / "demo.yaml")
    for key, value in RECIPE.items():
        assert _get(demo, key) == value, key


def test_the_reference_config_keeps_the_reference_recipe():
    """paper-mnist.yaml is the reference experiment: none of b2kd's own levers."""
    paper = load_config(CONFIGS / "paper-mnist.yaml").distill
    assert (paper.lr, paper.schedule, paper.warmup_steps, paper.grad_clip, paper.hard_loss) == \
        (0.1, "step", 0, None, "kl")
    assert (paper.reuse_setup, paper.pool, paper.local_unlabelled, paper.student) == \
        (False, "random", False, "resnet8")
    gan = load_config(CONFIGS / "paper-mnist.yaml").deprivatize
    assert (gan.lr, gan.d_lr, gan.spectral_norm, gan.d_dropout) == (2e-4, None, False, 0.25)


def test_bench_baselines_do_not_train_on_the_private_images():
    """local_unlabelled defaults on for MEKD; a baseline of a bench file turns it off itself."""
    from b2kd.bench.run import cell_config, load_bench

    for path in sorted(CONFIGS.glob("bench-*.yaml")):
        bench, base = load_bench(path)
        for spec in bench.methods:
            if spec.name == "mekd":
                continue
            cfg = cell_config(bench, base, bench.gaps[0], spec, spec.responses[0], bench.budgets[0],
                              bench.seeds[0], None, None)
            assert cfg.distill.local_unlabelled is False, (path.name, spec.name)


# what a bench file may set beside the demo's sizing: its length, and what its baselines need
BENCH_SIZING = SIZING | {"distill.steps", "distill.warmup_steps", "distill.transfer_copies"}
BASELINE_KEYS = {"distill.local_unlabelled", "distill.lr", "distill.dafl_steps", "distill.transfer_copies"}
# the bench files that compare methods; bench-mnist-graybox.yaml compares answers within MEKD and
# still pins the plain GAN its published table was made with
METHOD_BENCHES = ["bench-mnist-cpu.yaml", "bench-fashion-cpu.yaml", "bench-fashion-main.yaml",
                  "bench-mnist-gap.yaml"]


@pytest.mark.parametrize("name", METHOD_BENCHES)
def test_bench_files_differ_from_the_demo_only_in_size(name):
    """One recipe: a bench's MEKD cells train with the defaults; the file sizes the run and sets up
    its baselines, never a tuned value of its own."""
    from b2kd.bench.run import cell_config, load_bench

    tree = yaml.safe_load((CONFIGS / name).read_text())
    assert set(_flat(tree.get("set") or {})) <= BENCH_SIZING
    bench, base = load_bench(CONFIGS / name)
    for spec in bench.methods:
        keys = set(_flat(spec.set)) | {k for r in spec.by_response.values() for k in _flat(r)}
        assert keys <= (set() if spec.name == "mekd" else BASELINE_KEYS), (name, spec.name)
        if spec.name != "mekd":
            continue
        for response in spec.responses:
            cfg = cell_config(bench, base, bench.gaps[0], spec, response, bench.budgets[0], bench.seeds[0],
                              None, None)
            for key in RECIPE.keys() - BENCH_SIZING - {"distill.response"}:
                assert _get(cfg, key) == RECIPE[key], (name, key)
