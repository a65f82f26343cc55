import pytest
import torch

from b2kd.core.checkpoint import CheckpointError, read, save_classifier, save_generator
from b2kd.models import Generator, build_model, load_classifier, load_generator


def test_classifier_round_trip_keeps_weights_and_meta(tmp_path):
    torch.manual_seed(0)
    model = build_model("lenet5", 10, 1, 28).eval()
    save_classifier(model, tmp_path / "m.pt", test_acc=0.5, dataset="mnist")
    again, meta = load_classifier(tmp_path / "m.pt")
    x = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    assert torch.equal(again(x), model(x))
    assert meta["test_acc"] == 0.5 and meta["dataset"] == "mnist" and "b2kd_version" in meta
    assert not list(tmp_path.glob("*.tmp"))


def test_generator_loads_frozen(tmp_path):
    save_generator(Generator(10, 28, 1, (16, 8)), tmp_path / "g.pt")
    gen, _ = load_generator(tmp_path / "g.pt")
    assert not gen.training and not any(p.requires_grad for p in gen.parameters())


def test_wrong_missing_or_corrupt_checkpoints_are_clear(tmp_path):
    save_generator(Generator(10, 28, 1, (16, 8)), tmp_path / "g.pt")
    with pytest.raises(CheckpointError, match="holds a generator, expected a classifier"):
        load_classifier(tmp_path / "g.pt")
    with pytest.raises(CheckpointError, match="not found"):
        read(tmp_path / "missing.pt")
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupted"):
        read(tmp_path / "bad.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a b2kd checkpoint"):
        read(tmp_path / "foreign.pt")
