import pytest
import yaml

from b2kd.config import ConfigError, load_config, parse_override, save_config


def test_defaults_file_options_and_overrides_in_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("distill:\n  epochs: 7\n  budget: 1000\nseed: 3\n")
    cfg = load_config(path, {"distill.budget": 500, "distill.student": None},
                      ["distill.epochs=5", "distill.milestones=[1, 2]", "deprivatize.widths=[32,16]"])
    assert cfg.seed == 3
    assert cfg.distill.epochs == 5  # override beats file
    assert cfg.distill.budget == 500  # option beats file
    assert cfg.distill.student == "lenet5"  # None means "not given": the default
    assert cfg.distill.milestones == [1, 2]
    assert cfg.deprivatize.widths == (32, 16)


def test_override_values_parse_as_yaml():
    assert parse_override("a.b=1e-3") == ("a.b", 1e-3)
    assert parse_override("a.b=soft") == ("a.b", "soft")
    assert parse_override("a.b=topk:3") == ("a.b", "topk:3")
    with pytest.raises(ConfigError):
        parse_override("nonsense")


def test_unknown_keys_and_bad_values_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="distill.epoch"):
        load_config(overrides=["distill.epoch=3"])
    with pytest.raises(ConfigError, match="distill.epochs"):
        load_config(overrides=["distill.epochs=many"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(overrides=["distill.response=hard", "data.image_size=32"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["distill"]["response"] == "hard"


@pytest.mark.parametrize("name", ["demo", "paper-mnist"])
def test_shipped_configs_load(name):
    from pathlib import Path

    cfg = load_config(Path(__file__).parent.parent / "configs" / f"{name}.yaml")
    assert cfg.data.dataset == "mnist"
