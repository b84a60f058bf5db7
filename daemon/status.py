"""`status`: progress read from save/ alone, without importing TensorFlow."""

import datetime
import json

from daemon.store import CheckpointStore, running_pid


def report(config):
    """A dict with at least epoch, step, epochs, loss, accuracy."""
    newest, _ = CheckpointStore(config.save).scan()
    result = {"epoch": 0, "step": 0, "epochs": config.train.epochs, "loss": None,
              "accuracy": None, "checkpoint": None, "checkpoint_time": None,
              "model": config.model, "save": str(config.save),
              "running_pid": running_pid(config.save)}
    if newest is not None:
        result.update(epoch=newest["epoch"], step=newest["step"], loss=newest.get("loss"),
                      accuracy=newest.get("accuracy"), checkpoint=newest.number,
                      checkpoint_time=newest["written_at"],
                      model=newest.get("fingerprint", {}).get("model", config.model))
    result["inbox"] = _live(config.save, result["running_pid"])
    return result


def _live(save, pid):
    """What the running daemon says of its inbox (save/live.json), or None when it is down:
    labelled, errors, backlog, retrying, cannot_label, watch (mode and why)."""
    try:
        live = json.loads((save / "live.json").read_text())
    except (OSError, ValueError):
        return None
    if pid is None or live.get("pid") != pid:
        return None
    return {key: live.get(key) for key in ("status", "labelled", "errors", "backlog",
                                          "retrying", "cannot_label", "watch")}


def render(result, as_json):
    """JSON, or lines for people; the first says whether it runs and how far it got, for
    `wardrobe status | head -1`."""
    if as_json:
        return json.dumps(result, sort_keys=True)
    state = f"running (pid {result['running_pid']})" if result["running_pid"] else "not running"
    where = f"model {result['model']}; save {result['save']}"
    if result["checkpoint"] is None:
        return f"wardrobe: {state}; no checkpoint yet: epoch 0/{result['epochs']}\n{where}"
    lines = [f"wardrobe: {state}; epoch {result['epoch']}/{result['epochs']}, "
             f"batch {result['step']}", where]
    written = datetime.datetime.fromisoformat(result["checkpoint_time"])
    age = datetime.datetime.now(datetime.timezone.utc) - written
    lines.append(f"last checkpoint: #{result['checkpoint']} at {written:%Y-%m-%d %H:%M:%S} UTC "
                 f"({_ago(age.total_seconds())})")
    if result["loss"] is not None:
        lines.append(f"last epoch: loss {result['loss']:.4f} accuracy {result['accuracy']:.4f}")
    if inbox := result.get("inbox"):
        lines.append(f"inbox: {inbox['labelled']:,} labelled, {inbox['errors']:,} errors, "
                     f"{inbox['backlog']:,} waiting, {inbox['retrying']:,} retrying; "
                     f"watched by {inbox['watch']['mode']} ({inbox['watch']['why']})")
        if inbox["cannot_label"]:
            lines.append(f"inbox: {inbox['cannot_label']:,} images cannot have a sidecar "
                         "(see the log)")
    return "\n".join(lines)


def _ago(seconds):
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return f"{max(seconds, 0):.0f} s ago"
