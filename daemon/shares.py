"""Folders on network shares that hang. A NAS gone under a hard NFS mount (or a FUSE file
system whose process stopped) blocks every call on it, for as long as it is gone, and no
timeout or signal short of SIGKILL ends the call. So whatever must keep answering -- the
daemon's main thread, `wardrobe status`, the config checks -- never touches such a folder
itself: ask() makes the call in a throwaway thread and stops waiting after a deadline, and
a Share is looked at by a probe thread of the service while the main thread only reads
what the probe found (plain attributes, no lock: a thread blocked on the share holds none).
"""

import os
import threading
import time

ANSWER_SECONDS = 0.5  # a folder that takes longer to answer "does not respond"
PATIENCE = 1.0  # a probe's look that takes longer: the share hangs


class NotResponding(Exception):
    def __init__(self, path):
        super().__init__(f"{path} does not respond")
        self.path = path


_blocked = {}  # path -> the thread of an ask() still blocked there


def ask(path, call, *args, seconds=ANSWER_SECONDS):
    """call(*args), which touches `path`: its result (or its exception), or NotResponding
    once it has not returned within `seconds` -- at once while an earlier call on `path` is
    still blocked. The thread of a call that never returns is left behind (it is a daemon
    thread: a process may exit with it)."""
    path = os.fspath(path)
    stuck = _blocked.get(path)
    if stuck is not None and stuck.is_alive():
        raise NotResponding(path)
    outcome = []

    def run():
        try:
            outcome.append((True, call(*args)))
        except BaseException as error:  # handed to the caller
            outcome.append((False, error))

    thread = threading.Thread(target=run, name=f"ask {path}", daemon=True)
    thread.start()
    thread.join(seconds)
    if not outcome:
        _blocked[path] = thread
        raise NotResponding(path)
    done, value = outcome[0]
    if not done:
        raise value
    return value


def look(path):
    """List the first entries of `path`: a call that always reaches the file server (a
    stat may be answered from the kernel's cache). Missing or unreadable is an answer."""
    try:
        with os.scandir(path) as entries:
            next(entries, None)
    except OSError:
        pass


def responds(path, seconds=ANSWER_SECONDS):
    try:
        ask(path, look, path, seconds=seconds)
        return True
    except NotResponding:
        return False


class Share:
    """A folder (the inbox, the training data) that the service's probe thread looks at
    again and again (look()); other threads ask hung() and excuses() without touching it.
    Each attribute is written by the probe thread alone."""

    def __init__(self, name, path, clock=time.monotonic):
        self.name, self.path, self.clock = name, str(path), clock
        self.since = None  # clock() when the look in progress began; None between looks
        self.back = None  # clock() when it last answered a look that had hung

    def look(self):
        """In the probe thread: may block for as long as the share hangs."""
        started = self.since = self.clock()
        look(self.path)
        now = self.clock()
        if now - started > PATIENCE:
            self.back = now
        self.since = None

    def hung(self, now, patience=PATIENCE):
        """Has the look in progress been blocked for longer than `patience` s?"""
        since = self.since
        return since is not None and now - since > patience

    def excuses(self, last_seen, now, grace):
        """May a thread that last came round at `last_seen` be blocked on this share? While
        it hangs, and for `grace` s after it answers again (the blocked calls return then;
        the thread needs a moment to come round). A thread stuck for another reason while
        the share answers is not excused."""
        back = self.back
        return self.hung(now) or (back is not None and last_seen < back and now - back < grace)
