"""`status`: progress read from save/ alone, without importing TensorFlow; and whether the
inbox and the data folder respond (a look with a deadline: a share that hangs would hang
the command, and everything else on it)."""

import datetime
import json

from daemon import shares
from daemon.data.versions import VersionStore
from daemon.service.addresses import show_broker
from daemon.service.live import read as read_live
from daemon.training.store import CheckpointStore, resolve_model, running_pid


def report(config):
    """A dict with at least epoch, step, epochs, loss, accuracy."""
    newest, _ = CheckpointStore(config.save).scan()
    result = {"epoch": 0, "step": 0, "epochs": config.train.epochs, "loss": None,
              "accuracy": None, "checkpoint": None, "checkpoint_time": None,
              "model": resolve_model(config).model, "save": str(config.save),
              "running_pid": running_pid(config.save)}
    if newest is not None:
        result.update(epoch=newest["epoch"], step=newest["step"], loss=newest.get("loss"),
                      accuracy=newest.get("accuracy"), checkpoint=newest.number,
                      checkpoint_time=newest["written_at"],
                      model=newest.get("fingerprint", {}).get("model", config.model))
    result.update(_data(config, newest))
    result["curve"] = [{key: entry.get(key) for key in ("epoch", "accuracy", "val_accuracy")}
                       for entry in (newest.get("history") or [] if newest else [])]
    live = read_live(config.save, result["running_pid"])
    result["inbox"] = {key: live.get(key) for key in INBOX_KEYS} if live else None
    if live:
        result.update({key: live[key] for key in DATA_KEYS + ("training",) if key in live})
    result["cluster"] = None if config.cluster.broker is None else (live or {}).get(
        "cluster", {"broker": show_broker(config.cluster.broker), "connected": None,
                    "queue": None, "jobs_out": None, "workers": None})
    folders = {"inbox": config.inbox, "data.path": config.data.path}
    result["responds"] = {key: shares.responds(path) for key, path in folders.items()
                          if path is not None}
    return result


INBOX_KEYS = ("status", "labelled", "errors", "backlog", "retrying", "cannot_label", "watch")
DATA_KEYS = ("classes", "images", "skipped_images", "data_version", "validation_accuracy",
             "epochs")


def _data(config, newest):
    """classes, images, data_version, validation_accuracy, training and the target epoch,
    as the newest checkpoint (or, before the first, the newest data version) has them."""
    result = {"training": False, "validation_accuracy": None, "classes": None,
              "images": None, "data_version": None, "skipped_images": None}
    if config.data.source != "folder":
        result["classes"] = list(config.classify.labels)
    if newest is not None and newest.get("data_version") is not None:
        history = newest.get("history") or [{}]
        result.update(data_version=newest["data_version"], images=newest.get("images"),
                      skipped_images=newest.get("skipped_images"),
                      validation_accuracy=history[-1].get("val_accuracy"),
                      epochs=max(config.train.epochs, newest.get("data_target") or 0))
        if config.data.source == "folder":
            result["classes"] = newest.get("classes")
    elif (version := VersionStore(config.save).newest()) is not None:
        result.update(data_version=version.number, images=version.images,
                      skipped_images=len(version.get("skipped", [])))
        if config.data.source == "folder":
            result["classes"] = version.classes
    return result


def render(result, as_json):
    """JSON, or lines for people; the first says whether it runs and how far it got, for
    `wardrobe status | head -1`."""
    if as_json:
        return json.dumps(result, sort_keys=True)
    state = f"running (pid {result['running_pid']})" if result["running_pid"] else "not running"
    where = f"model {result['model']}; save {result['save']}"
    hung = [f"{key} does not respond (a network share that hangs?)"
            for key, answers in result["responds"].items() if not answers]
    if result["checkpoint"] is None:
        return "\n".join([f"wardrobe: {state}; no checkpoint yet: epoch 0/{result['epochs']}",
                          where, *hung])
    lines = [f"wardrobe: {state}; epoch {result['epoch']}/{result['epochs']}, "
             f"batch {result['step']}", where]
    written = datetime.datetime.fromisoformat(result["checkpoint_time"])
    age = datetime.datetime.now(datetime.timezone.utc) - written
    lines.append(f"last checkpoint: #{result['checkpoint']} at {written:%Y-%m-%d %H:%M:%S} UTC "
                 f"({_ago(age.total_seconds())})")
    if result["loss"] is not None:
        validation = result.get("validation_accuracy")
        lines.append(f"last epoch: loss {result['loss']:.4f} accuracy {result['accuracy']:.4f}"
                     + (f", validation accuracy {validation:.4f}" if validation is not None
                        else ""))
    if result.get("data_version") is not None:
        classes = result.get("classes") or []
        lines.append(f"data version {result['data_version']}: {result['images']:,} images, "
                     f"{len(classes)} classes ({', '.join(classes[:10])}"
                     + (f" and {len(classes) - 10} more)" if len(classes) > 10 else ")")
                     + (f"; {result['skipped_images']:,} skipped (see the log)"
                        if result.get("skipped_images") else "")
                     + ("; training" if result.get("training") else ""))
    if inbox := result.get("inbox"):
        lines.append(f"inbox: {inbox['labelled']:,} labelled, {inbox['errors']:,} errors, "
                     f"{inbox['backlog']:,} waiting, {inbox['retrying']:,} retrying; "
                     f"watched by {inbox['watch']['mode']} ({inbox['watch']['why']})")
        if inbox["cannot_label"]:
            lines.append(f"inbox: {inbox['cannot_label']:,} images cannot have a sidecar "
                         "(see the log)")
    if cluster := result.get("cluster"):
        lines += _cluster_lines(cluster)
    return "\n".join(lines + hung)


def _cluster_lines(cluster):
    if cluster["workers"] is None:
        return [f"cluster: broker {cluster['broker']}"]
    taking = [w for w in cluster["workers"] if w["alive"] and not w.get("refused")]
    rate = sum(w["photos_per_second"] for w in taking)
    lines = [f"cluster: broker {cluster['broker']} "
             f"({'connected' if cluster['connected'] else 'unreachable'}), "
             f"{len(taking)} of {len(cluster['workers'])} workers taking jobs "
             f"({rate:.1f} photos/s), {cluster['queue']} jobs queued, {cluster['jobs_out']} out"]
    for worker in cluster["workers"]:
        state = ("refuses our jobs: " + worker["refused"] if worker.get("refused") else
                 f"{worker['photos_per_second']:.1f} photos/s" if worker["alive"] else
                 f"gone, last seen {worker['last_seen']}")
        lines.append(f"  worker {worker['name']}: {worker['jobs']:,} jobs, {state}")
    return lines


def _ago(seconds):
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return f"{max(seconds, 0):.0f} s ago"
