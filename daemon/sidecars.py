"""Sidecar files: `shoe.jpg` -> `shoe.jpg.json` (or `.txt`), written atomically.

A sidecar records the size, mtime and inode of the image it labels, so an image replaced
later (even by an older file) is seen as changed; a sidecar that is missing, empty or
unparsable means: label again. No fsync per sidecar: after a power cut a lost or empty
sidecar is simply relabelled at start-up, and batches stay fast.
"""

import json
import os
import re
import stat

from daemon import fsutil

_OUR_TEMPORARY = re.compile(r"^\..+\.(json|txt)\.\d+-\d+\.tmp$")


class Sidecars:
    def __init__(self, kind, extensions):
        self.kind = kind  # "json" or "txt"
        self.suffix = "." + kind
        self.extensions = frozenset("." + ext.lower() for ext in extensions)

    def is_image_name(self, path):
        name = os.path.basename(path)
        return (not name.startswith(".") and os.path.splitext(name)[1].lower() in self.extensions)

    def path_for(self, image):
        return image + self.suffix

    def is_up_to_date(self, image, info=None):
        """True if `image` has a valid sidecar written for its current content."""
        try:
            info = info or os.stat(image, follow_symlinks=False)
            text, sidecar_time = _read_regular(self.path_for(image))
        except OSError:
            return False
        if self.kind == "txt":
            return text.endswith(b"\n") and len(text) > 1 and sidecar_time >= info.st_mtime_ns
        try:
            record = json.loads(text)
        except ValueError:
            return False
        if not isinstance(record, dict) or not ("label" in record or "error" in record):
            return False
        return record.get("source") == _source(info)

    def write(self, image, info, result):
        """Write the sidecar for `image` (whose stat was `info`): `result` holds label,
        class, confidence, epoch, model -- or error. Replaces, never follows, a symlink."""
        if self.kind == "txt":
            line = result["label"] if "label" in result else f"error: {result['error']}"
            data = (line.replace("\n", " ") + "\n").encode()
        else:
            record = dict(result, classified_at=fsutil.utc_timestamp(), source=_source(info))
            data = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        fsutil.publish(self.path_for(image), data)

    @staticmethod
    def is_our_temporary(name):
        return bool(_OUR_TEMPORARY.match(name))


def _read_regular(path):
    """(first 64 KiB, mtime_ns) of a regular file; a symlink or FIFO there is an OSError."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(f"{path} is not a regular file")
        return os.read(fd, 65536), info.st_mtime_ns
    finally:
        os.close(fd)


def _source(info):
    if info is None:
        return None
    return {"size": info.st_size, "mtime_ns": info.st_mtime_ns, "inode": info.st_ino}
