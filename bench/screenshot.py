"""The review page's screenshot for the docs (run by hand; no test runs it): a real daemon
trained on a few photos a class of ../shared/data/photos-sample, 24 others in its inbox,
web.listen on a free loopback port; once every photo is labelled and training is complete,
one photo is corrected (the first the model got wrong, else its least confident one, to its
true class) by a click and a digit key in headless Chromium, and the page is shot at
1280x900, newest first so that the correction is in view.

    PYTHONPATH=. .venv/bin/python bench/screenshot.py [--out docs/review-page.png] [--keep]

Needs Debian's chromium and chromium-driver; nothing is downloaded (SE_OFFLINE, both paths
given to Selenium). The backbone comes from photobench's cache (converted once).
"""

import argparse
import json
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
from daemonproc import REPO, environment

OUT = REPO / "docs" / "review-page.png"
CLASSES = ("ants", "bees")
TRAIN_PHOTOS, INBOX_PHOTOS = 16, 12  # a class
SIZE = (1280, 900)
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def wait_until(predicate, timeout, what, daemon=None, every=0.2):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if daemon is not None and daemon.poll() is not None:
            raise RuntimeError(f"the daemon exited {daemon.returncode} waiting for {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} after {timeout} s")
        time.sleep(every)
    return value


def sidecar(image):
    try:
        return json.loads(Path(f"{image}.json").read_text())
    except (OSError, ValueError):
        return None


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def setup(folder):
    """data/<class>/ with TRAIN_PHOTOS photos a class, inbox/ with the next INBOX_PHOTOS a
    class (alternating, as they might arrive); {inbox photo: its true class}, config path."""
    truth = {}
    inbox = folder / "inbox"
    inbox.mkdir(parents=True)
    lists = {}
    for klass in CLASSES:
        files = sorted(p for p in (photobench.SAMPLE / klass).glob("*.jpg") if " " not in p.name)
        (folder / "data" / klass).mkdir(parents=True)
        for path in files[:TRAIN_PHOTOS]:
            shutil.copyfile(path, folder / "data" / klass / path.name)
        lists[klass] = files[TRAIN_PHOTOS:TRAIN_PHOTOS + INBOX_PHOTOS]
    for pair in zip(*(lists[k] for k in CLASSES)):
        for klass, path in zip(CLASSES, pair):
            shutil.copyfile(path, inbox / path.name)
            truth[inbox / path.name] = klass
    photobench.seed_save(folder / "save")
    port = free_port()
    config = {"inbox": str(inbox), "save": str(folder / "save"),
              "data": {"source": "folder", "path": str(folder / "data")},
              "train": {"epochs": 15, "batch_size": 8, "seed": 7},
              "classify": {"checkpoint": "newest"},
              "web": {"listen": f"127.0.0.1:{port}"}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return truth, folder / "config.yaml", f"http://127.0.0.1:{port}/"


def browser():
    os.environ["SE_OFFLINE"] = "true"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--disable-gpu", "--hide-scrollbars", f"--window-size={SIZE[0]},{SIZE[1]}"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    # the viewport, not the window, is SIZE
    inner = driver.execute_script("return [window.innerWidth, window.innerHeight]")
    driver.set_window_size(2 * SIZE[0] - inner[0], 2 * SIZE[1] - inner[1])
    return driver


LOADED = """return [...document.querySelectorAll('#grid .card img')].every(
    (img) => img.complete && img.naturalWidth > 0) && document.querySelectorAll('#grid .card').length"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="wardrobe-screenshot-"))
    truth, config, url = setup(folder)
    log = open(folder / "daemon.log", "wb")
    daemon = subprocess.Popen([sys.executable, "-m", "daemon", "run", "--config", str(config)],
                              stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=environment())
    driver = None
    try:
        started = time.monotonic()
        wait_until(lambda: "training complete" in (folder / "daemon.log").read_text(
            errors="replace"), 600, "training complete", daemon)
        wait_until(lambda: all((s := sidecar(p)) and s.get("label") for p in truth), 300,
                   "every inbox photo labelled", daemon)
        print(f"trained and labelled in {time.monotonic() - started:.0f} s", flush=True)
        records = {p: sidecar(p) for p in truth}
        wrong = [p for p in truth if records[p]["label"] != truth[p]]
        print(f"the model got {len(wrong)} of {len(truth)} wrong", flush=True)
        aim = min(wrong or truth, key=lambda p: records[p]["confidence"])

        driver = browser()
        driver.get(url)
        wait_until(lambda: driver.execute_script(LOADED) == len(truth), 60,
                   "every thumbnail loaded")
        wait_until(lambda: driver.execute_script(
            "return document.querySelector('#curve polyline') !== null"), 30, "the curve")
        buttons = {b.text.split(" ", 1)[1]: b.text.split(" ", 1)[0]
                   for b in driver.find_elements("css selector", "#classes button")}
        driver.find_element("css selector", f'#grid .card[data-path="{aim.name}"]').click()
        from selenium.webdriver.common.action_chains import ActionChains

        ActionChains(driver).send_keys(buttons[truth[aim]]).perform()
        wait_until(lambda: (s := sidecar(aim)) and s.get("source") == "person", 30,
                   "the correction on disk")
        print(f"corrected {aim.name}: {records[aim]['label']} "
              f"({100 * records[aim]['confidence']:.1f}%) -> {truth[aim]}", flush=True)
        # newest first: the correction leads; the selection stays where labelling left it
        from selenium.webdriver.support.select import Select

        Select(driver.find_element("id", "sort")).select_by_value("newest")
        wait_until(lambda: driver.execute_script(
            "const c = document.querySelector('#grid .card');"
            "return c && c.classList.contains('person')"), 30, "the correction in front")
        wait_until(lambda: driver.execute_script(LOADED) == len(truth), 60,
                   "every thumbnail loaded")
        driver.execute_script("document.getElementById('toast').hidden = true; "
                              "window.scrollTo(0, 0)")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(args.out))
        print(f"wrote {args.out}", flush=True)
    finally:
        if driver is not None:
            driver.quit()
        daemon.terminate()
        daemon.wait(60)
        log.close()
        if args.keep:
            print(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
