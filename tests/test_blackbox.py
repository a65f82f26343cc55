import pytest
import torch

from b2kd.blackbox import BlackBoxError, BudgetExceeded, LocalBackend
from b2kd.edge import BlackBoxTeacher, Ledger, image_hashes
from b2kd.models import build_model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("lenet5", num_classes=10, in_channels=1, image_size=28).eval()


def _images(n, seed=0):
    return torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _teacher(model, tmp_path, kind="soft", budget=None):
    return BlackBoxTeacher(LocalBackend(model, kind), Ledger(tmp_path / "ledger.sqlite"), budget=budget)


def test_hashes_depend_on_bytes_and_shape():
    x = _images(3)
    h = image_hashes(x)
    assert len(set(h)) == 3 and h == image_hashes(x.clone())
    y = x.clone()
    y[0, 0, 0, 0] ^= 1
    assert image_hashes(y)[0] != h[0]
    assert image_hashes(x.reshape(3, 1, 14, 56))[0] != h[0]
    with pytest.raises(TypeError):
        image_hashes(x.float())


def test_local_backend_answers_like_the_model(model):
    x = _images(5)
    soft = LocalBackend(model, "soft").infer(x)
    with torch.no_grad():
        expected = torch.softmax(model(x), 1)
    assert torch.allclose(soft.responses, expected, atol=1e-6)
    assert soft.bytes_sent == [784] * 5 and soft.bytes_received == [40] * 5
    hard = LocalBackend(model, "hard").infer(x)
    assert torch.equal(hard.responses.argmax(1), expected.argmax(1))
    assert hard.bytes_received == [4] * 5
    with pytest.raises(BlackBoxError, match="uint8"):
        LocalBackend(model).infer(x.float())
    with pytest.raises(BlackBoxError, match="shape"):
        LocalBackend(model).infer(torch.zeros(1, 1, 32, 32, dtype=torch.uint8))


def test_ledger_records_every_query_and_bytes(model, tmp_path):
    teacher = _teacher(model, tmp_path)
    out = teacher.query(_images(10))
    assert out.shape == (10, 10)
    totals = teacher.ledger.totals()
    assert totals == {"queries": 10, "bytes_sent": 7840, "bytes_received": 400, "refused_answers": 0,
                      "refused_bytes": 0}
    hashes, imgs = teacher.ledger.images()
    assert len(hashes) == 10 and torch.equal(imgs, _images(10))


def test_cache_hits_are_free_and_identical(model, tmp_path):
    teacher = _teacher(model, tmp_path)
    x = _images(8)
    first = teacher.query(x)
    again = teacher.query(torch.cat([x[:4], x[:4]]))  # repeats, also within one batch
    assert teacher.spent == 8 and teacher.cache_hits == 8
    assert torch.equal(again[:4], first[:4]) and torch.equal(again[4:], first[:4])
    dup = teacher.query(torch.cat([_images(1, seed=5)] * 3))  # 3 copies of a new image: paid once
    assert teacher.spent == 9 and torch.equal(dup[0], dup[2])


def test_cache_survives_reopening(model, tmp_path):
    x = _images(6)
    first = _teacher(model, tmp_path).query(x)
    reopened = _teacher(model, tmp_path, budget=6)
    assert torch.equal(reopened.query(x), first)
    assert reopened.spent == 6


def test_budget_refuses_before_sending_and_loses_nothing(model, tmp_path):
    teacher = _teacher(model, tmp_path, budget=10)
    teacher.query(_images(6))
    with pytest.raises(BudgetExceeded, match="6 of 10"):
        teacher.query(_images(5, seed=1))
    assert teacher.spent == 6  # nothing of the refused batch was sent or recorded
    teacher.query(torch.cat([_images(6), _images(4, seed=2)]))  # cached + 4 new fits exactly
    assert teacher.spent == 10 and teacher.remaining == 0
    with pytest.raises(BudgetExceeded):
        teacher.query(_images(1, seed=3))


def test_private_images_sent_detects_exact_copies(model, tmp_path):
    teacher = _teacher(model, tmp_path)
    private = _images(20, seed=7)
    teacher.query(_images(10))
    assert teacher.ledger.private_images_sent(private) == 0
    teacher.query(private[:3])
    assert teacher.ledger.private_images_sent(private) == 3


def test_response_kinds_cache_separately(model, tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    x = _images(4)
    BlackBoxTeacher(LocalBackend(model, "soft"), ledger).query(x)
    hard = BlackBoxTeacher(LocalBackend(model, "hard"), ledger)
    out = hard.query(x)
    assert ledger.count() == 8 and set(out.unique().tolist()) <= {0.0, 1.0}


def test_images_not_kept_when_asked(model, tmp_path):
    teacher = BlackBoxTeacher(LocalBackend(model), Ledger(tmp_path / "l.sqlite", keep_images=False))
    teacher.query(_images(3))
    assert teacher.ledger.images() == ([], None)
    assert teacher.ledger.private_images_sent(_images(3)) == 3  # hashes alone prove it


def _open_ledger(path: str, barrier, results) -> None:
    barrier.wait(timeout=300)  # a loaded machine may take minutes to start a spawned torch process
    try:
        Ledger(path).close()
        results.put("ok")
    except Exception as error:  # the race this test is about: sqlite3's "database is locked"
        results.put(repr(error))


def test_processes_opening_one_new_ledger_at_once_all_succeed(tmp_path):
    # before Ledger retried, 6 processes opening a new ledger together failed in most trials
    # (SQLite breaks the lock deadlock of two WAL switches by refusing one at once)
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    for attempt in range(3):  # the race is timing-dependent: three new ledgers
        barrier, results = ctx.Barrier(6), ctx.Queue()
        path = str(tmp_path / f"shared-{attempt}.sqlite")
        procs = [ctx.Process(target=_open_ledger, args=(path, barrier, results)) for _ in range(6)]
        for p in procs:
            p.start()
        outcomes = [results.get(timeout=600) for _ in procs]
        for p in procs:
            p.join(timeout=60)
        assert outcomes == ["ok"] * 6
