"""The inbox as users really use it: links, full disks, permissions fixed later, a renamed
inbox, downloads in progress, long names, renames and deletions, network shares (a real
FUSE mount). Each with a real daemon subprocess, real files and real signals."""

import datetime
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from conftest import NO_DAC, REPO, TEST_IMAGES, sidecar, status, wait_until, write_config
from test_systemd import FakeNotifySocket, gaps
from daemon import shares
from daemon.data import dataset

BINDFS = shutil.which("bindfs")
FUSERMOUNT = shutil.which("fusermount") or shutil.which("fusermount3") or "fusermount"
IS_ROOT = os.geteuid() == 0


@pytest.fixture(scope="module")
def crops():
    return dataset.load("sample").x_test[:TEST_IMAGES]


@pytest.fixture
def trained(tmp_path, small_data, one_epoch_save):
    """A config whose training is complete, so the daemon only labels."""
    shutil.copytree(one_epoch_save, tmp_path / "save")
    (tmp_path / "inbox").mkdir()
    return write_config(tmp_path, small_data, epochs=1)


def with_settings(config, **sections):
    """Merge `sections` (e.g. watch={...}) into the config file."""
    document = yaml.safe_load(config.read_text())
    for key, value in sections.items():
        document[key] = dict(document.get(key) or {}, **value) if isinstance(value, dict) else value
    config.write_text(yaml.safe_dump(document))
    return config


def png(crop):
    return cv2.imencode(".png", crop)[1].tobytes()


def labelled(image):
    record = sidecar(image)
    return record if record and "label" in record else None


def test_links_and_fifos_made_while_running_get_sidecars(tmp_path, trained, daemons, crops):
    inbox = tmp_path / "inbox"
    outside = tmp_path / "outside.png"
    outside.write_bytes(png(crops[0]))
    daemon = daemons(trained)
    daemon.wait_for_log(r"ready")
    os.link(outside, inbox / "hardlink.png")  # ln: no close-after-write event
    subprocess.run(["cp", "-l", str(outside), str(inbox / "cp-l.png")], check=True)
    (inbox / "symlink.png").symlink_to(outside)
    os.mkfifo(inbox / "fifo.png")
    wait_until(lambda: labelled(inbox / "hardlink.png") and labelled(inbox / "cp-l.png"), 30,
               message="hard links labelled")
    wait_until(lambda: sidecar(inbox / "symlink.png") and sidecar(inbox / "fifo.png"), 30,
               message="error sidecars for the symlink and the FIFO")
    assert "symbolic link" in sidecar(inbox / "symlink.png")["error"]
    assert "not a regular file" in sidecar(inbox / "fifo.png")["error"]
    assert daemon.stop() == 0


@pytest.mark.skipif(not IS_ROOT, reason="mounting a small tmpfs needs root")
def test_a_full_disk_or_read_only_inbox_is_retried_until_writable(tmp_path, trained, daemons, crops):
    inbox = tmp_path / "inbox"
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(inbox)], check=True)
    try:
        for i in range(5):
            (inbox / f"{i}.png").write_bytes(png(crops[i]))
        filler = inbox / ".filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        with pytest.raises(OSError):  # fill the file system to the last block
            while True:
                os.write(fd, b"\0" * 4096)
        os.close(fd)
        daemon = daemons(trained)
        daemon.wait_for_log(r"No space left on device; will retry")
        assert not any(sidecar(inbox / f"{i}.png") for i in range(5))
        filler.unlink()  # space returns: no restart, nothing deleted by the user
        wait_until(lambda: all(labelled(inbox / f"{i}.png") for i in range(5)), 60,
                   message="sidecars once space returned")
        assert daemon.process.poll() is None
        assert daemon.stop() == 0
        # A read-only file system, made writable again later: the same.
        (inbox / "ro.png").write_bytes(png(crops[5]))
        subprocess.run(["mount", "-o", "remount,ro", str(inbox)], check=True)
        daemon = daemons(trained)
        daemon.wait_for_log(r"ro.png.*Read-only file system; will retry")
        subprocess.run(["mount", "-o", "remount,rw", str(inbox)], check=True)
        wait_until(lambda: labelled(inbox / "ro.png"), 60, message="a sidecar once writable")
        assert daemon.stop() == 0
    finally:
        subprocess.run(["umount", "-l", str(inbox)], check=False)




@pytest.mark.skipif(not IS_ROOT or not shutil.which("setpriv"),
                    reason="needs root and setpriv to drop the capability to read anything")
def test_a_permission_fixed_later_is_labelled_without_a_restart(tmp_path, trained, daemons,
                                                                 crops):
    image = tmp_path / "inbox" / "private.png"
    image.write_bytes(png(crops[0]))
    image.chmod(0o000)
    daemon = daemons(trained, wrapper=NO_DAC)
    daemon.wait_for_log(r"private.png.*Permission denied; will retry", 60)
    assert sidecar(image) is None  # not written down as final
    image.chmod(0o644)  # chmod changes neither size, mtime nor inode
    wait_until(lambda: labelled(image), 60, message="a label once readable")
    assert daemon.stop() == 0


def test_a_renamed_away_inbox_is_replaced_by_the_new_one(tmp_path, trained, daemons, crops):
    inbox = tmp_path / "inbox"
    daemon = daemons(trained)
    daemon.wait_for_log(r"ready")
    (inbox / "first.png").write_bytes(png(crops[0]))
    wait_until(lambda: labelled(inbox / "first.png"), 30, message="first label")
    os.rename(inbox, tmp_path / "inbox.old")  # archived, the usual way
    inbox.mkdir()
    (inbox / "second.png").write_bytes(png(crops[1]))
    wait_until(lambda: labelled(inbox / "second.png"), 30, message="the new inbox labelled")
    (tmp_path / "inbox.old" / "late.png").write_bytes(png(crops[2]))
    assert daemon.stop() == 0
    assert sidecar(tmp_path / "inbox.old" / "late.png") is None  # the old one is not watched
    assert labelled(tmp_path / "inbox.old" / "first.png")  # its sidecar went along


def test_a_download_in_progress_at_start_is_never_given_an_error(tmp_path, trained, daemons,
                                                                  crops):
    inbox = tmp_path / "inbox"
    data = png(crops[3])
    image = inbox / "download.png"
    file = open(image, "wb")
    file.write(data[: len(data) // 2])
    file.flush()
    seen = []
    daemon = daemons(trained)
    daemon.wait_for_log(r"ready")

    def watch_sidecar():
        while not done.is_set():
            seen.append(sidecar(image))
            time.sleep(0.05)

    done = threading.Event()
    watcher = threading.Thread(target=watch_sidecar)
    watcher.start()
    try:
        (inbox / "other.png").write_bytes(png(crops[4]))  # the labeller is at work
        wait_until(lambda: labelled(inbox / "other.png"), 30, message="another image labelled")
        deadline = time.monotonic() + 3  # a download that pauses for 3 s
        wait_until(lambda: time.monotonic() > deadline, 10)
        file.write(data[len(data) // 2:])
        file.close()
        wait_until(lambda: labelled(image), 30, message="a label once complete")
    finally:
        done.set()
        watcher.join()
    assert not [record for record in seen if record and "error" in record]
    assert daemon.stop() == 0


def test_long_names(tmp_path, trained, daemons, crops):
    inbox = tmp_path / "inbox"
    fits = inbox / ("a" * 236 + ".png")  # 240 bytes: the sidecar's name (245) fits
    too_long = inbox / ("b" * 248 + ".png")  # 252 bytes: its sidecar's (257) cannot exist
    fits.write_bytes(png(crops[0]))
    too_long.write_bytes(png(crops[1]))
    daemon = daemons(trained)
    first = wait_until(lambda: labelled(fits), 30, message="the 240-byte name labelled")
    staged = tmp_path / "new.png"
    staged.write_bytes(png(crops[1]))
    os.rename(staged, fits)  # replaced: a new label, not the old one kept
    wait_until(lambda: labelled(fits) and labelled(fits)["file"] != first["file"], 30,
               message="a new label for the replaced image")
    daemon.wait_for_log(r"b{248}\.png' cannot have a sidecar: its name is 252 bytes")
    wait_until(lambda: (status(trained)["inbox"] or {}).get("cannot_label") == 1, 30,
               message="counted in status")
    (inbox / "other.png").write_bytes(png(crops[2]))
    wait_until(lambda: labelled(inbox / "other.png"), 30)
    assert daemon.log.count("cannot have a sidecar") == 1  # said once
    assert not [p for p in inbox.iterdir() if p.name.endswith(".tmp")]
    assert daemon.stop() == 0


def test_sidecars_go_with_their_images(tmp_path, trained, daemons, crops):
    inbox = tmp_path / "inbox"
    for name in ("keep", "rename", "delete", "move-out", "gone-while-down"):
        (inbox / f"{name}.png").write_bytes(png(crops[0]))
    (inbox / "mine.png.json").write_text('{"note": "a file of the user, not ours"}\n')
    daemon = daemons(trained)
    wait_until(lambda: all(labelled(inbox / f"{n}.png") for n in ("keep", "rename", "delete")),
               30, message="first labels")
    before = sidecar(inbox / "rename.png")
    os.rename(inbox / "rename.png", inbox / "renamed.png")
    (inbox / "delete.png").unlink()
    os.rename(inbox / "move-out.png", tmp_path / "move-out.png")
    wait_until(lambda: not (inbox / "rename.png.json").exists()
               and not (inbox / "delete.png.json").exists()
               and not (inbox / "move-out.png.json").exists(), 30, message="sidecars follow")
    assert sidecar(inbox / "renamed.png") == before  # moved along: same label, not redone
    assert daemon.stop() == 0
    (inbox / "gone-while-down.png").unlink()
    daemon = daemons(trained)
    daemon.wait_for_log(r"ready")
    wait_until(lambda: not (inbox / "gone-while-down.png.json").exists(), 30,
               message="an orphan left while down removed at start")
    assert labelled(inbox / "keep.png")
    assert (inbox / "mine.png.json").exists()  # not ours: never removed
    assert daemon.stop() == 0


def test_signals(tmp_path, trained, daemons):
    daemon = daemons(trained)
    daemon.wait_for_log(r"ready")
    for signum in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM, signal.SIGPWR):
        daemon.signal(signum)
    daemon.wait_for_log(r"SIGUSR1: serving")
    daemon.wait_for_log(r"SIGUSR2: rescanning the inbox")
    daemon.wait_for_log(r"SIGALRM received: ignored")
    daemon.wait_for_log(r"SIGPWR received: ignored")
    assert daemon.process.poll() is None
    daemon.signal(signal.SIGQUIT)  # stops cleanly, like SIGTERM
    assert daemon.wait() == 0
    assert "SIGQUIT: stopping" in daemon.log


def test_sigterm_while_tensorflow_loads_exits_at_once(tmp_path, trained, daemons):
    daemon = daemons(trained)
    daemon.wait_for_log(r"watching .*inbox")  # TensorFlow is being imported now
    assert "ready" not in daemon.log
    sent = time.monotonic()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0
    # about 0.1 s here; generous for a loaded machine, far below the 2.5-5 s of the import
    assert time.monotonic() - sent < 2.0, daemon.log
    assert "ready" not in daemon.log


def test_sighup_reloads_the_config(tmp_path, trained, daemons):
    daemon = daemons(trained)
    daemon.wait_for_log(r"training complete")
    config = with_settings(trained, train={"epochs": 2}, classify={"sidecar": "txt"})
    daemon.signal(signal.SIGHUP)
    daemon.wait_for_log(r"reloaded config from .*config.yaml: changed classify.sidecar, train.epochs")
    daemon.wait_for_log(r"epoch 2/2: loss")  # trains on, no restart
    (tmp_path / "inbox" / "a.png").write_bytes(b"not an image")
    wait_until(lambda: (tmp_path / "inbox" / "a.png.txt").exists(), 30, message="txt sidecar")
    with_settings(config, model="cnn")
    daemon.signal(signal.SIGHUP)
    daemon.wait_for_log(r"reload: model changed; that takes a restart")
    config.write_text("train: {epochs: ten}\n")
    daemon.signal(signal.SIGHUP)
    daemon.wait_for_log(r"ERROR .*reload: train.epochs: expected .* carrying on")
    assert daemon.process.poll() is None
    assert daemon.stop() == 0


def test_temporary_files_stay_in_save(tmp_path, small_data, daemons):
    tmp = tmp_path / "system-tmp"
    tmp.mkdir()
    trained = write_config(tmp_path, small_data, epochs=1)
    daemon = daemons(trained, env={"TMPDIR": str(tmp)})
    daemon.wait_for_log(r"training complete")  # TensorFlow traced its functions
    assert daemon.kill() != 0  # killed: nothing of ours may clean up
    assert list(tmp.iterdir()) == []
    assert list((tmp_path / "save" / "tmp").glob("__autograph_generated_file*"))
    daemon = daemons(trained, env={"TMPDIR": str(tmp)})
    daemon.wait_for_log(r"ready")
    assert daemon.stop() == 0
    assert list(tmp.iterdir()) == []


class Share:
    """A FUSE mount (bindfs, in the foreground: its process is ours) of a backing folder:
    writes into the backing folder raise no inotify event on the mount, as on a network
    share; hang() makes every call on the mount block, as a NAS gone under a hard NFS mount
    does, until resume()."""

    def __init__(self, backing, mount):
        self.backing, self.mount = backing, mount
        self.process = subprocess.Popen([BINDFS, "-f", str(backing), str(mount)])
        wait_until(lambda: os.path.ismount(mount), 10, message="the bindfs mount")

    def __iter__(self):
        return iter((self.backing, self.mount))

    def hang(self):
        self.process.send_signal(signal.SIGSTOP)

    def resume(self):
        self.process.send_signal(signal.SIGCONT)

    def close(self):
        self.resume()  # an unmount waits for a stopped file system process
        subprocess.run([FUSERMOUNT, "-u", "-z", str(self.mount)], check=False)
        subprocess.run(["umount", "-l", str(self.mount)], check=False, stderr=subprocess.DEVNULL)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:  # still in use (a failed test's daemon, say)
            self.process.kill()
            self.process.wait(10)


@pytest.fixture
def share(tmp_path):
    if BINDFS is None or not os.path.exists("/dev/fuse"):
        pytest.skip("bindfs or /dev/fuse missing (.ci/run installs bindfs)")
    backing, mount = tmp_path / "backing", tmp_path / "inbox"
    backing.mkdir()
    mount.mkdir(exist_ok=True)
    mounted = Share(backing, mount)
    yield mounted
    mounted.close()


def test_a_network_share_is_polled(tmp_path, trained, daemons, crops, share):
    backing, mount = share
    daemon = daemons(with_settings(trained, watch={"poll_seconds": 0.5}))
    daemon.wait_for_log(r"watching .*inbox by polling every 0.5 s: fuse(\.bindfs)? file system")
    daemon.wait_for_log(r"ready")
    (backing / "from-another-machine.png").write_bytes(png(crops[0]))
    wait_until(lambda: labelled(backing / "from-another-machine.png"), 30,
               message="a file written behind the mount's back labelled")
    subprocess.run([FUSERMOUNT, "-u", "-z", str(mount)], check=True)  # the share goes away
    daemon.wait_for_log(r"suddenly empty|is gone|replaced by another folder")
    (backing / "while-away.png").write_bytes(png(crops[1]))
    assert labelled(backing / "from-another-machine.png")  # not taken as deleted
    subprocess.run([BINDFS, str(backing), str(mount)], check=True)  # back
    wait_until(lambda: labelled(backing / "while-away.png"), 30, message="labelled once back")
    assert labelled(backing / "from-another-machine.png")
    wait_until(lambda: (status(trained)["inbox"] or {}).get("watch", {}).get("mode") == "poll",
               30, message="status: polling")
    assert daemon.stop() == 0


def test_the_safety_net_rescan_finds_what_inotify_missed(tmp_path, trained, daemons, crops,
                                                        share):
    backing, _ = share
    daemon = daemons(with_settings(trained, watch={"mode": "inotify", "rescan_seconds": 1}))
    daemon.wait_for_log(r"watching .*inbox by inotify: watch.mode is inotify")
    daemon.wait_for_log(r"ready")
    (backing / "missed.png").write_bytes(png(crops[0]))  # no inotify event on the mount
    wait_until(lambda: labelled(backing / "missed.png"), 30, message="found by the rescan")
    assert daemon.stop() == 0


def test_a_share_that_hangs(tmp_path, trained, daemons, crops, share):
    """A NAS gone under a hard mount blocks every call on it (here: its bindfs process
    stopped). `status` still answers at once and says so; the daemon starts, trains and
    feeds the watchdog meanwhile; labelling resumes with the share; a stop does not wait."""
    backing, _ = share
    config = with_settings(trained, train={"epochs": 2}, watch={"poll_seconds": 0.5})
    share.hang()
    fake = FakeNotifySocket(str(tmp_path / "notify.sock"))
    try:
        daemon = daemons(config, env={"NOTIFY_SOCKET": fake.address, "WATCHDOG_USEC": "6000000"})
        wait_until(lambda: fake.lines("READY=1"), 90, message="READY=1")
        daemon.wait_for_log(r"WARNING daemon.service: the inbox .*inbox does not respond")
        started = time.monotonic()
        assert status(config)["responds"] == {"inbox": False, "data.path": True}
        text = subprocess.run([sys.executable, "-m", "daemon", "status", "--config", str(config)],
                              capture_output=True, text=True, cwd=REPO, timeout=30)
        assert time.monotonic() - started < 8  # two commands, each ~1 s of it waiting
        assert text.returncode == 0 and "inbox does not respond" in text.stdout
        daemon.wait_for_log(r"training complete", 120)
        count = len(fake.lines("WATCHDOG=1"))
        wait_until(lambda: len(fake.lines("WATCHDOG=1")) >= count + 3, 60,
                   message="pings while the inbox hangs")
        assert max(gaps(fake)) < 6.0  # systemd kills a service silent for WATCHDOG_USEC
        assert not labelled(backing / "meanwhile.png")
        (backing / "meanwhile.png").write_bytes(png(crops[0]))
        share.resume()
        wait_until(lambda: labelled(backing / "meanwhile.png"), 60,
                   message="labelled once the share answers")
        daemon.wait_for_log(r"the inbox .* responds again")
        share.hang()
        wait_until(lambda: daemon.log.count("does not respond") >= 2, 30, message="hung again")
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(30) == 0  # systemd's TimeoutStopSec
    finally:
        fake.close()


def test_only_a_thread_blocked_on_a_share_that_hangs_is_excused(share):
    """The service's watchdog excuses a labeller that does not come round while the
    inbox's probe is blocked (and a moment after), never while the inbox answers."""
    _, mount = share
    probe = shares.Share("inbox", mount)
    probe.look()
    now = time.monotonic()
    assert not probe.hung(now) and not probe.excuses(now - 60, now, grace=2)
    share.hang()
    looking = threading.Thread(target=probe.look)
    looking.start()
    wait_until(lambda: probe.hung(time.monotonic()), 10, message="the look to hang")
    now = time.monotonic()
    assert probe.excuses(now - 60, now, grace=2)
    share.resume()
    looking.join(10)
    back, now = probe.back, time.monotonic()
    assert back is not None and not probe.hung(now)
    assert probe.excuses(back - 1, now, grace=30)  # blocked until then: a moment to come round
    assert not probe.excuses(back - 1, back + 31, grace=30)  # ... but not for ever
    assert not probe.excuses(back + 0.1, back + 1, grace=30)  # came round since: stuck elsewhere


def test_sigterm_during_a_long_final_evaluation_exits_at_once(tmp_path, daemons):
    """The end-of-training evaluation of a large test set holds nothing unsaved: a stop
    does not wait for it."""
    sample = dataset.load("sample")
    test_images = np.tile(sample.x_test, (40, 1, 1))  # 80,000: many seconds with the cnn
    test_labels = np.tile(sample.y_test, 40)
    data = tmp_path / "data"
    dataset.write_idx_folder(data, (sample.x_train[:512], sample.y_train[:512]),
                             (test_images, test_labels))
    config = write_config(tmp_path, data, epochs=1)
    with_settings(config, model="cnn")
    daemon = daemons(config)
    daemon.wait_for_log(r"epoch 1/1: loss", 180)  # the checkpoint is written; evaluating now
    sent = time.monotonic()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0
    assert time.monotonic() - sent < 2.0, daemon.log
    assert "training done" not in daemon.log  # it did not wait for the evaluation
    assert status(config)["epoch"] == 1


def phone_photo(crop, rng):
    """A 12-megapixel JPEG that looks like a phone photo of a product: the crop, light on a
    textured, noisy, unevenly lit background (what a dataset crop was cut from)."""
    height, width = 3024, 4032
    light = np.linspace(215, 245, width, dtype=np.float32)[None, :].repeat(height, 0)
    background = light + rng.normal(0, 4, (height, width)).astype(np.float32)
    item = cv2.resize(255 - crop, (2400, 2400), interpolation=cv2.INTER_CUBIC)
    top, left = (height - 2400) // 2, (width - 2400) // 2
    region = background[top:top + 2400, left:left + 2400]
    background[top:top + 2400, left:left + 2400] = np.where(item < 200, item, region)
    colour = cv2.cvtColor(np.clip(background, 0, 255).astype(np.uint8), cv2.COLOR_GRAY2BGR)
    return cv2.imencode(".jpg", colour, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()


def test_a_photo_library_streams_out_and_keeps_the_watchdog_fed(tmp_path, trained, daemons,
                                                                crops):
    """40 12-megapixel photos waiting at start, systemd's watchdog at 4 s: the first sidecar
    comes within moments of the model being ready, and the pings never stop."""
    from test_systemd import FakeNotifySocket, gaps

    rng = np.random.default_rng(0)
    inbox = tmp_path / "inbox"
    for i in range(40):
        (inbox / f"IMG_{i:04d}.jpg").write_bytes(phone_photo(crops[i], rng))
        os.utime(inbox / f"IMG_{i:04d}.jpg", (1, 1))  # taken long ago
    fake = FakeNotifySocket(str(tmp_path / "notify.sock"))
    try:
        daemon = daemons(trained, env={"NOTIFY_SOCKET": fake.address,
                                       "WATCHDOG_USEC": "4000000"})
        images = sorted(inbox.glob("*.jpg"))
        wait_until(lambda: all(labelled(p) for p in images), 120, message="every photo")
        # The main loop logs "ready" on its next tick (up to 1 s): a fast machine may have
        # labelled all 40 by then.
        daemon.wait_for_log(r"INFO daemon.service: ready")
        ready = re.search(r"^(\S+ \S+) INFO daemon.service: ready", daemon.log, re.M).group(1)
        ready = datetime.datetime.fromisoformat(ready.replace(",", ".")).astimezone()
        times = sorted(datetime.datetime.fromisoformat(labelled(p)["classified_at"])
                       for p in images)
        # The first sidecar within moments, not after the whole backlog was decoded.
        assert (times[0] - ready).total_seconds() < 3.0, (ready, times[0])
        wait_until(lambda: len(fake.lines("WATCHDOG=1")) >= 3, 30, message="pings")
        assert "not pinging" not in daemon.log
        assert max(gaps(fake)) < 4.0  # never late for the watchdog
        assert daemon.stop() == 0
    finally:
        fake.close()


def padded_pngs(first, second):
    """Two different PNGs of the same byte length (decoders stop at IEND)."""
    a, b = png(first), png(second)
    size = max(len(a), len(b))
    return a + b"\0" * (size - len(a)), b + b"\0" * (size - len(b))


def test_an_image_rewritten_in_place_with_its_mtime_kept_is_labelled_again(tmp_path, trained,
                                                                          daemons, crops):
    """`exiftool -P` and friends rewrite a photo and put its mtime back: same size, mtime
    and inode, new content. The close-after-write says so."""
    before, after = padded_pngs(crops[0], crops[1])
    image = tmp_path / "inbox" / "edited.png"
    image.write_bytes(before)
    daemon = daemons(trained)
    first = wait_until(lambda: labelled(image), 30, message="first label")
    kept = image.stat()
    with open(image, "r+b") as file:  # in place: same inode
        file.write(after)
    os.utime(image, ns=(kept.st_atime_ns, kept.st_mtime_ns))
    assert (image.stat().st_size, image.stat().st_mtime_ns) == (kept.st_size, kept.st_mtime_ns)
    wait_until(lambda: labelled(image)["classified_at"] != first["classified_at"], 30,
               message="labelled again")
    assert daemon.stop() == 0


def test_a_file_of_the_users_where_a_sidecar_goes_is_never_overwritten(tmp_path, trained,
                                                                      daemons, crops):
    inbox = tmp_path / "inbox"
    mine = '{"label": "Shirt", "reviewed_by": "carol"}\n'
    (inbox / "corrected.png.json").write_text(mine)
    (inbox / "corrected.png").write_bytes(png(crops[0]))
    (inbox / "other.png").write_bytes(png(crops[1]))
    daemon = daemons(trained)
    daemon.wait_for_log(r"corrected.png.json exists and was not written by wardrobe")
    wait_until(lambda: labelled(inbox / "other.png"), 30)
    wait_until(lambda: (status(trained)["inbox"] or {}).get("cannot_label") == 1, 30,
               message="counted in status")
    assert (inbox / "corrected.png.json").read_text() == mine
    assert daemon.stop() == 0


@pytest.mark.skipif(not IS_ROOT or not shutil.which("setpriv"),
                    reason="needs root and setpriv to drop the capability to read anything")
def test_a_folder_unreadable_at_start_is_labelled_once_readable(tmp_path, trained, daemons,
                                                                crops):
    locked = tmp_path / "inbox" / "locked"
    locked.mkdir()
    (locked / "inside.png").write_bytes(png(crops[0]))
    locked.chmod(0o000)
    try:
        daemon = daemons(trained, wrapper=NO_DAC)
        daemon.wait_for_log(r"cannot scan .*locked: Permission denied; will retry")
        locked.chmod(0o755)
        wait_until(lambda: labelled(locked / "inside.png"), 60, message="labelled once readable")
        (locked / "later.png").write_bytes(png(crops[1]))  # and watched from then on
        wait_until(lambda: labelled(locked / "later.png"), 30, message="a new file in it")
        assert daemon.stop() == 0
    finally:
        locked.chmod(0o755)


def test_an_inbox_symlink_pointed_elsewhere_is_followed(tmp_path, small_data, one_epoch_save,
                                                       daemons, crops):
    shutil.copytree(one_epoch_save, tmp_path / "save")
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    (tmp_path / "inbox").symlink_to(tmp_path / "one")
    config = write_config(tmp_path, small_data, epochs=1)
    daemon = daemons(config)
    daemon.wait_for_log(r"ready")
    (tmp_path / "one" / "a.png").write_bytes(png(crops[0]))
    wait_until(lambda: labelled(tmp_path / "one" / "a.png"), 30)
    (tmp_path / "next").symlink_to(tmp_path / "two")
    os.rename(tmp_path / "next", tmp_path / "inbox")  # atomically repointed, as `ln -sfn`
    (tmp_path / "two" / "b.png").write_bytes(png(crops[1]))
    wait_until(lambda: labelled(tmp_path / "two" / "b.png"), 30, message="the new target")
    assert daemon.stop() == 0


def test_a_sidecar_deleted_while_running_is_written_again(tmp_path, trained, daemons, crops):
    image = tmp_path / "inbox" / "a.png"
    image.write_bytes(png(crops[0]))
    daemon = daemons(trained)
    wait_until(lambda: labelled(image), 30)
    Path(f"{image}.json").unlink()
    wait_until(lambda: labelled(image), 30, message="the sidecar back")
    assert daemon.stop() == 0


def test_a_share_mounted_inside_the_inbox_is_polled(tmp_path, trained, daemons, crops, share):
    """The inbox is local, but a share is mounted in a subfolder of it: poll the tree."""
    backing, mount = share  # mounted at inbox/: unmount and mount it at inbox/nas instead
    subprocess.run([FUSERMOUNT, "-u", "-z", str(mount)], check=True)
    (mount / "nas").mkdir()
    subprocess.run([BINDFS, str(backing), str(mount / "nas")], check=True)
    try:
        daemon = daemons(with_settings(trained, watch={"poll_seconds": 0.5}))
        daemon.wait_for_log(r"watching .*inbox by polling every 0.5 s: fuse\S* file system at "
                            r".*inbox/nas")
        daemon.wait_for_log(r"ready")
        (backing / "remote.png").write_bytes(png(crops[0]))
        wait_until(lambda: labelled(backing / "remote.png"), 30, message="seen on the share")
        assert daemon.stop() == 0
    finally:
        subprocess.run([FUSERMOUNT, "-u", "-z", str(mount / "nas")], check=False)
