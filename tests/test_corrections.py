"""A person's correction is done or not at all: killed (SIGKILL) at each of its file system
steps in turn and carried through at the next start, it is always either the whole
correction (the person's sidecar and the training copy) or none of it; and every file it
relies on is fsynced before what names it, so a power cut cannot leave half of one."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest

from conftest import REPO
from test_protocol import STRACE, syscalls

# A correction in a process of its own that kills itself (SIGKILL) at its K-th call of a
# file system step: where a power cut or kill -9 could stop it.
STEP = """
import os, signal, sys
from daemon.inbox.sidecars import Sidecars
from daemon.web.corrections import Corrections

kill_at, op, save, data, image, label = sys.argv[1:]
calls = 0

def deadly(real):
    def call(*args, **kwargs):
        global calls
        calls += 1
        if calls == int(kill_at):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    return call

corrections = Corrections(Sidecars("json", ["jpg"]), save, os.path.dirname(image),
                          data_path=data)
if op == "finish":
    assert corrections.finish()
else:
    for name in ("fsync", "replace", "rename", "link", "unlink", "makedirs", "mkdir"):
        setattr(os, name, deadly(getattr(os, name)))
    if op == "label":
        corrections.label(image, label)
    else:
        corrections.undo(image)
print(calls)
"""


def run(*args, wrapper=()):
    return subprocess.run([*wrapper, sys.executable, "-c", STEP, *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def model_sidecar(image):
    info = image.stat()
    record = {"label": "ants", "class": 0, "confidence": 0.61, "epoch": 3, "model": "m",
              "classified_at": "2026-12-02T10:00:00.000+00:00", "source": "model",
              "file": {"size": info.st_size, "mtime_ns": info.st_mtime_ns,
                       "inode": info.st_ino}}
    (image.parent / (image.name + ".json")).write_text(json.dumps(record) + "\n")
    return record


def state(folder):
    """What a user could find: ("model" or (label, copy's name)), checked whole."""
    image = folder / "inbox" / "photo.jpg"
    record = json.loads((folder / "inbox" / "photo.jpg.json").read_text())
    copies = sorted(str(p.relative_to(folder / "data")) for p in (folder / "data").rglob("*.jpg"))
    assert not (folder / "save" / "review" / "intent.json").exists()
    # (the inbox's own are removed by its scan at start)
    assert not [p for p in folder.rglob("*.tmp") if "inbox" not in p.parts], "a temporary left"
    if record["source"] == "model":
        assert copies == [] and record["label"] == "ants", (record, copies)
        return "model"
    assert record["source"] == "person" and copies == [record["copy"]], (record, copies)
    copy = folder / "data" / record["copy"]
    assert copy.stat().st_ino == image.stat().st_ino == record["copy_inode"]
    assert record["previous"]["source"] == "model"
    return record["label"], copy.name


@pytest.fixture
def scene(tmp_path, photos):
    def make(name):
        folder = tmp_path / name
        (folder / "inbox").mkdir(parents=True)
        (folder / "data" / "ants").mkdir(parents=True)
        (folder / "save").mkdir()
        image = shutil.copyfile(photos.held[0], folder / "inbox" / "photo.jpg")
        model_sidecar(image)
        return folder
    return make


def killed_at_every_step(scene, setup, op, label, before, after):
    """Kill `op` at its 1st, 2nd, ... step until it runs through; each time, carry it
    through as the next start does and check the user finds `before` or `after`."""
    seen = set()
    for kill_at in range(1, 100):
        folder = scene(f"{op}-{label}-{kill_at}")
        setup(folder)
        args = [folder / "save", folder / "data", folder / "inbox" / "photo.jpg", label]
        step = run(kill_at, op, *args)
        if step.returncode == 0:
            assert state(folder) == after
            return seen
        assert step.returncode == -signal.SIGKILL, step.stderr
        finish = run(0, "finish", *args)
        assert finish.returncode == 0, finish.stderr
        seen.add(found := state(folder))
        assert found in (before, after), (kill_at, found)
    raise AssertionError("never ran through")


def test_a_correction_killed_at_any_step_is_whole_or_absent(scene):
    seen = killed_at_every_step(scene, lambda folder: None, "label", "bees", "model",
                                ("bees", "photo.jpg"))
    assert seen == {"model", ("bees", "photo.jpg")}  # killed before and after its point


def test_undo_and_a_second_correction_killed_at_any_step_are_whole_or_absent(scene):
    def corrected(folder):
        args = [folder / "save", folder / "data", folder / "inbox" / "photo.jpg", "bees"]
        assert run(0, "label", *args).returncode == 0
    seen = killed_at_every_step(scene, corrected, "undo", "-", ("bees", "photo.jpg"), "model")
    assert seen == {"model", ("bees", "photo.jpg")}
    seen = killed_at_every_step(scene, corrected, "label", "wasps", ("bees", "photo.jpg"),
                                ("wasps", "photo.jpg"))
    assert seen == {("bees", "photo.jpg"), ("wasps", "photo.jpg")}


@pytest.mark.skipif(STRACE is None, reason="strace is not installed (.ci/run installs it)")
def test_each_step_is_durable_before_the_next_names_it(scene, tmp_path):
    """The write order a power cut needs: the intent fsynced and its folder before any
    change; the training copy's data and its folder before the sidecar that names it; the
    sidecar fsynced before its rename and its folder after; the intent removed last."""
    folder = scene("traced")
    trace = tmp_path / "trace.txt"
    args = [folder / "save", folder / "data", folder / "inbox" / "photo.jpg", "bees"]
    done = run(0, "label", *args, wrapper=[STRACE, "-f", "-qq", "-y", "-o", str(trace), "-e",
                                           "trace=fsync,rename,link,linkat,unlink,unlinkat"])
    assert done.returncode == 0, done.stderr
    assert state(folder) == ("bees", "photo.jpg")
    events = []
    for name, arguments in syscalls(trace):
        paths = re.findall(r'"([^"]*)"', arguments) or re.findall(r"<(.*?)>", arguments)
        events.append((name, *paths))
    review, inbox = str(folder / "save" / "review"), str(folder / "inbox")
    copy, sidecar = str(folder / "data" / "bees" / "photo.jpg"), inbox + "/photo.jpg.json"

    def at(kind, test):
        found = [i for i, event in enumerate(events) if event[0] == kind and test(event)]
        assert found, (kind, events)
        return found[0]

    intent = at("rename", lambda e: e[2] == review + "/intent.json")
    assert at("fsync", lambda e: e[1].startswith(review + "/.wardrobe-")) < intent
    intent_durable = at("fsync", lambda e: e[1] == review)
    linked = at("linkat", lambda e: e[-1].endswith("/bees/photo.jpg"))
    assert intent < intent_durable < linked
    copy_durable = max(at("fsync", lambda e: e[1] == copy),
                       at("fsync", lambda e: e[1] == str(folder / "data" / "bees")))
    published = at("rename", lambda e: e[2] == sidecar)
    assert linked < copy_durable < at("fsync", lambda e: e[1].startswith(
        inbox + "/.wardrobe-")) < published
    sidecar_durable = at("fsync", lambda e: e[1] == inbox)
    assert published < sidecar_durable < at("unlink", lambda e: e[1].endswith("intent.json"))


def test_an_image_swapped_for_a_symlink_before_its_correction_is_finished(scene, tmp_path):
    """Killed before the training copy was made, and the image then swapped for a symbolic
    link to a file outside the inbox: carried through, the correction copies nothing from
    outside and writes no sidecar for the link; the intent is done with."""
    folder = scene("swapped")
    image = folder / "inbox" / "photo.jpg"
    args = [folder / "save", folder / "data", image, "bees"]
    for kill_at in range(1, 100):  # the first kill that leaves an intent and no copy
        attempt = scene(f"probe-{kill_at}")
        run(kill_at, "label", attempt / "save", attempt / "data", attempt / "inbox" /
            "photo.jpg", "bees")
        if (attempt / "save" / "review" / "intent.json").exists():
            break
    assert run(kill_at, "label", *args).returncode == -signal.SIGKILL
    assert (folder / "save" / "review" / "intent.json").exists()
    assert not list((folder / "data").rglob("*.jpg"))
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(b"TOP SECRET, not an image of the inbox")
    image.unlink()
    image.symlink_to(secret)
    finish = run(0, "finish", *args)
    assert finish.returncode == 0, finish.stderr
    assert "no longer the file" in finish.stderr
    assert not [p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()
                and p.read_bytes() == secret.read_bytes()]
    assert json.loads((folder / "inbox" / "photo.jpg.json").read_text())["source"] == "model"
    assert not (folder / "save" / "review" / "intent.json").exists()


def test_a_correction_left_by_a_kill_is_finished_at_start_with_the_page_off(
        tmp_path, trained, photos, daemons):
    from conftest import photo_config, wait_until

    shutil.copytree(trained.save, tmp_path / "save")
    data = shutil.copytree(photos.data, tmp_path / "data")
    inbox = shutil.copytree(trained.folder / "inbox", tmp_path / "inbox")
    image = sorted(inbox.glob("*.jpg"))[0]
    label = "bees" if json.loads(image.with_name(image.name + ".json").read_text())[
        "label"] == "ants" else "ants"
    for kill_at in range(1, 100):  # killed once its intent is written, before its copy
        step = run(kill_at, "label", tmp_path / "save", data, image, label)
        if (tmp_path / "save" / "review" / "intent.json").exists():
            break
    assert step.returncode == -signal.SIGKILL
    config = photo_config(tmp_path, data)  # no web key
    daemon = daemons(config)
    daemon.wait_for_log(r"review: finishing the label of", 120)
    intent = tmp_path / "save" / "review" / "intent.json"
    # said before it is done: the sidecar and the intent's removal follow
    record = wait_until(lambda: (r := json.loads(image.with_name(image.name + ".json")
                                                 .read_text()))["source"] == "person"
                        and not intent.exists() and r, 60, 0.1, message="the correction finished")
    assert (record["source"], record["label"]) == ("person", label)
    assert (data / record["copy"]).stat().st_ino == image.stat().st_ino
    assert daemon.stop() == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_correction_a_full_disk_left_unfinished_is_retried_with_the_page_off(
        tmp_path, trained, photos, daemons):
    """data.path full (a tmpfs: a byte copy, not a link): the correction is written down but
    not done; the daemon, started without web.listen, cannot finish it at start and does
    once there is room, without a restart."""
    from conftest import photo_config, wait_until

    shutil.copytree(trained.save, tmp_path / "save")
    inbox = shutil.copytree(trained.folder / "inbox", tmp_path / "inbox")
    image = sorted(inbox.glob("*.jpg"))[0]
    label = "bees" if json.loads(image.with_name(image.name + ".json").read_text())[
        "label"] == "ants" else "ants"  # a class it has: no new class to train on meanwhile
    data = tmp_path / "data"
    data.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(data)], check=True)
    try:
        shutil.copytree(photos.data, data, dirs_exist_ok=True)
        filler = data / ".filler"
        with pytest.raises(OSError), open(filler, "wb") as file:  # to the last block
            while True:
                file.write(b"\0" * 65536)
                file.flush()
        step = run(0, "label", tmp_path / "save", data, image, label)  # never killed
        assert "written down, to be finished" in step.stderr, step.stderr
        assert (tmp_path / "save" / "review" / "intent.json").exists()
        daemon = daemons(photo_config(tmp_path, data))  # no web key
        daemon.wait_for_log(r"review: cannot finish a correction yet: .*No space left", 120)
        assert json.loads(image.with_name(image.name + ".json").read_text())["source"] == "model"
        filler.unlink()
        record = wait_until(
            lambda: (r := json.loads(image.with_name(image.name + ".json").read_text()))[
                "source"] == "person" and r, 60, 0.2, message="the correction finished")
        copy = data / label / image.name
        assert record["label"] == label and record["copy_inode"] == copy.stat().st_ino
        assert copy.read_bytes() == image.read_bytes()
        assert not (tmp_path / "save" / "review" / "intent.json").exists()
        daemon.wait_for_log(r"review: the unfinished correction is done", 10)
        assert daemon.stop() == 0, daemon.log
    finally:
        subprocess.run(["umount", "-l", str(data)], check=False)
