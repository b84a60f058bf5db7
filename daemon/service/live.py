"""save/live.json: what the running daemon says of itself (its status line, its inbox, its
data, its cluster), written by the service's main loop and read by `wardrobe status`, which
never asks the daemon anything."""

import json
import logging
import os
import time

from daemon import fsutil

log = logging.getLogger("daemon.service")


def status_line(labeller, trainer, shares):
    """One line for people: systemd's STATUS=, SIGUSR1, `status`."""
    summary = labeller.summary if labeller else {}
    parts = [f"{summary.get('labelled', 0):,} images labelled"]
    if summary.get("errors"):
        parts.append(f"{summary['errors']:,} errors")
    if summary.get("backlog"):
        parts.append(f"{summary['backlog']:,} waiting")
    now = time.monotonic()
    parts += [f"the {share.name} does not respond" for share in shares if share.hung(now)]
    if trainer is None or trainer.phase == "loading":
        return "loading the model, " + ", ".join(parts)
    if trainer.phase == "waiting":
        return "waiting for training data, " + ", ".join(parts)
    if trainer.phase == "training":
        return (f"training epoch {trainer.epoch + 1}/{trainer.epochs} "
                f"(batch {trainer.step}), " + ", ".join(parts))
    return "serving, " + ", ".join(parts)


class Live:
    """The writer of save/live.json: written again only when what it says changed, and
    neither fsynced nor kept (a status for the living; a power cut takes the daemon too)."""

    def __init__(self, save):
        self.path = save / "live.json"
        self._last = None

    def write(self, labeller, trainer, watcher, cluster, status):
        live = dict(labeller.summary, pid=os.getpid(), status=status,
                    watch={"mode": watcher.mode, "why": watcher.why},
                    training=bool(trainer and trainer.phase == "training"))
        if trainer is not None and trainer.data is not None:
            version = trainer.data.version
            live.update(data_version=version.number, images=version.images,
                        skipped_images=len(version.get("skipped", [])),
                        classes=list(trainer.data.classes), epochs=trainer.epochs,
                        validation_accuracy=trainer.validation_accuracy)
        if cluster is not None:
            live["cluster"] = cluster.snapshot()
        if live != self._last:
            self._last = live
            try:
                fsutil.write_new(self.path, json.dumps(live).encode(), sync_folder=False,
                                 durable=False)
            except OSError as error:
                log.debug("cannot write live.json: %s", error)


def read(save, pid):
    """What the running daemon says of itself, or None when it is down (`pid`, the lock's
    holder, is None or another process wrote the file): its inbox (labelled, errors, backlog,
    retrying, cannot_label, watch: mode and why), its data (training, data_version, images,
    classes, validation_accuracy, epochs) and its cluster."""
    try:
        live = json.loads((save / "live.json").read_text())
    except (OSError, ValueError):
        return None
    if pid is None or live.get("pid") != pid:
        return None
    return live
