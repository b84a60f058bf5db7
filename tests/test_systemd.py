"""sd_notify to a fake NOTIFY_SOCKET, the watchdog's health rules, journal logs, the unit."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import REPO, wait_until, write_config
from test_sandbox import sandbox  # noqa: F401  (the fixture)
from daemon.errors import WardrobeError
from daemon.service import config as config_module
from daemon.service import systemd

STRACE = shutil.which("strace")
ANALYZE = shutil.which("systemd-analyze")


class FakeNotifySocket:
    """A datagram socket standing in for systemd's; records (time, message)."""

    def __init__(self, address):
        self.address = address
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind("\0" + address[1:] if address.startswith("@") else address)
        self.socket.settimeout(0.2)
        self.messages = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive)
        self._thread.start()

    def _receive(self):
        while not self._stop.is_set():
            try:
                data = self.socket.recv(4096)
            except socket.timeout:
                continue
            for line in data.decode().splitlines():
                self.messages.append((time.monotonic(), line))

    def lines(self, prefix):
        return [(at, line) for at, line in self.messages if line.startswith(prefix)]

    def close(self):
        self._stop.set()
        self._thread.join()
        self.socket.close()


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request, tmp_path):
    address = (str(tmp_path / "notify.sock") if request.param == "path"
               else f"@wardrobe-test-{os.getpid()}-{time.monotonic_ns()}")
    fake = FakeNotifySocket(address)
    yield fake
    fake.close()


@pytest.fixture
def trained(tmp_path, small_data, one_epoch_save):
    shutil.copytree(one_epoch_save, tmp_path / "save")
    return write_config(tmp_path, small_data, epochs=1)


def test_ready_status_watchdog_and_stopping(tmp_path, small_data, daemons, notify_socket):
    config = write_config(tmp_path, small_data, epochs=2, batch_size=4)
    daemon = daemons(config, env={"NOTIFY_SOCKET": notify_socket.address,
                                  "WATCHDOG_USEC": "4000000"})
    wait_until(lambda: notify_socket.lines("READY=1"), 60, message="READY=1")
    daemon.wait_for_log("ready: model restored, inbox watched")  # logged after READY=1
    wait_until(lambda: notify_socket.lines("STATUS=training epoch"), 30)
    wait_until(lambda: len(notify_socket.lines("WATCHDOG=1")) >= 3, 30, message="pings")
    # Pings come every WATCHDOG_USEC/2 = 2 s; the other 2 s are slack for a loaded machine:
    # only a ping later than WATCHDOG_USEC would get the service killed.
    pings = [at for at, _ in notify_socket.lines("WATCHDOG=1")]
    assert max(b - a for a, b in zip(pings, pings[1:])) < 4.0
    (tmp_path / "inbox" / "x.png").write_bytes(b"not an image")
    wait_until(lambda: any(re.match(r"STATUS=(training|serving).*, 0 images labelled, 1 errors", line)
                           for _, line in notify_socket.messages), 30)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0
    assert notify_socket.lines("STOPPING=1")
    ready_at = notify_socket.lines("READY=1")[0][0]
    assert all(at >= ready_at for at, _ in notify_socket.lines("WATCHDOG=1"))


def test_a_broken_notify_socket_is_logged_not_fatal(tmp_path, trained, daemons):
    daemon = daemons(trained, env={"NOTIFY_SOCKET": str(tmp_path / "nobody-listens"),
                                   "WATCHDOG_USEC": "1000000"})
    daemon.wait_for_log(r"ERROR daemon.systemd: sd_notify to .*nobody-listens.* failed")
    (tmp_path / "inbox" / "x.png").write_bytes(b"still labelling")
    wait_until(lambda: (tmp_path / "inbox" / "x.png.json").exists(), 30)
    assert daemon.stop() == 0
    assert daemon.log.count("sd_notify to") == 1  # said once, not at every ping


def gaps(fake):
    """Seconds between watchdog pings, the one still open (since the last ping) included."""
    pings = [at for at, _ in fake.lines("WATCHDOG=1")] + [time.monotonic()]
    return [b - a for a, b in zip(pings, pings[1:])]


@pytest.mark.skipif(STRACE is None, reason="strace is not installed (.ci/run installs it)")
def test_a_stalled_training_loop_stops_the_watchdog_pings(tmp_path, small_data, daemons):
    """strace holds one of the trainer's checkpoint fsyncs for 4 s: a hung training loop
    while the rest of the daemon runs on."""
    fake = FakeNotifySocket(str(tmp_path / "notify.sock"))
    try:
        config = write_config(tmp_path, small_data, epochs=50)
        daemon = daemons(config, env={"NOTIFY_SOCKET": fake.address, "WATCHDOG_USEC": "1000000"},
                         wrapper=[STRACE, "-f", "-qq", "-o", "/dev/null", "-e", "trace=fsync",
                                  "-e", "inject=fsync:delay_enter=4000000:when=40"])
        daemon.wait_for_log(r"not pinging the systemd watchdog: training made no progress", 180)
        wait_until(lambda: max(gaps(fake) or [0]) > 2.5, 30, message="a gap in the pings")
        count = len(fake.lines("WATCHDOG=1"))
        wait_until(lambda: len(fake.lines("WATCHDOG=1")) >= count + 3, 30,
                   message="pings again once training moves")
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(60) == 0
    finally:
        fake.close()


MAX_INSTANCES = Path("/proc/sys/fs/inotify/max_user_instances")


@pytest.mark.skipif(not os.access(MAX_INSTANCES, os.W_OK), reason="cannot change the inotify "
                    "instance limit here (needs a writable /proc/sys)")
def test_an_inbox_that_cannot_be_watched_stops_the_watchdog_pings(tmp_path, trained, daemons):
    """watch.mode: inotify, and inotify refuses to watch: not healthy. A missing inbox
    is not a fault of ours: the daemon waits for it and stays healthy."""
    fake = FakeNotifySocket(str(tmp_path / "notify.sock"))
    config = trained.read_text() + "watch: {mode: inotify}\n"
    trained.write_text(config)
    original = MAX_INSTANCES.read_text()
    try:
        daemon = daemons(trained, env={"NOTIFY_SOCKET": fake.address,
                                       "WATCHDOG_USEC": "1000000"})
        wait_until(lambda: len(fake.lines("WATCHDOG=1")) >= 2, 60, message="pings")
        inbox = tmp_path / "inbox"
        shutil.rmtree(inbox)
        inbox.write_text("a file where the inbox folder was")
        daemon.wait_for_log(r"inbox is gone .*waiting for it to come back")
        count = len(fake.lines("WATCHDOG=1"))
        wait_until(lambda: len(fake.lines("WATCHDOG=1")) >= count + 3, 30,
                   message="pings go on while waiting")
        MAX_INSTANCES.write_text("0\n")  # no new inotify instance can be made
        inbox.unlink()
        inbox.mkdir()
        daemon.wait_for_log(r"cannot watch .*inbox with inotify")
        daemon.wait_for_log(r"not pinging the systemd watchdog: the inbox is not watched")
        wait_until(lambda: max(gaps(fake) or [0]) > 2.0, 30, message="a gap in the pings")
        count = len(fake.lines("WATCHDOG=1"))
        MAX_INSTANCES.write_text(original)  # the next try succeeds
        wait_until(lambda: len(fake.lines("WATCHDOG=1")) >= count + 3, 30,
                   message="pings again")
        daemon.signal(signal.SIGTERM)
        assert daemon.wait() == 0
    finally:
        MAX_INSTANCES.write_text(original)
        fake.close()


def test_logs_fit_the_journal(tmp_path, trained, daemons):
    daemon = daemons(trained, journal=True)
    daemon.wait_for_log(r"ready: model restored")
    (tmp_path / "save" / "model.json").write_text("{}")  # stale export: a WARNING next time
    assert daemon.stop() == 0
    lines = [line for line in daemon.log.splitlines() if line.startswith("<")]
    assert any(line.startswith("<6>daemon.service: wardrobe starting") for line in lines)
    assert not any(re.match(r"<\d>\d{4}-\d\d-\d\d", line) for line in lines)  # no timestamps
    again = daemons(trained, journal=True)
    again.wait_for_log(r"<4>daemon.checkpoints: model.json did not match")
    assert again.stop() == 0


def test_reloading_sends_a_monotonic_timestamp(tmp_path):
    fake = FakeNotifySocket(str(tmp_path / "notify.sock"))
    try:
        notifier = systemd.Notifier({"NOTIFY_SOCKET": fake.address})
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert notifier.reloading() and notifier.notify("READY=1")
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        wait_until(lambda: len(fake.messages) == 3, 10, message="three lines")
        lines = [line for _, line in fake.messages]
        assert lines[0] == "RELOADING=1" and lines[2] == "READY=1"
        assert before <= int(lines[1].removeprefix("MONOTONIC_USEC=")) <= after
        notifier.close()
    finally:
        fake.close()
    assert not systemd.Notifier({}).reloading()  # not under systemd: nothing to tell


@pytest.mark.parametrize("user", [False, True])
def test_unit_reload_per_systemd_version(tmp_path, small_data, user):
    config = config_module.load(write_config(tmp_path, small_data))
    for version in (253, 257):  # systemd sends SIGHUP and waits for RELOADING=1, READY=1
        lines = systemd.unit_file(config, user=user, version=version).splitlines()
        assert "Type=notify-reload" in lines and "Type=notify" not in lines
        assert not any(line.startswith("ExecReload=") for line in lines)
    lines = systemd.unit_file(config, user=user, version=252).splitlines()
    assert "Type=notify" in lines and "ExecReload=/bin/kill -HUP $MAINPID" in lines
    assert "Type=notify-reload" not in lines
    assert systemd.reload_lines(None) == systemd.reload_lines(252)  # unknown: the safe one


def fake_systemctl(folder, script):
    """A `systemctl` first on $PATH, standing in for a machine's."""
    path = folder / "systemctl"
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(0o755)


def test_manager_version_asks_the_running_manager_then_systemctl(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert systemd.manager_version() is None  # no systemctl at all
    fake_systemctl(tmp_path, 'case "$*" in\n'
                   '  "show --property=Version --value") echo 256.7-1; exit 0;;\n'
                   '  "--user show --property=Version --value") exit 1;;\n'
                   '  --version) echo "systemd 254 (254.5-1~bpo12+3)"; echo "+PAM";;\n'
                   'esac')
    assert systemd.manager_version() == 256  # PID 1's own version
    assert systemd.manager_version(user=True) == 254  # no user manager: the installed one
    fake_systemctl(tmp_path, "echo 'System has not been booted with systemd'; exit 1")
    assert systemd.manager_version() is None
    fake_systemctl(tmp_path, "echo garbage")
    assert systemd.manager_version() is None


def unit_text(config, *extra):
    result = subprocess.run([sys.executable, "-m", "daemon", "unit", "--config", str(config),
                             *extra], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_unit_file_for_this_installation(tmp_path, small_data):
    config = write_config(tmp_path, small_data)
    text = unit_text(config)
    for line in [*systemd.reload_lines(systemd.manager_version()), f"ExecStart={sys.executable} -m daemon run --config {config}",
                 "Restart=on-failure", "RestartPreventExitStatus=2", "KillSignal=SIGTERM",
                 "NoNewPrivileges=yes", "ProtectSystem=strict",
                 f"ReadWritePaths={tmp_path / 'inbox'} {tmp_path / 'save'} /tmp /var/tmp"]:
        assert line in text.splitlines(), line
    assert re.search(r"^TimeoutStopSec=\d+$", text, re.M)
    assert re.search(r"^WatchdogSec=\d+$", text, re.M)
    assert "PrivateTmp" not in text  # the paths live under /tmp here
    assert "MemoryDenyWriteExecute" not in text
    user = unit_text(config, "--user")
    assert "WantedBy=default.target" in user and "ProtectSystem" not in user
    assert (tmp_path / "inbox").is_dir() and (tmp_path / "save").is_dir()


@pytest.mark.parametrize("source, listen, expected", [
    # no metrics, nothing to download: the journal and sd_notify only
    ("path", None, ["RestrictAddressFamilies=AF_UNIX"]),
    ("path", "127.0.0.1:9464", ["RestrictAddressFamilies=AF_UNIX AF_INET",
                                "IPAddressAllow=localhost", "IPAddressDeny=any"]),
    ("path", "[::1]:9464", ["RestrictAddressFamilies=AF_UNIX AF_INET6",
                            "IPAddressAllow=localhost", "IPAddressDeny=any"]),
    # scraped from other machines: any peer
    ("path", "0.0.0.0:9464", ["RestrictAddressFamilies=AF_UNIX AF_INET"]),
    # keras.datasets downloads Fashion-MNIST from the internet
    ("auto", None, ["RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6"]),
    ("keras", "127.0.0.1:9464", ["RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6"]),
])
def test_unit_allows_the_network_the_config_needs_and_no_more(tmp_path, small_data, source,
                                                              listen, expected):
    config = write_config(tmp_path, small_data)
    text = config.read_text().replace("source: path", f"source: {source}")
    if listen:
        text += f"metrics: {{listen: '{listen}'}}\n"
    config.write_text(text)
    lines = systemd.unit_file(config_module.load(config), version=252).splitlines()
    network = [line for line in lines if line.startswith(("RestrictAddressFamilies=", "IPAddress",
                                                          "PrivateNetwork="))]
    assert network == expected


def test_the_coordinators_unit_reaches_its_broker_and_nothing_else(tmp_path, small_data):
    config = write_config(tmp_path, small_data)
    config.write_text(config.read_text() + "metrics: {listen: '127.0.0.1:9464'}\n"
                      "cluster: {broker: 'redis://:pw@127.0.0.2:6390/0'}\n")
    lines = systemd.unit_file(config_module.load(config), version=252).splitlines()
    assert [line for line in lines if line.startswith(("RestrictAddressFamilies=", "IPAddress"))] \
        == ["RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
            "IPAddressAllow=127.0.0.2 localhost", "IPAddressDeny=any"]


def test_the_workers_unit_reads_reaches_only_the_broker_and_writes_only_its_cache(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    config = tmp_path / "worker.yaml"
    config.write_text(f"cluster: {{broker: 'redis://:pw@127.0.0.3:6390/0', paths: "
                      f"{{/srv/photos: {photos}}}}}\n")
    text = unit_text(config, "--worker")
    lines = text.splitlines()
    assert f"ExecStart={sys.executable} -m daemon worker --config {config}" in lines
    for line in ["CacheDirectory=wardrobe-worker", "RestartPreventExitStatus=2",
                 "ProtectSystem=strict", "NoNewPrivileges=yes",
                 "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
                 "IPAddressAllow=127.0.0.3", "IPAddressDeny=any"]:
        assert line in lines, line
    assert "pw" not in text and not any(line.startswith("ReadWritePaths=") and "photos" in line
                                        for line in lines)
    assert "WatchdogSec" not in text  # no sd_notify: Type=exec
    no_broker = tmp_path / "none.yaml"
    no_broker.write_text("{}\n")
    result = subprocess.run([sys.executable, "-m", "daemon", "unit", "--worker", "--config",
                             str(no_broker)], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2 and "cluster.broker: a worker needs" in result.stderr


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_accepts_the_units(tmp_path, small_data):
    config = write_config(tmp_path, small_data)
    worker = tmp_path / "worker.yaml"
    worker.write_text("cluster: {broker: 'redis://127.0.0.1:6390/0'}\n")
    for name, text in [("wardrobe.service", unit_text(config)),
                       ("wardrobe-user.service", unit_text(config, "--user")),
                       ("wardrobe-worker.service", unit_text(worker, "--worker"))]:
        unit = tmp_path / name
        unit.write_text(text)
        result = subprocess.run([ANALYZE, "verify", str(unit)], capture_output=True,
                                text=True, timeout=60)
        assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    shipped = (REPO / "deploy" / "wardrobe.service").read_text()
    assert "Type=notify" in shipped and "RestartPreventExitStatus=2" in shipped


def test_the_shipped_unit_reloads_on_current_systemd_and_says_how_on_older():
    lines = (REPO / "deploy" / "wardrobe.service").read_text().splitlines()
    assert "Type=notify-reload" in lines
    for line in systemd.reload_lines(252):  # the two lines to use instead, commented
        assert f"#   {line}" in lines, line


# Folder names systemd reads specially: white space, a specifier, a variable, quotes, a
# backslash, a command separator, a tab.
ODD_NAMES = ["x sp ace", "pct%n", "mix %n $HOME ${HOME} 'q\" back\\slash ;\tend"]


@pytest.mark.parametrize("name", ODD_NAMES)
def test_units_for_folders_with_special_characters(tmp_path, small_data, name):
    folder = tmp_path / name
    folder.mkdir()
    config = write_config(folder, small_data)
    text = unit_text(config)
    lines = text.splitlines()
    assert f"WorkingDirectory={str(folder).replace('%', '%%')}" in lines  # as is, unquoted
    if name == "x sp ace":
        assert f'ExecStart={sys.executable} -m daemon run --config "{config}"' in lines
        assert f'ReadWritePaths="{folder}/inbox" "{folder}/save" /tmp /var/tmp' in lines
        assert f'Environment="KERAS_HOME={folder}/save/keras"' in lines
    if name == "pct%n":
        assert f"ExecStart={sys.executable} -m daemon run --config {tmp_path}/pct%%n/config.yaml"\
            in lines
        assert not re.search(r"(?<!%)%n", text.replace("%%", ""))  # no bare specifier left
    if ANALYZE:
        for unit_name, unit in [("wardrobe.service", text),
                                ("wardrobe-user.service", unit_text(config, "--user"))]:
            (tmp_path / unit_name).write_text(unit)
            result = subprocess.run([ANALYZE, "verify", str(tmp_path / unit_name)],
                                    capture_output=True, text=True, timeout=60)
            assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_units_with_odd_paths_parse_back_to_the_paths():
    """The writers against systemd 252's rules, decoded here as systemd does."""
    path = "/a b/%n/$HOME/\"q'/back\\slash/;\tend"
    assert systemd._exec_arg(path) == (
        '"/a b/%%n/$$HOME/\\"q\'/back\\\\slash/;\\tend"')  # C escapes, $$ and %%
    assert systemd._list_item(path) == '"/a b/%%n/$HOME/\\"q\'/back\\\\slash/;\tend"'
    assert systemd._env("K", path) == '"K=/a b/%%n/$HOME/\\"q\'/back\\\\slash/;\\tend"'
    assert systemd._executable("/opt/my env/$x%i/python") == '"/opt/my env/$x%%i/python"'
    assert systemd._exec_arg("/plain/path") == "/plain/path"


@pytest.mark.parametrize("name, key, reason", [
    ("line\nbreak", "inbox", "a line break"),
    ("trailing ", "config", "ends in white space"),
    ("trailing\\", "config", "ends in white space or a backslash"),
])
def test_unit_refuses_paths_systemd_cannot_express(tmp_path, small_data, name, key, reason):
    folder = tmp_path / name
    folder.mkdir()
    config = write_config(folder, small_data)
    result = subprocess.run([sys.executable, "-m", "daemon", "unit", "--config", str(config)],
                            capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert f"wardrobe: {key}: systemd cannot use" in result.stderr and reason in result.stderr


def test_unit_refuses_an_interpreter_systemd_cannot_run(tmp_path, small_data, monkeypatch):
    config = config_module.load(write_config(tmp_path, small_data))
    monkeypatch.setattr(sys, "executable", "/opt/it's/python")
    with pytest.raises(WardrobeError, match="cannot run an interpreter"):
        systemd.unit_file(config, version=252)


def test_a_real_start_from_a_folder_with_odd_characters(small_data, sandbox):
    """Under systemd 252 (the sandbox), outside /tmp so only ReadWritePaths= makes the
    folders writable: the unit starts, runs in the folder, and labels an image."""
    from test_sandbox import install_unit

    top = Path("/var/lib") / f"wardrobe-test-{os.getpid()}-{time.monotonic_ns()}"
    folder = top / "x sp %n $HOME ace"
    try:
        folder.mkdir(parents=True)
        config = write_config(folder, small_data, epochs=1)
        install_unit(sandbox, top, config)
        sandbox("ctl", "start", "wardrobe")  # returns once the daemon sent READY=1
        assert sandbox.show("ActiveState") == "active", sandbox.journal()
        assert sandbox.show("WorkingDirectory") == str(folder)
        pid = sandbox.show("MainPID")
        cwd = sandbox("in", "readlink", f"/proc/{pid}/cwd").stdout  # its own PID namespace
        assert cwd == f"{folder}\n"
        (folder / "inbox" / "x.png").write_bytes(b"not an image")
        wait_until(lambda: (folder / "inbox" / "x.png.json").exists(), 60,
                   message=f"a sidecar\n{sandbox.journal()[-3000:]}")
        sandbox("ctl", "stop", "wardrobe")
        assert (sandbox.show("Result"), sandbox.show("ExecMainStatus")) == ("success", "0")
    finally:
        shutil.rmtree(top, ignore_errors=True)


@pytest.mark.parametrize("web, expected", [
    # the review page on loopback: a browser on this machine only, and its port only
    ("{listen: '127.0.0.1:8080'}", ["RestrictAddressFamilies=AF_UNIX AF_INET",
                                    "IPAddressAllow=localhost", "IPAddressDeny=any",
                                    "SocketBindAllow=tcp:8080", "SocketBindDeny=any"]),
    # exposed (with a token): any peer, still its port only
    ("{listen: '0.0.0.0:8443', token: 0123456789abcdefXYZ}",
     ["RestrictAddressFamilies=AF_UNIX AF_INET", "SocketBindAllow=tcp:8443",
      "SocketBindDeny=any"]),
])
def test_the_units_review_page_opens_its_port_and_no_other(tmp_path, small_data, web,
                                                          expected):
    config = write_config(tmp_path, small_data)
    config.write_text(config.read_text() + f"web: {web}\n")
    lines = systemd.unit_file(config_module.load(config), version=252).splitlines()
    assert [line for line in lines if line.startswith(
        ("RestrictAddressFamilies=", "IPAddress", "SocketBind"))] == expected


def test_a_unit_without_a_port_to_serve_binds_none(tmp_path, small_data):
    config = write_config(tmp_path, small_data)
    lines = systemd.unit_file(config_module.load(config), version=252).splitlines()
    assert [line for line in lines if line.startswith("SocketBind")] == ["SocketBindDeny=any"]
