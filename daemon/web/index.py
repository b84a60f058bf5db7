"""What the review page lists: every inbox image with a sidecar of ours, in memory.

Fed by the sidecars themselves (inbox.sidecars tells its observer of every sidecar seen,
written, moved or gone: the start-up scan reads them all once anyway), so a request never
walks the inbox. The sorted orders are made again only after something changed, at most
once a second while the labeller writes, and a page of them is a slice.
"""

import threading
import time

SORTS = ("confidence", "newest")
RESORT_SECONDS = 1.0  # a busy labeller: the lists may lag this much, never more


class Entry(tuple):
    """(label, confidence, source, time, error) of one image."""
    __slots__ = ()

    @classmethod
    def of(cls, record):
        confidence = record.get("confidence")
        return cls((record.get("label"), confidence if isinstance(confidence, (int, float))
                    else None, record.get("source") if record.get("source") == "person"
                    else "model", str(record.get("labelled_at") or record.get("classified_at")
                                      or ""), record.get("error")))


class Index:
    def __init__(self, root, clock=time.monotonic):
        self.root = root.rstrip("/") + "/"
        self._entries = {}  # inbox-relative path -> Entry
        self._lock = threading.Lock()
        self._changes = 0  # bumped by every change: the page's "anything new?"
        self._sorted = {}  # (sort, class) -> (changes when made, time made, [paths])
        self._clock = clock

    # ---- the observer of inbox.sidecars (the labeller's and the inbox's threads) --------

    def seen(self, image, record):
        relative = self.relative(image)
        if relative is None:
            return
        entry = Entry.of(record)
        with self._lock:
            if self._entries.get(relative) != entry:
                self._entries[relative] = entry
                self._changes += 1

    def gone(self, image):
        relative = self.relative(image)
        with self._lock:
            if self._entries.pop(relative, None) is not None:
                self._changes += 1

    # ---- the page's side -------------------------------------------------------------

    def relative(self, image):
        image = str(image)
        return image[len(self.root):] if image.startswith(self.root) else None

    def get(self, relative):
        with self._lock:
            return self._entries.get(relative)

    @property
    def changes(self):
        return self._changes

    def __len__(self):
        return len(self._entries)

    def page(self, sort="confidence", label=None, offset=0, limit=60):
        """(total, [(path, Entry)]) of one page: least confident (errors and unlabelled
        last) or newest first; only `label`'s with a label."""
        paths = self._order(sort, label)
        with self._lock:
            rows = [(path, self._entries.get(path)) for path in paths[offset:offset + limit]]
        return len(paths), [(path, entry) for path, entry in rows if entry is not None]

    def counts(self):
        """{label: images} and the number of error sidecars."""
        counts, errors = {}, 0
        with self._lock:
            entries = list(self._entries.values())
        for label, _, _, _, error in entries:
            if error is not None:
                errors += 1
            elif label is not None:
                counts[label] = counts.get(label, 0) + 1
        return counts, errors

    def _order(self, sort, label):
        key = (sort, label)
        made = self._sorted.get(key)
        now = self._clock()
        if made and (made[0] == self._changes or now - made[1] < RESORT_SECONDS):
            return made[2]
        with self._lock:
            changes, entries = self._changes, dict(self._entries)
        # Sorted by keys the entries already hold: a (person, error, confidence, path) key
        # tuple per image was 100,000 new tuples to make and compare, and they set off the
        # garbage collector over the daemon's heap (TensorFlow's) again and again. A sort
        # of 100,000 in the daemon: 0.62 s, now 0.19 s (bench/web.py).
        paths = list(entries) if label is None else [
            path for path, entry in entries.items() if entry[0] == label]
        if sort == "newest":
            paths.sort(key=lambda path: entries[path][3], reverse=True)
        else:  # least confident first; a person's label and errors last
            paths.sort()  # ties in path order: the sorts below are stable
            groups = ([], [], [], [])  # the model's, its errors, a person's, a person's errors
            for path in paths:
                entry = entries[path]
                groups[2 * (entry[2] == "person") + (entry[4] is not None)].append(path)

            def confidence(path):
                value = entries[path][1]
                return 2.0 if value is None else value

            paths = []
            for group in groups:
                group.sort(key=confidence)
                paths += group
        if len(self._sorted) > 64:  # one per class and order: bounded all the same
            self._sorted.clear()
        self._sorted[key] = (changes, now, paths)
        return paths
