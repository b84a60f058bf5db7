"""Under a real systemd (../shared/tools/systemd-sandbox): the unit from `daemon unit`,
READY, STATUS, restart after kill -9 with resume, a label, a clean stop, no restart loop,
`systemctl reload`."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pytest

from conftest import REPO, status, wait_until, write_config
from daemon.data import dataset
from daemon.service.config import DEFAULT_LABELS
from daemon.service.systemd import reload_lines

SANDBOX = REPO.parent / "shared" / "tools" / "systemd-sandbox"
# systemd's debug log of the daemon's answer to a reload: "Got notification message from
# PID 61 (RELOADING=1, MONOTONIC_USEC=...)" (": ..." in newer systemd), later READY=1.
ANSWERED = re.compile(r"Got notification message from PID \d+\W+RELOADING=1, MONOTONIC_USEC=\d+"
                      r".*?Got notification message from PID \d+\W+READY=1", re.S)


class Sandbox:
    def __init__(self, folder):
        self.env = dict(os.environ, SANDBOX_DIR=str(folder))

    def __call__(self, *args, check=True, timeout=120):
        result = subprocess.run([str(SANDBOX), *args], env=self.env, capture_output=True,
                                text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"systemd-sandbox {' '.join(args)}: {result.returncode}\n"
                                 f"{result.stdout}\n{result.stderr}")
        return result

    def show(self, prop):
        return self("ctl", "show", "-P", prop, "wardrobe").stdout.strip()

    def journal(self):
        return self("journal", "-u", "wardrobe", "--no-pager", check=False).stdout

    def version(self):
        """The major version of the systemd running in the sandbox."""
        text = self("in", "systemctl", "show", "--property=Version", "--value").stdout
        return int(re.match(r"\d+", text.strip()).group())


@pytest.fixture
def sandbox(tmp_path):
    if not SANDBOX.exists():
        pytest.skip(f"{SANDBOX} is not here")
    # One sandbox per folder; its basename names a cgroup, so make it unique.
    folder = Path("/tmp") / f"wardrobe-sandbox-{os.getpid()}-{time.monotonic_ns()}"
    box = Sandbox(folder)
    started = box("start", check=False)
    if started.returncode != 0:
        pytest.skip(f"systemd-sandbox cannot start here: {started.stderr.strip()[-300:]}")
    yield box
    stopped = box("stop", check=False)
    if stopped.returncode == 0 and "cgroup removed: yes" in stopped.stdout:
        shutil.rmtree(folder, ignore_errors=True)


def install_unit(sandbox, folder, config):
    """`daemon unit` for `config`, run with this tree's code (the unit's working folder is
    the config's, where `python -m daemon` would find another installation's)."""
    unit = subprocess.run([sys.executable, "-m", "daemon", "unit", "--config", str(config)],
                          capture_output=True, text=True, cwd=REPO, timeout=60, check=True)
    text = unit.stdout.replace("[Service]\n", f"[Service]\nEnvironment=PYTHONPATH={REPO}\n", 1)
    (folder / "wardrobe.service").write_text(text)
    sandbox("install", str(folder / "wardrobe.service"))
    return text


def test_wardrobe_as_a_systemd_service(tmp_path, small_data, sandbox):
    config = write_config(tmp_path, small_data, epochs=500, checkpoint_every=10)
    install_unit(sandbox, tmp_path, config)

    started = time.monotonic()
    sandbox("ctl", "start", "wardrobe")  # returns once the daemon sent READY=1
    ready_seconds = time.monotonic() - started
    assert sandbox.show("ActiveState") == "active", sandbox.journal()
    wait_until(lambda: re.match(r"training epoch \d+/500 \(batch \d+\), \d+ images labelled",
                                sandbox.show("StatusText")), 30, message="a STATUS text")

    wait_until(lambda: status(config)["epoch"] >= 2, 60, message="two epochs trained")
    killed = sandbox.show("MainPID")
    started = time.monotonic()
    sandbox("in", "kill", "-9", killed)
    wait_until(lambda: sandbox.show("MainPID") not in (killed, "0")
               and sandbox.show("ActiveState") == "active"
               and sandbox.show("SubState") == "running", 60, message="a restart")
    restart_seconds = time.monotonic() - started
    assert sandbox.show("NRestarts") == "1"
    wait_until(lambda: re.search(r"resuming from .*: epoch ([1-9]\d*)/500",
                                 sandbox.journal()), 30, message="a resume in the journal")

    image = tmp_path / "inbox" / "dropped.png"
    image.write_bytes(cv2.imencode(".png", dataset.load("sample").x_test[0])[1].tobytes())
    record = wait_until(lambda: _read_json(Path(f"{image}.json")), 30, message="a sidecar")
    assert record["label"] in DEFAULT_LABELS and record["epoch"] >= 2

    before = status(config)
    started = time.monotonic()
    sandbox("ctl", "stop", "wardrobe")
    stop_seconds = time.monotonic() - started
    assert (sandbox.show("Result"), sandbox.show("ExecMainStatus")) == ("success", "0")
    assert re.search(r"stopped at batch \d+ of epoch \d+; checkpoint|bye", sandbox.journal())
    after = status(config)
    assert (after["epoch"], after["step"]) >= (before["epoch"], before["step"])

    config.write_text(config.read_text().replace("epochs: 500", "epochs: ten"))
    assert sandbox("ctl", "start", "wardrobe", check=False).returncode != 0
    assert sandbox.show("ExecMainStatus") == "2"
    restarts = sandbox.show("NRestarts")
    wait_until(lambda: sandbox.show("ActiveState") == "failed", 10, message="failed, not "
               "restarting")
    assert "train.epochs: expected a whole number" in sandbox.journal()
    deadline = time.monotonic() + 5  # RestartSec=2: a loop would have restarted by now
    while time.monotonic() < deadline:
        assert sandbox.show("NRestarts") == restarts and sandbox.show("ActiveState") == "failed"
        time.sleep(0.5)
    print(f"\nsystemd: READY after {ready_seconds:.2f} s; running again {restart_seconds:.2f} s "
          f"after kill -9; stop {stop_seconds:.2f} s")


def test_systemctl_reload(tmp_path, small_data, sandbox):
    """SIGHUP from `systemctl reload`: the daemon answers RELOADING=1 (with MONOTONIC_USEC)
    and READY=1, and keeps running with the same pid. Type=notify-reload (systemd >= 253)
    waits for that answer; older systemd runs ExecReload=kill -HUP and takes the answer as
    a reload announced by the service."""
    config = write_config(tmp_path, small_data, epochs=500)
    text = install_unit(sandbox, tmp_path, config)
    for line in reload_lines(sandbox.version()):  # the variant for the systemd running it
        assert line in text.splitlines(), line
    sandbox("in", "systemd-analyze", "log-level", "debug")  # log every notify message
    sandbox("ctl", "start", "wardrobe")
    pid = sandbox.show("MainPID")
    for count in (1, 2):  # a second reload works as the first did
        started = time.monotonic()
        sandbox("ctl", "reload", "wardrobe", timeout=60)  # must never hang
        reload_seconds = time.monotonic() - started
        wait_until(lambda: reloads(sandbox, pid) == count, 30, interval=0.5,
                   message=f"reload {count} in the journal")
        # systemd saw RELOADING=1 with a timestamp, then READY=1, and is back to running
        # (without READY=1 it would stay "reloading" until TimeoutStartSec).
        wait_until(lambda: len(ANSWERED.findall(sandbox.journal())) == count
                   and sandbox.show("ActiveState") == "active", 30, interval=0.5,
                   message=f"RELOADING=1, READY=1 and active after reload {count}")
        assert (sandbox.show("MainPID"), sandbox.show("SubState")) == (pid, "running")
    assert sandbox.show("NRestarts") == "0"
    sandbox("ctl", "stop", "wardrobe")
    assert (sandbox.show("Result"), sandbox.show("ExecMainStatus")) == ("success", "0")
    print(f"\nsystemd {sandbox.version()}: systemctl reload took {reload_seconds:.2f} s")


def reloads(sandbox, pid):
    """How many reloads the daemon logged; fails at once if it is gone (SIGHUP kills a
    process without a handler, and systemd counts that as a clean exit)."""
    journal = sandbox.journal()
    assert sandbox.show("MainPID") == pid, journal[-3000:]
    return len(re.findall(r"daemon\.service: reloaded config", journal))


def _read_json(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def test_metrics_and_the_review_page_under_systemd_on_loopback_only(tmp_path, small_data,
                                                                    sandbox):
    """The unit for a loopback metrics.listen and web.listen: systemd's firewall lets a
    scraper and a browser on the same machine in (the sandbox's own network namespace), the
    daemon serves there, and it may bind those two ports only."""
    config = write_config(tmp_path, small_data, epochs=2)
    config.write_text(config.read_text() + "metrics: {listen: '127.0.0.1:9464'}\n"
                      "web: {listen: '127.0.0.1:8080'}\n")
    text = install_unit(sandbox, tmp_path, config)
    assert "IPAddressAllow=localhost" in text.splitlines()
    assert [line for line in text.splitlines() if line.startswith("SocketBind")] == [
        "SocketBindAllow=tcp:9464", "SocketBindAllow=tcp:8080", "SocketBindDeny=any"]
    sandbox("ctl", "start", "wardrobe")
    assert sandbox.show("IPAddressDeny") in ("::/0 0.0.0.0/0", "0.0.0.0/0 ::/0")
    pid1 = (Path(sandbox.env["SANDBOX_DIR"]) / "state" / "pid1").read_text().strip()
    scraper = ["nsenter", "-t", pid1, "-n", sys.executable, "-c",
               "import urllib.request; print(urllib.request.urlopen("
               "'http://127.0.0.1:9464/metrics', timeout=5).read().decode())"]

    def scraped():
        result = subprocess.run(scraper, capture_output=True, text=True, timeout=30)
        match = re.search(r"^wardrobe_training_epoch (\S+)$", result.stdout, re.M)
        return match and float(match.group(1)) == 2 and result.stdout

    metrics = wait_until(scraped, 120, interval=0.5, message="epoch 2 scraped in the sandbox")
    assert re.search(r"^process_resident_memory_bytes \S+$", metrics, re.M)
    browser = ["nsenter", "-t", pid1, "-n", sys.executable, "-c",
               "import urllib.request; print(urllib.request.urlopen("
               "'http://127.0.0.1:8080/api/status', timeout=5).read().decode())"]
    page = subprocess.run(browser, capture_output=True, text=True, timeout=30)
    assert json.loads(page.stdout)["epoch"] == 2, page.stderr[-2000:]
    sandbox("ctl", "stop", "wardrobe")
    assert (sandbox.show("Result"), sandbox.show("ExecMainStatus")) == ("success", "0")


def test_photos_with_the_backbone_under_the_hardened_unit(tmp_path, photos, backbone,
                                                          sandbox):
    """The backbone model under the unit `daemon unit` writes (no network, a read-only
    system, no new privileges): its weights read from the installed package, its
    TensorFlow Lite runtime in the spawned decode workers, a photo labelled."""
    from conftest import CLASSES, photo_config, with_backbone

    data = shutil.copytree(photos.data, tmp_path / "data")
    config = photo_config(tmp_path, data, epochs=3)
    with_backbone(tmp_path / "save", backbone)
    (tmp_path / "inbox").mkdir()
    install_unit(sandbox, tmp_path, config)
    sandbox("ctl", "start", "wardrobe")
    assert sandbox.show("ActiveState") == "active", sandbox.journal()
    wait_until(lambda: status(config)["epoch"] >= 3, 120, message="three epochs trained")
    photo = tmp_path / "inbox" / photos.held[0].name
    shutil.copyfile(photos.held[0], photo)
    record = wait_until(lambda: _read_json(Path(f"{photo}.json")), 60, message="a sidecar")
    assert record["label"] in CLASSES, record
    journal = sandbox.journal()
    assert "model: auto is efficientnet_lite0" in journal
    assert "converting the efficientnet_lite0 backbone" not in journal  # the cache was used
    sandbox("ctl", "stop", "wardrobe")
    assert (sandbox.show("Result"), sandbox.show("ExecMainStatus")) == ("success", "0")


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not "
                    "installed (.ci/run installs it)")
def test_a_coordinator_and_two_workers_under_systemd(tmp_path, photos, backbone, sandbox):
    """Scaling out as the README does it, inside the sandbox's own loopback network: Redis,
    the coordinator's unit and two workers' units from `wardrobe unit --worker` (network
    only to the broker, a read-only system, only their cache writable). Photos dropped into
    the inbox are featurized by the workers and labelled by the coordinator."""
    from conftest import CLASSES, photo_config, with_backbone

    (tmp_path / "redis").mkdir()
    sandbox("in", "systemd-run", "--unit=redis", shutil.which("redis-server"), "--port", "6390",
            "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir",
            str(tmp_path / "redis"))
    url = "redis://127.0.0.1:6390/0"
    data = shutil.copytree(photos.data, tmp_path / "data")
    config = photo_config(tmp_path, data, epochs=3, cluster={"broker": url})
    with_backbone(tmp_path / "save", backbone)
    (tmp_path / "inbox").mkdir()
    unit = install_unit(sandbox, tmp_path, config)
    assert "IPAddressAllow=127.0.0.1" in unit and "IPAddressDeny=any" in unit
    # the cache a worker's first start fills (CacheDirectory=wardrobe-worker), filled now
    cache = Path("/var/cache/wardrobe-worker")
    made_cache = not cache.exists()
    shutil.copytree(backbone / "backbone", cache / "backbone", dirs_exist_ok=True)
    try:
        names = []
        for number in (1, 2):
            folder = tmp_path / f"worker{number}"
            folder.mkdir()
            (folder / "worker.yaml").write_text(f"cluster: {{broker: '{url}'}}\n")
            text = subprocess.run([sys.executable, "-m", "daemon", "unit", "--worker",
                                   "--config", str(folder / "worker.yaml")], capture_output=True,
                                  text=True, cwd=REPO, timeout=60, check=True).stdout
            assert "IPAddressAllow=127.0.0.1" in text and "CacheDirectory=wardrobe-worker" in text
            text = text.replace("[Service]\n", f"[Service]\nEnvironment=PYTHONPATH={REPO}\n", 1)
            names.append(f"wardrobe-worker{number}")
            (folder / f"{names[-1]}.service").write_text(text)
            sandbox("install", str(folder / f"{names[-1]}.service"))
            sandbox("ctl", "start", names[-1])
        sandbox("ctl", "start", "wardrobe")
        wait_until(lambda: len([w for w in (status(config)["cluster"] or {}).get("workers") or []
                                if w["alive"]]) == 2, 120, 0.5, message="two workers alive")
        dropped = []
        for path in photos.held:
            shutil.copyfile(path, tmp_path / "inbox" / path.name)
            dropped.append(tmp_path / "inbox" / path.name)
        records = wait_until(lambda: all(_read_json(Path(f"{p}.json")) for p in dropped)
                             and [_read_json(Path(f"{p}.json")) for p in dropped], 120,
                             message="sidecars")
        assert all(record["label"] in CLASSES for record in records), records
        wait_until(lambda: sum(w["jobs"] for w in status(config)["cluster"]["workers"]) > 0, 30,
                   0.5, message="jobs done by the workers")
        journal = sandbox("journal", "--no-pager", check=False).stdout
        assert "refus" not in journal and "featurizing here" not in journal, journal[-3000:]
        for name in ["wardrobe", *names]:
            sandbox("ctl", "stop", name)
            result = sandbox("ctl", "show", "-P", "Result", name).stdout.strip()
            assert result == "success", sandbox("journal", "-u", name, "--no-pager").stdout
    finally:
        if made_cache:
            shutil.rmtree(cache, ignore_errors=True)
