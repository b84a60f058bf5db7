"""What the labeller and the data source hold when the daemon has a cluster: the decode
workers' interface (daemon.inbox.decoding.Decoder's), over the cluster's workers while any
take our jobs, over the local decode workers otherwise. Sidecar writes and 28x28 crops
always stay local."""

import concurrent.futures
import os
from concurrent.futures.process import BrokenProcessPool

from daemon.backbone import efficientnet
from daemon.cluster import broker as wire


class Dispatch:
    """A Decoder's interface over the cluster and a local Decoder (`local`): photos to
    featurize go to the workers while any are alive; the rest (sidecars to write, 28x28
    crops) stays local."""

    def __init__(self, cluster, local, root):
        self.cluster, self.local, self.root = cluster, local, str(root)

    @property
    def featurizer(self):
        return self.local.featurizer

    @featurizer.setter
    def featurizer(self, runtime):
        self.local.featurizer = runtime

    @property
    def feature_id(self):
        return self.local.featurizer.feature_id

    def _remote(self):
        return self.local.featurizer is not None and self.cluster.usable

    @property
    def workers(self):
        """The labeller keeps two chunks out for each decode process; for a worker's, twice
        that (one running, one at hand in the worker, two in Redis: measured, a worker with
        fewer idles between jobs, 25 % slower)."""
        return 2 * max(1, self.cluster.slots()) if self._remote() else self.local.workers

    def chunk_size(self):
        return self.cluster.chunk_size() if self._remote() else self.local.chunk_size()

    def submit(self, paths):
        future = self.cluster.send(self, "label", paths) if self._remote() else None
        return future or self.local.submit(paths)

    def submit_training(self, paths, known=None):
        future = self.cluster.send(self, "train", paths, known) if self._remote() else None
        return future or self.local.submit_training(paths, known)

    def decode_all(self, paths, chunk=None, known=None):
        """As Decoder.decode_all, on the workers while any are alive; a window of jobs out
        at a time, so none waits in the queue long enough to be sent again."""
        if not self._remote():
            return self.local.decode_all(paths, chunk, known)
        known = known or {}
        out, results, leftover, start = {}, {}, [], 0
        while start < len(paths) or out:
            while start < len(paths) and len(out) < 2 * self.workers:
                # the size once: the cluster thread may change it meanwhile
                part = paths[start:start + self.chunk_size()]
                start += len(part)
                try:
                    out[self.submit_training(part, {p: known[p] for p in part if p in known})] = part
                except BrokenProcessPool:
                    leftover += part
            if not out:
                continue
            done, _ = concurrent.futures.wait(out, timeout=1.0,
                                              return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                part = out.pop(future)
                try:
                    results.update((result[0], result) for result in future.result())
                except BrokenProcessPool:
                    leftover += part  # the local fallback's pool broke: its own way below
            if not done and self.local.lost():
                leftover += [p for part in out.values() for p in part]
                out.clear()
        if leftover:
            results.update((result[0], result) for result in self.local.decode_all(
                leftover, chunk, {p: known[p] for p in leftover if p in known}))
        return [results[path] for path in paths]

    # what stays local
    def start(self):
        self.local.start()

    def stop(self, wait=True):
        self.local.stop(wait)

    def restart(self):
        self.local.restart()

    def lost(self):
        return self.local.lost()

    def measured(self, results):
        self.local.measured(results)

    def result(self, future):
        return self.local.result(future)

    def submit_writes(self, sidecars):
        return self.local.submit_writes(sidecars)


def decoded(kind_of_job, paths, meta, features):
    """A worker's answer (daemon.cluster.broker.decode_answer) as the Decoder's results
    for `paths`: submit()'s for kind "label", submit_training()'s for "train"; ValueError
    (or KeyError, TypeError) for an answer that does not fit."""
    items = meta["results"]
    if len(items) != len(paths):
        raise ValueError(f"{len(items)} results for {len(paths)} photos")
    if len(features) and features.shape[1] != efficientnet.FEATURES:
        raise ValueError(f"features of {features.shape[1]} values")
    results = []
    for path, item in zip(paths, items):
        kind = item["kind"]
        if kind not in ("image", "bad", "unreadable"):
            raise ValueError(f"a result of kind {kind!r}")
        extra = item.get("extra") or {}
        if "row" in item and not 0 <= item["row"] < len(features) or (
                kind == "image" and kind_of_job == "label" and "row" not in item):
            raise ValueError(f"no row {item.get('row')} of features")
        payload = features[item["row"]] if "row" in item else item.get("why")
        if kind_of_job == "label":
            results.append((path, kind, payload, float(extra.get("seconds", 0.0))))
        elif kind != "image":
            results.append((path, kind, payload))
        else:
            results.append((path, *_as_seen_here(path, payload, extra)))
    return results


def _as_seen_here(path, features, extra):
    """A training photo's (kind, payload) with this machine's stat of it: the worker's may
    differ in its inode (another mount). Changed since it was read: read again later."""
    size, mtime_ns, _ = extra["stat"]
    try:
        info = os.stat(path, follow_symlinks=False)
    except OSError as error:
        return "unreadable", f"cannot stat: {error.strerror}"
    if not wire.same_file((info.st_size, info.st_mtime_ns), (size, mtime_ns)):
        return "unreadable", "changed while a worker read it"
    return "image", (features, extra["sha256"], (info.st_size, info.st_mtime_ns, info.st_ino))


def chain(done, future):
    """Give `future` the outcome of `done` (a local decode of a job meant for a worker)."""
    if future.done():
        return
    error = done.exception()
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(done.result())
