"""What a request may name: an inbox image by its inbox-relative path, a class by a folder
name. Anything else is refused before a file is touched."""

import errno
import os
import stat
import unicodedata

MAX_PATH_BYTES = 4096
MAX_CLASS_BYTES = 100


class Refused(Exception):
    """The request names something it may not: HTTP `status`, and why."""

    def __init__(self, status, why):
        super().__init__(why)
        self.status = status


def image(root, relative):
    """The absolute path of the regular file `relative` names inside `root`, reached
    without a symbolic link; else Refused. `root` is the inbox's real path."""
    if not isinstance(relative, str) or not relative:
        raise Refused(400, "path: expected an inbox-relative path")
    if "\0" in relative or len(_utf8(relative) or b"\0" * MAX_PATH_BYTES) >= MAX_PATH_BYTES:
        raise Refused(400, "path: not a file name")
    parts = relative.split("/")
    if relative.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise Refused(400, "path: must be inside the inbox (no /, . or .. parts)")
    path = os.path.join(root, *parts)
    parent = os.path.dirname(path)
    try:
        if os.path.realpath(parent) != parent:
            raise Refused(404, "path: not inside the inbox (a symbolic link on the way)")
        info = os.lstat(path)
    except (OSError, ValueError):
        raise Refused(404, "path: no such image") from None
    if not stat.S_ISREG(info.st_mode):
        raise Refused(404, "path: not a regular file")
    return path


def class_name(name, ours=()):
    """`name` if it can be a class folder's name, else Refused. `ours`: the daemon's own
    folder names in data.path, which are not classes."""
    if not isinstance(name, str):
        raise Refused(400, "label: expected a class name")
    name = unicodedata.normalize("NFC", name.strip())
    if not name or len(_utf8(name) or b"\0" * (MAX_CLASS_BYTES + 1)) > MAX_CLASS_BYTES:
        raise Refused(400, f"label: a class name is 1 to {MAX_CLASS_BYTES} bytes long")
    if "/" in name or "\\" in name or name.startswith(".") or name in ours or any(
            unicodedata.category(c).startswith("C") for c in name):
        raise Refused(400, "label: a class name is a folder name: no / or \\, no control "
                      "characters, not starting with a dot")
    return name


def _utf8(text):
    """`text` as the bytes of a file name (a name that is not UTF-8 on disk comes and goes
    as surrogate escapes), or None if it names none (a lone surrogate from JSON's \\ud800)."""
    try:
        return os.fsencode(text)
    except UnicodeEncodeError:
        return None


def open_beneath(root, path):
    """An fd of the file `path` (absolute, under `root`), opened one component at a time
    from `root` without following a symbolic link anywhere on the way: a folder swapped for
    a link after image() looked is an OSError (ELOOP or ENOTDIR), never a file outside."""
    parts = os.path.relpath(path, root).split(os.sep)
    if parts[0] in ("..", ".") or os.path.isabs(parts[0]):
        raise OSError(errno.EXDEV, f"{path} is not under {root}")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts[:-1]:
            inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                            dir_fd=fd)
            os.close(fd)
            fd = inner
        return os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                       dir_fd=fd)
    finally:
        os.close(fd)
