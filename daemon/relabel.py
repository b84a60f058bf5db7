"""`wardrobe relabel`: rewrite the sidecars of inbox images labelled by another model than
the one labelling now (or, with --all, every sidecar of ours).

While the daemon runs, it does the work itself -- the command leaves a request in
save/relabel-request.json and waits for the answer -- so no sidecar is ever written by two
processes. While it is down, the command holds save/.lock (a daemon starting meanwhile
waits for nothing: it refuses to start, and systemd tries again) and labels in process, with
the same classifier and the same atomic sidecar writes. txt sidecars do not say which model
wrote them: all of them are rewritten.
"""

import json
import os
import time
import uuid

from daemon import fsutil
from daemon.errors import AlreadyRunning
from daemon.sidecars import Sidecars
from daemon.store import lock, running_pid

REQUEST = "relabel-request.json"
ANSWER = "relabel-answer.json"
BATCH = 256


def stale(root, sidecars, model_id, everything):
    """Inbox images whose sidecar of ours was written by another model than `model_id`
    (all of ours with `everything`). Symbolic links are never followed."""
    found = []
    for folder, folders, names in os.walk(root):
        folders[:] = [name for name in folders if not fsutil.is_temp_name(name)]
        for name in names:
            if sidecars.is_image_name(name):
                path = os.path.join(folder, name)
                by = sidecars.labelled_by(path, errors=everything)
                if by is not None and (everything or by != model_id):
                    found.append(path)
    return found


def run(config, everything, out, err, timeout=None):
    """The command; returns its exit code."""
    sidecars = Sidecars(config.classify.sidecar, config.classify.extensions)
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
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from daemon import images
    from daemon.classifier import Classifier

    classifier = Classifier(config)
    if not classifier.refresh():
        print(f"wardrobe: no checkpoint in {config.save} yet: nothing to relabel with",
              file=err)
        return 1
    paths = stale(str(config.inbox), sidecars, classifier.generation.id, everything)
    done = failed = 0
    for start in range(0, len(paths), BATCH):
        batch = []
        for path in paths[start: start + BATCH]:
            try:
                info = os.stat(path, follow_symlinks=False)
                batch.append((path, info, {"image": images.load(path)}))
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
          + (f"; {failed} failed" if failed else ""), file=out)
    return 1 if failed else 0


def _ask(config, pid, everything, out, err, timeout):
    """The daemon runs: leave it a request, wait for its answer."""
    request = {"id": uuid.uuid4().hex, "all": bool(everything)}
    fsutil.write_new(config.save / REQUEST, json.dumps(request).encode(), durable=False)
    deadline = None if timeout is None else time.monotonic() + timeout
    while deadline is None or time.monotonic() < deadline:
        try:
            answer = json.loads((config.save / ANSWER).read_text())
        except (OSError, ValueError):
            answer = {}
        if answer.get("id") == request["id"]:
            if answer.get("error"):
                print(f"wardrobe: {answer['error']}", file=err)
                return 1
            retrying = answer.get("retrying", 0)
            print(f"relabelled {answer['relabelled']} images with checkpoint {answer['model']}"
                  + (f"; {retrying} could not be written now (the daemon retries them)"
                     if retrying else ""), file=out)
            return 0
        if running_pid(config.save) != pid:
            print("wardrobe: the daemon stopped before it answered; run relabel again",
                  file=err)
            return 1
        time.sleep(0.2)
    print("wardrobe: no answer from the daemon in time", file=err)
    return 1


def take_request(save):
    """In the daemon: a relabel request left by the command, or None (removed once read)."""
    path = save / REQUEST
    try:
        text = path.read_text()
        path.unlink()
        request = json.loads(text)
    except (OSError, ValueError):
        return None
    return request if isinstance(request, dict) and "id" in request else None


def answer(save, request, **result):
    """In the daemon: tell the waiting command how it went."""
    fsutil.write_new(save / ANSWER, json.dumps(dict(result, id=request["id"])).encode(),
                     durable=False)
