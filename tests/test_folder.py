"""Training on the user's own images: a folder of class folders, data versions, new classes,
validation, the best checkpoint labelling, relabel. Real daemons, real folders of PNGs made
from the bundled sample."""

import json
import os
import random
import shutil
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest
import yaml

from conftest import NO_DAC, REPO, assert_loadable, newest_state, sidecar, status, wait_until
from daemon.data import dataset
from daemon.data.versions import VersionStore
from daemon.service.config import DEFAULT_LABELS
from daemon.training.store import CheckpointStore

TROUSER, DRESS, SNEAKER, BAG = 1, 3, 7, 8


@pytest.fixture(scope="module")
def sample():
    return dataset.load("sample")


def add_class(root, sample, label, count, start=0, name=None):
    """`count` training images of `label` as PNGs in root/<its name>/ (in a subfolder for
    every other one: nested folders belong to the class). Returns the folder."""
    folder = root / (name or DEFAULT_LABELS[label].replace("/", "-"))
    for number, index in enumerate(np.flatnonzero(sample.y_train == label)[start:start + count]):
        path = folder / ("more" if number % 2 else "") / f"{index}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), sample.x_train[index])
    return folder


def arrive(root, sample, label, count, start=0):
    """add_class(), as a user's copy lands while the daemon runs: the files written elsewhere,
    then moved in at once (a copy written file by file may become two data versions)."""
    staging = root.parent / f"staging-{label}-{start}"
    folder = add_class(staging, sample, label, count, start)
    target = root / folder.name
    if not target.exists():
        folder.rename(target)
        return target
    for path in sorted(folder.rglob("*.png")):
        destination = target / path.relative_to(folder)
        destination.parent.mkdir(parents=True, exist_ok=True)
        path.rename(destination)
    return target


def folder_config(tmp_path, root, **train):
    """A folder source with the 28x28 tutorial model (`model: auto` would pick the backbone:
    tests/test_photos_daemon.py): these tests are about the data side, on Fashion-MNIST crops."""
    settings = {"epochs": 2, "batch_size": 16, "seed": 3, "epochs_per_update": 2}
    settings.update(train)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"data": {"source": "folder", "path": str(root)},
                                    "model": "mlp", "train": settings}))
    return path


def drop(inbox, sample, label, count=3):
    """`count` test images of `label` into the inbox; their paths."""
    inbox.mkdir(exist_ok=True)
    paths = []
    for index in np.flatnonzero(sample.y_test == label)[:count]:
        paths.append(inbox / f"{DEFAULT_LABELS[label][:5]}-{index}.png")
        cv2.imwrite(str(paths[-1]), sample.x_test[index])
    return paths


def manifests(save):
    """Newest first; a running daemon may remove old ones while we read."""
    found = []
    for number in CheckpointStore(save).numbers():
        try:
            found.append(json.loads((save / f"ckpt-{number:08d}.json").read_text()))
        except FileNotFoundError:
            continue
    return found


def tutorial_width(save):
    """Load save/model.json + model.h5 as the tutorial does; the output width."""
    code = ("import keras; m = keras.models.model_from_json(open('model.json').read()); "
            "m.load_weights('model.h5'); print(m.outputs[0].shape[-1])")
    done = subprocess.run([sys.executable, "-c", code], cwd=save, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.split()[-1])


@pytest.fixture
def three_classes(tmp_path, sample):
    root = tmp_path / "dataset"
    for label in (TROUSER, SNEAKER, BAG):
        add_class(root, sample, label, 120)
    return root


def test_a_folder_of_class_folders_trains_and_labels_with_its_names(tmp_path, daemons, sample,
                                                                    three_classes):
    (three_classes / "Bag" / "broken.png").write_bytes(b"not a png")
    (three_classes / "loose.png").write_bytes(cv2.imencode(".png", sample.x_train[0])[1])
    config = folder_config(tmp_path, three_classes)
    daemon = daemons(config)
    daemon.wait_for_log(r"training complete", 180)
    assert re.search(r"data version 1: 360 images \(\d+ validation\) in 3 classes; 1 skipped",
                     daemon.log), daemon.log
    assert daemon.log.count("broken.png: skipped") == 1
    assert "loose.png: skipped" in daemon.log
    assert "is missing" not in daemon.log  # a first start has no version to miss
    assert re.search(r"epoch 2/2: .* validation loss [\d.]+ accuracy [\d.]+", daemon.log)
    # live.json, which status reads while the daemon runs, follows within a second
    report = wait_until(lambda: (lambda r: r if r["training"] is False else None)(
        status(config)), 30, message="status: not training")
    assert report["classes"] == ["Bag", "Sneaker", "Trouser"]  # a first version: sorted
    assert report["images"] == 360 and report["data_version"] == 1
    assert report["skipped_images"] == 1
    assert 0.5 < report["validation_accuracy"] <= 1.0
    images = drop(tmp_path / "inbox", sample, BAG) + drop(tmp_path / "inbox", sample, TROUSER)
    wait_until(lambda: all(sidecar(p) for p in images), 60, message="sidecars")
    labels = [sidecar(p)["label"] for p in images]
    assert labels.count("Bag") >= 2 and labels.count("Trouser") >= 2, labels
    assert daemon.stop() == 0, daemon.log
    assert tutorial_width(tmp_path / "save") == 3
    # The validation split is by content: about a tenth, the same images every time.
    version = VersionStore(tmp_path / "save").get(1)
    assert 15 <= version["counts"]["validation"] <= 60


def test_a_class_added_while_running_widens_the_head_and_trains_on(tmp_path, daemons, sample,
                                                                   three_classes):
    config = folder_config(tmp_path, three_classes)
    daemon = daemons(config)
    daemon.wait_for_log(r"training complete", 180)
    arrive(three_classes, sample, DRESS, 120)
    arrive(three_classes, sample, BAG, 10, start=120)  # more of an old class
    daemon.wait_for_log(r"data version 2: 490 images .* in 4 classes; new: Dress", 60)
    daemon.wait_for_log(r"widening the output layer to 4 classes", 60)
    wait_until(lambda: daemon.log.count("training complete") == 2, 180, message="more training")
    newest = manifests(tmp_path / "save")[0]
    assert newest["classes"] == ["Bag", "Sneaker", "Trouser", "Dress"]  # appended, not sorted
    assert newest["epoch"] == 4 and newest["data_version"] == 2  # 2 + epochs_per_update
    # (status reads live.json while the daemon runs: it follows within a second)
    expected = (["Bag", "Sneaker", "Trouser", "Dress"], 490, 2, 4)
    wait_until(lambda: (lambda r: (r["classes"], r["images"], r["data_version"], r["epochs"]))(
        status(config)) == expected, 30, message=f"status {expected}")
    dresses = drop(tmp_path / "inbox", sample, DRESS)
    wait_until(lambda: all(sidecar(p) for p in dresses), 60, message="sidecars")
    assert [sidecar(p)["label"] for p in dresses].count("Dress") >= 2
    # Files touched and renamed, but no image or class changed: it does not train again.
    epochs = len(re.findall(r"epoch \d+/\d+: loss", daemon.log))
    bags = sorted((three_classes / "Bag").glob("*.png"))
    os.utime(bags[0])
    bags[1].rename(bags[1].with_name("renamed.png"))
    daemon.wait_for_log(r"files changed but no image or class did; data version 2 stays")
    assert len(re.findall(r"epoch \d+/\d+: loss", daemon.log)) == epochs
    assert "data version 3" not in daemon.log
    assert daemon.stop() == 0, daemon.log
    assert tutorial_width(tmp_path / "save") == 4


def test_a_class_added_while_down_comes_in_at_the_next_start(tmp_path, daemons, sample,
                                                            three_classes):
    config = folder_config(tmp_path, three_classes)
    daemon = daemons(config)
    daemon.wait_for_log(r"training complete", 180)
    assert daemon.stop() == 0
    add_class(three_classes, sample, DRESS, 60)
    (three_classes / "Sneaker").rename(tmp_path / "sneakers-away")  # a class folder goes
    again = daemons(config)
    # (the files are a second old: the version may come just after the restored model has
    # said "training complete" for its old target)
    again.wait_for_log(r"epoch 4/4: .*\n.*training complete", 180)
    assert re.search(r"data version 2: 300 images .* in 4 classes; new: Dress", again.log)
    assert "class 'Sneaker' has no images" in again.log
    assert re.search(r"resuming from .*: epoch 2/\d, batch 0", again.log)
    newest = manifests(tmp_path / "save")[0]
    assert newest["classes"] == ["Bag", "Sneaker", "Trouser", "Dress"]  # Sneaker keeps its unit
    assert newest["epoch"] == 4 and newest["data_version"] == 2
    assert again.stop() == 0


def test_an_interrupted_epoch_ends_on_its_own_version(tmp_path, daemons, sample):
    """Killed inside an epoch, the folder changed meanwhile (images deleted, a class added):
    the epoch is finished on the data it began with; the new data comes at the boundary."""
    root = tmp_path / "dataset"
    for label in (TROUSER, SNEAKER, BAG):
        add_class(root, sample, label, 300)
    config = folder_config(tmp_path, root, batch_size=1, epochs=1, checkpoint_every=20)
    save = tmp_path / "save"
    daemon = daemons(config)
    wait_until(lambda: any(m["step"] for m in manifests(save)), 120, message="a mid-epoch ckpt")
    daemon.kill()
    interrupted = manifests(save)[0]
    assert (interrupted["epoch"], interrupted["data_version"]) == (0, 1), \
        "the epoch ended before the kill: nothing to resume"
    for path in list((root / "Bag").rglob("*.png"))[:100]:
        path.unlink()
    add_class(root, sample, DRESS, 40)
    again = daemons(config)
    again.wait_for_log(r"training complete", 180)
    assert again.stop() == 0
    log = again.log
    resumed = log.index("data version 1 (folder): ")
    finished = log.index("epoch 1/1: ")
    switched = log.index("data version 2 (folder): ")
    assert resumed < finished < switched, log
    assert f"batch {interrupted['step']}" in log[resumed:finished]
    assert re.search(r"new classes: Dress; training on to epoch 3", log)
    newest = manifests(save)[0]
    assert (newest["epoch"], newest["data_version"], newest["images"]) == (3, 2, 840)


def test_random_sigkills_while_versions_change_and_the_head_widens(tmp_path, daemons, sample):
    """kill -9 at random moments while classes and images arrive: every restart resumes (no
    crash loop), every checkpoint names a version that is there with its classes, and the
    tutorial's loader reads the result."""
    rng = random.Random(8)
    root = tmp_path / "dataset"
    add_class(root, sample, TROUSER, 60)
    add_class(root, sample, SNEAKER, 60)
    config = folder_config(tmp_path, root, batch_size=4, epochs=3, checkpoint_every=10)
    save = tmp_path / "save"
    arrivals = [(BAG, 0), (DRESS, 0), (BAG, 60), (0, 0), (TROUSER, 60)]
    for round_, (label, start) in enumerate(arrivals):
        daemon = daemons(config)
        daemon.wait_for_log(r"(no checkpoint in|resuming from)", 120)
        add_class(root, sample, label, 30, start=start)
        try:
            daemon.process.wait(timeout=rng.uniform(0.5, 4.0))
        except subprocess.TimeoutExpired:
            pass
        assert daemon.process.poll() is None, daemon.log  # no crash
        daemon.kill()
        if CheckpointStore(save).numbers():
            assert_loadable(save)
        versions = VersionStore(save)
        for manifest in manifests(save):
            version = versions.get(manifest["data_version"])
            assert version is not None, manifest["data_version"]
            assert version.classes == manifest["classes"]
            version.arrays()  # its digest checks
    final = daemons(config)
    wait_until(lambda: manifests(save) and manifests(save)[0]["data_version"] == VersionStore(
        save).numbers()[0] and status(config)["training"] is False and "training complete"
        in final.log, 300, message="trained on the newest data")
    assert final.stop() == 0, final.log
    classes = manifests(save)[0]["classes"]
    assert classes[:2] == ["Sneaker", "Trouser"] and sorted(classes[2:]) == ["Bag", "Dress",
                                                                           "T-shirt-top"]
    assert tutorial_width(save) == 5


def test_an_unchanged_folder_resumes_bit_identical_after_kills(tmp_path, tmp_path_factory,
                                                               daemons, sample):
    root = tmp_path_factory.mktemp("shared") / "dataset"
    for label in (TROUSER, SNEAKER, BAG):
        add_class(root, sample, label, 60)
    train = {"batch_size": 1, "epochs": 2, "checkpoint_every": 7}
    reference = tmp_path / "reference"
    reference.mkdir()
    done = daemons(folder_config(reference, root, **train))
    done.wait_for_log(r"training complete", 180)
    assert done.stop() == 0
    killed = tmp_path / "killed"
    killed.mkdir()
    config = folder_config(killed, root, **train)
    rng = random.Random(5)
    kills = 0
    while kills < 4:
        daemon = daemons(config)
        daemon.wait_for_log(r"(no checkpoint in|resuming from)", 120)
        try:
            daemon.process.wait(timeout=rng.uniform(0.2, 1.5))
        except subprocess.TimeoutExpired:
            pass
        if "training complete" in daemon.log:
            assert daemon.stop() == 0
            break
        daemon.kill()
        kills += 1
    assert kills >= 2, "the runs ended before most kills: nothing was resumed"
    final = daemons(config)
    final.wait_for_log(r"training complete", 180)
    assert final.stop() == 0
    (manifest, arrays), (expected_manifest, expected) = (newest_state(killed / "save"),
                                                        newest_state(reference / "save"))
    assert manifest["epoch"] == expected_manifest["epoch"] == 2
    assert all(np.array_equal(arrays[name], expected[name]) for name in expected)
    # Timings and the inbox's work are measured, not trained: they differ run to run.
    measured = ("seconds", "checkpoint_seconds", "images_labelled")
    assert manifest["history"] == [dict(h, **{k: m.get(k) for k in measured if k in m})
                                   for h, m in zip(expected_manifest["history"],
                                                   manifest["history"])]
    assert VersionStore(killed / "save").numbers() == [1]


def test_relabel_rewrites_what_another_checkpoint_labelled(tmp_path, daemons, sample,
                                                         three_classes):
    config = folder_config(tmp_path, three_classes, epochs=3)
    daemon = daemons(config)
    daemon.wait_for_log(r"training complete", 180)
    images = drop(tmp_path / "inbox", sample, BAG) + drop(tmp_path / "inbox", sample, SNEAKER)
    wait_until(lambda: all(sidecar(p) for p in images), 60, message="sidecars")
    first = {sidecar(p)["model"] for p in images}
    assert len(first) == 1

    def relabel(*args):
        done = subprocess.run([sys.executable, "-m", "daemon", "relabel", *args, "--config",
                               str(config)], capture_output=True, text=True, cwd=REPO,
                              timeout=180)
        assert done.returncode == 0, done.stderr[-2000:]
        return int(re.search(r"relabelled (\d+) images", done.stdout).group(1))

    # While it runs: the daemon does the writing.
    assert relabel() == 0
    assert relabel("--all") == 6
    daemon.wait_for_log(r"relabelled 6 inbox images")
    assert daemon.stop() == 0
    # While it is down, after a switch to the newest checkpoint.
    text = config.read_text() + "classify: {checkpoint: newest}\n"
    config.write_text(text)
    newest = CheckpointStore(tmp_path / "save").scan()[0]
    expected = 0 if newest.id in first else 6
    assert relabel() == expected
    assert {sidecar(p)["model"] for p in images} == {newest.id}
    assert relabel() == 0


def test_a_file_written_slowly_into_a_class_waits_for_its_end(tmp_path, daemons, sample,
                                                              three_classes):
    """A download that pauses is neither skipped as broken nor trained on half-written."""
    config = folder_config(tmp_path, three_classes)
    daemon = daemons(config)
    daemon.wait_for_log(r"training complete", 180)
    data = cv2.imencode(".png", sample.x_train[np.flatnonzero(sample.y_train == BAG)[500]])[1]
    data = data.tobytes()
    with open(three_classes / "Bag" / "slow.png", "wb") as file:
        file.write(data[: len(data) // 2])
        file.flush()
        daemon.wait_for_log(r"Bag/slow.png is still being written", 30)
        file.write(data[len(data) // 2:])
    daemon.wait_for_log(r"data version 2: 361 images", 30)
    assert "not a usable image" not in daemon.log
    assert daemon.stop() == 0


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root and setpriv to drop the capability to read anything")
def test_a_class_folder_that_cannot_be_listed_keeps_its_images_and_blocks_nothing(
        tmp_path, daemons, sample, three_classes):
    config = folder_config(tmp_path, three_classes)
    daemon = daemons(config, wrapper=NO_DAC)
    daemon.wait_for_log(r"training complete", 180)
    (three_classes / "Sneaker").chmod(0)
    try:
        arrive(three_classes, sample, DRESS, 30)
        daemon.wait_for_log(r"data version 2: 390 images .* in 4 classes; new: Dress", 60)
        assert re.search(r"WARNING .*cannot list .*/Sneaker \(Permission denied\); its images "
                         r"stay", daemon.log)
    finally:
        (three_classes / "Sneaker").chmod(0o755)
    arrive(three_classes, sample, SNEAKER, 5, start=200)
    daemon.wait_for_log(r"data version 3: 395 images", 60)
    assert daemon.stop() == 0


def test_waiting_for_a_second_class_is_a_ready_daemon(tmp_path, daemons, sample):
    """With one class there is nothing to train yet: the daemon is up and says so (systemd
    would otherwise kill a start that never ends)."""
    from test_systemd import FakeNotifySocket

    root = tmp_path / "dataset"
    add_class(root, sample, BAG, 20)
    config = folder_config(tmp_path, root)
    fake = FakeNotifySocket(str(tmp_path / "notify.sock"))
    try:
        daemon = daemons(config, env={"NOTIFY_SOCKET": fake.address, "WATCHDOG_USEC": "4000000"})
        daemon.wait_for_log(r"ready: waiting for training data, inbox watched", 60)
        wait_until(lambda: fake.lines("READY=1") and fake.lines("WATCHDOG=1"), 30,
                   message="READY and a watchdog ping")
        # said by the data thread, maybe after READY on a busy machine
        daemon.wait_for_log(r"waiting for at least 2 class folders with images", 60)
        report = wait_until(lambda: status(config)["inbox"] and status(config), 30,
                            message="live status")
        assert report["training"] is False and report["data_version"] is None
        add_class(root, sample, DRESS, 20)
        daemon.wait_for_log(r"training complete", 120)
        assert daemon.stop() == 0
    finally:
        fake.close()


def test_a_model_of_fashion_mnist_is_not_retrained_on_a_folder(tmp_path, one_epoch_save,
                                                              three_classes):
    """Its ten outputs mean Fashion-MNIST's classes: a folder source needs a new save/."""
    shutil.copytree(one_epoch_save, tmp_path / "save")
    config = folder_config(tmp_path, three_classes)
    done = subprocess.run([sys.executable, "-m", "daemon", "run", "--config", str(config)],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "holds a model trained on fashion-mnist data but data.source is 'folder'" in \
        done.stderr
    assert "tensorflow" not in done.stderr.lower()


def test_deleted_data_versions_are_made_again_under_new_numbers_and_trained_on(
        tmp_path, daemons, sample):
    """save/data/version-* looks like a cache: deleted while the daemon runs, the version in
    use is made again from the folder under a higher number (never a number used before, which
    would name other images), images added next are trained on, and status tells what the
    model was trained on, also after restarts; emptied while stopped, it is rebuilt too."""
    root = tmp_path / "dataset"
    add_class(root, sample, TROUSER, 40)
    add_class(root, sample, BAG, 40)
    config = folder_config(tmp_path, root)
    save = tmp_path / "save"
    daemon = daemons(config)
    daemon.wait_for_log(r"training complete", 180)
    assert (manifests(save)[0]["data_version"], manifests(save)[0]["images"]) == (1, 80)
    for path in (save / "data").glob("version-*"):
        path.unlink()
    daemon.wait_for_log(r"WARNING .*data version 1 is missing from .*; rebuilding it", 30)
    daemon.wait_for_log(r"data version 2: 80 images", 60)
    # The same images under a new number: nothing new to train on.
    daemon.wait_for_log(r"the same images as data version 1; training goes on with it", 60)
    wait_until(lambda: manifests(save)[0]["data_version"] == 2, 30, message="a checkpoint "
               "naming version 2")
    assert manifests(save)[0]["epoch"] == 2
    arrive(root, sample, BAG, 40, start=40)
    wait_until(lambda: (manifests(save)[0]["data_version"], manifests(save)[0]["images"],
                        manifests(save)[0]["epoch"]) == (3, 120, 4), 180,
               message=f"trained on 120 images of version 3:\n{daemon.log[-3000:]}")
    assert VersionStore(save).numbers()[0] == 3
    assert daemon.stop() == 0, daemon.log
    again = daemons(config)
    again.wait_for_log(r"resuming from .*: epoch 4/4, batch 0", 120)
    report = status(config)
    assert (report["data_version"], report["images"], report["epoch"]) == (3, 120, 4), report
    assert again.stop() == 0, again.log
    # Emptied while stopped (its high-water file too): rebuilt, numbered above the checkpoint's.
    shutil.rmtree(save / "data")
    arrive(root, sample, TROUSER, 20, start=40)
    third = daemons(config)
    third.wait_for_log(r"WARNING .*data version 3, named by checkpoint \d+, is missing from "
                       r".*; it is being rebuilt", 120)
    third.wait_for_log(r"data version 4: 140 images", 60)
    wait_until(lambda: (manifests(save)[0]["data_version"], manifests(save)[0]["images"],
                        manifests(save)[0]["epoch"]) == (4, 140, 6), 180,
               message=f"trained on version 4:\n{third.log[-3000:]}")
    assert manifests(save)[0]["classes"] == ["Bag", "Trouser"]
    assert third.stop() == 0, third.log
    assert (status(config)["data_version"], status(config)["images"]) == (4, 140)
