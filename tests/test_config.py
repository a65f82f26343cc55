import pytest
import yaml

import b2kd
from b2kd.core.config import ConfigError, load_config, parse_override, save_config


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


def test_an_older_run_config_with_removed_options_loads_with_one_line(tmp_path, caplog):
    """An older run's config.yaml names every option b2kd had then: the removed ones at the value b2kd
    kept are dropped without a word; one set otherwise is dropped with one warning line naming it."""
    old = yaml.safe_load(yaml.safe_dump(load_config().model_dump(mode="json")))
    old["deprivatize"].update({"init": "default", "diffaugment": [], "ema": None, "select": "last",
                               "select_from": 0.5, "balance_real": 0.0, "balance_from": 0.25,
                               "balance_fit_steps": 200, "balance_max_boost": 10.0})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(old))
    with caplog.at_level("WARNING", logger="b2kd"):
        assert load_config(path) == load_config()
    assert caplog.records == []
    old["deprivatize"].update({"ema": 0.999, "select": "score"})
    path.write_text(yaml.safe_dump(old))
    with caplog.at_level("WARNING", logger="b2kd"):
        assert load_config(path, overrides=["seed=1"]).seed == 1
    [line] = [r.getMessage() for r in caplog.records]
    assert str(path) in line and "\n" not in line
    assert "deprivatize.ema=0.999 (now always null)" in line and "deprivatize.select=\"score\"" in line


def test_a_generator_made_when_anchored_pools_coral_and_mixup_existed_still_loads(tmp_path, caplog):
    """Those three levers lost on dev and left the code; the GANs trained in between still serve."""
    old = load_config().model_dump(mode="json")
    old["distill"].update({"anchor_share": 0.0, "anchor_sd": 0.5, "anchor_floor": 0.05, "anchor_per": 4,
                           "anchor_weight": 1.0, "coral_weight": 0.0, "mixup_share": 0.0})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(old))
    with caplog.at_level("WARNING", logger="b2kd"):
        assert load_config(path) == load_config()
    assert caplog.records == []


def test_a_removed_option_asked_for_is_one_clear_error():
    with pytest.raises(ConfigError, match=r"deprivatize.ema is no longer an option: .* deprivatize.ema=null"):
        load_config(overrides=["deprivatize.ema=0.999"])
    with pytest.raises(ConfigError, match="deprivatize.balance_real is no longer an option"):
        load_config(None, {"deprivatize.balance_real": 0.5})
    assert load_config(overrides=["deprivatize.select=last"]) == load_config()  # what b2kd does anyway


def test_bench_reuse_sees_a_removed_option_that_was_set():
    from b2kd.core.config_diff import differences

    now = load_config()
    stored = now.model_dump(mode="json")
    stored["deprivatize"]["ema"] = None
    assert differences(stored, now) == []
    stored["deprivatize"]["ema"] = 0.999
    assert differences(stored, now) == ["deprivatize.ema: 0.999 -> removed, always None"]
    assert differences(stored, now, ("distill.",)) == []


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(overrides=["distill.response=hard", "data.image_size=32"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    stored = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert stored["distill"]["response"] == "hard"
    assert stored["b2kd_version"] == b2kd.__version__


def test_a_config_with_keys_this_version_does_not_know_names_who_wrote_it(tmp_path):
    tree = yaml.safe_load(yaml.safe_dump(load_config().model_dump(mode="json")))
    tree["distill"]["lever"] = 1
    tree["cloud"] = {"region": "x"}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"b2kd_version": "9.1.0", **tree}))
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides=["distill.epochs=many"])
    line = str(err.value)
    assert "\n" not in line
    assert line.startswith(f"{path} was written by b2kd 9.1.0 and sets keys b2kd {b2kd.__version__}"
                           " does not know: distill.lever, cloud;")
    assert "(also: distill.epochs: Input should be a valid integer" in line
    path.write_text(yaml.safe_dump(tree))
    with pytest.raises(ConfigError, match="names no b2kd version .* does not know: distill.lever, cloud"):
        load_config(path)
    with pytest.raises(ConfigError, match="^invalid configuration: distill.lever: Extra inputs"):
        load_config(overrides=["distill.lever=1"])  # not from a file: no version to name


@pytest.mark.parametrize("name", ["demo", "paper-mnist"])
def test_shipped_configs_load(name):
    from pathlib import Path

    cfg = load_config(Path(__file__).parent.parent / "configs" / f"{name}.yaml")
    assert cfg.data.dataset == "mnist"
