"""Damaged save/ folders: fall back, repair, quarantine, or refuse -- never crash-loop."""

import os
import re
import resource
import shutil
import signal
import subprocess
import sys

import cv2
import pytest

from conftest import NO_DAC, REPO, assert_loadable, sidecar, status, wait_until, write_config
from daemon import fsutil
from daemon.data import dataset
from daemon.training.store import CheckpointStore, manifest_name, state_name

STARTED = r"(no checkpoint in|resuming from) .*: epoch (\d+)/\d+, batch (\d+)"


@pytest.fixture
def save(tmp_path, one_epoch_save):
    shutil.copytree(one_epoch_save, tmp_path / "save")
    return tmp_path / "save"

# What a running daemon keeps in save/ besides checkpoints: its lock, its status for
# `wardrobe status`, its private temporary folder.
# data/: versions, tensorboard/: curves drawn from the checkpoints; neither is a checkpoint
RUNTIME = {".lock", "live.json", "tmp", "data", "tensorboard", "model-choice.json"}  # not checkpoints

def start_and_stop(daemons, config):
    """Run the daemon until it has picked its resume point; returns (daemon, epoch, batch)."""
    daemon = daemons(config)
    found = daemon.wait_for_log(STARTED)
    assert daemon.stop() == 0, daemon.log
    return daemon, int(found.group(2)), int(found.group(3))


def generations(save):
    return CheckpointStore(save).numbers()


def manifest_of(save, number):
    import json

    return json.loads((save / manifest_name(number)).read_text())


def corrupt_dirs(save):
    return [p for p in save.iterdir() if p.name.startswith("corrupt-")]


@pytest.mark.parametrize("damage", ["truncate state", "garble state", "flip state",
                                    "garble manifest", "empty manifest", "delete state"])
def test_damaged_newest_generation_falls_back_to_the_previous(tmp_path, small_data, daemons,
                                                              save, damage):
    newest, previous = generations(save)[:2]
    expected = manifest_of(save, previous)
    what, name = damage.split()
    path = save / (state_name(newest) if name == "state" else manifest_name(newest))
    if what == "truncate":
        path.write_bytes(path.read_bytes()[:1000])
    elif what == "garble":
        data = bytearray(path.read_bytes())
        data[len(data) // 2: len(data) // 2 + 16] = b"\xff" * 16
        path.write_bytes(bytes(data))
    elif what == "flip":  # one bit of one byte: the checksum must catch it
        data = bytearray(path.read_bytes())
        data[len(data) // 3] ^= 0x01
        path.write_bytes(bytes(data))
    elif what == "empty":
        path.write_bytes(b"")
    else:
        path.unlink()

    daemon, epoch, batch = start_and_stop(daemons, write_config(tmp_path, small_data))
    assert (epoch, batch) == (expected["epoch"], expected["step"]), daemon.log
    assert re.search(rf"WARNING .*checkpoint {newest} is unusable .*resuming from checkpoint "
                     rf"{previous}", daemon.log), daemon.log
    [quarantine] = corrupt_dirs(save)
    assert path.name in {p.name for p in quarantine.iterdir()} or what == "delete"


def cut_short(save, number):
    """What a power cut leaves while generation `number` was being written: its state file
    without a manifest, and a temporary."""
    manifest = save / manifest_name(number)
    if manifest.exists():
        manifest.unlink()
    (save / f".{state_name(number)}.999-0.tmp").write_bytes(b"half a write")


def test_uncommitted_newest_generation_is_removed_not_quarantined(tmp_path, small_data,
                                                                  daemons, save):
    newest, previous = generations(save)[:2]
    expected = manifest_of(save, previous)
    cut_short(save, newest)
    daemon, epoch, batch = start_and_stop(daemons, write_config(tmp_path, small_data))
    assert (epoch, batch) == (expected["epoch"], expected["step"]), daemon.log
    assert re.search(rf"INFO .*removed what an unfinished checkpoint write left in .*: "
                     rf"\.{state_name(newest)}\.999-0\.tmp, {state_name(newest)}\n", daemon.log)
    assert not corrupt_dirs(save)
    assert "unusable" not in daemon.log and "ERROR daemon" not in daemon.log


def test_no_committed_generation_is_a_fresh_start_not_a_quarantine(tmp_path, small_data,
                                                                   daemons, save):
    numbers = generations(save)
    for number in numbers:
        cut_short(save, number)
    daemon, epoch, batch = start_and_stop(daemons, write_config(tmp_path, small_data))
    assert (epoch, batch) == (0, 0), daemon.log
    leftovers = sorted([f".{state_name(n)}.999-0.tmp" for n in numbers]
                       + [state_name(n) for n in numbers] + ["model.h5", "model.json"])
    assert re.search(r"INFO .*removed what an unfinished checkpoint write left in .*: "
                     + re.escape(", ".join(leftovers)) + "\n", daemon.log), daemon.log
    assert not corrupt_dirs(save)
    assert not re.search(r"(WARNING|ERROR) daemon", daemon.log), daemon.log


@pytest.mark.parametrize("case", ["uncommitted newest", "nothing committed", "flipped byte"])
def test_open_store_removes_the_uncommitted_and_quarantines_the_damaged(tmp_path, save, case):
    """store.open_store, the start-up repair, on its own (no daemon, no TensorFlow)."""
    from daemon.service import config as config_module
    from daemon.training.store import open_store, resolve_model

    config = resolve_model(config_module.parse({"save": str(save),
                                                "inbox": str(tmp_path / "inbox")}, tmp_path))
    newest, previous = generations(save)[:2]
    if case == "uncommitted newest":
        cut_short(save, newest)
        expected, quarantined = previous, set()
    elif case == "nothing committed":
        for number in (newest, previous):
            cut_short(save, number)
        expected, quarantined = None, set()
    else:
        path = save / state_name(newest)
        data = bytearray(path.read_bytes())
        data[100] ^= 0x80
        path.write_bytes(bytes(data))
        expected, quarantined = previous, {manifest_name(newest), state_name(newest)}
    generation = open_store(config)
    assert (generation.number if generation else None) == expected
    found = {p.name for folder in corrupt_dirs(save) for p in folder.iterdir()}
    assert found == quarantined
    assert not [p for p in save.iterdir() if fsutil.is_temp_name(p.name)]
    assert set(generations(save)) == ({expected} if expected else set())
    assert (save / "model.h5").exists() == (expected is not None)


@pytest.mark.parametrize("export", ["model.h5", "model.json"])
def test_damaged_export_is_rewritten_from_the_checkpoint(tmp_path, small_data, daemons, save,
                                                         export):
    newest = generations(save)[0]
    (save / export).write_bytes((save / export).read_bytes()[:200])
    # epochs=1: training is already complete, so only the repair writes to save/
    daemon, epoch, batch = start_and_stop(daemons, write_config(tmp_path, small_data, epochs=1))
    assert generations(save)[0] == newest
    assert (epoch, batch) == (manifest_of(save, newest)["epoch"], 0)
    assert f"WARNING daemon.checkpoints: {export} did not match checkpoint {newest}" in daemon.log
    recorded = manifest_of(save, newest)["exports"][export]
    assert fsutil.file_digest(save / export, like=recorded) == recorded
    assert_loadable(save)


def test_nothing_loadable_is_quarantined_and_training_starts_afresh(tmp_path, small_data,
                                                                   daemons, save):
    numbers = generations(save)
    for number in numbers:
        (save / state_name(number)).write_bytes(b"garbage")
    damaged = sorted(p.name for p in save.iterdir()
                     if not p.name.startswith(".") and p.name not in RUNTIME)
    daemon, epoch, batch = start_and_stop(daemons, write_config(tmp_path, small_data))
    assert (epoch, batch) == (0, 0)
    assert re.search(r"ERROR daemon\.\w+: no loadable checkpoint", daemon.log)
    [quarantine] = corrupt_dirs(save)
    assert sorted(p.name for p in quarantine.iterdir()) == damaged
    # and the next start is a normal resume, not a crash loop
    daemon = daemons(write_config(tmp_path, small_data))
    daemon.wait_for_log(STARTED)
    assert daemon.stop() == 0
    assert "ERROR" not in daemon.log


def test_checkpoint_of_another_architecture_exits_2_and_touches_nothing(tmp_path, small_data,
                                                                       save):
    before = {p.name: fsutil.sha256_file(p) for p in save.iterdir() if p.is_file()
              and p.name not in RUNTIME}
    config = write_config(tmp_path, small_data)
    config.write_text(config.read_text() + "model: cnn\n")
    result = subprocess.run([sys.executable, "-m", "daemon", "run", "--config", str(config)],
                            capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "holds a checkpoint of model 'mlp' but the config asks for 'cnn'" in result.stderr
    after = {p.name: fsutil.sha256_file(p) for p in save.iterdir() if p.is_file()
             and p.name not in RUNTIME}
    assert after == before
    assert not corrupt_dirs(save)


def test_failed_checkpoint_write_is_logged_and_training_goes_on(tmp_path, small_data, daemons,
                                                                save):
    """A real write failure: RLIMIT_FSIZE makes the kernel refuse files over 100 kB (EFBIG)."""
    newest = generations(save)[0]

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    config = write_config(tmp_path, small_data, epochs=2)
    daemon = daemons(config, preexec_fn=small_files)
    daemon.wait_for_log(r"training complete")
    assert daemon.stop() == 0, daemon.log
    assert re.search(r"ERROR daemon.checkpoints: checkpoint at epoch \d+ batch \d+ failed: "
                     r"\[Errno 27\] File too large; the previous one stays", daemon.log)
    assert "epoch 2/2: loss" in daemon.log  # training went on
    assert generations(save)[0] == newest  # no half generation
    assert not [p for p in save.iterdir() if fsutil.is_temp_name(p.name)]
    assert_loadable(save)
    assert status(config)["epoch"] == 1


def test_a_second_daemon_on_the_same_save_is_refused(tmp_path, small_data, daemons):
    config = write_config(tmp_path, small_data)
    first = daemons(config)
    first.wait_for_log(STARTED)
    wait_until(lambda: status(config)["running_pid"] == first.process.pid, 10)
    result = subprocess.run([sys.executable, "-m", "daemon", "run", "--config", str(config)],
                            capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 1
    assert f"another wardrobe (pid {first.process.pid}) is running" in result.stderr
    assert first.stop() == 0


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root and setpriv to drop the capability to write anywhere")
def test_the_last_epochs_checkpoint_is_written_once_save_is_writable_again(tmp_path,
                                                                          small_data, daemons):
    """The checkpoint of the last epoch fails (save/ not writable: a permission, or a full
    disk): it is tried again while the daemon idles, and written once it can be, with no
    restart; nothing trained is lost and the inbox gets that model."""
    save = tmp_path / "save"
    daemon = daemons(write_config(tmp_path, small_data, epochs=1), wrapper=NO_DAC)
    daemon.wait_for_log(r"training complete")
    assert daemon.stop() == 0
    save.chmod(0o555)  # no new file in save/ (the checkpoints), data/ and the rest writable
    try:
        config = write_config(tmp_path, small_data, epochs=2)
        daemon = daemons(config, wrapper=NO_DAC)
        daemon.wait_for_log(r"training complete \(2 epochs\)", 120)
        assert re.search(r"ERROR daemon.checkpoints: checkpoint at epoch 2 batch 0 failed: "
                         r".*Permission denied", daemon.log)
        assert status(config)["epoch"] == 1
    finally:
        save.chmod(0o755)
    daemon.wait_for_log(r"the checkpoint of epoch 2 is written at last", 90)
    assert status(config)["epoch"] == 2
    image = tmp_path / "inbox" / "late.png"
    image.write_bytes(cv2.imencode(".png", dataset.load("sample").x_test[0])[1].tobytes())
    record = wait_until(lambda: sidecar(image), 60, message="a sidecar")
    assert record["epoch"] == 2
    assert daemon.stop() == 0
