"""Every image dropped into inbox/ gets exactly one label: real observer, files, daemon."""

import os
import random
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import REPO, TEST_IMAGES, run_to_completion, sidecar, wait_until, write_config
from daemon.data import dataset


@pytest.fixture(scope="module")
def crops():
    sample = dataset.load("sample")
    return sample.x_test[:TEST_IMAGES], sample.y_test[:TEST_IMAGES]


@pytest.fixture
def trained(tmp_path, small_data, one_epoch_save):
    """A config whose training is already complete, so the daemon only labels."""
    shutil.copytree(one_epoch_save, tmp_path / "save")
    return write_config(tmp_path, small_data, epochs=1)


def png(crop):
    return cv2.imencode(".png", crop)[1].tobytes()


def images_in(inbox):
    return sorted(p for p in Path(inbox).rglob("*") if p.suffix == ".png" and p.is_file())


def all_labelled(inbox, count):
    found = images_in(inbox)
    return len(found) == count and all(sidecar(p) and "label" in sidecar(p) for p in found)


def leftovers(inbox):
    """Temporary files, or sidecars without an image."""
    names = [p for p in Path(inbox).rglob("*") if p.is_file()]
    return [p for p in names if p.name.endswith(".tmp")
            or (p.suffix == ".json" and not Path(str(p)[:-5]).exists())]


class Dropper:
    """Drops images the ways users do: moved in, copied in, written in two halves."""

    def __init__(self, inbox, crops, staging):
        self.inbox, self.crops, self.staging = Path(inbox), crops, Path(staging)
        self.count = 0
        self.staging.mkdir(exist_ok=True)

    def _next(self, folder):
        self.count += 1
        target = self.inbox / folder
        target.mkdir(parents=True, exist_ok=True)
        return target / f"img {self.count:05d} é.png", png(self.crops[self.count % len(self.crops)])

    def moved(self, folder="moved"):
        path, data = self._next(folder)
        staged = self.staging / path.name
        staged.write_bytes(data)
        os.rename(staged, path)

    def copied(self, folder="copied"):
        path, data = self._next(folder)
        with open(path, "wb") as file:
            for start in range(0, len(data), 64):
                file.write(data[start:start + 64])

    def in_two_halves(self, pause, folder="halves"):
        path, data = self._next(folder)
        with open(path, "wb") as file:
            file.write(data[: len(data) // 2])
            file.flush()
            pause.wait(0.3)  # a writer that stalls halfway
            file.write(data[len(data) // 2:])


def test_drop_storms_with_kill_9_and_restarts_label_each_image_once(tmp_path, trained, daemons,
                                                                  crops):
    rng = random.Random(7)
    inbox = tmp_path / "inbox"
    dropper = Dropper(inbox, crops[0], tmp_path / "staging")
    seen = {}  # image -> its sidecar as first seen; must never change
    for round_ in range(4):
        daemon = daemons(trained)
        daemon.wait_for_log(r"watching .*inbox")
        pause = threading.Event()
        for _ in range(40):
            dropper.moved()
            dropper.copied()
        halves = threading.Thread(target=lambda: [dropper.in_two_halves(pause) for _ in range(3)])
        halves.start()
        try:
            daemon.process.wait(timeout=rng.uniform(0.05, 0.6))  # a random moment
        except subprocess.TimeoutExpired:
            pass
        daemon.kill()
        halves.join()
        for image in images_in(inbox):
            record = sidecar(image)
            if record is not None:
                assert seen.setdefault(image, record) == record, f"{image} labelled twice"
    daemon = daemons(trained)
    wait_until(lambda: all_labelled(inbox, dropper.count), 60, message="every image labelled")
    assert daemon.stop() == 0, daemon.log
    assert not leftovers(inbox)
    for image in images_in(inbox):
        record = sidecar(image)
        assert record["file"]["size"] == image.stat().st_size  # never read half-written
        assert seen.get(image, record) == record, f"{image} labelled twice"
        assert set(record) >= {"label", "class", "confidence", "epoch", "model", "classified_at"}


def test_images_waiting_for_the_first_checkpoint_are_labelled_with_it(tmp_path, small_data,
                                                                      daemons, crops):
    """One epoch, checkpointed at its end only: the one generation there is labels what
    waited for it (its state file seen before its manifest once hid it for good)."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    images = [inbox / f"early-{index}.png" for index in range(5)]
    for index, image in enumerate(images):
        image.write_bytes(png(crops[0][index]))
    daemon = daemons(write_config(tmp_path, small_data, epochs=1, checkpoint_every="epoch"))
    daemon.wait_for_log(r"training complete", 120)
    wait_until(lambda: all(sidecar(p) and "label" in sidecar(p) for p in images), 30,
               message="labelled with the first checkpoint")
    assert daemon.stop() == 0


def test_bad_input_gets_error_sidecars_and_the_daemon_lives_on(tmp_path, trained, daemons,
                                                               crops):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(png(crops[0][0]))
    (outside / "victim.txt").write_text("untouched\n")
    daemon = daemons(trained)
    daemon.wait_for_log(r"watching .*inbox")
    bad = {
        "empty.png": b"",
        "garbage.jpg": b"\x00garbage" * 100,
        "truncated.png": png(crops[0][1])[:100],
        "line\nbreak and spaces.PNG": b"not really a png",
    }
    for name, data in bad.items():
        (inbox / name).write_bytes(data)
    (inbox / "folder.png").mkdir()
    (inbox / "escape.png").symlink_to(outside / "secret.png")
    (inbox / "linked-folder").symlink_to(outside)
    (inbox / "planted.png.json").symlink_to(outside / "victim.txt")
    (inbox / "planted.png").write_bytes(png(crops[0][2]))
    (inbox / "good.png").write_bytes(png(crops[0][3]))
    errors = {name: None for name in [*bad, "escape.png"]}
    wait_until(lambda: all(sidecar(inbox / name) for name in [*errors, "good.png", "planted.png"]),
               30, message="sidecars for every file")
    for name in errors:
        assert "error" in sidecar(inbox / name), name
    assert "symbolic link" in sidecar(inbox / "escape.png")["error"]
    assert sidecar(inbox / "good.png")["label"]
    assert not (inbox / "planted.png.json").is_symlink()
    assert sidecar(inbox / "planted.png")["label"]
    assert (outside / "victim.txt").read_text() == "untouched\n"
    assert sorted(p.name for p in outside.iterdir()) == ["secret.png", "victim.txt"]
    assert not (inbox / "folder.png.json").exists()
    assert daemon.process.poll() is None
    (inbox / "after.png").write_bytes(png(crops[0][4]))
    wait_until(lambda: sidecar(inbox / "after.png"), 30, message="the daemon still labelling")
    assert daemon.stop() == 0


MAX_QUEUED = Path("/proc/sys/fs/inotify/max_queued_events")


@pytest.mark.skipif(not os.access(MAX_QUEUED, os.W_OK), reason="cannot lower the inotify "
                    "queue limit here (needs a writable /proc/sys)")
def test_inotify_overflow_turns_into_a_rescan(tmp_path, trained, daemons, crops):
    """With the kernel queue cut to 32 events a burst overflows it; nothing is lost."""
    original = MAX_QUEUED.read_text()
    try:
        MAX_QUEUED.write_text("32\n")  # applies to inotify instances made from now on
        daemon = daemons(trained)
        daemon.wait_for_log(r"watching .*inbox")
    finally:
        MAX_QUEUED.write_text(original)
    inbox, data = tmp_path / "inbox", png(crops[0][5])
    for i in range(3000):
        (inbox / f"burst-{i:04d}.png").write_bytes(data)
    wait_until(lambda: all_labelled(inbox, 3000), 120, message="all 3,000 labelled")
    assert re.search(r"WARNING daemon.watch: rescanning .* \(inotify queue overflow", daemon.log)
    assert daemon.stop() == 0


def test_a_deleted_and_recreated_inbox_is_watched_again(tmp_path, trained, daemons, crops):
    inbox = tmp_path / "inbox"
    daemon = daemons(trained)
    daemon.wait_for_log(r"watching .*inbox")
    shutil.rmtree(inbox)
    daemon.wait_for_log(r"inbox is gone .*; waiting for it to come back")
    inbox.mkdir(exist_ok=True)
    (inbox / "back.png").write_bytes(png(crops[0][6]))
    wait_until(lambda: sidecar(inbox / "back.png"), 30, message="a label after the restart")
    assert daemon.stop() == 0


def test_labels_agree_with_the_models_own_evaluate(tmp_path, small_data, daemons, crops):
    config = write_config(tmp_path, small_data, epochs=2)
    first = run_to_completion(daemons, config)
    evaluated = float(re.search(r"test loss [\d.]+ accuracy ([\d.]+) on 256",
                                first.log).group(1))
    inbox = tmp_path / "inbox"
    for i, crop in enumerate(crops[0]):
        (inbox / f"test-{i:03d}.png").write_bytes(png(crop))
    daemon = daemons(config)
    wait_until(lambda: all_labelled(inbox, TEST_IMAGES), 60, message="all test images")
    assert daemon.stop() == 0
    predicted = np.array([sidecar(inbox / f"test-{i:03d}.png")["class"]
                          for i in range(TEST_IMAGES)])
    assert round(float(np.mean(predicted == crops[1])), 4) == evaluated


def test_images_before_the_first_checkpoint_wait_for_it(tmp_path, small_data, daemons, crops):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for i in range(10):
        (inbox / f"early-{i}.png").write_bytes(png(crops[0][i]))
    daemon = daemons(write_config(tmp_path, small_data, epochs=1))
    wait_until(lambda: all_labelled(inbox, 10), 60, message="labels once a checkpoint exists")
    assert daemon.stop() == 0
    assert "labelling with checkpoint" in daemon.log


def test_txt_sidecars(tmp_path, small_data, one_epoch_save, daemons, crops):
    shutil.copytree(one_epoch_save, tmp_path / "save")
    config = write_config(tmp_path, small_data, classify={"sidecar": "txt"}, epochs=1)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "a.png").write_bytes(png(crops[0][0]))
    (inbox / "b.png").write_bytes(b"nope")
    daemon = daemons(config)
    wait_until(lambda: (inbox / "a.png.txt").exists() and (inbox / "b.png.txt").exists(), 30)
    assert daemon.stop() == 0
    assert (inbox / "a.png.txt").read_text().strip() in {
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
        "Bag", "Ankle boot"}
    assert (inbox / "b.png.txt").read_text().startswith("error: ")
    assert not (inbox / "a.png.json").exists()


def test_classify_command(tmp_path, trained, crops):
    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    good.write_bytes(png(crops[0][0]))
    bad.write_bytes(b"garbage")
    result = subprocess.run([sys.executable, "-m", "daemon", "classify", str(good), str(bad),
                             "--config", str(trained)], capture_output=True, text=True,
                            cwd=REPO, timeout=120)
    assert result.returncode == 1
    path, label, confidence = result.stdout.strip().split("\t")
    assert path == str(good) and label and 0 < float(confidence) <= 1
    assert f"{bad}: not a decodable image" in result.stderr
    assert not (tmp_path / "good.png.json").exists()


def test_a_replaced_image_is_labelled_again_even_while_down(tmp_path, trained, daemons, crops):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    image = inbox / "shoe.png"
    image.write_bytes(png(crops[0][0]))
    daemon = daemons(trained)
    first = wait_until(lambda: sidecar(image), 30, message="first label")
    staged = tmp_path / "new.png"
    staged.write_bytes(png(crops[0][1]))
    os.rename(staged, image)  # replaced while running
    second = wait_until(lambda: sidecar(image) != first and sidecar(image), 30,
                        message="a new label after the replacement")
    assert second["file"]["inode"] != first["file"]["inode"]
    assert daemon.stop() == 0
    staged.write_bytes(png(crops[0][2]))
    os.utime(staged, ns=(1, 1))  # replaced while down, by an older file
    os.rename(staged, image)
    daemon = daemons(trained)
    third = wait_until(lambda: sidecar(image) != second and sidecar(image), 30,
                       message="a new label after the replacement while down")
    assert third["file"]["mtime_ns"] == 1
    assert daemon.stop() == 0


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_an_observer_killed_by_a_raising_handler_is_replaced(tmp_path, monkeypatch):
    """watchdog's observer thread dies silently when a handler raises; take() notices,
    starts a new observer and rescans. In-process, with the real observer."""
    from daemon.inbox import watch
    from daemon.service.config import Watch
    from daemon.inbox.inbox import Inbox
    from daemon.inbox.sidecars import Sidecars

    root = tmp_path / "inbox"
    inbox = Inbox(root, Sidecars("json", ["png"]), Watch(mode="inotify"))
    inbox.start(owner="test")
    try:
        assert inbox.take(10, 0.1) == {} and not inbox.problem
        raised = []

        def broken_handler(self, event):
            raised.append(event)
            raise RuntimeError("a bug in a handler")

        monkeypatch.setattr(watch._Handler, "on_closed", broken_handler)
        (root / "lost.png").write_bytes(b"event lost with the thread")
        wait_until(lambda: raised and inbox.problem, 10, message="the observer to die")
        monkeypatch.undo()
        os.utime(root / "lost.png", (1, 1))  # settled: no wait
        found = wait_until(lambda: inbox.take(10, 0.2), 10, message="the rescan to find it")
        assert list(found) == [str(root / "lost.png")] and not inbox.problem
        (root / "next.png").write_bytes(b"seen by the new observer")
        os.utime(root / "next.png", (1, 1))
        # closed after writing: {path: True}, labelled even if its sidecar looked current
        assert wait_until(lambda: inbox.take(10, 0.2), 10) == {str(root / "next.png"): True}
    finally:
        inbox.stop()


def test_a_folder_moved_in_from_outside_is_labelled(tmp_path, trained, daemons, crops):
    inbox = tmp_path / "inbox"
    daemon = daemons(trained)
    daemon.wait_for_log(r"watching .*inbox")
    album = tmp_path / "album"
    (album / "inner").mkdir(parents=True)
    for i in range(5):
        (album / f"{i}.png").write_bytes(png(crops[0][i]))
        (album / "inner" / f"{i}.png").write_bytes(png(crops[0][i]))
    os.rename(album, inbox / "album")
    wait_until(lambda: all_labelled(inbox, 10), 30, message="the moved-in folder labelled")
    assert daemon.stop() == 0
