"""The typed config: presets, dotted overrides, validation messages that name the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vixml_ray.config import Config, check_overrides, load_config, replace, save_config
from vixml_ray.errors import ConfigError


def test_defaults_and_overrides() -> None:
    cfg = load_config(None, ["train.epochs=3", "model.lora.r=8", "prompt.sequence=[E,EOS]"])
    assert cfg.train.epochs == 3 and cfg.model.lora.r == 8 and cfg.prompt.sequence == ["E", "EOS"]
    changes = {"train.epochs": 3, "model.lora.r": 8, "prompt.sequence": ["E", "EOS"]}
    assert cfg == replace(Config(), **changes)  # everything else is the schema's default


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.epoch=3", "did you mean 'train.epochs'"),
        ("trian.epochs=3", "did you mean 'train'"),
        ("data.synthetic.num_topic=3", "did you mean 'data.synthetic.num_topics'"),
        ("train.epochs=abc", "invalid value for 'train.epochs'"),
        ("model.kind=foo", "'model.kind': 'foo' (choices: auto, encoder, decoder)"),
        ("train.epochs=-1", "'train.epochs': -1 (must be >= 0)"),
        ("prompt.sequence=[E,X]", "unknown part 'X'"),
        ("train.epochs", "not of the form key=value"),
    ],
)
def test_bad_overrides_name_the_key(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert fragment in str(err.value)


def test_overrides_are_checked_against_the_schema_alone() -> None:
    """What a job checks before reading the config the overrides apply to (an export's): keys, types, ranges; not
    the cross-field rules, which depend on that config."""
    check_overrides(["infer.max_actors=2", "vision.num_cpus_per_actor=0.5"])  # equal to decode_num_cpus: cross-field
    for override, fragment in [("train.epoch=3", "did you mean 'train.epochs'"),
                               ("infer.batch_size=0", "'infer.batch_size': 0 (must be >= 1)"),
                               ("eval.k=x", "invalid value for 'eval.k'")]:
        with pytest.raises(ConfigError, match=re.escape(fragment)):
            check_overrides([override])


def test_preset_typo_names_file_and_key(tmp_path: Path) -> None:
    base = tmp_path / "base.yaml"
    base.write_text("train:\n  epochs: 7\n")
    child = tmp_path / "child.yaml"
    child.write_text("extends: base.yaml\nmodel:\n  max_lenght: 16\n")
    with pytest.raises(ConfigError) as err:
        load_config(child)
    assert str(child) in str(err.value) and "did you mean 'model.max_length'" in str(err.value)
    child.write_text("extends: base.yaml\nmodel:\n  max_length: 16\n")
    cfg = load_config(child)
    assert cfg.train.epochs == 7 and cfg.model.max_length == 16


def test_missing_preset_lists_presets() -> None:
    with pytest.raises(ConfigError, match="config file not found: no-such-preset"):
        load_config("no-such-preset")


def test_save_and_reload_round_trip(tmp_path: Path) -> None:
    cfg = load_config(None, ["train.lr_backbone=0.001", "data.text_fields=[title,content]"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg


def test_replace_revalidates() -> None:
    cfg = load_config(None)
    assert replace(cfg, **{"train.epochs": 2}).train.epochs == 2
    with pytest.raises(ConfigError):
        replace(cfg, **{"train.margin_min": 0.5, "train.margin_max": 0.2})
