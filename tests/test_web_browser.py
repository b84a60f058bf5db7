"""The review page in a real browser: headless Chromium (Selenium) against a real daemon
with web.listen on real photos. The grid shows the sidecars' labels with thumbnails that
load; j and a digit correct a photo (a person's sidecar and a hard-linked training copy on
disk), u takes it back, a new class name labels it as that class; at a phone's width the
page does not scroll sideways and the grid has two columns.

Needs Debian's chromium and chromium-driver (.ci/run installs them); nothing is fetched:
Selenium is given both paths and SE_OFFLINE keeps Selenium Manager from looking."""

import os
import socket
from pathlib import Path

import pytest

from conftest import CLASSES, HELD_OUT, Daemon, arrive, copy_trained, photo_config, sidecar, \
    wait_until

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason=f"{CHROMIUM} or {CHROMEDRIVER} is missing (Debian's chromium and chromium-driver; "
           ".ci/run installs them)")

NEW_CLASS = "wasps"
# the page asks for /api/status every 2 s, and a correction is a few fsyncs: 30 s is ample
PAGE_SECONDS = 30


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def review(tmp_path_factory, photos, trained):
    """A daemon on a copy of the trained save/ with 6 of the held-out photos (3 ants, 3
    bees) labelled in its inbox, serving the review page; (url, inbox, data, daemon)."""
    folder = tmp_path_factory.mktemp("web")
    _, data = copy_trained(trained, folder, photos)
    port = free_port()
    config = photo_config(folder, data, web={"listen": f"127.0.0.1:{port}"})
    inbox = arrive(photos.held[:3] + photos.held[HELD_OUT:HELD_OUT + 3], folder / "inbox")
    daemon = Daemon(config)
    try:
        daemon.wait_for_log(r"serving the review page at http://127\.0\.0\.1:\d+/", 120)
        wait_until(lambda: all(sidecar(p) for p in inbox), 120, 0.1, message="sidecars")
        yield f"http://127.0.0.1:{port}/", inbox, data, daemon
        assert daemon.stop() == 0, daemon.log[-3000:]  # the page served, a clean stop
    finally:
        daemon.kill()


@pytest.fixture
def browser(monkeypatch):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager: never download anything
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--disable-gpu", "--window-size=1280,900"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)),
                              options=options)
    try:
        yield driver
    finally:
        driver.quit()


CARDS = """return [...document.querySelectorAll('#grid figure.card')].map((card) => ({
    path: card.dataset.path, classes: [...card.classList],
    label: card.querySelector('.label').textContent,
    meta: card.querySelector('.meta').textContent,
    width: card.querySelector('img').naturalWidth,
    complete: card.querySelector('img').complete}));"""


def cards(driver):
    return driver.execute_script(CARDS)


def card(driver, path):
    found = [c for c in cards(driver) if c["path"] == path]
    return found[0] if found else None


def class_buttons(driver):
    """The class buttons' texts ("DIGIT NAME"), read at one moment (the page redraws the
    buttons on its updates: an element found a moment before may be gone)."""
    return driver.execute_script(
        "return [...document.querySelectorAll('#classes button')].map((b) => b.innerText);")


def selected(driver):
    chosen = [c["path"] for c in cards(driver) if "selected" in c["classes"]]
    assert len(chosen) <= 1, chosen
    return chosen[0] if chosen else None


def press(driver, keys):
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).send_keys(keys).perform()


def test_the_grid_shows_the_sidecars_and_the_keyboard_corrects_on_disk(review, browser):
    url, inbox, data, daemon = review
    by_name = {p.name: p for p in inbox}
    browser.get(url)

    def shown():
        """The cards, once there is one for each photo, every thumbnail loaded and every
        label the one its sidecar on disk says."""
        now = cards(browser)
        if sorted(c["path"] for c in now) != sorted(by_name):
            return None
        if not all(c["complete"] and c["width"] > 0 for c in now):
            return None
        if any(c["label"] != sidecar(by_name[c["path"]])["label"] for c in now):
            return None
        return now

    grid = wait_until(shown, PAGE_SECONDS, 0.1, message="6 cards with thumbnails and the "
                      "sidecars' labels")
    assert {c["label"] for c in grid} <= set(CLASSES), grid
    assert not any("person" in c["classes"] for c in grid), grid
    for c in grid:  # "NN.N% · path": the sidecar's confidence (toFixed(1) rounds ties up)
        shown_percent, _, path = c["meta"].partition("% · ")
        confidence = sidecar(by_name[c["path"]])["confidence"]
        assert path == c["path"] and abs(float(shown_percent) - 100 * confidence) <= 0.0501, c
    state = browser.execute_script("return document.getElementById('state').innerText;")
    assert "validation accuracy" in state and "6 labelled in the inbox" in state, state
    digits = wait_until(lambda: {text.split(" ", 1)[1]: text.split(" ", 1)[0] for text in
                                 class_buttons(browser)},
                        PAGE_SECONDS, message="the class buttons")
    assert set(digits) == set(CLASSES), digits

    # j: the second card is selected; the digit of the other class labels it so
    first = selected(browser)
    assert first == grid[0]["path"], (first, grid)
    press(browser, "j")
    target = wait_until(lambda: (path := selected(browser)) != first and path, PAGE_SECONDS,
                        message="j to move the selection")
    assert target == grid[1]["path"], (target, grid)
    image, model = by_name[target], sidecar(by_name[target])
    assert model["source"] == "model", model
    other = next(name for name in CLASSES if name != model["label"])
    press(browser, digits[other])
    record = wait_until(lambda: (r := sidecar(image)) and r.get("source") == "person" and r,
                        PAGE_SECONDS, 0.05, message="the person's sidecar")
    assert record["label"] == other and record["copy"] == f"{other}/{image.name}", record
    copy = data / other / image.name
    assert copy.exists() and os.path.samestat(copy.stat(), image.stat()), copy
    wait_until(lambda: (c := card(browser, target)) and "person" in c["classes"]
               and c["label"] == other, PAGE_SECONDS, message="the card to show the person's label")

    # u, straight after: taken back, the model's sidecar again and the copy gone
    press(browser, "u")
    record = wait_until(lambda: (r := sidecar(image)) and r.get("source") == "model" and r,
                        PAGE_SECONDS, 0.05, message="the model's sidecar back")
    assert record["label"] == model["label"], (record, model)
    assert record["confidence"] == model["confidence"], (record, model)
    assert not copy.exists(), copy
    wait_until(lambda: (c := card(browser, target)) and "person" not in c["classes"]
               and c["label"] == model["label"], PAGE_SECONDS, message="the card to show the "
               "model's label again")

    # a new class name: the selected photo is labelled with it and copied to data/<new>/
    aimed = selected(browser)
    assert aimed is not None
    name_box = browser.find_element("id", "new-name")
    name_box.send_keys(NEW_CLASS)
    browser.find_element("css selector", "#new-class button").click()
    image = by_name[aimed]
    record = wait_until(lambda: (r := sidecar(image)) and r.get("label") == NEW_CLASS and r,
                        PAGE_SECONDS, 0.05, message="the new class's sidecar")
    assert record["source"] == "person" and record["copy"] == f"{NEW_CLASS}/{image.name}", record
    copy = data / NEW_CLASS / image.name
    assert copy.exists() and os.path.samestat(copy.stat(), image.stat()), copy
    assert os.listdir(data / NEW_CLASS) == [image.name]
    wait_until(lambda: f"3 {NEW_CLASS}" in class_buttons(browser), PAGE_SECONDS,
               message="a button for the new class")
    assert daemon.process.poll() is None, daemon.log


PHONE = """const root = document.documentElement, grid = document.getElementById('grid');
return {scroll: root.scrollWidth, client: root.clientWidth, inner: window.innerWidth,
        columns: getComputedStyle(grid).gridTemplateColumns.split(' ').length,
        cards: grid.children.length,
        widest: Math.max(...[...document.body.querySelectorAll('*')].map(
            (e) => e.getBoundingClientRect().right))};"""


def test_at_a_phones_size_two_columns_and_no_sideways_scroll(review, browser):
    url, inbox, _, _ = review
    browser.set_window_size(390, 844)
    browser.get(url)
    layout = wait_until(lambda: (m := browser.execute_script(PHONE))["cards"] == len(inbox) and m,
                        PAGE_SECONDS, 0.1, message="the cards at a phone's size")
    assert layout["inner"] <= 400, layout  # the window did become phone-sized
    assert layout["scroll"] <= layout["client"], layout
    assert layout["widest"] <= layout["client"] + 0.5, layout
    assert layout["columns"] == 2, layout
