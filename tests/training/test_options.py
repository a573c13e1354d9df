"""The common training options: argparse wiring, defaults, validation."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from attn_training import TrainConfig, add_train_arguments


def _parse(*argv, **defaults):
    parser = argparse.ArgumentParser()
    add_train_arguments(parser, **defaults)
    return TrainConfig.from_args(parser.parse_args(list(argv)))


def test_defaults_match_the_dataclass():
    assert _parse() == TrainConfig()


def test_every_option_has_a_flag_and_a_help_line():
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    actions = {a.dest: a for a in parser._actions}
    for f in dataclasses.fields(TrainConfig):
        if f.name == "extra":
            continue
        assert f.name in actions, f.name
        assert actions[f.name].help, f.name
        assert f"--{f.name.replace('_', '-')}" in actions[f.name].option_strings


def test_values_and_app_defaults():
    config = _parse(
        "--output-dir",
        "runs/x",
        "--max-steps",
        "7",
        "--precision",
        "bf16",
        "--resume",
        "none",
        "--init-from",
        "ckpt",
        "--init-skip-mismatched",
        "--no-progress",
        batch_size=64,
        lr=3e-4,
    )
    assert config.output_dir == Path("runs/x")
    assert (config.max_steps, config.precision, config.resume) == (7, "bf16", "none")
    assert config.init_from == Path("ckpt") and config.init_skip_mismatched
    assert (config.batch_size, config.lr, config.progress) == (64, 3e-4, False)


def test_unknown_app_default_is_refused():
    with pytest.raises(TypeError, match="no training option named bogus"):
        add_train_arguments(argparse.ArgumentParser(), bogus=1)


def test_choices_are_enforced_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        _parse("--precision", "fp8")
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("batch_size", 0, "--batch-size must be at least 1"),
        ("ema", 1.0, "--ema must be in"),
        ("max_bad_fraction", 1.5, "--max-bad-fraction"),
        ("lr", 0.0, "--lr must be positive"),
        ("best_mode", "median", "--best-mode must be one of"),
    ],
)
def test_invalid_values_are_named(field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{field: value})


def test_val_interval_defaults_to_save_every():
    assert TrainConfig(save_every=25).val_interval == 25
    assert TrainConfig(save_every=25, val_every=10).val_interval == 10
