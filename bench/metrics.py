"""Monitoring (issue 9): does serving Prometheus metrics slow labelling or training, what
does a scrape cost, and what do the TensorBoard event files cost per epoch.

    .venv/bin/python bench/metrics.py [--rounds 4] [--burst 10000] [--epochs 30]

About 14 minutes on 2 cores. Three configurations of a real `python -m daemon run` of this
tree, alternated within each round (their order rotated from round to round):
  A   no metrics key;
  A2  the same again: the A-vs-A difference within a round is the noise floor;
  B   metrics.listen on 127.0.0.1:<a free port>, scraped every 0.5 s by a thread of this
      process (Prometheus's default is every 15 s) for as long as it is measured.
Then training against the scrape interval (no metrics; served, never scraped; scraped every
15 s; every 0.5 s), 6 rounds: a real cost would grow with the scrapes. Then the scrape
itself on an idle daemon (latency, size, daemon CPU per 1,000 scrapes
against equal windows without scrapes), Curves.draw timed in this process, and what the
parts pay to feed the metrics per image and per batch. Results:
docs/bench-metrics.json (replaced).
"""

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np

from daemonproc import REPO, Daemon, wait_for_sidecars
from report import OtherLoad, code_version, machine

sys.path.insert(0, str(REPO))
from daemon.data import dataset  # noqa: E402

OUT = REPO / "docs" / "bench-metrics.json"
SAMPLE_BATCHES = 232  # an epoch of the sample: 7,413 training images, 32 a batch
CONFIGS = ("A", "B", "A2")
LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) \S+ \S+: epoch (\d+)/\d+: ")


def median(values, digits=4):
    return round(statistics.median(values), digits) if values else None


def percentile(values, q, digits=2):
    return round(float(np.percentile(values, q)), digits) if values else None


def free_port():
    """A port nobody listens on now (the daemon binds it a moment later)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def order(number):
    """Round `number`'s order of the configurations: each goes first, second and last."""
    shift = number % len(CONFIGS)
    return CONFIGS[shift:] + CONFIGS[:shift]


# ---- the scraper -------------------------------------------------------------------------------

def scrape(url):
    """(seconds, bytes) of one GET, a new connection each time as Prometheus's may be."""
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=10) as response:
        size = len(response.read())
    return time.perf_counter() - started, size


class Scraper:
    """GET `url` every `every` s on a thread, from start() to stop(); refused connections
    (the daemon not serving yet) are counted, not timed."""

    def __init__(self, url, every=0.5):
        self.url, self.every = url, every
        self.times, self.sizes, self.refused = [], [], 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self._thread.start()
        return self

    def _run(self):
        tick = time.monotonic()
        while not self._stop.is_set():
            try:
                seconds, size = scrape(self.url)
                self.times.append(seconds)
                self.sizes.append(size)
            except OSError:
                self.refused += 1
            tick += self.every
            self._stop.wait(max(0.0, tick - time.monotonic()))

    def stop(self):
        self._stop.set()
        self._thread.join()
        return self

    def summary(self):
        ms = [t * 1000 for t in self.times]
        return {"scrapes": len(ms), "refused": self.refused, "p50_ms": percentile(ms, 50),
                "p99_ms": percentile(ms, 99), "max_ms": percentile(ms, 100),
                "bytes": int(statistics.median(self.sizes)) if self.sizes else None}


def metrics_config(config):
    if config != "B":
        return None, None
    port = free_port()
    return {"listen": f"127.0.0.1:{port}"}, f"http://127.0.0.1:{port}/metrics"


# ---- 1. labelling ------------------------------------------------------------------------------

def stage_pngs(folder, count, crops, prefix):
    folder.mkdir(parents=True)
    encoded = [cv2.imencode(".png", crop)[1].tobytes() for crop in crops]
    paths = [folder / f"{prefix}-{i:06d}.png" for i in range(count)]
    for i, path in enumerate(paths):
        path.write_bytes(encoded[i % len(encoded)])
    return paths


def trained_daemon(folder, metrics=None):
    """A daemon that has trained its one epoch and only labels (trained by itself, not
    started on a copied save/: at 52aa763 any restart from a checkpoint crashed)."""
    daemon = Daemon(folder, epochs=1, metrics=metrics)
    daemon.wait_for(r"training complete", timeout=300)
    return daemon


def labelling(ctx, rounds, count):
    """A burst of `count` PNGs renamed into the inbox of each of three daemons that only
    label, in turn, each round; images/s from the moment of the first rename to the last
    sidecar's mtime."""
    work = ctx.folder("labelling")
    daemons, urls = {}, {}
    for config in CONFIGS:
        listen, urls[config] = metrics_config(config)
        daemons[config] = trained_daemon(work / config, listen)
    rows = []
    try:
        for config, daemon in daemons.items():
            warm = stage_pngs(work / f"warm-{config}", 1, ctx.crops, "warm")[0]
            os.rename(warm, daemon.inbox / warm.name)  # the labeller warm, as in the rounds
            wait_for_sidecars(daemon, [daemon.inbox], 1, timeout=120, every=0.01)
        for daemon in daemons.values():
            daemon.wait_quiet()
        for number in range(rounds):
            staged = {config: stage_pngs(work / f"staging-{number}-{config}", count,
                                         ctx.crops, f"r{number}") for config in CONFIGS}
            os.sync()  # the staging's writeback is not part of what is measured
            row = {"round": number + 1, "order": "".join(order(number))}
            for config in order(number):
                daemon = daemons[config]
                scraper = Scraper(urls[config]).start() if urls[config] else None
                started = time.time()
                for path in staged[config]:
                    os.rename(path, daemon.inbox / path.name)
                wait_for_sidecars(daemon, [daemon.inbox], 1 + count * (number + 1),
                                  timeout=600, every=0.1)
                if scraper:
                    row["B_scrapes"] = scraper.stop().summary()
                last = max(os.stat(f"{daemon.inbox / p.name}.json").st_mtime_ns
                           for p in staged[config]) / 1e9
                row[config] = round(count / (last - started), 1)
                time.sleep(1)  # the last writeback of this burst off the next one's clock
            row["B_over_A"] = round(row["B"] / row["A"], 4)
            row["A2_over_A"] = round(row["A2"] / row["A"], 4)
            rows.append(row)
            print(f"  labelling round {number + 1}: {row}", flush=True)
    finally:
        for daemon in daemons.values():
            daemon.stop()
    result = {"images_per_burst": count, "rounds": rows}
    result.update(verdict(rows, higher_is_better=True))
    return result


def verdict(rows, higher_is_better):
    """Medians, B/A next to the A2/A noise floor, and whether B is worse beyond it."""
    result = {config: median([r[config] for r in rows], 3) for config in CONFIGS}
    b_over_a = median([r["B_over_A"] for r in rows])
    noise = max(abs(r["A2_over_A"] - 1) for r in rows)
    spread_a = max(r["A"] for r in rows) / min(r["A"] for r in rows) - 1
    cost = (1 - b_over_a) if higher_is_better else (b_over_a - 1)  # > 0: B is worse
    result.update(B_over_A_median=b_over_a,
                  A2_over_A_median=median([r["A2_over_A"] for r in rows]),
                  noise_max_abs_A2_over_A_minus_1=round(noise, 4),
                  A_spread_between_rounds=round(spread_a, 4),
                  B_cost=round(cost, 4), B_worse_beyond_noise=cost > noise)
    return result


# ---- 2. training -------------------------------------------------------------------------------

def epoch_times(daemon):
    """(seconds of each epoch from the newest checkpoint's history -- the figure of the
    "epoch E/T: ... (S s)" line, to the millisecond --, seconds between consecutive epoch
    lines, which add the checkpoint write and the TensorBoard files)."""
    newest = max((daemon.folder / "save").glob("ckpt-*.json"))
    history = json.loads(newest.read_text())["history"]
    stamps = []
    for line in daemon.log.read_text(errors="replace").splitlines():
        if match := LINE.match(line):
            stamp = time.mktime(time.strptime(match[1], "%Y-%m-%d %H:%M:%S"))
            stamps.append(stamp + int(match[2]) / 1000)
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return [entry["seconds"] for entry in history], gaps, history


def training(ctx, rounds, epochs):
    """`epochs` epochs on the bundled sample from a fresh save/ per run; per run the median
    epoch (epochs 2+: epoch 1 traces the model) and the median gap between epoch lines."""
    rows = []
    for number in range(rounds):
        row = {"round": number + 1, "order": "".join(order(number))}
        for config in order(number):
            listen, url = metrics_config(config)
            run = ctx.folder(f"training-{number}-{config}")
            load = OtherLoad()  # right: the daemon is waited for before it measures
            daemon = Daemon(run, epochs=epochs, metrics=listen)
            scraper = Scraper(url).start() if url else None
            try:
                daemon.wait_for(r"training complete", timeout=600)
            finally:
                if scraper:
                    row["B_scrapes"] = scraper.stop().summary()
                daemon.stop()
            row[f"{config}_other_load"] = load.measure()["other_load_cores"]
            seconds, gaps, history = epoch_times(daemon)
            assert len(seconds) == epochs, (len(seconds), daemon.tail())
            row[config] = median(seconds[1:])
            row[f"{config}_gap"] = median(gaps[1:])
            row[f"{config}_first"] = seconds[0]
            if config == "A" and number == 0:
                ctx.history = history
                newest = max((run / "save").glob("ckpt-*.json"))
                ctx.confusion = json.loads(newest.read_text())["confusion"]
                ctx.event_bytes = event_bytes(run / "save" / "tensorboard", epochs)
        row["B_over_A"] = round(row["B"] / row["A"], 4)
        row["A2_over_A"] = round(row["A2"] / row["A"], 4)
        row["B_gap_over_A_gap"] = round(row["B_gap"] / row["A_gap"], 4)
        row["A2_gap_over_A_gap"] = round(row["A2_gap"] / row["A_gap"], 4)
        rows.append(row)
        print(f"  training round {number + 1}: {row}", flush=True)
    result = {"epochs": epochs, "rounds": rows, "epoch_s": "median over epochs 2+ per run, "
              "from the checkpoint history (the log line's figure, to the ms)"}
    result.update(verdict(rows, higher_is_better=False))
    gap_rows = [{c: r[f"{c}_gap"] for c in CONFIGS} | {"B_over_A": r["B_gap_over_A_gap"],
                "A2_over_A": r["A2_gap_over_A_gap"]} for r in rows]
    result["between_epoch_lines"] = verdict(gap_rows, higher_is_better=False)
    return result


def training_by_interval(ctx, rounds, epochs):
    """Training again, against how often /metrics is scraped: A no metrics key, S served but
    never scraped, P scraped every 15 s (Prometheus's default), F every 0.5 s. A cost of
    scraping would grow from S to P to F; noise does not."""
    configs, rows = ("A", "S", "P", "F"), []
    for number in range(rounds):
        row = {"round": number + 1}
        shift = number % len(configs)
        for config in configs[shift:] + configs[:shift]:
            listen, url = metrics_config("A" if config == "A" else "B")
            run = ctx.folder(f"interval-{number}-{config}")
            daemon = Daemon(run, epochs=epochs, metrics=listen)
            every = {"P": 15.0, "F": 0.5}.get(config)
            scraper = Scraper(url, every).start() if every else None
            try:
                daemon.wait_for(r"training complete", timeout=600)
            finally:
                if scraper:
                    row[f"{config}_scrapes"] = scraper.stop().summary()["scrapes"]
                daemon.stop()
            seconds, _, _ = epoch_times(daemon)
            row[config] = median(seconds[1:])
        for config in configs[1:]:
            row[f"{config}_over_A"] = round(row[config] / row["A"], 4)
        rows.append(row)
        print(f"  training by scrape interval, round {number + 1}: {row}", flush=True)
    return {"epochs": epochs, "rounds": rows,
            **{f"{c}_over_A_median": median([r[f"{c}_over_A"] for r in rows])
               for c in configs[1:]},
            "spread_of_ratios": round(max(abs(r[f"{c}_over_A"] - 1) for r in rows
                                          for c in configs[1:]), 4)}


def event_bytes(folder, epochs):
    sizes = {run: sorted(p.stat().st_size for p in (folder / run).iterdir())
             for run in ("train", "validation")}
    assert all(len(s) == epochs for s in sizes.values()), sizes
    return {run: median(s, 0) for run, s in sizes.items()} | {
        "per_epoch": median(sizes["train"], 0) + median(sizes["validation"], 0),
        "total_for_run": sum(map(sum, sizes.values())), "epochs": epochs}


# ---- 3. the scrape -----------------------------------------------------------------------------

def scrape_cost(ctx, rounds, count, paced_seconds):
    """An idle daemon (trained save/, a burst labelled so the histograms have counts):
    `paced_seconds` of scrapes every 0.5 s (latency as Prometheus would see it); then, in
    `rounds` pairs, `count` scrapes back to back and an idle window as long, the daemon's
    CPU (utime + stime) measured over each."""
    work = ctx.folder("scrape")
    listen, url = metrics_config("B")
    daemon = trained_daemon(work / "B", listen)
    pairs = []
    try:
        paths = stage_pngs(work / "staging", 1000, ctx.crops, "s")
        for path in paths:
            os.rename(path, daemon.inbox / path.name)
        wait_for_sidecars(daemon, [daemon.inbox], len(paths), timeout=120)
        daemon.wait_quiet()
        paced = Scraper(url).start()
        time.sleep(paced_seconds)
        paced = paced.stop().summary()
        back_to_back = []
        for number in range(rounds):
            before, started = daemon.cpu_seconds(), time.monotonic()
            for _ in range(count):
                back_to_back.append(scrape(url)[0] * 1000)
            window = time.monotonic() - started
            busy = daemon.cpu_seconds() - before
            before = daemon.cpu_seconds()
            time.sleep(window)
            idle = daemon.cpu_seconds() - before
            pairs.append({"scrapes": count, "window_s": round(window, 2),
                          "cpu_s_scraping": round(busy, 2), "cpu_s_idle": round(idle, 2),
                          "cpu_s_per_1000": round((busy - idle) * 1000 / count, 3)})
            print(f"  scrape round {number + 1}: {pairs[-1]}", flush=True)
        body = urllib.request.urlopen(url, timeout=10).read().decode()
    finally:
        daemon.stop()
    per_1000 = median([p["cpu_s_per_1000"] for p in pairs], 3)
    return {"paced_every_0_5_s": paced,
            "back_to_back": {"p50_ms": percentile(back_to_back, 50),
                             "p99_ms": percentile(back_to_back, 99),
                             "scrapes": len(back_to_back)},
            "bytes": len(body.encode()), "series": sum(1 for line in body.splitlines()
                                                       if line and not line.startswith("#")),
            "wardrobe_series": sum(1 for line in body.splitlines()
                                   if line.startswith("wardrobe_")),
            "cpu_rounds": pairs, "daemon_cpu_s_per_1000_scrapes": per_1000,
            "cpu_share_of_a_core_every_15_s": round(per_1000 / 1000 / 15, 6),
            "cpu_share_of_a_core_every_0_5_s": round(per_1000 / 1000 / 0.5, 5)}


# ---- 4. TensorBoard ----------------------------------------------------------------------------

def tensorboard(ctx, epochs, epoch_s):
    """Curves.draw for one new epoch at a time (train + validation files, the validation
    one with the 10-class confusion image), timed here in one process with TensorFlow
    loaded, on epochs shaped like the sample run's; epoch 1 (first use of tf.summary) apart."""
    from unittest import mock

    from daemon.training.curves import Curves, confusion_image

    save, unsynced = ctx.folder("tensorboard") / "save", ctx.folder("unsynced") / "save"
    curves, without_fsync = Curves(save), Curves(unsynced)
    curves.draw([])
    without_fsync.draw([])
    template = ctx.history[-2]  # the last entry has no checkpoint_seconds yet
    history, draws, unsynced_draws = [], [], []
    for epoch in range(1, epochs + 2):
        history.append(dict(template, epoch=epoch))
        picture = dict(ctx.confusion, epoch=epoch)
        started = time.perf_counter()
        curves.draw(history, picture)
        draws.append(time.perf_counter() - started)
        # The same with every os.fsync a no-op (files and folders): what durability costs.
        with mock.patch("os.fsync"):
            started = time.perf_counter()
            without_fsync.draw(history, picture)
            unsynced_draws.append(time.perf_counter() - started)
    images = []
    for _ in range(epochs):
        started = time.perf_counter()
        confusion_image(ctx.confusion["matrix"], ctx.confusion["classes"])
        images.append(time.perf_counter() - started)
    draw_ms = median(draws[1:], 6) * 1000
    image, description = confusion_image(ctx.confusion["matrix"], ctx.confusion["classes"])
    parts = summary_parts(ctx.folder("parts"), image, description, epochs)
    return {"epochs_timed": epochs, "draw_ms": round(draw_ms, 2),
            "draw_ms_p90": percentile([d * 1000 for d in draws[1:]], 90),
            "first_draw_ms": round(draws[0] * 1000, 1),
            "draw_ms_without_fsync": round(median(unsynced_draws[1:], 6) * 1000, 2),
            "confusion_image_ms": round(median(images, 6) * 1000, 2),
            "tf_summary_ms_no_fsync": parts,
            "sample_epoch_s": epoch_s, "share_of_sample_epoch": round(draw_ms / 1000 / epoch_s, 4),
            "bytes_here": event_bytes(save / "tensorboard", epochs + 1),
            "bytes_in_daemon_run": ctx.event_bytes,
            "classes": len(ctx.confusion["classes"])}


def summary_parts(folder, image, description, count):
    """Median ms of a tf.summary file writer opened and closed with nothing, with the four
    train scalars, and with two scalars and the confusion image (no fsync, no rename)."""
    import tensorflow as tf

    def empty(writer):
        pass

    def scalars(writer):
        for tag in ("a", "b", "c", "d"):
            tf.summary.scalar(tag, 0.5)

    def picture(writer):
        for tag in ("a", "b"):
            tf.summary.scalar(tag, 0.5)
        tf.summary.image("confusion_matrix/10 classes", image[np.newaxis], description=description)

    result = {}
    for name, write in (("empty_writer", empty), ("four_scalars", scalars),
                        ("two_scalars_and_image", picture)):
        times = []
        for number in range(count + 1):
            started = time.perf_counter()
            writer = tf.summary.create_file_writer(str(folder / f"{name}-{number}"))
            with writer.as_default(step=number + 1):
                write(writer)
            writer.close()
            times.append(time.perf_counter() - started)
        result[name] = round(median(times[1:], 6) * 1000, 2)
    return result


# ---- the run -----------------------------------------------------------------------------------

class Context:
    def __init__(self, root):
        self.root = root
        sample = dataset.load("sample")
        self.crops = sample.x_test[:500]
        self.history = self.confusion = self.event_bytes = None

    def folder(self, name):
        path = self.root / name
        path.mkdir()
        return path


def feeding(calls, labelling_rate, epoch_s, batches):
    """What the parts pay to feed the metrics, whether or not anyone serves them: each
    feeding function timed in this process, against the time an image or a batch takes."""
    from daemon.service import metrics

    def per_call(function):
        started = time.perf_counter()
        for _ in range(calls):
            function()
        return (time.perf_counter() - started) / calls * 1e6

    image_us = 1e6 / labelling_rate
    batch_us = epoch_s * 1e6 / batches
    labelled = per_call(lambda: metrics.labelled("label", 1.0, 2.0))
    trained = per_call(lambda: metrics.batch_trained(3, 0.5, 0.7))
    return {"labelled_us": round(labelled, 3), "batch_trained_us": round(trained, 3),
            "image_us_at_burst_rate": round(image_us, 1), "batch_us": round(batch_us, 1),
            "labelled_share_of_an_image": round(labelled / image_us, 4),
            "batch_trained_share_of_a_batch": round(trained / batch_us, 5)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4, help="rounds of each comparison")
    parser.add_argument("--burst", type=int, default=10_000, help="images per burst")
    parser.add_argument("--epochs", type=int, default=30, help="epochs per training run")
    parser.add_argument("--interval-rounds", type=int, default=6,
                        help="rounds of training against the scrape interval")
    parser.add_argument("--scrapes", type=int, default=1000, help="back-to-back scrapes")
    parser.add_argument("--paced", type=float, default=30, help="seconds of paced scrapes")
    parser.add_argument("--draws", type=int, default=20, help="epochs of TensorBoard files")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="wardrobe-bench-metrics-"))
    results = {"machine": machine(), "code": code_version(),
               "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    print(json.dumps(results), flush=True)
    began = time.monotonic()
    try:
        ctx = Context(root)
        for name, run in (("labelling", lambda: labelling(ctx, args.rounds, args.burst)),
                          ("training", lambda: training(ctx, args.rounds, args.epochs)),
                          ("training_by_interval", lambda: training_by_interval(
                              ctx, args.interval_rounds, args.epochs)),
                          ("scrape", lambda: scrape_cost(ctx, 3, args.scrapes, args.paced)),
                          ("tensorboard", lambda: tensorboard(
                              ctx, args.draws, results["training"]["A"])),
                          ("feeding", lambda: feeding(
                              200_000, results["labelling"]["A"],
                              results["training"]["A"], SAMPLE_BATCHES))):
            load = OtherLoad()
            results[name] = dict(run(), **load.measure())
            print(json.dumps({"benchmark": name, **results[name]}), flush=True)
        results["bench_s"] = round(time.monotonic() - began)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    finally:
        if args.keep:
            print(f"work folder kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    print(f"all: {results['bench_s']} s; results in {args.out}", flush=True)


if __name__ == "__main__":
    main()
