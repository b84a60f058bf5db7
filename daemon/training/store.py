"""The checkpoint store: numbered generations in save/, written so a crash never loses both.

A generation N is `ckpt-N.npz` (everything needed to resume) and `ckpt-N.json` (the
manifest: progress, fingerprint, sha256 of the state file and a sha256 block digest of each
export: fsutil.BlockDigest, cheap for a model.h5 whose head alone changed). The manifest's
rename is the commit point: it is written last, after the state file and the exports
(`model.json`, `model.h5`, the tutorial-facing pair; written at epoch ends and stops, not
by mid-epoch generations) are complete, fsynced and renamed. The previous generation is kept.
Reading needs no TensorFlow, so `status` stays fast.

After a crash or power cut, what was never committed (a state file without a manifest,
temporaries, exports written before the first manifest) is a write cut short, not damage:
it is removed. Only a committed generation that fails verification is quarantined.
"""

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

from daemon import fsutil
from daemon.errors import AlreadyRunning, ConfigError, IncompatibleCheckpoint
from daemon.sequence import Sequence

log = logging.getLogger("daemon.store")  # the name users see: daemon.service.logs

FORMAT = 1
_GENERATION = re.compile(r"^ckpt-(\d{8})\.(json|npz)$")
EXPORTS = ("model.json", "model.h5")


def manifest_name(number):
    return f"ckpt-{number:08d}.json"


def state_name(number):
    return f"ckpt-{number:08d}.npz"


class Generation:
    """One verified checkpoint generation."""

    def __init__(self, folder, manifest):
        self.folder = Path(folder)
        self.manifest = manifest
        self.number = manifest["generation"]

    def __getitem__(self, key):
        return self.manifest[key]

    def get(self, key, default=None):
        return self.manifest.get(key, default)

    @property
    def id(self):
        """Names this checkpoint in logs and sidecars: generation and time written."""
        return f"{self.number}@{self.manifest['written_at']}"

    def read_state(self):
        return (self.folder / state_name(self.number)).read_bytes()

    def stale_exports(self):
        """Exports in the folder that differ from what this generation recorded there."""
        stale = []
        for name in EXPORTS:
            expected = self.manifest.get("exports", {}).get(name)
            try:
                actual = fsutil.file_digest(self.folder / name, like=expected)
            except OSError:
                actual = None
            if actual != expected:
                stale.append(name)
        return stale


class CheckpointStore:
    def __init__(self, folder):
        self.folder = Path(folder)
        self._export_digests = {}  # name -> digest of what we last wrote there
        self.sequence = Sequence(self.folder, ".last-generation")

    # ---- reading ---------------------------------------------------------------------------

    def numbers(self):
        """Generation numbers that have a manifest or a state file, newest first."""
        found = set()
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return []
        for name in names:
            match = _GENERATION.match(name)
            if match:
                found.add(int(match.group(1)))
        return self.sequence.listed(sorted(found, reverse=True))

    def scan(self):
        """(newest verified Generation or None, [(number, why) for newer damaged ones]).

        Only committed generations (with a manifest) count: a state file without one is a
        write in progress or cut short, never damage.
        """
        damaged = []
        for number in self.numbers():
            try:
                manifest = self._verify(number)
            except _Damaged as why:
                damaged.append((number, str(why)))
                continue
            if manifest is not None:
                return Generation(self.folder, manifest), damaged
        return None, damaged

    def _verify(self, number):
        """The manifest of a sound generation; None if it was never committed."""
        path = self.folder / manifest_name(number)
        try:
            manifest = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            raise _Damaged(f"manifest unreadable: {error}") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise _Damaged("manifest has an unknown format")
        if manifest.get("generation") != number or not isinstance(manifest.get("files"), dict):
            raise _Damaged("manifest does not describe this generation")
        state = state_name(number)
        expected = manifest["files"].get(state)
        try:
            actual = fsutil.sha256_file(self.folder / state)
        except OSError as error:
            raise _Damaged(f"{state} unreadable: {error.strerror}") from None
        if actual != expected:
            raise _Damaged(f"{state} does not match its checksum")
        return manifest

    # ---- writing ---------------------------------------------------------------------------

    def write(self, meta, state, exports, started=None, digests=None):
        """Write a new generation; returns it. `state` and each export are bytes; `exports`
        may be empty (the files stay as they are, and the manifest records them as such);
        `digests` may give an export's fsutil.BlockDigest, kept up to date by its maker.
        With `started` (a time.monotonic()), the manifest records `write_seconds`: the time
        from then until it is itself written.

        Order: the number's high-water file (save/.last-generation), state file, changed
        exports, fsync folder, manifest, fsync folder. A crash before the manifest's rename
        leaves the previous generation as the newest complete one (and its number unused).
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        numbers = self.numbers()
        number = self.sequence.next(numbers)  # durable with the fsync before the manifest
        try:
            fsutil.write_new(self.folder / state_name(number), state, sync_folder=False)
            files = {state_name(number): hashlib.sha256(state).hexdigest()}
            for name, data in exports.items():
                self._write_export(name, data, (digests or {}).get(name))
            fsutil.fsync_folder(self.folder)
        except BaseException:
            # No manifest, no generation: drop the orphan so numbering stays meaningful.
            fsutil.unlink_if_present(self.folder / state_name(number))
            raise
        manifest = dict(meta, format=FORMAT, generation=number, files=files,
                        exports=dict(self._export_digests),
                        written_at=fsutil.utc_timestamp())
        if started is not None:
            manifest["write_seconds"] = round(time.monotonic() - started, 4)
        body = json.dumps(manifest, indent=1, sort_keys=True).encode()
        fsutil.write_new(self.folder / manifest_name(number), body, sync_folder=True)
        self._prune(keep={number, numbers[0] if numbers else number})
        return Generation(self.folder, manifest)

    def adopt(self, generation):
        """Continue from `generation`: its intact exports need no rewriting; returns the
        names of those that are damaged or stale (to be repaired with write_exports)."""
        stale = generation.stale_exports()
        self._export_digests = {name: digest for name, digest in
                                generation.get("exports", {}).items() if name not in stale}
        return stale

    def has_exports(self):
        """Are model.json and model.h5 on disk, as this store wrote or adopted them?"""
        return all(name in self._export_digests for name in EXPORTS)

    def write_exports(self, exports, digests=None):
        """Rewrite the exports alone (repairing them from a restored generation)."""
        for name, data in exports.items():
            self._write_export(name, data, (digests or {}).get(name))
        fsutil.fsync_folder(self.folder)

    def _write_export(self, name, data, digest=None):
        digest = digest or fsutil.BlockDigest(data).hexdigest()
        if self._export_digests.get(name) != digest:  # model.json rarely changes
            fsutil.write_new(self.folder / name, data, sync_folder=False)
            self._export_digests[name] = digest

    def _prune(self, keep):
        """Remove older generations but those in `keep` (the newest two) and the best."""
        best = self.best()
        keep = keep | ({best.number} if best is not None else set())
        for number in self.numbers():
            if number < max(keep) and number not in keep:
                for name in (manifest_name(number), state_name(number)):
                    fsutil.unlink_if_present(self.folder / name)

    # ---- the best so far -----------------------------------------------------------------

    def best(self):
        """The best verified generation by validation accuracy, or None. A contest within
        one data version (same validation images, same classes): the newest version that
        has a contestant holds it, the earliest of equals wins (kept until beaten). Only
        epoch ends compete: their manifest holds the validation of those very weights."""
        # epoch ends: validated (or with nothing to validate on)
        ends = [m for m in self._manifests() if m.get("validation_accuracy") is not None
                or m.get("validation_images") == 0 and m.get("step") == 0]
        entrants = []
        if ends:
            version = max(m.get("data_version") or 0 for m in ends)
            entrants = [m for m in ends if (m.get("data_version") or 0) == version]
            # A version without validation images holds no contest: its newest labels.
            entrants.sort(key=lambda m: (-(m.get("validation_accuracy") or 0),
                                         m["generation"] * (1 if m.get("validation_images")
                                                            else -1)))
        for manifest in entrants:
            try:
                verified = self._verify(manifest["generation"])
            except _Damaged:
                continue
            if verified is not None:
                return Generation(self.folder, verified)
        return None

    def data_versions(self):
        """The data versions named by the generations in the folder."""
        return {m["data_version"] for m in self._manifests()
                if isinstance(m.get("data_version"), int)}

    def trained_on(self):
        """(data version, classes) of the newest generation that names them, or (0, []):
        what the model was last trained on and what its output units mean."""
        for manifest in self._manifests():
            if isinstance(manifest.get("data_version"), int):
                return manifest["data_version"], list(manifest.get("classes") or [])
        return 0, []

    def _manifests(self):
        """The manifests in the folder that parse, newest first, unverified (cheap: for
        choosing; a chosen generation is verified before use)."""
        for number in self.numbers():
            try:
                manifest = json.loads((self.folder / manifest_name(number)).read_bytes())
            except (OSError, ValueError):
                continue
            if isinstance(manifest, dict):
                yield manifest

    def labelling(self, prefer):
        """The generation that labels: the best (`prefer` "best"; the newest until there is
        a best) or the newest."""
        chosen = self.best() if prefer == "best" else None
        return chosen if chosen is not None else self.scan()[0]

    # ---- repair ----------------------------------------------------------------------------

    def tidy(self):
        """At start, with no writer running: remove what a write cut short left behind --
        temporaries, state files without a manifest, and the exports if no generation was
        ever committed (they were written before the first manifest). Returns the names."""
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return []
        committed = self.committed()
        removed = []
        for name in names:
            match = _GENERATION.match(name)
            orphan = match and match.group(2) == "npz" and int(match.group(1)) not in committed
            if fsutil.is_temp_name(name) or orphan or (name in EXPORTS and not committed):
                fsutil.unlink_if_present(self.folder / name)
                removed.append(name)
        if removed:
            fsutil.fsync_folder(self.folder)
            log.info("removed what an unfinished checkpoint write left in %s: %s",
                     self.folder, ", ".join(sorted(removed)))
        return removed

    def quarantine(self, numbers, with_exports):
        """Move damaged generations (and the exports) to save/corrupt-<time>/; returns it."""
        stamp = fsutil.utc_timestamp().replace(":", "").replace("-", "")
        target = self.folder / f"corrupt-{stamp}"
        target.mkdir(parents=True, exist_ok=True)
        names = [n for number in numbers for n in (manifest_name(number), state_name(number))]
        for name in names + (list(EXPORTS) if with_exports else []):
            if (self.folder / name).exists():
                shutil.move(self.folder / name, target / name)
        fsutil.fsync_folder(self.folder)
        return target

    def committed(self):
        """Numbers of the generations that were committed (have a manifest), sound or not."""
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return set()
        return {int(match.group(1)) for match in map(_GENERATION.match, names)
                if match and match.group(2) == "json"}


CHOICE = "model-choice.json"  # save/'s model, as `model: auto` resolved at its first start


def resolve_model(config):
    """`config` with `model: auto` made concrete, once per save/ and for good: the model of
    its newest checkpoint (a save/ from before `auto` keeps its model), else the choice
    recorded at its first start (record_model), else efficientnet_lite0 for a folder source
    and the tutorial's mlp for Fashion-MNIST. No TensorFlow."""
    if config.model != "auto":
        return config
    folder = Path(config.save)
    newest, _ = CheckpointStore(folder).scan()
    model = newest.get("fingerprint", {}).get("model") if newest is not None else None
    why = "its checkpoints' model"  # an upgraded save/ says which model it kept
    if model is None:
        try:
            model = json.loads((folder / CHOICE).read_bytes()).get("model")
        except (OSError, ValueError, AttributeError):
            model = None
        why = f"chosen at its first start, {CHOICE}"
    if model is None:
        model = "efficientnet_lite0" if config.data.source == "folder" else "mlp"
        why = f"data.source {config.data.source}"
    log.info("model: auto is %s for this save/ (%s)", model, why)
    if config.weights is not None and model in ("mlp", "cnn"):
        raise ConfigError("weights", f"a backbone's weights file, but model: auto is {model} "
                          f"for {config.save} (a backbone's model is efficientnet_lite0)")
    return dataclasses.replace(config, model=model)


def record_model(config):
    """Write down what `model: auto` chose for save/ at its first start (the daemon, holding
    save/'s lock, once the config was found sound), so that it stays."""
    path = Path(config.save) / CHOICE
    if not path.exists() and not CheckpointStore(config.save).numbers():
        try:
            fsutil.write_new(path, json.dumps({"model": config.model}).encode())
        except OSError as error:  # the first checkpoint records it too; next start again
            log.warning("cannot write %s (%s); the model is recorded with the first "
                        "checkpoint", path, error.strerror or error)


def open_store(config, weights=None):
    """Pick the generation to resume from; quarantine what is damaged. No TensorFlow.

    A damaged newest generation falls back to the previous one (WARNING); if nothing
    committed is loadable, every checkpoint file moves to save/corrupt-<time>/ (ERROR) and
    training starts afresh; what was never committed is removed (INFO); a checkpoint of
    another model, or of a backbone with other `weights` (a daemon.backbone.runtime.Weights),
    is refused (exit 2) and left untouched.
    """
    store = CheckpointStore(config.save)
    newest, damaged = store.scan()
    if newest is not None:
        made_for = newest.get("fingerprint", {}).get("model")
        if made_for != config.model:
            raise IncompatibleCheckpoint(
                f"{config.save} holds a checkpoint of model {made_for!r} but the config asks "
                f"for {config.model!r}; set `model: {made_for}` or point `save` elsewhere")
        made_with = newest.get("fingerprint", {}).get("weights")
        if weights is not None and made_with != weights.sha256:
            raise IncompatibleCheckpoint(
                f"weights: {config.save} holds a head trained on other backbone weights "
                f"(sha256 {str(made_with)[:16]}…, now {weights.sha256[:16]}… from "
                f"{weights.path}); set `weights` back or point `save` elsewhere")
        # Its output units mean its classes: Fashion-MNIST's ten, or a folder's own.
        trained_on = newest.get("data_kind", "fashion-mnist")
        if trained_on != data_kind(config):
            raise IncompatibleCheckpoint(
                f"{config.save} holds a model trained on {trained_on} data but data.source "
                f"is {config.data.source!r}; point `save` elsewhere to start afresh")
    if damaged:
        target = store.quarantine([number for number, _ in damaged], with_exports=newest is None)
        if newest is not None:
            for number, why in damaged:
                log.warning("checkpoint %d is unusable (%s); moved to %s, resuming from "
                            "checkpoint %d", number, why, target, newest.number)
        else:
            log.error("no loadable checkpoint in %s (%s); moved the files to %s and starting "
                      "afresh", config.save, "; ".join(f"{n}: {why}" for n, why in damaged),
                      target)
    store.tidy()
    return newest


def data_kind(config):
    """What a model's outputs mean: "folder" (its class folders) or "fashion-mnist"."""
    return "folder" if config.data.source == "folder" else "fashion-mnist"


def lock(folder):
    """Hold an exclusive lock on save/.lock for the process's life; one daemon per save/."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    file, pid = fsutil.lock_file(folder / ".lock", f"{os.getpid()}\n")
    if file is None:
        raise AlreadyRunning(f"another wardrobe (pid {pid or '?'}) is running on {folder}")
    return file


def running_pid(folder):
    """The pid of the daemon holding save/.lock, or None."""
    try:
        return int(fsutil.lock_holder(Path(folder) / ".lock") or 0) or None
    except ValueError:
        return None


class _Damaged(Exception):
    pass
