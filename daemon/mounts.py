"""Which file system holds a folder, and whether inotify can be trusted there.

Files that another machine writes into a network share (NFS, SMB, sshfs, rclone, 9p,
virtiofs, ...) raise no inotify event on this one, so a tree on such a file system, or
holding one mounted inside it, has to be polled. Read from /proc/self/mountinfo.
"""

import os
import time

# File systems where another machine's writes raise no inotify event here.
REMOTE = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "fuse", "fuseblk", "ceph",
          "glusterfs", "afs", "lustre", "gpfs", "vboxsf", "virtiofs", "davfs", "ncpfs", "coda")


def filesystem_of(path):
    """(type, mount point) of the file system holding `path`, from /proc/self/mountinfo."""
    path = os.path.realpath(path)
    best = ("unknown", "/")
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as file:
            for line in file:
                fields = line.split()
                mount = _unescape(fields[4])
                fstype = fields[fields.index("-") + 1]
                inside = path == mount or path.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best[1]):
                    best = (fstype, mount)
    except (OSError, ValueError, IndexError):
        pass
    return best


def is_remote(device, clock=time.monotonic):
    """Is the file system with this st_dev one that other machines write to (REMOTE)?
    There the kernel cannot tell whether a file is still being written: a lease sees only
    this machine's writers. Looked up in /proc/self/mountinfo, again after CACHE_SECONDS
    (a device number may be reused by a later mount)."""
    known = _remote.get(device)
    if known is None or clock() - known[1] > CACHE_SECONDS:
        key, remote = f"{os.major(device)}:{os.minor(device)}", False
        try:
            with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as file:
                for line in file:
                    fields = line.split()
                    if fields[2] == key:
                        remote = fields[fields.index("-") + 1].split(".")[0] in REMOTE
                        break
        except (OSError, ValueError, IndexError):
            remote = True  # cannot tell: take the careful side
        known = _remote[device] = (remote, clock())
    return known[0]


_remote = {}  # st_dev -> (remote?, clock() when looked up)
CACHE_SECONDS = 30.0


def choose_mode(path, configured="auto"):
    """("inotify" | "poll", why) for watching the tree at `path`: poll if it is on, or
    holds, a file system where changes made elsewhere raise no inotify event here."""
    fstype, mount = filesystem_of(path)
    if configured != "auto":
        return configured, f"watch.mode is {configured} ({fstype} file system at {mount})"
    for kind, where in [(fstype, mount), *_mounts_below(path)]:
        if kind.split(".")[0] in REMOTE:
            return "poll", (f"{kind} file system at {where}: changes made elsewhere raise no "
                            "inotify event")
    return "inotify", f"{fstype} file system at {mount}"


def _mounts_below(path):
    """[(type, mount point)] of the file systems mounted inside the tree at `path`."""
    prefix = os.path.realpath(path).rstrip("/") + "/"
    found = []
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as file:
            for line in file:
                fields = line.split()
                mount = _unescape(fields[4])
                if mount.startswith(prefix):
                    found.append((fields[fields.index("-") + 1], mount))
    except (OSError, ValueError, IndexError):
        pass
    return found


def _unescape(field):
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace(
        "\\134", "\\")
