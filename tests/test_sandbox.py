"""Under a real systemd (../shared/tools/systemd-sandbox): the unit from `daemon unit`,
READY, STATUS, restart after kill -9 with resume, a label, a clean stop, no restart loop."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pytest

from conftest import REPO, status, wait_until, write_config
from daemon import dataset
from daemon.config import DEFAULT_LABELS

SANDBOX = REPO.parent / "shared" / "tools" / "systemd-sandbox"


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
    box("stop", check=False)


def test_wardrobe_as_a_systemd_service(tmp_path, small_data, sandbox):
    config = write_config(tmp_path, small_data, epochs=500, checkpoint_every=10)
    unit = subprocess.run([sys.executable, "-m", "daemon", "unit", "--config", str(config)],
                          capture_output=True, text=True, cwd=REPO, timeout=60, check=True)
    (tmp_path / "wardrobe.service").write_text(unit.stdout)
    sandbox("install", str(tmp_path / "wardrobe.service"))

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


def _read_json(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
