import os

import pytest
import torch
from toy import PLAIN_DISTILL

# Two threads per test process (the CI machine has 2 cores), unless OMP_NUM_THREADS says otherwise:
# on a machine shared with other jobs, oversubscribed OpenMP threads slow every process several-fold.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 2))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep decoded-dataset caches out of the user's home during tests."""
    monkeypatch.setenv("B2KD_CACHE", os.environ.get("B2KD_TEST_CACHE") or str(tmp_path_factory.getbasetemp() / "cache"))


# --- toy runs shared by the export and audit tests -----------------------------------------

TOY_RUNS = {
    "threads": 1,
    "data": {"dataset": "npz", "local_fraction": 0.25},
    "teacher": {"arch": "lenet5", "epochs": 2},
    "deprivatize": {"epochs": 1, "widths": [16, 8], "max_queries": 40, "query_every": 2,
                    "query_batch": 4, "spectral_norm": False, "d_lr": None},
    "distill": {"student": "lenet5", "budget": 200, "epochs": 2, "batch_size": 32,
                "query_batch": 64, "response": "soft", **PLAIN_DISTILL},
}


@pytest.fixture(scope="session")
def toy_runs(tmp_path_factory):
    """Teacher, generator, and one MEKD and one KN (Knockoff) distillation run on a tiny MNIST
    slice (800 train images, 200 of them private; 200 test images), built once per session:
    {"cfg": Config, "mekd": run dir, "kn": run dir, "generator": path, "npz": path}."""
    import numpy as np

    from b2kd.core.config import Config
    from b2kd.data import load_dataset
    from b2kd.pipeline import run_deprivatize, run_distill, run_teacher

    threads = torch.get_num_threads()
    root = tmp_path_factory.mktemp("toy-runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("B2KD_CACHE", os.environ.get("B2KD_TEST_CACHE")
                  or str(tmp_path_factory.getbasetemp() / "cache"))
        train, test = load_dataset("mnist", "train"), load_dataset("mnist", "test")
        npz = root / "tiny-mnist.npz"
        np.savez(npz, x_train=train.images[:800].numpy(), y_train=train.labels[:800].numpy(),
                 x_test=test.images[:200].numpy(), y_test=test.labels[:200].numpy())
        cfg = Config.model_validate({**TOY_RUNS, "data": {**TOY_RUNS["data"], "root": str(npz)}})

        def quiet(*args, **kwargs):
            pass

        run_teacher(cfg, root / "teacher", quiet)
        cfg.teacher.checkpoint = str(root / "teacher" / "teacher.pt")
        cfg.deprivatize.generator = run_deprivatize(cfg, root / "deprivatize", quiet)["generator"]
        for method in ("mekd", "kn"):
            run_cfg = cfg.model_copy(deep=True)
            run_cfg.distill.method = method
            if method == "kn":  # queries private images: needs no generator
                run_cfg.deprivatize.generator = None
            run_distill(run_cfg, root / method, quiet)
    torch.set_num_threads(threads)
    return {"cfg": cfg, "mekd": root / "mekd", "kn": root / "kn", "npz": npz,
            "generator": cfg.deprivatize.generator}


# --- a tiny MEKD run that learns (the toy runs above only check plumbing) -------------------

# The toy runs' teacher (2 epochs of 7 steps) is at chance. This one trains 8 epochs at batch 32
# (94.5% on the 200 test images), the GAN 130 steps at lr 1e-3 on the 200 private images, and
# the MEKD student 300 steps on 1,000 paid generator images. The GAN and pool options are pinned
# so that a change of their defaults does not move this run. About 20 s on one thread.
LEARNING = {
    "teacher": {"epochs": 8, "batch_size": 32},
    "deprivatize": {"epochs": 10, "batch_size": 16, "lr": 1e-3},
    "distill": {"method": "mekd", "response": "soft", "budget": 1000, "steps": 300, "lr": 0.05,
                "grad_clip": 5, "warmup_steps": 0, "select": "last", "pool": "random", "reuse_setup": False,
                "local_unlabelled": False},
}


@pytest.fixture(scope="session")
def learning_run(toy_runs, tmp_path_factory):
    """Teacher, generator and one soft MEKD run on the toy runs' tiny MNIST, evaluated:
    {"cfg": the run's Config, "run": run dir, "report": run_evaluate's result, "teacher": meta}."""
    from b2kd.core.config import Config
    from b2kd.pipeline import run_deprivatize, run_distill, run_evaluate, run_teacher

    threads = torch.get_num_threads()
    root = tmp_path_factory.mktemp("learning-run")
    tree = toy_runs["cfg"].model_dump(mode="json")
    tree["teacher"]["checkpoint"] = tree["deprivatize"]["generator"] = None
    for section, values in LEARNING.items():
        tree[section].update(values)
    cfg = Config.model_validate(tree)

    def quiet(*args, **kwargs):
        pass

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("B2KD_CACHE", os.environ.get("B2KD_TEST_CACHE")
                  or str(tmp_path_factory.getbasetemp() / "cache"))
        teacher = run_teacher(cfg, root / "teacher", quiet)
        cfg.teacher.checkpoint = str(root / "teacher" / "teacher.pt")
        cfg.deprivatize.generator = run_deprivatize(cfg, root / "deprivatize", quiet)["generator"]
        run_distill(cfg, root / "mekd", quiet)
        report = run_evaluate(root / "mekd", cfg)
    torch.set_num_threads(threads)
    return {"cfg": cfg, "run": root / "mekd", "report": report, "teacher": teacher}
