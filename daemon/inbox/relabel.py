"""`wardrobe relabel`: rewrite the sidecars of inbox images labelled by another model than
the one labelling now (or, with --all, every sidecar of ours).

While the daemon runs, it does the work itself -- the command leaves a request in
save/relabel-request-<id>.json and waits for save/relabel-answer-<id>.json -- so no sidecar is
ever written by two processes; requests are taken one at a time. While it is down, the command holds save/.lock (a daemon starting meanwhile
waits for nothing: it refuses to start, and systemd tries again) and labels in process, with
the same classifier and the same atomic sidecar writes. txt sidecars do not say which model
wrote them: all of them are rewritten.
"""

import json
import logging
import os
import time
import uuid

from daemon import fsutil
from daemon.errors import AlreadyRunning
from daemon.inbox.sidecars import Sidecars
from daemon.service import logs
from daemon.training.store import CheckpointStore, lock, running_pid

log = logging.getLogger("daemon.relabel")  # the name users see: daemon.service.logs

REQUEST = "relabel-request-{}.json"
ANSWER = "relabel-answer-{}.json"
TAKEN_SECONDS = 60  # a running daemon takes a request within a second or two
BATCH = 256


def stale(root, sidecars, model_id, everything):
    """Yields the inbox images whose sidecar of ours was written by another model than
    `model_id` (all of ours with `everything`). Symbolic links are never followed."""
    for folder, folders, names in os.walk(root):
        folders[:] = [name for name in folders if not fsutil.is_temp_name(name)]
        for name in names:
            if sidecars.is_image_name(name):
                path = os.path.join(folder, name)
                by = sidecars.labelled_by(path, errors=everything)
                if by is not None and (everything or by != model_id):
                    yield path


def run(config, everything, out, err, timeout=None):
    """The command; returns its exit code."""
    sidecars = Sidecars(config.classify.sidecar, config.classify.extensions)
    if not CheckpointStore(config.save).numbers():  # before TensorFlow, before making save/
        print(f"wardrobe: no checkpoint in {config.save} yet: nothing to relabel with",
              file=err)
        return 1
    pid = running_pid(config.save)
    if pid is None:
        try:
            held = lock(config.save)
        except AlreadyRunning:  # one started just now
            pid = running_pid(config.save)
        else:
            try:
                return _here(config, sidecars, everything, out, err)
            finally:
                held.close()
    return _ask(config, pid, everything, out, err, timeout)


def _here(config, sidecars, everything, out, err):
    """The daemon is down: relabel in this process."""
    logs.import_tensorflow()
    from daemon.data import images
    from daemon.inbox.classifier import Classifier

    classifier = Classifier(config)
    if not classifier.refresh():
        print(f"wardrobe: no checkpoint in {config.save} yet: nothing to relabel with",
              file=err)
        return 1
    paths = list(stale(str(config.inbox), sidecars, classifier.generation.id, everything))
    done = failed = 0
    for start in range(0, len(paths), BATCH):
        batch = []
        for path in paths[start: start + BATCH]:
            try:
                info = os.stat(path, follow_symlinks=False)
                batch.append((path, info, {"image": classifier.read(path)}))
            except images.BadImage as error:
                batch.append((path, info, {"error": str(error)}))
            except (images.Unreadable, OSError) as error:
                print(f"{path}: {error}; left as it was", file=err)
                failed += 1
        labelled = [entry for entry in batch if "image" in entry[2]]
        results = classifier.results([entry[2]["image"] for entry in labelled]) if labelled \
            else []
        by_path = {path: result for (path, _, _), result in zip(labelled, results)}
        for path, info, outcome in batch:
            try:
                sidecars.write(path, info, by_path.get(path, outcome))
                done += 1
            except OSError as error:
                print(f"{path}: cannot write its sidecar: {error.strerror}", file=err)
                failed += 1
    print(f"relabelled {done} images with checkpoint {classifier.generation.id}"
          + (f"; {failed} failed" if failed else "") + _txt_note(sidecars), file=out)
    return 1 if failed else 0


def _ask(config, pid, everything, out, err, timeout):
    """The daemon runs: leave it a request, wait for its answer."""
    request = {"id": uuid.uuid4().hex, "all": bool(everything)}
    asked = config.save / REQUEST.format(request["id"])
    answered = config.save / ANSWER.format(request["id"])
    fsutil.write_new(asked, json.dumps(request).encode(), durable=False)
    started = time.monotonic()
    deadline = None if timeout is None else started + timeout
    while deadline is None or time.monotonic() < deadline:
        try:
            answer = json.loads(answered.read_text())
            answered.unlink()
        except (OSError, ValueError):
            answer = {}
        if answer.get("id") == request["id"]:
            if answer.get("error"):
                print(f"wardrobe: {answer['error']}", file=err)
                return 1
            retrying = answer.get("retrying", 0)
            print(f"relabelled {answer['relabelled']} images with checkpoint {answer['model']}"
                  + (f"; {retrying} could not be written now (the daemon retries them)"
                     if retrying else "") + _txt_note(Sidecars(config.classify.sidecar, ())),
                  file=out)
            return 0
        if running_pid(config.save) != pid:
            print("wardrobe: the daemon stopped before it answered; run relabel again",
                  file=err)
            fsutil.unlink_if_present(asked)
            return 1
        if asked.exists() and time.monotonic() - started > TAKEN_SECONDS:
            print(f"wardrobe: the daemon (pid {pid}) has not taken the request in "
                  f"{TAKEN_SECONDS} s; see its log", file=err)
            fsutil.unlink_if_present(asked)
            return 1
        time.sleep(0.2)
    print("wardrobe: no answer from the daemon in time", file=err)
    return 1


class Requests:
    """In the daemon, in the labeller's thread: takes the command's request, has the
    labeller do it, answers once done."""

    def __init__(self, save):
        self.save = save
        self.request = None

    def poll(self, labeller):
        if self.request is None:
            self.request = self._take()
            if self.request is None:
                return
            if not labeller.classifier.refresh():
                self._answer(error="no checkpoint to label with yet")
                return
            labeller.relabel(self.request.get("all", False))
            log.info("relabelling inbox images with checkpoint %s (wardrobe relabel%s)",
                     labeller.classifier.generation.id,
                     " --all" if self.request.get("all") else "")
        finished = labeller.relabel_finished()
        if finished is not None:
            self._answer(relabelled=finished[0], retrying=finished[1],
                         model=labeller.classifier.generation.id)
            log.info("relabelled %d inbox images", finished[0])
            labeller.relabelling = None

    def _take(self):
        """The oldest request a command left, or None; removed once read."""
        for path in sorted(self.save.glob(REQUEST.format("*")), key=_mtime):
            try:
                text = path.read_text()
                path.unlink()
                request = json.loads(text)
            except (OSError, ValueError):
                continue
            if isinstance(request, dict) and isinstance(request.get("id"), str):
                return request
        return None

    def _answer(self, **result):
        try:
            fsutil.write_new(self.save / ANSWER.format(self.request["id"]), json.dumps(
                dict(result, id=self.request["id"])).encode(), durable=False)
        except OSError as error:  # save/ full: the command waits, and is told it timed out
            log.error("cannot answer wardrobe relabel: %s", error)
        self.request = None


def _txt_note(sidecars):
    return (" (txt sidecars do not say which checkpoint wrote them: all were rewritten)"
            if sidecars.kind == "txt" else "")


def forget_requests(save):
    """At start: requests and answers of an earlier run (their commands have given up)."""
    for pattern in (REQUEST, ANSWER):
        for path in save.glob(pattern.format("*")):
            fsutil.unlink_if_present(path)


def _mtime(path):
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0
