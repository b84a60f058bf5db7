"""Durable file writes: a new file is complete and fsynced before its rename makes it visible."""

import hashlib
import itertools
import os

_counter = itertools.count()


def temp_name(path):
    """A hidden, unique temporary name beside `path` (same folder, so rename is atomic)."""
    folder, name = os.path.split(os.fspath(path))
    return os.path.join(folder, f".{name}.{os.getpid()}-{next(_counter)}.tmp")


def is_temp_name(name):
    return name.startswith(".") and name.endswith(".tmp")


def write_new(path, data, sync_folder=True, durable=True):
    """Atomically replace `path` with `data`; returns the data's sha256 hex digest.

    The bytes go to a temporary file created with O_EXCL|O_NOFOLLOW (never through a planted
    symlink) and renamed over `path` (replacing a symlink there, never following it), so a
    reader sees the old file or the new one, never a part. `durable` fsyncs the file before
    the rename, so a crash cannot leave the new name with missing data; with sync_folder the
    rename itself is made durable too (callers renaming several files fsync the folder once).
    """
    tmp = temp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise
    if sync_folder:
        fsync_folder(os.path.dirname(os.fspath(path)) or ".")
    return hashlib.sha256(data).hexdigest()


def fsync_folder(folder):
    """Make renames and unlinks in `folder` durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _remove_quietly(path):
    try:
        os.unlink(path)
    except OSError:
        pass
