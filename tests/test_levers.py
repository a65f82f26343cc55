"""The accuracy levers of distillation: per-step schedule, semi-supervised consistency on private
images, the balanced pool, the dev split, and the reuse of deprivatization's paid answers. Values
checked against hand computations."""

import math

import pytest
import torch

from b2kd.core.engine import make_step_scheduler, step_schedule_factor
from b2kd.data.augment import StrongAugment, cutout
from b2kd.data.splits import dev_split, edge_split
from b2kd.distill.semisup import consistency_loss
from b2kd.pool.balanced import class_quotas, neighbour_latents, pick, shortfall


def test_cosine_factor_per_step_with_warmup():
    # 2 warm-up steps (1/2, 1), then cosine over the remaining 8: 1 at step 2, 0.5 at step 6, 0 at 10
    assert step_schedule_factor(0, 10, "cosine", warmup=2) == pytest.approx(0.5)
    assert step_schedule_factor(1, 10, "cosine", warmup=2) == pytest.approx(1.0)
    assert step_schedule_factor(2, 10, "cosine", warmup=2) == pytest.approx(1.0)
    assert step_schedule_factor(6, 10, "cosine", warmup=2) == pytest.approx(0.5)
    assert step_schedule_factor(10, 10, "cosine", warmup=2) == pytest.approx(0.0)
    assert step_schedule_factor(4, 10, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.4)))


def test_step_factor_milestones():
    assert [step_schedule_factor(s, 10, "step", milestones=(3, 6)) for s in (0, 3, 5, 6, 9)] == \
        pytest.approx([1.0, 0.1, 0.1, 0.01, 0.01])


def test_scheduler_finishes_with_training():
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = make_step_scheduler(opt, "cosine", total_steps=400)
    for _ in range(400):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_consistency_loss_by_hand():
    weak = torch.tensor([[4.0, 0.0], [0.1, 0.0]])  # confident row 0 (p = 0.982), unsure row 1
    strong = torch.tensor([[1.0, 2.0], [5.0, -5.0]])
    loss, kept = consistency_loss(weak, strong, threshold=0.95)
    # row 0: CE of logits (1, 2) on class 0 = log(1 + e) ; row 1 masked; mean over both rows
    assert loss.item() == pytest.approx(math.log(1 + math.e) / 2, rel=1e-6)
    assert kept == 0.5


def test_strong_augment_is_seeded_and_in_range():
    x = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8)
    a = StrongAugment()(x, torch.Generator().manual_seed(0))
    b = StrongAugment()(x, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.dtype == torch.float32
    assert a.min() >= 0 and a.max() <= 1 and not torch.equal(a, x.float() / 255)


def test_cutout_zeroes_a_square():
    x = torch.ones(1, 1, 9, 9)
    y = cutout(x, 3, torch.Generator().manual_seed(1))
    zeros = int((y == 0).sum())
    assert 1 <= zeros <= 9  # a 3x3 square, clipped where it overhangs


def test_class_quotas_water_fill():
    have = torch.tensor([5, 0, 2])
    assert class_quotas(have, torch.tensor([10, 10, 10]), 6).tolist() == [0, 4, 2]  # levels 5, 4, 4
    # class 1 has only 1 candidate: the rest goes to the next lowest
    assert class_quotas(have, torch.tensor([10, 1, 10]), 6).tolist() == [1, 1, 4]


def test_shortfall_is_the_gap_to_the_even_level():
    # level ceil((7 + 6) / 3) = 5: class 1 needs 5 - 0 - 1 = 4 more, class 2 needs 5 - 2 - 0 = 3
    assert shortfall(torch.tensor([5, 0, 2]), torch.tensor([10, 1, 0]), 6).tolist() == [0, 4, 3]
    assert shortfall(torch.tensor([2, 2]), torch.tensor([9, 9]), 4).tolist() == [0, 0]


def test_neighbour_latents_stay_around_their_parents():
    parents = torch.tensor([[0.0, 0.0], [10.0, -10.0]])
    z = neighbour_latents(parents, 4000, 0.1, torch.Generator().manual_seed(0))
    nearest = torch.cdist(z, parents).min(1)
    assert z.shape == (4000, 2) and float(nearest.values.max()) < 0.6
    assert 0.45 < float((nearest.indices == 0).float().mean()) < 0.55  # both parents, evenly
    assert float((z - parents[nearest.indices]).std()) == pytest.approx(0.1, rel=0.05)


def test_latents_are_the_noise_behind_synthesise():
    from b2kd.models import Generator
    from b2kd.pool.paid import latents, render, synthesise

    torch.manual_seed(0)
    generator = Generator(10, 28, 1, (16, 8))
    assert torch.equal(synthesise(generator, 300, 5), render(generator, latents(300, 10, 5)))
    assert torch.equal(latents(100, 10, 5), latents(300, 10, 5)[:100])  # pools nest


class _OneNumberGenerator(torch.nn.Module):
    """G(z): a 4x4 grey image, every pixel tanh(z_0 - 1.5); bright images are rare (z_0 > 1.5)."""

    config = {"latent_dim": 2}

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def forward(self, z):
        return torch.tanh(z[:, :1, None, None] - 1.5).expand(-1, 1, 4, 4)


class _BrightnessTeacher(torch.nn.Module):
    """Class 1 for an image brighter than mid-grey, else class 0 (about 7% of G's images)."""

    num_classes, in_channels, image_size = 2, 1, 4

    def forward(self, x):
        bright = x.float().mean((1, 2, 3)) / 255 - 0.5
        return torch.stack([-20 * bright, 20 * bright], 1)


class _BlindStudent(torch.nn.Module):
    """A student that never predicts class 1, as one fitted on a pool with few of them."""

    def forward(self, x):
        return torch.tensor([[2.0, 0.0]]).expand(len(x), 2)


def _rare_class_pool(tmp_path, neighbours):
    from b2kd.blackbox import LocalBackend, top1
    from b2kd.distill.methods.base import Acquisition
    from b2kd.edge import BlackBoxTeacher, Ledger
    from b2kd.pool.balanced import balanced_pool

    teacher = BlackBoxTeacher(LocalBackend(_BrightnessTeacher()), Ledger(tmp_path / "ledger.sqlite"), budget=2000)
    acq = Acquisition(teacher=teacher, budget=2000, seed=0, device=torch.device("cpu"), out=tmp_path,
                      student=_BlindStudent(), fit=lambda *a: None, generator=_OneNumberGenerator())
    images, answers = balanced_pool(acq, 0.25, 4, 0, 2, neighbours)
    assert len(images) == 2000  # (identical images are answered once: G makes at most 256 distinct ones)
    return float((top1(answers) == 1).float().mean())


def test_neighbours_fill_a_class_the_generator_seldom_draws(tmp_path):
    # without neighbours the blind student finds no bright candidate: the pool keeps G's 7%
    plain = _rare_class_pool(tmp_path / "plain", 0.0)
    assert plain < 0.12
    # with them, the first part's bright images seed candidates the teacher also calls bright
    grown = _rare_class_pool(tmp_path / "grown", 0.3)
    assert grown > 0.4


def test_pick_takes_least_confident_half():
    pred = torch.tensor([0, 0, 0, 0, 1, 1])
    conf = torch.tensor([0.9, 0.2, 0.5, 0.99, 0.3, 0.8])
    idx = pick(pred, conf, torch.tensor([2, 1]), torch.Generator().manual_seed(0))
    assert 1 in idx.tolist() and 4 in idx.tolist() and len(idx) == 3
    assert (pred[idx] == 0).sum() == 2


def test_dev_split_is_outside_the_private_set():
    split = edge_split(1000, 0.1, seed=3)
    dev = dev_split(1000, split.local_idx, 200, seed=3)
    assert len(dev) == 200 and len(set(dev.tolist()) & set(split.local_idx.tolist())) == 0
    assert torch.equal(dev, dev_split(1000, split.local_idx, 200, seed=3))


def _distil(toy_runs, tmp_path, name, **distill):
    from b2kd.pipeline import run_distill

    cfg = toy_runs["cfg"].model_copy(deep=True)
    for key, value in distill.items():
        setattr(cfg.distill, key, value)
    return run_distill(cfg, tmp_path / name, lambda *a, **k: None), cfg


def test_local_unlabelled_never_sends_a_private_image(toy_runs, tmp_path):
    from b2kd.core.checkpoint import read
    from b2kd.data.edge_sets import edge_private_images
    from b2kd.edge import Ledger

    summary, cfg = _distil(toy_runs, tmp_path, "semi", local_unlabelled=True, unlabelled_threshold=0.0)
    private = edge_private_images(cfg)
    with Ledger(tmp_path / "semi" / "ledger.sqlite") as ledger:
        hashes, sent = ledger.images()
        assert ledger.private_images_sent(private) == 0
    pool = read(tmp_path / "semi" / "pool.pt", "pool")
    assert pool["source"] == "generator" and len(sent) == summary["queries"] == cfg.distill.budget
    # every sent image is a pool image, i.e. a generator sample
    from b2kd.edge.ledger import image_hashes

    assert set(hashes) <= set(image_hashes(pool["images"]))
    history = summary["history"]
    assert all("unlabelled" in r and "confident" in r for r in history)
    assert history[-1]["confident"] == 1.0  # threshold 0: every private image is pseudo-labelled


def test_reuse_setup_adds_paid_answers_without_queries(toy_runs, tmp_path):
    summary, cfg = _distil(toy_runs, tmp_path, "setup", reuse_setup=True)
    gan_queries = read_gan_queries(toy_runs)
    assert summary["setup_in_pool"] == gan_queries > 0
    assert summary["pool_size"] == cfg.distill.budget + gan_queries
    assert summary["queries"] == cfg.distill.budget  # nothing new paid for the setup images


def read_gan_queries(toy_runs):
    from pathlib import Path

    from b2kd.edge import Ledger

    with Ledger(Path(toy_runs["generator"]).parent / "ledger.sqlite") as ledger:
        return ledger.count()


def test_balanced_pool_spends_the_budget_once(toy_runs, tmp_path):
    from b2kd.core.checkpoint import read
    from b2kd.edge import Ledger

    summary, cfg = _distil(toy_runs, tmp_path, "balanced", pool="balanced", balance_fit_steps=5)
    assert summary["queries"] == cfg.distill.budget == summary["pool_size"]
    rest = read(tmp_path / "balanced" / "pool-balanced.pt", "pool")["images"]
    assert len(rest) == cfg.distill.budget - round(cfg.distill.budget * cfg.distill.balance_first)
    # a re-run reads the same pool back and pays nothing
    again, _ = _distil(toy_runs, tmp_path, "balanced", pool="balanced", balance_fit_steps=5)
    with Ledger(tmp_path / "balanced" / "ledger.sqlite") as ledger:
        assert ledger.count() == cfg.distill.budget
    assert again["queries"] == cfg.distill.budget


def test_pick_unsure_share_sets_how_many_are_the_least_confident():
    pred = torch.tensor([0, 0, 0, 0, 0, 0])
    conf = torch.tensor([0.9, 0.2, 0.5, 0.99, 0.3, 0.8])
    rng = lambda: torch.Generator().manual_seed(0)
    assert sorted(pick(pred, conf, torch.tensor([3]), rng(), 1.0).tolist()) == [1, 2, 4]
    none = pick(pred, conf, torch.tensor([3]), rng(), 0.0)
    assert len(none) == 3 and len(set(none.tolist())) == 3
    # the default share: ceil(half) least confident, as before the option
    assert torch.equal(pick(pred, conf, torch.tensor([3]), rng()), pick(pred, conf, torch.tensor([3]), rng(), 0.5))
    assert {1, 4} <= set(pick(pred, conf, torch.tensor([3]), rng()).tolist())


def test_domain_mixup_by_hand():
    # one paid image (all 255 -> 1.0) and one private image (all 0); the student reads one pixel:
    # logits (2x, 0). The mix is the pixel lam, the target lam * teacher + (1 - lam) * the student's
    # own answer on the private image, softmax(0, 0) = (1/2, 1/2).
    from b2kd.data.augment import Augment
    from b2kd.distill.semisup import DomainMixup

    student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(1, 2))
    with torch.no_grad():
        student[1].weight.copy_(torch.tensor([[2.0], [0.0]]))
        student[1].bias.zero_()
    paid = torch.full((1, 1, 1, 1), 255, dtype=torch.uint8)
    private = torch.zeros((1, 1, 1, 1), dtype=torch.uint8)
    teacher = torch.tensor([[0.9, 0.1]])
    term = DomainMixup(private, paid, teacher, torch.tensor([0]), batch_size=1, weight=0.5,
                       weak=Augment(), device=torch.device("cpu"))
    loss, parts = term.loss(student, torch.Generator().manual_seed(0))
    replay = torch.Generator().manual_seed(0)  # the same draws: paid index, private index, lam
    torch.randint(1, (1,), generator=replay), torch.randint(1, (1,), generator=replay)
    lam = torch.rand(1, 1, generator=replay).item()
    q0 = math.exp(2 * lam) / (math.exp(2 * lam) + 1)
    t0 = 0.9 * lam + 0.5 * (1 - lam)
    expected = -(t0 * math.log(q0) + (1 - t0) * math.log(1 - q0))
    assert parts["domain_mixup"] == pytest.approx(expected, rel=1e-5)
    assert loss.item() == pytest.approx(0.5 * expected, rel=1e-5)
