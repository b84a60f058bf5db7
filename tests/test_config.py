"""Bad configs and arguments exit 2 with the key named, before TensorFlow is imported."""

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from daemon.errors import ConfigError
from daemon.service import config as config_module
from daemon.service.addresses import show_broker

BAD = [
    ("inbox: [a, b]\n", "inbox", "expected a path"),
    ("save: ''\n", "save", "expected a path"),
    ("inbox: same\nsave: same\n", "save", "must differ from inbox"),
    ("data: 5\n", "data", "expected a mapping"),
    ("data: {source: internet}\n", "data.source", "one of auto, keras, sample, path, folder"),
    ("data: {source: folder}\n", "data.path", "a folder of class folders"),
    ("data: {source: folder, path: nowhere}\n", "data.path", "is not a folder"),
    ("data: {source: folder, path: .}\nclassify: {labels: [a, b]}\n", "classify.labels",
     "the class names are the folder names"),
    ("train: {epochs_per_update: 0}\n", "train.epochs_per_update", "from 1 to"),
    ("classify: {checkpoint: worst}\n", "classify.checkpoint", "one of best, newest"),
    ("data: {source: path}\n", "data.path", "expected a folder"),
    ("data: {path: 3}\n", "data.path", "expected a path or null"),
    ("model: resnet\n", "model", "one of auto, mlp, cnn, efficientnet_lite0"),
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
    ("data: []\n", "data", "expected a mapping of keys, got []"),
    ("train: 0\n", "train", "expected a mapping of keys, got 0"),
    ("classify: false\n", "classify", "expected a mapping of keys, got False"),
    ("watch: yes\n", "watch", "expected a mapping of keys, got True"),
    ("classify: {extensions: [png jpg]}\n", "classify.extensions", "one per entry"),
    ("classify: {extensions: [png, '']}\n", "classify.extensions", "one per entry"),
    ("classify: {extensions: ['*.png']}\n", "classify.extensions", "one per entry"),
    ("classify: {extensions: [png, json]}\n", "classify.extensions", "json cannot be"),
    ("classify: {extensions: [txt]}\n", "classify.extensions", "txt cannot be"),
    ("classify: {extensions: [.TMP, png]}\n", "classify.extensions", "tmp cannot be"),
    ("watch: {mode: fast}\n", "watch.mode", "one of auto, inotify, poll"),
    ("watch: {poll_seconds: 0}\n", "watch.poll_seconds", "a number of seconds above 0, got 0"),
    ("watch: {poll_seconds: -0.5}\n", "watch.poll_seconds", "above 0"),
    ("watch: {poll_seconds: true}\n", "watch.poll_seconds", "above 0, got True"),
    ("watch: {poll_seconds: '2'}\n", "watch.poll_seconds", "above 0, got '2'"),
    ("watch: {poll_seconds: .inf}\n", "watch.poll_seconds", "above 0"),
    ("watch: {rescan_seconds: -1}\n", "watch.rescan_seconds", "of at least 0, got -1"),
    ("watch: {rescan_seconds: null}\n", "watch.rescan_seconds", "of at least 0, got None"),
    ("watch: {interval: 3}\n", "watch.interval", "unknown key"),
    ("metrics: {listen: 9464}\n", "metrics.listen", 'as "HOST:PORT"'),
    ("metrics: {listen: '127.0.0.1'}\n", "metrics.listen", 'as "HOST:PORT"'),
    ("metrics: {listen: ':9464'}\n", "metrics.listen", 'as "HOST:PORT"'),
    ("metrics: {listen: '::1:9464'}\n", "metrics.listen", 'as "HOST:PORT"'),
    ("metrics: {listen: '127.0.0.1:0'}\n", "metrics.listen", "a port from 1 to 65535"),
    ("metrics: {listen: '127.0.0.1:65536'}\n", "metrics.listen", "a port from 1 to 65535"),
    ("metrics: {listen: 'no such host:80'}\n", "metrics.listen", 'as "HOST:PORT"'),
    ("metrics: {listen: 'nosuchhost.invalid:9464'}\n", "metrics.listen", "cannot resolve"),
    ("metrics: {port: 9464}\n", "metrics.port", "unknown key"),
    ("metrics: on\n", "metrics", "expected a mapping"),
    ("cluster: {broker: 'http://127.0.0.1:6379'}\n", "cluster.broker", "a Redis URL"),
    ("cluster: {broker: 'redis://'}\n", "cluster.broker", "a Redis URL"),
    ("cluster: {broker: 'redis://h:70000/0'}\n", "cluster.broker", "a Redis URL"),
    ("cluster: {broker: 'redis://h/zero'}\n", "cluster.broker", "a Redis URL"),
    ("cluster: {broker: 6379}\n", "cluster.broker", "a Redis URL"),
    ("cluster: {broker: 'http://:pw@h:1'}\n", "cluster.broker", "got 'http://:***@h:1'"),
    ("cluster: {paths: [/a, /b]}\n", "cluster.paths", "a mapping of absolute path prefixes"),
    ("cluster: {paths: {a: /b}}\n", "cluster.paths", "a mapping of absolute path prefixes"),
    ("cluster: {brokers: x}\n", "cluster.brokers", "unknown key"),
    ("web: {listen: 8080}\n", "web.listen", 'as "HOST:PORT"'),
    ("web: {listen: '0.0.0.0:8080'}\n", "web.token", "required when web.listen (0.0.0.0:8080) "
     "is not a loopback address"),
    ("web: {listen: '127.0.0.1:8080'}\nclassify: {sidecar: txt}\n", "web.listen",
     "needs classify.sidecar json"),
    ("web: {listen: '127.0.0.1:8080'}\nmetrics: {listen: '127.0.0.1:8080'}\n", "web.listen",
     "must differ from metrics.listen"),
    ("web: {listen: '0.0.0.0:8080', token: short}\n", "web.token", "at least 16 characters"),
    ("web: {listen: '127.0.0.1:8080', token: [a]}\n", "web.token", "at least 16 characters"),
    ("web: {port: 8080}\n", "web.port", "unknown key"),
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


def write_linked(tmp_path):
    """tmp_path/real, and tmp_path/link -> real."""
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")


OVERLAPS = [  # (config, key named, words in the message)
    ("inbox: a\nsave: b/../a\n", "save", "must differ from inbox"),
    ("inbox: a\nsave: a/save\n", "save", "must not be nested with inbox"),
    ("inbox: s/inbox\nsave: s\n", "save", "must not be nested with inbox"),
    ("inbox: real\nsave: link\n", "save", "must differ from inbox"),
    ("inbox: real\nsave: link/save\n", "save", "must not be nested with inbox"),
    ("inbox: link/inbox\nsave: real\n", "save", "must not be nested with inbox"),
    ("data: {path: inbox}\n", "data.path", "must differ from inbox"),
    ("data: {source: path, path: save/data}\n", "data.path", "nested with save"),
    ("inbox: d/inbox\ndata: {path: d}\n", "data.path", "nested with inbox"),
    ("save: link/save\ndata: {path: real/../real}\n", "data.path", "nested with save"),
    ("inbox: real/inbox\ndata: {source: folder, path: link}\n", "data.path",
     "nested with inbox"),
    ("data: {source: folder, path: link/pictures/save/..}\nsave: real/pictures\n",
     "data.path", "must differ from save"),
]


@pytest.mark.parametrize("text,key,expected", OVERLAPS, ids=[c[0] for c in OVERLAPS])
def test_overlapping_folders_name_the_key(tmp_path, text, key, expected):
    """The daemon would read its own output: also through `..` and symlinks."""
    write_linked(tmp_path)
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        config_module.load(path)
    assert caught.value.key == key and expected in str(caught.value), str(caught.value)


@pytest.mark.parametrize("text", ["data:\ntrain: null\n", "inbox: in\nsave: inside\n",
                                  "inbox: real/in\nsave: link/save\ndata: {path: real/d}\n"])
def test_defaults_and_neighbouring_folders_are_fine(tmp_path, text):
    write_linked(tmp_path)
    path = tmp_path / "config.yaml"
    path.write_text(text)
    loaded = config_module.load(path)
    assert loaded.train == config_module.Train() and loaded.data.source == "auto"


def test_watch_settings_and_extensions(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("watch: {mode: poll, poll_seconds: 0.25, rescan_seconds: 0}\n"
                    "classify: {extensions: [.PNG, jpg, png, jp2]}\n")
    loaded = config_module.load(path)
    assert loaded.watch == config_module.Watch(mode="poll", poll_seconds=0.25, rescan_seconds=0)
    assert loaded.classify.extensions == ("jp2", "jpg", "png")
    assert "watch.mode=poll watch.poll_seconds=0.25 watch.rescan_seconds=0" in loaded.summary()
    defaults = config_module.parse({}, tmp_path).watch
    assert (defaults.mode, defaults.poll_seconds, defaults.rescan_seconds) == ("auto", 5, 3600)


def test_differences_names_the_changed_keys(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    before = tmp_path / "a" / "config.yaml"
    before.write_text("inbox: ../in\nsave: ../save\ntrain: {epochs: 5}\n")
    same = tmp_path / "b" / "config.yaml"  # another file, same effective values
    same.write_text("inbox: ../in\nsave: ../save\ntrain: {epochs: 5, seed: 0}\nwatch:\n")
    after = tmp_path / "b" / "changed.yaml"
    labels = list(config_module.DEFAULT_LABELS[:9]) + ["Boot"]
    after.write_text(f"inbox: ../in\nsave: ../save\ntrain: {{epochs: 6}}\n"
                     f"classify: {{labels: {labels}}}\n")
    old = config_module.load(before)
    assert old.differences(config_module.load(same)) == []
    assert old.differences(config_module.load(after)) == ["classify.labels", "train.epochs"]
    assert config_module.load(after).differences(old) == ["classify.labels", "train.epochs"]


def run_cli(*args, cwd=REPO):
    """Run the CLI in a fresh interpreter; report whether TensorFlow got imported."""
    code = ("import sys; from daemon.__main__ import main; code = main(sys.argv[1:]); "
            "print('TF-IMPORTED' if 'tensorflow' in sys.modules else 'NO-TF', file=sys.stderr); "
            "sys.exit(code)")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          cwd=cwd, timeout=60)


@pytest.mark.parametrize("text,key", [("train: {epochs: ten}\n", "train.epochs"),
                                      ("model: resnet\n", "model"),
                                      ("data: []\n", "data"),
                                      ("inbox: x\nsave: x/../x/save\n", "save"),
                                      ("data: {source: path, path: nowhere}\n", "data.path"),
                                      ("metrics: {listen: localhost}\n", "metrics.listen"),
                                      ("web: {listen: '0.0.0.0:8080'}\n", "web.token")])
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


@pytest.mark.parametrize("text, key, message", [
    ("inbox: a\ninbox: b\n", "inbox", "given twice (line 2)"),
    ("train:\n  epochs: 3\n  epochs: 4\n", "epochs", "given twice (line 3)"),
    ("inbox: afile\n", "inbox", "afile exists and is not a folder"),
    ("save: afile\n", "save", "afile exists and is not a folder"),
])
def test_duplicate_keys_and_files_where_folders_go(tmp_path, text, key, message):
    (tmp_path / "afile").write_text("a file, not a folder\n")
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as raised:
        config_module.load(path)
    assert raised.value.key == key and message in str(raised.value)


def test_the_brokers_password_is_never_shown(tmp_path):
    """The broker's URL goes into the start-up line, status and errors: never its password."""
    path = tmp_path / "config.yaml"
    path.write_text("cluster: {broker: 'redis://user:s3cret@127.0.0.1:6390/2', "
                    "paths: {/srv/photos/: /mnt/photos, /srv: /mnt/srv}}\n")
    loaded = config_module.load(path, worker=True)
    assert loaded.cluster.broker == "redis://user:s3cret@127.0.0.1:6390/2"
    assert loaded.cluster.paths == (("/srv/photos", "/mnt/photos"), ("/srv", "/mnt/srv"))
    assert "cluster.broker=redis://user:***@127.0.0.1:6390/2" in loaded.summary()
    assert "s3cret" not in loaded.summary()
    assert config_module.load(tmp_path / "config.yaml").cluster.broker is not None
    for url, shown in [("redis://127.0.0.1:6390/0?password=s3cret", "redis://127.0.0.1:6390/0?password=***"),
                       ("unix:///run/redis.sock?db=1&Password=s3cret", "unix:///run/redis.sock?db=1&Password=***"),
                       ("rediss://:s3cret@h/0", "rediss://:***@h/0"),
                       ("redis://h:6379/0", "redis://h:6379/0")]:
        assert show_broker(url) == shown


def test_a_worker_does_not_look_at_the_coordinators_folders(tmp_path):
    """The coordinator's inbox and data folder are not on a worker's machine (or elsewhere)."""
    path = tmp_path / "config.yaml"
    path.write_text("data: {source: folder, path: /no/such/photos}\n"
                    "cluster: {broker: 'redis://127.0.0.1:6390/0'}\n")
    with pytest.raises(ConfigError, match="data.path"):
        config_module.load(path)
    assert config_module.load(path, worker=True).data.path == Path("/no/such/photos")


def test_a_cluster_without_its_libraries_names_the_extra(tmp_path, monkeypatch):
    """`cluster.broker` on an install without the [cluster] extra: exit 2 saying what to
    install, not an ImportError once TensorFlow has loaded."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "dramatiq" else find_spec(name, *args))
    path = tmp_path / "config.yaml"
    path.write_text("cluster: {broker: 'redis://127.0.0.1:6390/0'}\n")
    with pytest.raises(ConfigError, match=r"cluster.broker: the cluster needs Dramatiq .* "
                                          r"pip install 'wardrobe\[cluster\]'"):
        config_module.load(path)


def test_the_web_token_is_never_shown(tmp_path):
    """Not in an error about it, nor in the effective config the start-up log gives."""
    secret = "not-a-good-token!" + "x" * 20  # a character a token may not have
    path = tmp_path / "config.yaml"
    path.write_text(f"web: {{listen: '0.0.0.0:8080', token: '{secret}'}}\n")
    result = run_cli("run", "--config", str(path))
    assert result.returncode == 2 and "web.token: expected at least 16" in result.stderr
    assert secret not in result.stderr
    good = "a" * 20 + "-Token_0"
    path.write_text(f"web: {{listen: '0.0.0.0:8080', token: '{good}'}}\n")
    config = config_module.load(path)
    assert config.web.token == good and config.web.listen == ("0.0.0.0", 8080)
    assert good not in config.summary() + repr(config) and "web.token=set" in config.summary()
