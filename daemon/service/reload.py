"""SIGHUP: the config file read again. What can change in a running daemon changes; what
needs a restart is named and keeps its running value; a broken file changes nothing."""

import dataclasses
import logging

from daemon.errors import ConfigError
from daemon.service import config as config_module

log = logging.getLogger("daemon.service")

# What a reload can change in a running daemon; anything else needs a restart.
LIVE_KEYS = ("train.epochs", "train.epochs_per_update", "classify.labels",
             "classify.sidecar", "classify.extensions", "classify.checkpoint", "watch.mode",
             "watch.poll_seconds", "watch.rescan_seconds")


def reloaded(running):
    """(the config to run with from now on, the live keys it changed): `running` with the
    live settings of its file read again; None when that file is broken."""
    try:
        new = config_module.load(running.source) if running.source else running
    except ConfigError as error:
        log.error("reload: %s; carrying on with the config in force", error)
        return None
    if new.model == "auto":  # resolved once, at the first start
        new = dataclasses.replace(new, model=running.model)
    changed = running.differences(new)
    for key in changed:
        if key not in LIVE_KEYS:
            log.warning("reload: %s changed; that takes a restart (systemctl restart "
                        "wardrobe): carrying on with the old value", key)
    return _with_live_settings(running, new), [key for key in changed if key in LIVE_KEYS]


def _with_live_settings(running, new):
    """`running` with LIVE_KEYS' values taken from `new` (classify.* and watch.* whole)."""
    return dataclasses.replace(
        running, train=dataclasses.replace(running.train, epochs=new.train.epochs,
                                           epochs_per_update=new.train.epochs_per_update),
        classify=new.classify, watch=new.watch)
