"""Durable file writes (a new file is complete and fsynced before its rename makes it visible),
and what the daemon asks of files it reads: being written? settled? the folders below."""

import contextlib
import datetime
import errno
import fcntl
import hashlib
import itertools
import os
import re
import stat
import time

from daemon import mounts

_counter = itertools.count()


TEMP_PREFIX = ".wardrobe-"


def temp_name(path):
    """A hidden, unique temporary name beside `path` (same folder, so rename is atomic),
    short enough for any name that fits NAME_MAX (255 bytes) itself."""
    folder, name = os.path.split(os.fspath(path))
    hint = os.fsencode(name)[:80].decode("utf-8", "ignore")  # for people looking at it
    return os.path.join(folder, f"{TEMP_PREFIX}{os.getpid()}-{next(_counter)}.{hint}.tmp")


def is_temp_name(name):
    """Ours, from this or an earlier run (also the older `.NAME.PID-N.tmp` form)."""
    return name.startswith(".") and name.endswith(".tmp") and (
        name.startswith(TEMP_PREFIX) or _OLD_TEMP.match(name) is not None)


_OLD_TEMP = re.compile(r"^\..+\.\d+-\d+\.tmp$")


def write_new(path, data, sync_folder=True, durable=True, mtime_ns=None):
    """Atomically replace `path` with `data`.

    The bytes go to a temporary file created with O_EXCL|O_NOFOLLOW (never through a planted
    symlink) and renamed over `path` (replacing a symlink there, never following it), so a
    reader sees the old file or the new one, never a part. `durable` fsyncs the file before
    the rename, so a crash cannot leave the new name with missing data; with sync_folder the
    rename itself is made durable too (callers renaming several files fsync the folder once).
    `mtime_ns` dates the new file (else: now).
    """
    tmp = temp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        try:
            _write_all(fd, data, mtime_ns)
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


def publish(path, data, mtime_ns=None):
    """Make `path` appear with `data`, all at once, not durably (for many small files).

    A new name is an unnamed O_TMPFILE linked in when complete: one inode, no rename, and
    half the inotify events of write-then-rename for the daemon's own observer to sift.
    linkat never follows or replaces what is there, so when the name exists (a file to
    replace, a planted symlink) this falls back to write_new, which renames over it.
    """
    folder = os.path.dirname(os.fspath(path)) or "."
    try:
        fd = os.open(folder, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o644)
    except OSError:  # a file system without O_TMPFILE
        return write_new(path, data, sync_folder=False, durable=False, mtime_ns=mtime_ns)
    try:
        _write_all(fd, data, mtime_ns)
        folder_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:  # a dir fd makes os.link use linkat(AT_SYMLINK_FOLLOW) on the /proc fd link
            os.link(f"/proc/self/fd/{fd}", path, src_dir_fd=folder_fd)
        finally:
            os.close(folder_fd)
    except OSError:  # the name exists (or /proc is hidden): the classic way
        return write_new(path, data, sync_folder=False, durable=False, mtime_ns=mtime_ns)
    finally:
        os.close(fd)


def _write_all(fd, data, mtime_ns=None):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    if mtime_ns is not None:
        os.utime(fd, ns=(mtime_ns, mtime_ns))


def being_written(path):
    """True if some process has `path` open for writing (the kernel refuses a read lease
    then), False if none has; None where that cannot be told (a file of another owner
    without CAP_LEASE, a file system without leases, such as a network share)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        return False
    except OSError as error:
        return True if error.errno == errno.EAGAIN else None
    finally:
        os.close(fd)


class Settling:
    """Has a file stopped changing? Decided by what this process saw, never by comparing a
    file's mtime with the wall clock (a share's, a camera's or a NAS's clock may be hours
    off, either way). The kernel is asked first (being_written); where it cannot tell (a
    network share, whose writers may be on other machines; a file of another owner), the
    file must show the same inode, size and mtime for `quiet` seconds of our own monotonic
    clock. One per folder tree watched; used from one thread."""

    OPEN_FOR_WRITING, CHANGED = "open for writing", "changing"

    def __init__(self, quiet, clock=time.monotonic):
        self.quiet, self.clock = quiet, clock
        self._seen = {}  # path -> ((ino, size, mtime_ns), clock() when first seen so)

    def check(self, path, quiet=None):
        """(0.0, None) if `path` has settled or is gone (whoever reads it finds out), else
        (seconds until it is worth asking again, why: OPEN_FOR_WRITING or CHANGED)."""
        try:
            info = os.lstat(path)
        except OSError:
            self._seen.pop(path, None)
            return 0.0, None
        if not stat.S_ISREG(info.st_mode):
            return 0.0, None  # a symlink, a FIFO: nothing in it is being written
        writing = None if mounts.is_remote(info.st_dev) else being_written(path)
        if writing is False:
            self._seen.pop(path, None)
            return 0.0, None
        if writing:
            return 1.0, self.OPEN_FOR_WRITING
        key, now = (info.st_ino, info.st_size, info.st_mtime_ns), self.clock()
        quiet = self.quiet if quiet is None else quiet
        first = self._seen.get(path)
        if first is None or first[0] != key:
            self._seen[path] = (key, now)
            return quiet, self.CHANGED
        wait = first[1] + quiet - now
        return (wait, self.CHANGED) if wait > 0 else (0.0, None)

    def forget(self, path):
        """`path` is done with (labelled, gone): its history is not needed any more."""
        self._seen.pop(path, None)


def lock_file(path, says):
    """Take an exclusive flock on `path` (made if need be) for the process's life and write
    `says` into it for whoever finds it taken: (the open file, None), or (None, what the
    holder wrote) when another process holds it. The kernel drops the lock when its process
    ends, however it ends, so a crash never leaves it stuck. OSError where it cannot be
    taken at all (a read-only folder, a share without locks)."""
    file = open(path, "a+")
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        file.seek(0)
        holder = file.read().strip()
        file.close()
        return None, holder
    except OSError:
        file.close()
        raise
    file.truncate(0)
    file.write(says)
    file.flush()
    return file, None


def lock_holder(path):
    """What the process holding the lock_file() at `path` wrote there, or None if no
    process holds it (or there is none)."""
    try:
        with open(path) as file:
            try:
                fcntl.flock(file, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return file.read().strip()
    except OSError:
        pass
    return None


@contextlib.contextmanager
def folder_lock(folder):
    """Within: the only one of the processes taking this lock on `folder` (a flock on the
    folder itself, dropped by the kernel if its holder dies). A file system without flock
    (some shares) is not locked: its sidecars' writers are all in this machine's daemon."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as error:
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                raise
        yield
    finally:
        os.close(fd)


def utc_timestamp():
    """Now, as ISO 8601 UTC with milliseconds, for what we write into files."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def fsync_folder(folder):
    """Make renames and unlinks in `folder` durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def walk(top, descend=lambda entry: True):
    """Every folder from `top` down, depth first, symbolic links never followed:
    (folder, entries, error), with the os.DirEntry list of the folder, or the OSError that
    kept it from being listed (entries then empty). The folders among its entries for which
    `descend(entry)` holds come next, the last listed first. One walker for the inbox scans,
    the poller's snapshots and the training-data folder."""
    stack = [top]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as listing:
                entries = list(listing)
        except OSError as error:
            yield folder, [], error
            continue
        yield folder, entries, None
        stack.extend(entry.path for entry in entries
                     if entry.is_dir(follow_symlinks=False) and descend(entry))


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


BLOCK = 1 << 20
BLOCKS = "b1:"  # marks a block digest (below); a bare hex digest is one sha256 of the file


class BlockDigest:
    """The digest of a bytes-like `data`: BLOCKS + the sha256 of the sha256 of each
    BLOCK-sized piece, as strong as one sha256 of the whole. Kept beside a buffer that is
    changed in place, it is brought up to date by rehashing the pieces that changed
    (changed(start, end)): a 14 MB model.h5 whose head alone changed costs one piece."""

    def __init__(self, data):
        self.data = memoryview(data)
        self.blocks = [self._hash(start) for start in range(0, len(data), BLOCK)]

    def _hash(self, start):
        return hashlib.sha256(self.data[start: start + BLOCK]).digest()

    def changed(self, start, end):
        for index in range(start // BLOCK, (max(end, start + 1) - 1) // BLOCK + 1):
            self.blocks[index] = self._hash(index * BLOCK)

    def hexdigest(self):
        return BLOCKS + hashlib.sha256(b"".join(self.blocks)).hexdigest()


def file_digest(path, like):
    """The digest of the file at `path` in the kind of `like` (a BlockDigest's, or a plain
    sha256 as older manifests recorded)."""
    if not (like or "").startswith(BLOCKS):
        return sha256_file(path)
    with open(path, "rb") as file:
        return BlockDigest(file.read()).hexdigest()


def _remove_quietly(path):
    try:
        os.unlink(path)
    except OSError:
        pass


def unlink_if_present(path):
    """Remove `path`; one already gone is fine."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
