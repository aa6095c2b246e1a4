"""Configs: presets by name, YAML files, dotted overrides checked against the dataclasses."""

import re

import pytest

from conftest import gptcore_here
from gptcore.cli import main
from gptcore.config import key_table, load_config, preset_names
from gptcore.errors import UserInputError


def test_presets_match_their_references():
    seed = load_config("seed")
    assert (seed.model.n_layer, seed.model.n_head, seed.model.n_embd, seed.model.block_size) == (8, 8, 512, 512)
    assert (seed.model.dropout, seed.train.batch_size, seed.train.lr, seed.train.max_iters) == (0.2, 64, 3e-4, 5000)
    ref = load_config("shakespeare_char")
    assert (ref.model.n_layer, ref.model.n_head, ref.model.n_embd, ref.model.block_size) == (6, 6, 384, 256)
    assert (ref.train.batch_size, ref.train.lr, ref.train.max_iters, ref.model.dropout) == (64, 1e-3, 5000, 0.2)
    assert {"seed", "shakespeare_char", "cpu", "tiny"} <= set(preset_names())


def test_overrides_are_parsed_by_field_type():
    config = load_config("tiny", ["model.n_layer=4", "train.lr=3e-4", "train.deterministic=true",
                                  "data.path=/tmp/x.txt", "out_dir=runs/a", "train.max_iters=1e2"])
    assert config.model.n_layer == 4 and isinstance(config.model.n_layer, int)
    assert config.train.lr == 3e-4
    assert config.train.deterministic is True
    assert (config.data.path, config.out_dir, config.train.max_iters) == ("/tmp/x.txt", "runs/a", 100)


def test_compile_takes_auto_or_a_yes_no_from_the_command_line_and_yaml(tmp_path):
    assert load_config("tiny").train.compile == "auto"
    assert load_config("tiny", ["train.compile=true"]).train.compile == "true"
    path = tmp_path / "mine.yaml"
    path.write_text("train:\n  compile: false\n")
    assert load_config(str(path)).train.compile == "false"
    with pytest.raises(UserInputError, match="train.compile must be one of auto, true, false"):
        load_config("tiny", ["train.compile=maybe"])


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("model:\n  n_layer: 3\ntrain:\n  lr: 0.01\n")
    config = load_config(str(path), ["train.lr=0.02"])
    assert config.model.n_layer == 3 and config.train.lr == 0.02


@pytest.mark.parametrize("override, expected", [
    ("model.n_layers=4", "did you mean model.n_layer"),
    ("train.learning_rate=1", "did you mean train.lr"),
    ("trian.max_iters=5", "did you mean train.max_iters"),
])
def test_typo_names_the_closest_key(override, expected):
    with pytest.raises(UserInputError, match=expected):
        load_config("tiny", [override])


@pytest.mark.parametrize("override, expected", [
    ("model.n_layer=four", "needs an integer"),
    ("model.n_layer=2.5", "needs an integer"),
    ("train.lr=fast", "needs a number"),
    ("train.deterministic=maybe", "needs true or false"),
    ("train.lr=-1", "must be positive"),
    ("model.n_embd=33", "divisible by model.n_head"),
    ("model.dropout=1.5", "model.dropout"),
    ("train.scaling=diagonal", "must be one of strong, weak"),
    ("train.max_iters", "not of the form key=value"),
])
def test_bad_values_are_rejected(override, expected):
    with pytest.raises(UserInputError, match=expected):
        load_config("tiny", [override])


def test_unknown_preset_lists_the_presets():
    with pytest.raises(UserInputError, match="presets: cpu"):
        load_config("nosuchpreset")


def test_nanogpt_names_point_to_ours():
    with pytest.raises(UserInputError, match="did you mean train.grad_accum"):
        load_config("tiny", ["gradient_accumulation_steps=4"])


def test_gptcore_config_lists_every_key_with_its_value_and_meaning(capsys):
    listed = gptcore_here(capsys, "config", "--config", "fast", "train.lr=1e-3")
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line for line in listed.stdout.splitlines()[1:]}
    assert set(rows) == {key for key, *_ in key_table(load_config())}
    assert rows["train.lr"].split()[1:3] == ["float", "0.001"]
    assert "'muon'" in rows["train.optimizer"] and "Muon on the blocks' matrices" in rows["train.optimizer"]
    assert "[auto | true | false]" in rows["log.tensorboard"]  # choices its comment does not spell out
    typo = gptcore_here(capsys, "config", "train.lrr=1")
    assert typo.returncode == 2 and "did you mean train.lr" in typo.stderr


def test_help_names_every_preset_and_says_each_default_once(capsys):
    for command in ("prepare", "train", "config", "sample", "eval", "quantize", "export", "import"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "(default: None)" not in text and "(default: )" not in text, command
        assert not re.search(r"default[^()]*\) \(default:", text), command
        if command in ("train", "config"):
            assert all(name in text for name in preset_names()), command
        if command == "prepare":
            assert "--clean {none,seed} none: the text as it is" in text

