"""Featurizing on other machines through a real job queue (issue 15): a real `redis-server`
(Debian's) on a free loopback port, workers as real `python -m daemon worker` subprocesses,
the coordinator a real daemon. Workers, the broker and the coordinator are killed and
stopped mid-burst; every photo still gets exactly one sidecar, with the label the daemon
alone gives it."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import BURST, REPO, Daemon, arrive, photo_config, sidecar, status, wait_until
from test_monitoring import free_port

REDIS = shutil.which("redis-server")
pytestmark = pytest.mark.skipif(REDIS is None, reason="redis-server is not installed "
                                "(.ci/run installs it)")


class Redis:
    """A real redis-server on a free loopback port in a scratch folder; `persist`: with its
    append-only file (what survives a kill -9), else nothing kept."""

    def __init__(self, folder, persist=False, password=None):
        self.folder, self.persist, self.password = Path(folder), persist, password
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.process = None
        self.start()

    @property
    def url(self):
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self):
        command = [REDIS, "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
                   str(self.folder), "--save", "", "--appendonly",
                   "yes" if self.persist else "no", "--appendfsync", "always"]
        if self.password:
            command += ["--requirepass", self.password]
        log = open(self.folder / "redis.log", "ab")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        wait_until(self.answers, 30, 0.05, message="redis-server to answer")

    def answers(self):
        import redis

        try:
            return redis.Redis.from_url(self.url, socket_timeout=2).ping()
        except redis.RedisError:
            return False

    def client(self):
        import redis

        return redis.Redis.from_url(self.url, socket_timeout=5)

    def kill(self):
        self.process.kill()
        self.process.wait(10)

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


@pytest.fixture
def redis_server(tmp_path):
    started = []

    def start(**kwargs):
        started.append(Redis(tmp_path / f"redis-{len(started)}", **kwargs))
        return started[-1]

    yield start
    for server in started:
        server.stop()


def labels(inbox, names):
    return {name: (sidecar(inbox / name)["label"], sidecar(inbox / name)["confidence"])
            for name in names}


def all_labelled(inbox, count):
    return lambda: sum(1 for _ in inbox.glob("*.jpg.json")) >= count


def labelled(config, count):
    """The daemon's count of sidecars written, once it says it has labelled `count` (it says
    so within a second): more would be a photo labelled twice."""
    inbox = wait_until(lambda: (status(config)["inbox"] or {}).get("labelled", 0) >= count
                       and status(config)["inbox"], 30, 0.2, message=f"{count} labelled")
    return inbox["labelled"], inbox["errors"]


def cluster_config(folder, trained, photos, url, **cluster):
    """A coordinator: a copy of the trained save/ and its class folders, and `url`."""
    shutil.copytree(trained.save, folder / "save")
    data = shutil.copytree(photos.data, folder / "data")
    return photo_config(folder, data, cluster={"broker": url, **cluster})


@pytest.fixture(scope="session")
def alone(tmp_path_factory, trained, photos, burst):
    """The burst labelled by the daemon alone: {name: (label, confidence)}."""
    folder = tmp_path_factory.mktemp("alone")
    shutil.copytree(trained.save, folder / "save")
    config = photo_config(folder, shutil.copytree(photos.data, folder / "data"))
    daemon = Daemon(config)
    try:
        daemon.wait_for_log(r"ready: model restored", 120)
        inbox = folder / "inbox"
        arrive(burst, inbox)
        wait_until(all_labelled(inbox, BURST), 300, 0.2, message="the burst labelled")
    finally:
        assert daemon.stop() == 0, daemon.log
    return labels(inbox, [p.name for p in burst])


class Workers:
    """`python -m daemon worker` subprocesses, each with its own config and cache folder
    (holding the converted backbone, as after its first start)."""

    def __init__(self, folder, backbone):
        self.folder, self.backbone, self.started = Path(folder), backbone, []

    def start(self, url, wait=True, **settings):
        folder = self.folder / f"worker-{len(self.started)}"
        cache = folder / "cache"
        shutil.copytree(self.backbone / "backbone", cache / "wardrobe" / "backbone")
        cluster = {"broker": url, **settings.pop("cluster", {})}
        (folder / "worker.yaml").write_text(yaml.safe_dump({"cluster": cluster, **settings}))
        worker = Daemon(folder / "worker.yaml", command="worker",
                        env={"XDG_CACHE_HOME": str(cache)})
        self.started.append(worker)
        if wait:
            worker.wait_for_log(r"worker \S+ ready", 120)
        return worker

    def kill_all(self):
        for worker in self.started:
            worker.kill()


@pytest.fixture
def workers(tmp_path, backbone):
    made = Workers(tmp_path, backbone)
    yield made
    made.kill_all()


def coordinator(tmp_path, trained, photos, server, workers, daemons, count):
    """`count` workers, then a coordinator that sees them all; (config, daemon, workers)."""
    started = [workers.start(server.url) for _ in range(count)]
    config = cluster_config(tmp_path, trained, photos, server.url)
    daemon = daemons(config)
    daemon.wait_for_log(rf"cluster: {count} workers? alive; featurizing on them", 120)
    return config, daemon, started


def name_of(worker):
    return re.search(r"worker (\S+) ready", worker.log).group(1)


def jobs_by_worker(config):
    return {w["name"]: w["jobs"] for w in status(config)["cluster"]["workers"]}


def test_two_workers_label_a_burst_exactly_once_as_the_daemon_alone(
        tmp_path, trained, photos, burst, alone, redis_server, workers, daemons):
    server = redis_server()
    config, daemon, (first, second) = coordinator(tmp_path, trained, photos, server, workers,
                                                  daemons, 2)
    inbox = tmp_path / "inbox"
    arrive(burst, inbox)
    wait_until(all_labelled(inbox, BURST), 300, 0.2, message="the burst labelled")
    assert labels(inbox, [p.name for p in burst]) == alone
    assert labelled(config, BURST) == (BURST, 0)
    # the workers' counts reach status within seconds (heartbeats, then the coordinator's look)
    wait_until(lambda: all(jobs_by_worker(config).get(name_of(w), 0) > 0
                           for w in (first, second)), 30, 0.5, message="jobs by both workers")
    report = status(config)
    assert report["cluster"]["broker"] == server.url and report["cluster"]["connected"]
    text = subprocess.run([sys.executable, "-m", "daemon", "status", "--config", str(config)],
                          capture_output=True, text=True, timeout=30, cwd=REPO).stdout
    assert re.search(r"^cluster: broker \S+ \(connected\), 2 of 2 workers taking jobs", text,
                     re.M), text
    for worker in (first, second):
        assert re.search(rf"^  worker {re.escape(name_of(worker))}: [\d,]+ jobs, ", text, re.M)
    assert "doing it here" not in daemon.log and "featurizing here" not in daemon.log
    assert daemon.stop() == 0, daemon.log
    assert first.stop() == 0 and second.stop() == 0, first.log + second.log
    assert "Traceback" not in daemon.log + first.log + second.log


def test_a_worker_killed_and_one_stopped_mid_burst_lose_nothing(
        tmp_path, trained, photos, burst, alone, redis_server, workers, daemons):
    """One worker SIGKILLed as it runs a job (its jobs wait unacknowledged in Redis), the
    other SIGTERMed: their jobs are done again, by the coordinator once none is left."""
    server = redis_server()
    config, daemon, (doomed, stopped) = coordinator(tmp_path, trained, photos, server, workers,
                                                    daemons, 2)
    client = server.client()
    inbox = tmp_path / "inbox"
    arrive(burst, inbox)

    def taken_by(name):
        return any(client.get(key) == name.encode() for key in client.scan_iter("wardrobe:job:*"))

    wait_until(lambda: taken_by(name_of(doomed)), 60, 0.005, message="a job taken")
    doomed.kill()
    killed = time.monotonic()
    stopped.signal(signal.SIGTERM)
    assert stopped.wait(60) == 0, stopped.log
    wait_until(all_labelled(inbox, BURST), 120, 0.2, message="the burst labelled")
    assert time.monotonic() - killed < 120
    assert labels(inbox, [p.name for p in burst]) == alone
    assert labelled(config, BURST) == (BURST, 0)
    daemon.wait_for_log(r"no worker takes our jobs now; featurizing here", 30)
    assert daemon.stop() == 0, daemon.log
    assert "Traceback" not in daemon.log + stopped.log
    # the stopped one finished its running jobs (its decode processes outlived the threads
    # that started them: a hostile tester saw them killed, the job failed)
    assert "decode worker died" not in stopped.log + daemon.log


@pytest.mark.parametrize("persist", [False, True], ids=["no-persistence", "append-only-file"])
def test_the_broker_killed_and_restarted_mid_burst(tmp_path, trained, photos, burst, alone,
                                                   redis_server, workers, daemons, persist):
    """kill -9 of redis-server mid-burst: the coordinator featurizes here meanwhile; once it
    is back (with what it kept on disk, or empty), the workers take jobs again. Nothing is
    lost, nothing labelled twice."""
    server = redis_server(persist=persist)
    config, daemon, (worker,) = coordinator(tmp_path, trained, photos, server, workers,
                                            daemons, 1)
    inbox = tmp_path / "inbox"
    arrive(burst[:400], inbox)
    wait_until(all_labelled(inbox, 40), 120, 0.05, message="40 sidecars")
    server.kill()
    daemon.wait_for_log(r"the broker redis://127\.0\.0\.1:\d+/0 is unreachable", 60)
    at_kill = sum(1 for _ in inbox.glob("*.json"))
    wait_until(all_labelled(inbox, at_kill + 20), 120, 0.1, message="labelling here")
    server.start()
    daemon.wait_for_log(r"the broker \S+ is back", 60)
    wait_until(all_labelled(inbox, 400), 300, 0.2, message="the first 400 labelled")
    daemon.wait_for_log(r"cluster: 1 worker alive; featurizing on them", 60)
    before = jobs_by_worker(config).get(name_of(worker), 0)
    arrive(burst[400:], inbox)  # after the restart: on the worker again
    wait_until(all_labelled(inbox, BURST), 300, 0.2, message="the burst labelled")
    wait_until(lambda: jobs_by_worker(config)[name_of(worker)] > before, 30, 0.5,
               message="jobs by the worker after the restart")
    assert labels(inbox, [p.name for p in burst]) == alone
    assert labelled(config, BURST) == (BURST, 0)
    assert daemon.stop() == 0 and worker.stop() == 0, daemon.log + worker.log
    assert "Traceback" not in daemon.log + worker.log


def test_the_coordinator_killed_mid_burst_writes_nothing_twice(
        tmp_path, trained, photos, burst, alone, redis_server, workers, daemons):
    """Answers to the dead run's jobs go to its own list, which nobody reads; its jobs still
    queued are no longer wanted (their keys deleted at the restart), so no worker runs them.
    What was labelled before the kill is not written again."""
    server = redis_server()
    config, first, _ = coordinator(tmp_path, trained, photos, server, workers, daemons, 2)
    inbox = tmp_path / "inbox"
    arrive(burst, inbox)
    wait_until(all_labelled(inbox, 100), 120, 0.02, message="100 sidecars")
    first.kill()
    before = {path: (path.stat().st_ino, path.stat().st_mtime_ns)
              for path in inbox.glob("*.json")}
    assert len(before) < BURST
    client = server.client()
    old_run = {key.decode().split(":")[3] for key in client.scan_iter("wardrobe:job:*")}
    second = daemons(config)
    wait_until(all_labelled(inbox, BURST), 300, 0.2, message="the burst labelled")
    assert {path: (path.stat().st_ino, path.stat().st_mtime_ns) for path in before} == before
    assert labelled(config, BURST - len(before)) == (BURST - len(before), 0)
    assert labels(inbox, [p.name for p in burst]) == alone
    left = {key.decode().split(":")[3] for key in client.scan_iter("wardrobe:job:*")}
    assert not (left & old_run), "the dead run's jobs are still wanted"
    assert second.stop() == 0, second.log


def test_features_from_workers_make_the_same_data_version_as_local(
        tmp_path, trained, photos, backbone, redis_server, workers, daemons):
    """A training folder featurized by a worker: the same features, bit for bit, as the
    daemon alone computed (the same CPU kind), so the same data version content."""
    server = redis_server()
    worker = workers.start(server.url)
    save = tmp_path / "save"
    save.mkdir()
    shutil.copytree(backbone / "backbone", save / "backbone")
    data = shutil.copytree(photos.data, tmp_path / "data")
    config = photo_config(tmp_path, data, epochs=2, cluster={"broker": server.url})
    daemon = daemons(config)
    daemon.wait_for_log(r"training complete", 240)
    wait_until(lambda: jobs_by_worker(config).get(name_of(worker), 0) > 0, 30, 0.5,
               message="jobs by the worker")
    assert "doing it here" not in daemon.log
    assert daemon.stop() == 0, daemon.log

    def features(save):
        import numpy as np

        found = {}
        for chunk in (save / "features").rglob("chunk-*.npz"):
            with np.load(chunk) as arrays:
                found.update(zip(arrays["digests"].astype(str), arrays["features"]))
        return found

    mine, local = features(save), features(trained.save)
    assert len(mine) == 32 and mine.keys() == local.keys()
    assert all((mine[key] == local[key]).all() for key in mine)
    assert worker.stop() == 0, worker.log


def test_a_worker_with_another_backbone_refuses_and_the_coordinator_labels(
        tmp_path, trained, photos, redis_server, workers, daemons):
    """The weights' checksum travels with each job: a worker with other weights says so once
    and answers no; the coordinator says so once and featurizes here."""
    from daemon.backbone import runtime, torchfile
    from test_backbone import torch_save_zip

    state = torchfile.read(runtime.locate().path)
    name = sorted(state)[-1]
    state[name] = state[name] * 1.01  # fine-tuned weights, say: another backbone
    other = tmp_path / "other.pth"
    torch_save_zip(other, state)
    server = redis_server()
    worker = workers.start(server.url, weights=str(other))
    config = cluster_config(tmp_path, trained, photos, server.url)
    daemon = daemons(config)
    inbox = arrive(photos.held, tmp_path / "inbox")
    wait_until(lambda: all(sidecar(p) for p in inbox), 120, message="sidecars")
    assert [sidecar(p)["label"] for p in inbox] == [sidecar(p)["label"] for p in trained.inbox]
    assert len(re.findall(r"refusing jobs: another backbone", worker.log)) == 1, worker.log
    # it converted its backbone at its start: TensorFlow's C++ lines went into log records
    assert re.search(r"converting the efficientnet_lite0 backbone .* cached in \S+/wardrobe",
                     worker.log) and not re.search(r"^[IWE]0000 ", worker.log, re.M), worker.log
    assert len(re.findall(rf"worker {re.escape(name_of(worker))} refuses our jobs: another "
                          "backbone", daemon.log)) == 1, daemon.log
    assert daemon.stop() == 0 and worker.stop() == 0


@pytest.mark.parametrize("mirror", ["unmounted", "empty", "stale"])
def test_a_worker_that_does_not_see_the_photos_refuses_and_nothing_is_stuck(
        tmp_path, trained, photos, redis_server, workers, daemons, mirror):
    """cluster.paths mapping the coordinator's folders to a folder of this machine that
    does not hold them (the share not mounted there), or the inbox to one that is empty, or
    holds a stale copy: other photos under the same names, whose features would label ours
    wrong (found by a hostile tester: 40 of 40 sidecars held another photo's label)."""
    server = redis_server()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    if mirror == "stale":  # the same names, each another photo
        for path, other in zip(photos.held, photos.held[::-1]):
            shutil.copyfile(other, elsewhere / path.name)
    mapped = tmp_path if mirror == "unmounted" else tmp_path / "inbox"
    worker = workers.start(server.url, cluster={"paths": {str(mapped): str(elsewhere)}})
    config = cluster_config(tmp_path, trained, photos, server.url)
    daemon = daemons(config)
    daemon.wait_for_log(r"cluster: 1 worker alive", 120)
    inbox = arrive(photos.held, tmp_path / "inbox")
    wait_until(lambda: all(sidecar(p) for p in inbox), 120, message="sidecars")
    assert [sidecar(p)["label"] for p in inbox] == [sidecar(p)["label"] for p in trained.inbox]
    why = (r"cannot see \S+elsewhere/(inbox|data) on this machine" if mirror == "unmounted"
           else r"sees other files than the coordinator under \S+elsewhere ")
    assert len(re.findall(rf"refusing jobs: {why}", worker.log)) in (1, 2), worker.log
    assert re.search(rf"refuses our jobs: {why}", daemon.log), daemon.log
    daemon.wait_for_log(r"no worker takes our jobs now; featurizing here", 30)
    assert daemon.stop() == 0 and worker.stop() == 0


def test_worker_configuration_errors_are_clear_and_exit_2(tmp_path, redis_server, workers):
    server = redis_server(password="s3cret-pass")
    wrong = server.url.replace("s3cret-pass", "wrong-pass")
    worker = workers.start(wrong, wait=False)
    assert worker.wait(60) == 2, worker.log
    assert re.search(r"cluster\.broker: redis://:\*\*\*@127\.0\.0\.1:\d+/0 refused the "
                     "password", worker.log), worker.log
    assert "wrong-pass" not in worker.log

    web = subprocess.Popen([sys.executable, "-m", "http.server", str(port := free_port()),
                            "--bind", "127.0.0.1"], cwd=tmp_path, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: subprocess.run(["bash", "-c", f"echo > /dev/tcp/127.0.0.1/{port}"],
                                          capture_output=True).returncode == 0, 30)
        not_redis = workers.start(f"redis://127.0.0.1:{port}/0", wait=False)
        assert not_redis.wait(60) == 2, not_redis.log
        assert re.search(r"cluster\.broker: \S+ is not a Redis server: it answered b'",
                         not_redis.log), not_redis.log
    finally:
        web.kill()
        web.wait()

    nowhere = workers.start(server.url, wait=False, cluster={"paths": {"/srv/photos":
                                                                       "/no/such/mount"}})
    assert nowhere.wait(60) == 2, nowhere.log
    assert "cluster.paths: /srv/photos maps to /no/such/mount, which is not a folder" in \
        nowhere.log
    for each in (worker, not_redis, nowhere):
        assert "Traceback" not in each.log and "tensorflow" not in each.log.lower()


def test_a_password_changed_on_the_broker_ends_the_worker_and_is_said(
        tmp_path, trained, photos, redis_server, workers, daemons):
    """Redis restarted with another requirepass: the worker exits 2 (its config is wrong
    now; systemd does not restart it), the coordinator says why it featurizes here."""
    server = redis_server(password="first-pass")
    config, daemon, (worker,) = coordinator(tmp_path, trained, photos, server, workers,
                                            daemons, 1)
    server.kill()
    server.password = "second-pass"
    server.start()
    assert worker.wait(60) == 2, worker.log
    assert re.search(r"cluster\.broker: redis://:\*\*\*@\S+ refused the password", worker.log)
    daemon.wait_for_log(r"ERROR daemon.cluster: cluster: cluster.broker: \S+ refused the "
                        "password", 60)
    inbox = arrive(photos.held[:2], tmp_path / "inbox")
    wait_until(lambda: all(sidecar(p) for p in inbox), 120, message="sidecars")
    assert "first-pass" not in daemon.log + worker.log
    assert "second-pass" not in daemon.log + worker.log
    assert daemon.stop() == 0, daemon.log


def test_a_coordinator_with_a_wrong_password_labels_here(tmp_path, trained, photos,
                                                         redis_server, daemons):
    server = redis_server(password="s3cret-pass")
    config = cluster_config(tmp_path, trained, photos,
                            server.url.replace("s3cret-pass", "wrong-pass"))
    daemon = daemons(config)
    inbox = arrive(photos.held, tmp_path / "inbox")
    wait_until(lambda: all(sidecar(p) for p in inbox), 120, message="sidecars")
    assert len(re.findall(r"ERROR daemon.cluster: cluster: cluster.broker: \S+ refused the "
                          "password.*featurizing here", daemon.log)) == 1, daemon.log
    assert "wrong-pass" not in daemon.log
    wait_until(lambda: status(config)["cluster"]["connected"] is False, 30, 0.5,
               message="status: not connected")
    assert daemon.stop() == 0, daemon.log


def test_a_workers_decode_process_killed_fails_only_its_job(
        tmp_path, trained, photos, burst, alone, redis_server, workers, daemons):
    """The OOM killer takes one of a worker's decode processes mid-burst: that worker
    answers that the job failed (it is done by the coordinator, where a file that kills
    decoders is found alone), replaces the process and goes on taking jobs."""
    config, daemon, (worker,) = coordinator(tmp_path, trained, photos, redis_server(), workers,
                                            daemons, 1)
    inbox = tmp_path / "inbox"
    arrive(burst[:300], inbox)

    def decoders():
        found = subprocess.run(["pgrep", "-P", str(worker.pid)], capture_output=True,
                               text=True).stdout.split()
        return [int(pid) for pid in found if "spawn_main" in Path(
            f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")]

    victim = wait_until(lambda: all_labelled(inbox, 20)() and decoders(), 60, 0.02,
                        message="the worker's decode processes busy")[0]
    os.kill(victim, signal.SIGKILL)
    daemon.wait_for_log(r"worker \S+ failed a job \(a decode worker died on this machine\); "
                        "doing it here", 60)
    before = jobs_by_worker(config).get(name_of(worker), 0)
    arrive(burst[300:], inbox)
    wait_until(all_labelled(inbox, BURST), 300, 0.2, message="the burst labelled")
    assert labels(inbox, [p.name for p in burst]) == alone
    assert labelled(config, BURST) == (BURST, 0)
    wait_until(lambda: jobs_by_worker(config)[name_of(worker)] > before, 30, 0.5,
               message="jobs by the worker after")
    assert "refuses our jobs" not in daemon.log
    assert daemon.stop() == 0 and worker.stop() == 0, daemon.log + worker.log
