"""Bad configs and arguments exit 2 with the key named, before TensorFlow is imported."""

import subprocess
import sys

import pytest

from conftest import REPO
from daemon import config as config_module
from daemon.errors import ConfigError

BAD = [
    ("inbox: [a, b]\n", "inbox", "expected a path"),
    ("save: ''\n", "save", "expected a path"),
    ("inbox: same\nsave: same\n", "save", "must differ from inbox"),
    ("data: 5\n", "data", "expected a mapping"),
    ("data: {source: internet}\n", "data.source", "one of auto, keras, sample, path"),
    ("data: {source: path}\n", "data.path", "expected a folder"),
    ("data: {path: 3}\n", "data.path", "expected a path or null"),
    ("model: resnet\n", "model", "one of mlp, cnn"),
    ("train: {epochs: ten}\n", "train.epochs", "expected a whole number of at least 1, got 'ten'"),
    ("train: {epochs: 0}\n", "train.epochs", "of at least 1"),
    ("train: {epochs: 2.5}\n", "train.epochs", "whole number"),
    ("train: {epochs: true}\n", "train.epochs", "whole number"),
    ("train: {batch_size: -1}\n", "train.batch_size", "from 1 to 65536"),
    ("train: {seed: -3}\n", "train.seed", "from 0 to"),
    ("train: {checkpoint_every: 0}\n", "train.checkpoint_every", "'epoch' or a positive number"),
    ("train: {checkpoint_every: often}\n", "train.checkpoint_every", "'epoch' or a positive"),
    ("train: {epoch: 3}\n", "train.epoch", "unknown key"),
    ("colour: blue\n", "colour", "unknown key"),
    ("classify: {labels: [a, b, c]}\n", "classify.labels", "a list of 10 non-empty names"),
    ("classify: {labels: [a, a, b, c, d, e, f, g, h, i]}\n", "classify.labels", "distinct"),
    ("classify: {sidecar: xml}\n", "classify.sidecar", "one of json, txt"),
    ("classify: {extensions: []}\n", "classify.extensions", "non-empty list"),
    ("train: [1, 2]\n", "train", "expected a mapping"),
    ("- just\n- a list\n", "config", "expected a mapping"),
    ("train: {epochs: 3\n", "config", "not valid YAML at line"),
]


@pytest.mark.parametrize("text,key,expected", BAD, ids=[case[1] + ":" + case[0][:20] for case in BAD])
def test_bad_value_names_its_key(tmp_path, text, key, expected):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        config_module.load(path)
    assert caught.value.key == key
    assert str(caught.value).startswith(f"{key}: ") and expected in str(caught.value)


def run_cli(*args, cwd=REPO):
    """Run the CLI in a fresh interpreter; report whether TensorFlow got imported."""
    code = ("import sys; from daemon.__main__ import main; code = main(sys.argv[1:]); "
            "print('TF-IMPORTED' if 'tensorflow' in sys.modules else 'NO-TF', file=sys.stderr); "
            "sys.exit(code)")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          cwd=cwd, timeout=60)


@pytest.mark.parametrize("text,key", [("train: {epochs: ten}\n", "train.epochs"),
                                      ("model: resnet\n", "model"),
                                      ("data: {source: path, path: nowhere}\n", "data.path")])
def test_run_exits_2_before_tensorflow(tmp_path, text, key):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    result = run_cli("run", "--config", str(path))
    assert result.returncode == 2, result.stderr
    assert f"ERROR daemon: {key}: " in result.stderr
    assert "NO-TF" in result.stderr


@pytest.mark.parametrize("args", [["run", "--bogus"], ["frobnicate"], [], ["status", "--json", "x"]])
def test_bad_arguments_exit_2(args):
    assert run_cli(*args).returncode == 2


def test_missing_config_file_exits_2(tmp_path):
    result = run_cli("status", "--config", str(tmp_path / "absent.yaml"))
    assert result.returncode == 2 and "config: cannot read" in result.stderr


def test_relative_paths_are_relative_to_the_config_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "config.yaml"
    path.write_text("inbox: in\nsave: ../out\ndata: {source: path, path: d}\n")
    loaded = config_module.load(path)
    assert loaded.inbox == tmp_path / "sub" / "in"
    assert loaded.save == tmp_path / "sub" / ".." / "out"
    assert loaded.data.path == tmp_path / "sub" / "d"


def test_shipped_config_is_the_defaults():
    shipped = config_module.load(REPO / "config.yaml")
    defaults = config_module.parse({}, REPO)
    assert shipped.train == defaults.train and shipped.classify == defaults.classify
    assert (shipped.model, shipped.data, shipped.inbox) == (defaults.model, defaults.data,
                                                           defaults.inbox)
