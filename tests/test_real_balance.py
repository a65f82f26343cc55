"""Class-balanced real batches for deprivatization: the sampling weights by hand, the labeller on
images it can tell apart, and a tiny GAN run that balances, pays only for generator images and
resumes with its paid answers and labeller."""

import json

import pytest
import torch

from b2kd.checkpoint import read
from b2kd.real_balance import balancing_weights, fit_labeller, label_private, make_labeller


def test_balancing_weights_by_hand():
    pseudo = torch.tensor([0, 0, 0, 1])
    # strength 1, no cap: each class carries half the mass -> 1/6 per class-0 image, 1/2 for class 1
    assert balancing_weights(pseudo, 1.0, 10.0).tolist() == pytest.approx([1 / 6, 1 / 6, 1 / 6, 1 / 2])
    # strength 0: the set as it is
    assert balancing_weights(pseudo, 0.0, 10.0).tolist() == pytest.approx([0.25] * 4)
    # strength 0.5: 3^-0.5 per class-0 image, 1 for class 1, normalised
    w = 3 ** -0.5
    total = 3 * w + 1
    assert balancing_weights(pseudo, 0.5, 10.0).tolist() == pytest.approx([w / total] * 3 + [1 / total])
    # cap 1.6 x uniform (0.4): class 1's 1/2 is cut to 0.4, then all renormalised by 0.9
    assert balancing_weights(pseudo, 1.0, 1.6).tolist() == pytest.approx(
        [1 / 6 / 0.9] * 3 + [0.4 / 0.9])


def test_labeller_learns_paid_answers_and_labels_private_images():
    # two classes the labeller can tell apart: bright left half vs bright right half (uint8, 1x28x28)
    def halves(n, side, g):
        x = torch.randint(0, 40, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
        if side == 0:
            x[..., :14] += 200
        else:
            x[..., 14:] += 200
        return x

    g = torch.Generator().manual_seed(0)
    paid = torch.cat([halves(32, 0, g), halves(32, 1, g)])
    answers = torch.cat([torch.tensor([[0.9, 0.1]]).repeat(32, 1), torch.tensor([[0.2, 0.8]]).repeat(32, 1)])
    net = make_labeller(2, 1, 28, seed=0)
    again = make_labeller(2, 1, 28, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values()))
    before = torch.random.get_rng_state()
    fit_labeller(net, paid, answers, steps=60, generator=torch.Generator().manual_seed(1), batch_size=32)
    assert torch.equal(torch.random.get_rng_state(), before)  # the GAN's global random state is untouched
    private = torch.cat([halves(20, 0, g), halves(10, 1, g)])
    labels = label_private(net, private, chunk=7)
    assert labels.tolist() == [0] * 20 + [1] * 10
    weights = balancing_weights(labels, 1.0, 10.0)
    assert weights[:20].sum().item() == pytest.approx(0.5) and weights[20:].sum().item() == pytest.approx(0.5)


def test_deprivatize_balances_pays_for_generator_images_only_and_resumes(toy_runs, tmp_path):
    from b2kd.edge import Ledger
    from b2kd.pipeline import edge_private_images, run_deprivatize

    cfg = toy_runs["cfg"].model_copy(deep=True)
    cfg.deprivatize.generator = None
    cfg.deprivatize.epochs = 2
    cfg.deprivatize.balance_real = 1.0
    cfg.deprivatize.balance_from = 0.5  # epoch 0 pays as usual, epoch 1 balances on its answers
    out = tmp_path / "gan"
    report = run_deprivatize(cfg, out, log=lambda *a, **k: None)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    private = edge_private_images(cfg)
    assert "private_labels" not in records[0]
    assert sum(records[1]["private_labels"]) == len(private)
    assert report["private_images_sent"] == 0
    with Ledger(out / "ledger.sqlite") as ledger:
        assert ledger.count() == report["queries"] > 0
    state = read(out / "checkpoints" / "gan_latest.pt", "gan_state")
    assert sum(len(x) for x in state["paid_images"]) == report["queries"]
    assert all(x.dtype == torch.uint8 for x in state["paid_images"])
    assert state["labeller"] is not None

    # one epoch more, resumed: the stored answers and labeller carry on, no query is paid twice
    cfg.deprivatize.epochs = 3
    again = run_deprivatize(cfg, out, log=lambda *a, **k: None)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1, 2]
    assert sum(records[2]["private_labels"]) == len(private)
    assert again["queries"] >= report["queries"]
