"""What a hostile tester broke (issue 13): a killed decode worker, clocks ahead, files still
open at start-up, two daemons on one inbox. Real daemon, real files, real signals."""

import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import sidecar, wait_until, write_config
from test_realworld import crops, labelled, png, share, trained, with_settings  # noqa: F401

F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)  # Linux


def decode_workers(pid):
    """The pids of a daemon's decode workers (its spawned children, not the tracker)."""
    children = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            children.update(Path(f"/proc/{pid}/task/{task}/children").read_text().split())
        except OSError:
            pass
    workers = []
    for child in children:
        try:
            command = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in command:  # (the resource tracker runs another main)
            workers.append(int(child))
    return workers


def _poll(predicate, seconds):
    """predicate()'s first truthy value within `seconds`, or None (no failure)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    return None


def small_pipes(pid):
    """Shrink every pipe the process `pid` holds (beyond stdin, stdout and stderr) to one
    page, the least Linux allows: a decode worker's results, more than a page unless the
    chunk is one image, can then never fit whole in its pipe, whatever the chunk size (it
    shrinks when the machine is busy). The number of pipes shrunk."""
    shrunk = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if int(fd) <= 2 or not os.readlink(f"/proc/{pid}/fd/{fd}").startswith("pipe:"):
                continue
            mine = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDWR | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            fcntl.fcntl(mine, F_SETPIPE_SZ, 4096)
            shrunk += 1
        except OSError:  # EBUSY: holding more than a page now; no matter for the others
            pass
        finally:
            os.close(mine)
    return shrunk


def burst(tmp_path, inbox, crops, count=3000):
    """`count` small PNGs moved into `inbox` at once; returns `count`."""
    staging = tmp_path / "staging"
    staging.mkdir()
    for index in range(count):
        (staging / f"{index:05d}.png").write_bytes(png(crops[index % len(crops)]))
    for index in range(count):
        os.rename(staging / f"{index:05d}.png", inbox / f"{index:05d}.png")
    return count


def test_decode_workers_killed_during_a_burst_are_replaced(tmp_path, trained, daemons, crops):
    """What the OOM killer does: SIGKILL a decode worker, again and again, while a burst is
    labelled. Each is replaced, its work redone: every image gets its label, none an error."""
    inbox = tmp_path / "inbox"
    daemon = daemons(trained)
    daemon.wait_for_log(r"labelling with checkpoint|ready")
    count = burst(tmp_path, inbox, crops)
    kills = 0
    for _ in range(5):  # a kill, then some progress by the new workers, and again
        done = len(list(inbox.glob("*.json")))
        if done == count:
            break
        workers = wait_until(lambda: decode_workers(daemon.pid), 30, message="decode workers")
        try:
            os.kill(workers[kills % len(workers)], signal.SIGKILL)
            kills += 1
        except ProcessLookupError:
            continue
        wait_until(lambda: daemon.process.poll() is not None or
                   len(list(inbox.glob("*.json"))) >= min(done + 100, count), 60,
                   interval=0.05, message="progress after a kill")
    assert kills >= 2, "found decode workers to kill during the burst"
    images = sorted(inbox.glob("*.png"))
    wait_until(lambda: daemon.process.poll() is not None or all(map(labelled, images)), 240,
               interval=0.5, message="every image labelled")
    assert daemon.process.poll() is None, daemon.log[-3000:]
    assert all(map(labelled, images))
    assert "a decode worker died" in daemon.log
    assert daemon.stop() == 0, daemon.log[-3000:]


def test_a_worker_killed_while_sending_its_results_is_replaced(tmp_path, trained, daemons,
                                                               crops):
    """The worst moment to die: half a chunk's results in the pipe. The pool's reader then
    waits for the rest for ever; the daemon must notice, redo the work, and still stop."""
    inbox = tmp_path / "inbox"
    daemon = daemons(trained)
    daemon.wait_for_log(r"ready")
    assert small_pipes(daemon.pid) >= 2  # the pool's: its results' and its tasks'
    count = burst(tmp_path, inbox, crops)
    wait_until(lambda: any(inbox.glob("*.json")), 60, message="labelling under way")
    pid = daemon.pid

    def sending():
        for worker in decode_workers(pid):
            try:
                if "pipe_write" in Path(f"/proc/{worker}/wchan").read_text():
                    return worker
            except OSError:
                pass
        return None

    killed = None
    for _ in range(100):  # nobody reads results while it is stopped: a worker may block
        os.kill(pid, signal.SIGSTOP)
        try:
            killed = _poll(sending, 1.0)
            if killed:
                os.kill(killed, signal.SIGKILL)
        finally:
            os.kill(pid, signal.SIGCONT)
        if killed or len(list(inbox.glob("*.json"))) == count:
            break
    assert killed, "caught a worker sending its results"
    images = sorted(inbox.glob("*.png"))
    wait_until(lambda: all(map(labelled, images)), 120, interval=0.5,
               message="every image labelled")
    assert "a decode worker died" in daemon.log
    assert daemon.stop(timeout=30) == 0, daemon.log[-3000:]


@pytest.mark.parametrize("kind", ["json", "txt"])
def test_images_dated_in_the_future_are_labelled_once(tmp_path, trained, daemons, crops, kind):
    """A camera in the wrong time zone: mtimes hours ahead of the clock, present at start-up
    and dropped while running. Labelled at once, and not again at the next start."""
    inbox = tmp_path / "inbox"
    config = with_settings(trained, classify={"sidecar": kind})
    ahead = time.time() + 2 * 3600
    early = [inbox / f"early-{index}.png" for index in range(3)]
    for index, image in enumerate(early):
        image.write_bytes(png(crops[index]))
        os.utime(image, (ahead, ahead))
    daemon = daemons(config)
    daemon.wait_for_log(r"ready")
    late = inbox / "late.png"
    (tmp_path / "late.png").write_bytes(png(crops[5]))
    os.utime(tmp_path / "late.png", (ahead, ahead))
    os.rename(tmp_path / "late.png", late)
    images = [*early, late]
    sidecars = [Path(f"{image}.{kind}") for image in images]
    wait_until(lambda: all(s.exists() and s.read_text().strip() for s in sidecars), 30,
               message="labelled")
    assert all("error" not in s.read_text() for s in sidecars)
    written = [s.stat().st_ino for s in sidecars]
    assert daemon.stop() == 0
    daemon = daemons(config)  # its start-up scan finds them up to date
    (tmp_path / "after.png").write_bytes(png(crops[6]))
    os.rename(tmp_path / "after.png", inbox / "after.png")
    wait_until(lambda: Path(f"{inbox}/after.png.{kind}").exists(), 30, message="labelled")
    assert [s.stat().st_ino for s in sidecars] == written, "labelled again"
    assert daemon.stop() == 0


def test_a_share_whose_clock_runs_ahead_is_labelled(tmp_path, trained, daemons, crops, share):
    backing, _ = share
    daemon = daemons(with_settings(trained, watch={"poll_seconds": 0.5}))
    daemon.wait_for_log(r"ready")
    ahead = time.time() + 3600
    images = [backing / f"nas-{index}.png" for index in range(5)]
    for index, image in enumerate(images):
        image.write_bytes(png(crops[index]))
        os.utime(image, (ahead, ahead))
    wait_until(lambda: all(map(labelled, images)), 30, message="labelled")
    assert daemon.stop() == 0


def test_a_download_that_pauses_on_a_share_never_gets_an_error(tmp_path, trained, daemons,
                                                              crops, share):
    """Written on another machine: no lease can tell that it is still open. Half an image
    then a pause: it waits, never written down as bad, and is labelled once complete."""
    backing, _ = share
    daemon = daemons(with_settings(trained, watch={"poll_seconds": 0.5}))
    daemon.wait_for_log(r"ready")
    data = png(crops[3])
    image = backing / "download.png"
    with open(image, "wb") as file:
        file.write(data[: len(data) // 2])
        file.flush()
        early = _poll(lambda: sidecar(image), 8.0)  # the download pauses for 8 s
        assert early is None, f"a sidecar for half a file: {early}"
        file.write(data[len(data) // 2:])
    wait_until(lambda: labelled(image), 30, message="labelled once complete")
    assert daemon.stop() == 0


def test_a_file_open_for_writing_at_start_is_read_only_once_closed(tmp_path, trained, daemons,
                                                                   crops):
    """Its first part is a whole image (what a decoder makes of a truncated file, or a PNG
    whose trailing chunks are still to come): no sidecar until the writer closes it."""
    inbox = tmp_path / "inbox"
    image = inbox / "download.png"
    first = png(crops[3])
    with open(image, "wb") as file:
        file.write(first)
        file.flush()
        old = time.time() - 60  # and its mtime says nothing about whether it is finished
        os.utime(image, (old, old))
        daemon = daemons(trained)
        daemon.wait_for_log(r"ready")
        other = inbox / "other.png"
        (tmp_path / "other.png").write_bytes(png(crops[4]))
        os.rename(tmp_path / "other.png", other)
        wait_until(lambda: labelled(other), 30, message="another image labelled meanwhile")
        daemon.signal(signal.SIGUSR2)  # a rescan while it is still open
        daemon.wait_for_log(r"SIGUSR2: rescanning")
        after = inbox / "after.png"  # labelled after the rescan has offered what it found
        (tmp_path / "after.png").write_bytes(png(crops[5]))
        os.rename(tmp_path / "after.png", after)
        wait_until(lambda: labelled(after), 30, message="an image labelled after the rescan")
        assert sidecar(image) is None, "labelled while still open for writing"
        file.write(b"\0" * 64)  # trailing bytes: what the rest of the download brings
    wait_until(lambda: labelled(image), 30, message="labelled once closed")
    assert sidecar(image)["file"]["size"] == len(first) + 64
    assert daemon.stop() == 0


def other_daemon(tmp_path, config, **sections):
    """A config beside `config` with its own save/ and `sections` changed."""
    folder = tmp_path / "second"
    folder.mkdir(exist_ok=True)
    document = yaml.safe_load(config.read_text())
    second = write_config(folder, document["data"]["path"], epochs=1)
    return with_settings(second, **sections)


def refused(config):
    """`wardrobe run` with `config`, which must exit 1 at once: its stderr."""
    result = subprocess.run([sys.executable, "-m", "daemon", "run", "--config", str(config)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr[-2000:]
    return result.stderr


def test_a_second_daemon_on_the_same_inbox_is_refused(tmp_path, trained, daemons, crops):
    inbox = tmp_path / "top" / "inbox"
    inbox.mkdir(parents=True)
    first = daemons(with_settings(trained, inbox=str(inbox)))
    first.wait_for_log(r"ready")
    (inbox / "mine.png").write_bytes(png(crops[0]))
    record = wait_until(lambda: labelled(inbox / "mine.png"), 30, message="labelled")
    second_config = other_daemon(tmp_path, trained, inbox=str(inbox))
    said = refused(second_config)
    assert f"pid {first.pid}" in said and str(tmp_path / "save") in said
    (inbox / "sub").mkdir()
    said = refused(with_settings(second_config, inbox=str(inbox / "sub")))
    assert f"pid {first.pid}" in said and "inside" in said
    said = refused(with_settings(second_config, inbox=str(tmp_path / "top")))  # around it
    assert f"pid {first.pid}" in said and "inside" in said
    assert labelled(inbox / "mine.png") == record, "relabelled by another daemon"
    first.kill()  # a crash leaves no lock behind
    again = daemons(with_settings(second_config, inbox=str(inbox)))
    again.wait_for_log(r"ready")
    assert again.stop() == 0


def test_a_sighup_to_the_whole_process_group_reloads_and_kills_no_worker(tmp_path, trained,
                                                                         crops):
    """A terminal closed (or `timeout`, `kill -HUP -PGID`) sends SIGHUP to every process of
    the group: the daemon reloads its config; its decode workers and multiprocessing's
    resource tracker, which inherit SIGHUP blocked, live on (no tracebacks in the log)."""
    from conftest import Daemon

    daemon = Daemon(trained, start_new_session=True)  # a group of its own, as a terminal's
    try:
        inbox = tmp_path / "inbox"
        (inbox / "one.png").write_bytes(png(crops[0]))
        wait_until(lambda: labelled(inbox / "one.png"), 120, message="a first label")
        workers = decode_workers(daemon.process.pid)
        assert workers
        os.killpg(daemon.process.pid, signal.SIGHUP)
        daemon.wait_for_log(r"reloaded config")
        (inbox / "two.png").write_bytes(png(crops[1]))
        wait_until(lambda: labelled(inbox / "two.png"), 60, message="a label after SIGHUP")
        assert decode_workers(daemon.process.pid) == workers  # the same, alive
        assert "a decode worker died" not in daemon.log and "Traceback" not in daemon.log
    finally:
        code = daemon.stop()
    assert code == 0, daemon.log
    assert "Traceback" not in daemon.log
