"""The cluster (issue 15), measured side by side in one run:

1. A backlog of 600 12-megapixel phone photos labelled by the daemon alone, and by the same
   daemon as coordinator with one `wardrobe worker` on the same 2 cores (a real
   redis-server on loopback): alone, cluster, alone, cluster, so that the machine's drift
   shows. photos/s from the first sidecar to the last (as bench/label_photos.py); the CPU
   the coordinator spent per photo (its process tree: the daemon and its decode workers,
   which write the sidecars) and the worker's.
2. The queue's own cost: jobs of K photos (answers of K x 1280 float32 features) sent
   through Dramatiq and Redis to a worker process that answers at once, the sender taking
   the answers as the coordinator does. ms per job and per photo (the CPU of the sender,
   the worker and redis-server over the jobs), and the jobs/s one Redis takes (its CPU per
   job: one core's worth); and what carrying the photos' bytes in the jobs would cost
   Redis (MB/s through one Redis, its CPU per MB).

    PYTHONPATH=. .venv/bin/python bench/cluster.py [--photos 600] [--jobs 2000]

Results: docs/bench-cluster.json. Goal: cluster within 10 % of the daemon alone.
"""

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

import photobench
from daemonproc import CLOCK_TICKS, REPO, Daemon, copy_save, environment, sidecar_times, \
    wait_for_sidecars
from label_photos import EPOCHS, trained
from report import OtherLoad, code_version, machine

OUT = REPO / "docs" / "bench-cluster.json"
FIRST_PHOTO = 20_000  # other contents than the other benchmarks' photos


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    def __init__(self, folder):
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
             str(folder), "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
        import redis

        deadline = time.monotonic() + 30
        while True:
            try:
                redis.Redis.from_url(self.url).ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self):
        self.process.terminate()
        self.process.wait()


def tree_cpu_seconds(root):
    """utime + stime of photobench.process_tree(root)."""
    total = 0.0
    for pid in photobench.process_tree(root):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return total


def start_worker(folder, url):
    """`python -m daemon worker` with the converted backbone in its cache."""
    cache = folder / "cache"
    shutil.copytree(photobench.backbone_folder() / "backbone", cache / "wardrobe" / "backbone")
    config = folder / "worker.yaml"
    config.write_text(yaml.safe_dump({"cluster": {"broker": url}}))
    log = folder / "worker.log"
    process = subprocess.Popen([sys.executable, "-m", "daemon", "worker", "--config",
                                str(config)], cwd=REPO, stdout=open(log, "w"),
                               stderr=subprocess.STDOUT,
                               env=dict(environment(), XDG_CACHE_HOME=str(cache)))
    deadline = time.monotonic() + 120
    while "ready" not in log.read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(log.read_text()[-3000:])
        time.sleep(0.05)
    return process


def backlog(root, photos, label, redis=None):
    """Label `photos` dropped at once into the inbox of a daemon that is ready and idle;
    {photos_per_s, CPU per photo of the coordinator and the worker}."""
    base = trained()
    run = root / label
    copy_save(base / "save", run)
    shutil.copytree(base / "data", run / "data", copy_function=os.link)
    inbox = root / f"{label}-inbox"
    worker = None
    if redis is not None:
        worker = start_worker(run, redis.url)
    daemon = Daemon(run, inbox=inbox, data=photobench.folder_data(run / "data"),
                    model="efficientnet_lite0", epochs=EPOCHS,
                    cluster={"broker": redis.url} if redis else None)
    try:
        daemon.wait_for(r"ready: model restored", timeout=300)
        if redis is not None:
            daemon.wait_for(r"featurizing on them", timeout=60)
        daemon.wait_quiet()
        before = tree_cpu_seconds(daemon.pid), tree_cpu_seconds(worker.pid) if worker else 0
        photobench.place(photos, inbox, by_class=False)
        wait_for_sidecars(daemon, [inbox], len(photos), timeout=900, every=0.1)
        coordinator_cpu = tree_cpu_seconds(daemon.pid) - before[0]
        worker_cpu = tree_cpu_seconds(worker.pid) - before[1] if worker else 0.0
    finally:
        daemon.stop()
        if worker is not None:
            worker.terminate()
            worker.wait()
    log = daemon.log.read_text()
    times = sidecar_times(inbox)
    shutil.rmtree(inbox)
    result = {"photos_per_s": round(len(times) / (max(times) - min(times)), 2),
              "coordinator_cpu_ms_per_photo": round(coordinator_cpu / len(times) * 1000, 1),
              "worker_cpu_ms_per_photo": round(worker_cpu / len(times) * 1000, 1)}
    if redis is not None:
        result["done_here"] = "doing it here" in log or "featurizing here" in log
    print(label, result, flush=True)
    return result


# ---- the queue's own cost ----------------------------------------------------------------------

ECHO = """
import sys, dramatiq, numpy as np
sys.path.insert(0, sys.argv[2])
from daemon.cluster import broker as wire
client = wire.client(sys.argv[1])
broker = wire.make_broker(sys.argv[1], client)
def featurize(job):
    features = np.zeros((len(job["paths"]), 1280), np.float32)
    answer = wire.encode_answer(job["id"], "echo", [("image", f, {"seconds": 0.0})
                                                   for f in features])
    pipe = client.pipeline()
    pipe.rpush(job["reply"], answer)
    pipe.expire(job["reply"], 60)
    pipe.execute()
dramatiq.actor(featurize, broker=broker, actor_name=wire.ACTOR, queue_name=wire.QUEUE)
worker = dramatiq.Worker(broker, worker_threads=2)
worker.queue_prefetch = 2
worker.start()
print("ready", flush=True)
sys.stdin.read()
worker.stop()
"""


def queue_cost(redis, jobs, photos_per_job, window=8):
    """Send `jobs` jobs of `photos_per_job` paths, `window` out at a time, through the
    real wire to an echoing worker process; the costs per job."""
    from daemon.cluster import broker as wire

    echo = subprocess.Popen([sys.executable, "-c", ECHO, redis.url, str(REPO)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=environment())
    assert echo.stdout.readline().strip() == "ready"
    client = wire.client(redis.url)
    broker = wire.make_broker(redis.url, client)
    reply = f"wardrobe:answers:bench:{time.monotonic_ns()}"
    paths = [f"/srv/photos/inbox/IMG_{i:05d}.jpg" for i in range(photos_per_job)]
    cpu = [os.times(), tree_cpu_seconds(echo.pid), tree_cpu_seconds(redis.process.pid)]
    started, sent, answered = time.perf_counter(), 0, 0
    while answered < jobs:
        while sent < jobs and sent - answered < window:
            key = f"wardrobe:job:bench:{sent}"
            client.set(key, "", ex=600)
            broker.enqueue(wire.message({"id": str(sent), "key": key, "reply": reply,
                                         "kind": "label", "weights": "", "feature_id": "",
                                         "paths": paths, "known": {}}))
            sent += 1
        _, data = client.blpop([reply], timeout=30)
        meta, features = wire.decode_answer(data)
        assert features.shape == (photos_per_job, 1280)
        client.delete(f"wardrobe:job:bench:{meta['job']}")
        answered += 1
    elapsed = time.perf_counter() - started
    mine = os.times()
    sender = (mine.user + mine.system) - (cpu[0].user + cpu[0].system)
    worker = tree_cpu_seconds(echo.pid) - cpu[1]
    server = tree_cpu_seconds(redis.process.pid) - cpu[2]
    echo.stdin.close()
    echo.wait(30)
    per_job = (sender + worker + server) / jobs
    result = {"photos_per_job": photos_per_job, "jobs": jobs, "jobs_per_s": round(jobs / elapsed),
              "round_trip_ms": round(elapsed / jobs * 1000, 2),
              "cpu_ms_per_job": {"coordinator": round(sender / jobs * 1000, 2),
                                 "worker": round(worker / jobs * 1000, 2),
                                 "redis": round(server / jobs * 1000, 3),
                                 "total": round(per_job * 1000, 2)},
              "cpu_ms_per_photo": round(per_job / photos_per_job * 1000, 3),
              "redis_jobs_per_core_s": round(jobs / server) if server else None}
    print("queue", result, flush=True)
    return result


def bytes_cost(redis, photos, count=100):
    """What carrying the photos themselves in the jobs would cost: `count` phone photos
    pushed into Redis and popped out again (as a job with the bytes would travel), MB/s and
    redis-server's CPU per MB."""
    import redis as redis_py

    client = redis_py.Redis.from_url(redis.url)
    blobs = [path.read_bytes() for path, _ in photos[:count]]
    size = sum(len(blob) for blob in blobs) / 1e6
    cpu = tree_cpu_seconds(redis.process.pid)
    started = time.perf_counter()
    for blob in blobs:
        client.rpush("wardrobe:bench:bytes", blob)
        client.lpop("wardrobe:bench:bytes")
    elapsed = time.perf_counter() - started
    server = tree_cpu_seconds(redis.process.pid) - cpu
    result = {"photos": len(blobs), "mb": round(size, 1), "mb_per_s": round(size / elapsed),
              "redis_cpu_ms_per_mb": round(server / size * 1000, 2),
              "photo_mb": round(size / len(blobs), 2)}
    print("bytes", result, flush=True)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=int, default=600)
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    photos = photobench.phone_photos(FIRST_PHOTO, args.photos, name="cluster")
    trained()
    load = OtherLoad()
    root = Path(tempfile.mkdtemp(prefix="wardrobe-bench-cluster-"))
    redis = RedisServer(root)
    try:
        runs = {"alone": [], "cluster": []}
        for round_ in range(args.rounds):
            runs["alone"].append(backlog(root, photos, f"alone-{round_}"))
            runs["cluster"].append(backlog(root, photos, f"cluster-{round_}", redis))
        queue = [queue_cost(redis, args.jobs, k) for k in (16, 64)]
        carried = bytes_cost(redis, photos)
    finally:
        redis.stop()
        shutil.rmtree(root, ignore_errors=True)

    def mean(kind, key):
        return round(sum(run[key] for run in runs[kind]) / len(runs[kind]), 2)

    alone, cluster = mean("alone", "photos_per_s"), mean("cluster", "photos_per_s")
    results = {"photos": args.photos, "megapixels": 12.2, "runs": runs,
               "alone_photos_per_s": alone, "cluster_photos_per_s": cluster,
               "ratio": round(cluster / alone, 3), "queue": queue, "bytes_in_jobs": carried,
               "goal": "cluster (coordinator + 1 worker on the same cores) >= 0.9 x alone",
               "machine": machine(), "code": code_version(),
               "redis": subprocess.run(["redis-server", "--version"], capture_output=True,
                                       text=True).stdout.split()[2],
               "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **load.measure()}
    results["met"] = results["ratio"] >= 0.9
    photobench.store(args.out, "cluster", results)
    rows = [("photos/s, coordinator + 1 worker", cluster, alone, results["ratio"], ">= 0.9",
             results["met"]),
            *[(f"queue: ms CPU per job of {q['photos_per_job']} (all parts)",
               q["cpu_ms_per_job"]["total"], "", "", "", "") for q in queue],
            *[(f"queue: jobs/s one Redis core takes ({q['photos_per_job']} a job)",
               q["redis_jobs_per_core_s"], "", "", "", "") for q in queue],
            ("other load on the machine, cores", results["other_load_cores"], "", "", "", "")]
    print(f"\n{args.photos} 12-MP photos waiting at start\n" + photobench.table(rows) +
          f"\n\nresults in {args.out}", flush=True)


if __name__ == "__main__":
    main()
