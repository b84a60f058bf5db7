"""Fashion-MNIST from keras.datasets, an IDX folder, or the sample bundled in the package;
the listing of a folder of class folders (the folder source)."""

import gzip
import hashlib
import logging
import os
import stat
from pathlib import Path

import numpy as np

from daemon import fsutil
from daemon.errors import ConfigError, WardrobeError

log = logging.getLogger("daemon.dataset")  # the name users see: daemon.service.logs

SAMPLE = Path(__file__).parent / "fashion-mnist-sample"  # package data of daemon.data
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


class Dataset:
    """uint8 images (N, 28, 28) and labels (N,), with where they came from."""

    def __init__(self, train, test, origin):
        (self.x_train, self.y_train), (self.x_test, self.y_test) = train, test
        self.origin = origin

    def digest(self, with_test=False):
        """Identifies the data (a data version records it: made again only if it changes)."""
        digest = hashlib.sha256(self.x_train.tobytes())
        digest.update(self.y_train.tobytes())
        if with_test:
            digest.update(self.x_test.tobytes())
            digest.update(self.y_test.tobytes())
        return digest.hexdigest()[:16]

    def __str__(self):
        return f"{self.origin}: {len(self.x_train)} training and {len(self.x_test)} test images"


def load(source, path=None):
    """`source` is one of auto, keras, sample, path (see config.yaml)."""
    if source == "sample":
        return read_idx_folder(SAMPLE, "bundled sample")
    if source == "path":
        return read_idx_folder(path, str(path))
    try:
        import keras

        train, test = keras.datasets.fashion_mnist.load_data()
        return Dataset(train, test, "keras.datasets.fashion_mnist")
    except Exception as error:  # keras raises bare Exception on a failed download
        if source == "keras":
            raise WardrobeError(f"keras.datasets.fashion_mnist failed: {error}") from None
        log.warning("keras.datasets.fashion_mnist is unavailable (%s); falling back to the "
                    "bundled sample (8,226 training images)", str(error).splitlines()[0][:200])
        return read_idx_folder(SAMPLE, "bundled sample")


def read_idx_folder(folder, origin):
    """Read the four Fashion-MNIST IDX files (gzipped or not) from `folder`."""
    folder = Path(folder)
    arrays = {key: _read_idx(find_file(folder, name)) for key, name in FILES.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != images.shape[:1]:
            raise WardrobeError(f"{folder}: {split} images {images.shape} and labels "
                                f"{labels.shape} are not 28x28 images with one label each")
    return Dataset((arrays["train_images"], arrays["train_labels"]),
                   (arrays["test_images"], arrays["test_labels"]), origin)


def write_idx_folder(folder, train, test):
    """Write images and labels as gzipped IDX files (for tests and benchmarks)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    values = {"train_images": train[0], "train_labels": train[1],
              "test_images": test[0], "test_labels": test[1]}
    for key, name in FILES.items():
        array = np.ascontiguousarray(values[key], dtype=np.uint8)
        header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
            int(size).to_bytes(4, "big") for size in array.shape)
        with gzip.open(folder / f"{name}.gz", "wb", compresslevel=1) as file:
            file.write(header + array.tobytes())


def check(data):
    """A missing data.path is a config error, reported before TensorFlow is imported."""
    if data.source == "path":
        try:
            for name in FILES.values():
                find_file(data.path, name)
        except WardrobeError as error:
            raise ConfigError("data.path", str(error)) from None


def find_file(folder, name):
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    raise WardrobeError(f"{folder}: missing {name}.gz (data.path must hold the four "
                        "Fashion-MNIST IDX files)")


def _read_idx(path):
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as file:
            data = file.read()
    except (OSError, EOFError) as error:
        raise WardrobeError(f"{path}: unreadable ({error})") from None
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise WardrobeError(f"{path}: not an IDX file of unsigned bytes")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    body = data[4 + 4 * ndim:]
    if len(body) != int(np.prod(shape)):
        raise WardrobeError(f"{path}: header says {shape}, body holds {len(body)} bytes")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


def _visible(entry):
    return not entry.name.startswith(".")


def list_folder(root, is_image_name):
    """({relative path: (class name, size, mtime_ns, ino)} of the images under
    DIR/<class>/, [names skipped: loose files, links, not regular files], [(relative path,
    why) of folders inside that cannot be listed now]). Hidden names are ignored; symbolic
    links are never followed (as in the inbox). DIR that cannot be listed is an OSError."""
    found, ignored, unlisted = {}, [], []
    skip = len(root.rstrip("/")) + 1  # relative paths by slicing: os.path.relpath is slow
    with os.scandir(root) as entries:  # an OSError here is the caller's
        classes = sorted((entry for entry in entries if not entry.name.startswith(".")),
                         key=lambda entry: entry.name)
    for entry in classes:
        if entry.is_symlink() or not entry.is_dir(follow_symlinks=False):
            if is_image_name(entry.name) or entry.is_symlink():
                ignored.append(entry.name)
            continue
        for folder, items, error in fsutil.walk(entry.path, _visible):
            if isinstance(error, FileNotFoundError):
                continue  # gone meanwhile
            if error is not None:  # a permission, a share: may go away
                unlisted.append((folder[skip:], error.strerror))
                continue
            for item in items:
                if item.name.startswith(".") or item.is_dir(follow_symlinks=False):
                    continue  # hidden, or a folder (walked next)
                if is_image_name(item.name):
                    if item.is_symlink():
                        ignored.append(item.path[skip:])
                        continue
                    try:
                        info = item.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # gone meanwhile
                    if stat.S_ISREG(info.st_mode):
                        found[item.path[skip:]] = (entry.name, info.st_size,
                                                   info.st_mtime_ns, info.st_ino)
                    else:
                        ignored.append(item.path[skip:])
    return found, ignored, unlisted
