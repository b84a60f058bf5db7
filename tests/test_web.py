"""The review page (web.listen) from outside: a real daemon serving it on a free loopback
port, its JSON API, corrections that become training data and come back out with undo,
and everything a request may try that it should not."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import types
import urllib.error
import urllib.parse
import urllib.request

import cv2
import numpy as np
import pytest

from conftest import REPO, Daemon, photo_config, sidecar, status, wait_until


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Client:
    """HTTP as a browser on this machine would speak it (urllib: no redirects followed)."""

    def __init__(self, port):
        self.base = f"http://127.0.0.1:{port}"

    def request(self, path, body=None, headers=None, method=None):
        """(status, headers, bytes)."""
        headers = dict(headers or {})
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        if data is not None:
            headers.setdefault("Content-Type", "application/json")
            headers.setdefault("Origin", self.base)
        opener = urllib.request.build_opener(NoRedirect)
        request = urllib.request.Request(self.base + path, data=data, headers=headers,
                                         method=method)
        try:
            with opener.open(request, timeout=30) as response:
                return response.status, response.headers, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.headers, error.read()

    def json(self, path, body=None, **kwargs):
        code, _, data = self.request(path, body, **kwargs)
        assert code == 200, (path, code, data[:500])
        return json.loads(data)


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args):
        return None


@pytest.fixture(scope="module")
def review(tmp_path_factory, trained, photos):
    """A daemon on a copy of the trained save/ and its labelled inbox, with the page on,
    and beside the inbox what a request must never reach: a photo outside, a symlink to it,
    a symlinked folder."""
    folder = tmp_path_factory.mktemp("review")
    shutil.copytree(trained.save, folder / "save")
    data = shutil.copytree(photos.data, folder / "data")
    inbox = shutil.copytree(trained.folder / "inbox", folder / "inbox")
    outside = folder / "outside"
    outside.mkdir()
    secret = shutil.copyfile(photos.held[0], outside / "secret.jpg")
    (inbox / "link.jpg").symlink_to(secret)
    (inbox / "linked").symlink_to(outside, target_is_directory=True)
    (inbox / "zz-broken.jpg").write_bytes(b"\xff\xd8\xff not really a JPEG")
    port = free_port()
    config = photo_config(folder, data, web={"listen": f"127.0.0.1:{port}"})
    daemon = Daemon(config)
    client = Client(port)
    images = sorted(p.name for p in inbox.glob("*.jpg") if not p.is_symlink() and
                    p.name != "zz-broken.jpg")
    try:
        daemon.wait_for_log(r"ready: model restored", 120)
        # the symlink and the broken file get error sidecars, listed too
        wait_until(lambda: client.json("/api/status")["review"]["listed"] == len(images) + 2,
                   60, message="the inbox listed")
        yield types.SimpleNamespace(folder=folder, config=config, daemon=daemon, data=data,
                                    inbox=inbox, client=client, images=images, secret=secret)
    finally:
        code = daemon.stop()
    assert code == 0, daemon.log


def test_the_listing_is_the_inbox_sidecars_least_confident_first(review):
    answer = review.client.json("/api/images?limit=100")
    assert answer["total"] == len(review.images) + 2
    errors = answer["images"][-2:]  # errors last
    assert [(row["path"], row["label"]) for row in errors] == [("link.jpg", None),
                                                               ("zz-broken.jpg", None)]
    assert "symbolic link" in errors[0]["error"] and errors[1]["error"]
    del answer["images"][-2:]
    listed = {row["path"]: row for row in answer["images"]}
    assert sorted(listed) == review.images
    for name, row in listed.items():
        record = sidecar(review.inbox / name)
        assert (row["label"], row["confidence"], row["source"]) == (
            record["label"], record["confidence"], "model")
    confidences = [row["confidence"] for row in answer["images"]]
    assert confidences == sorted(confidences)
    one = answer["images"][0]["label"]
    only = review.client.json(f"/api/images?class={one}&limit=100")["images"]
    assert only and {row["label"] for row in only} == {one}
    assert len(only) == sum(row["label"] == one for row in answer["images"])
    assert review.client.json("/api/images?class=nothing")["images"] == []
    page = review.client.json("/api/images?offset=2&limit=3")
    assert [row["path"] for row in page["images"]] == [r["path"] for r in answer["images"][2:5]]
    newest = review.client.json("/api/images?sort=newest&limit=100")["images"]
    assert [r["time"] for r in newest] == sorted((r["time"] for r in newest), reverse=True)
    for bad in ("sort=random", "limit=501", "offset=-1", "limit=ten"):
        code, _, body = review.client.request(f"/api/images?{bad}")
        assert code == 400, (bad, body)


def test_status_is_status_json_with_the_curve(review):
    answer = review.client.json("/api/status")
    report = status(review.config)
    for key in ("epoch", "epochs", "classes", "data_version", "validation_accuracy", "images"):
        assert answer[key] == report[key], key
    assert [point["epoch"] for point in answer["curve"]] == list(range(1, report["epoch"] + 1))
    assert answer["review"]["trains"] is True


def test_a_thumbnail_is_a_small_jpeg_made_once(review):
    name = review.images[0]
    code, headers, data = review.client.request(f"/api/thumb?path={name}")
    assert code == 200 and headers["Content-Type"] == "image/jpeg"
    picture = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    original = cv2.imread(str(review.inbox / name))
    assert max(picture.shape[:2]) == min(256, max(original.shape[:2]))
    made = list((review.folder / "save" / "thumbs").rglob("*.jpg"))
    assert len(made) >= 1
    again = review.client.request(f"/api/thumb?path={name}")[2]
    assert again == data and len(list((review.folder / "save" / "thumbs").rglob("*.jpg"))) \
        == len(made)


def corrected(review, name, label):
    answer = review.client.json("/api/label", {"path": name, "label": label})
    assert answer["label"] == label and answer["source"] == "person"
    return answer


def test_a_correction_is_training_data_the_model_never_overwrites_and_undo_takes_back(
        review):
    name = review.images[1]
    image = review.inbox / name
    before = sidecar(image)
    other = next(c for c in status(review.config)["classes"] if c != before["label"])
    version = status(review.config)["data_version"]
    corrected(review, name, other)
    record = sidecar(image)
    assert (record["source"], record["label"], record["previous"]) == ("person", other, before)
    copy = review.data / other / name
    assert copy.stat().st_ino == image.stat().st_ino  # a hard link: same file system
    report = wait_until(lambda: (r := status(review.config))["data_version"] > version and r,
                        120, 0.2, message="a data version with the correction")
    listed = {row["path"]: row for row in review.client.json("/api/images?limit=100")["images"]}
    assert (listed[name]["label"], listed[name]["source"]) == (other, "person")
    # the model's labels never replace it: not a relabel of everything, nor a rewrite
    relabel = subprocess.run([sys.executable, "-m", "daemon", "relabel", "--all", "--config",
                              str(review.config)], cwd=REPO, capture_output=True, text=True,
                             timeout=300)
    assert relabel.returncode == 0, relabel.stderr
    image.write_bytes(image.read_bytes())  # closed after writing: labelled again, normally
    later = shutil.copyfile(review.inbox / review.images[0], review.inbox / "later.jpg")
    wait_until(lambda: sidecar(later), 60, message="an image dropped after the rewrite")
    assert sidecar(image) == record
    answer = review.client.json("/api/undo", {"path": name})
    assert answer["source"] == "model" and sidecar(image)["label"] == before["label"]
    assert not copy.exists()
    wait_until(lambda: status(review.config)["images"] == report["images"] - 1, 120, 0.2,
               message="a data version without it")
    code, _, body = review.client.request("/api/undo", {"path": name})
    assert code == 409, body  # nothing of a person's left to undo


def test_a_new_class_typed_in_grows_the_model(review):
    name = review.images[2]
    corrected(review, name, "wasps")
    assert (review.data / "wasps" / name).stat().st_ino == (review.inbox / name).stat().st_ino
    wait_until(lambda: "wasps" in (status(review.config)["classes"] or ()), 120, 0.2,
               message="the class in the model")
    review.client.json("/api/undo", {"path": name})
    assert not (review.data / "wasps" / name).exists()


def test_nothing_outside_the_inbox_is_read_or_written(review):
    look = lambda: {p: (s.st_ino, s.st_size, s.st_mtime_ns, s.st_nlink)  # noqa: E731
                    for p in [*review.data.rglob("*"), review.secret] if (s := p.stat())}
    before = look()
    bad = ["../outside/secret.jpg", str(review.secret), "link.jpg", "linked/secret.jpg",
           f"{review.images[0]}/../../outside/secret.jpg", "./" + review.images[0], "",
           "%2e%2e/outside/secret.jpg", "..%2foutside%2fsecret.jpg", review.images[0] + "%00",
           "a\\..\\..\\outside\\secret.jpg", ".wardrobe.lock", review.images[0] + ".json",
           "linked", "%ED%A0%80"]
    for path in bad:
        code, _, body = review.client.request(f"/api/thumb?path={path}")
        assert code in (400, 404), (path, code, body[:200])
        raw = urllib.parse.unquote(path)
        for route, payload in (("/api/label", {"path": raw, "label": "ants"}),
                               ("/api/undo", {"path": raw})):
            code, _, body = review.client.request(route, payload)
            assert code in (400, 404), (route, path, code, body)
    assert look() == before and before[review.secret][3] == 1


def test_class_names_are_folder_names(review):
    before = sorted(p.name for p in review.data.iterdir())
    for label in ["", " ", "a/b", "..", ".hidden", "x" * 101, "a\x01b", "\\evil", "a\nb", 3,
                  None, ["ants"], "\ud800"]:
        code, _, body = review.client.request(
            "/api/label", {"path": review.images[3], "label": label})
        assert code == 400 and b"label" in body, (label, code, body)
    assert sorted(p.name for p in review.data.iterdir()) == before
    assert sidecar(review.inbox / review.images[3])["source"] == "model"
    code, _, body = review.client.request("/api/label", {"path": review.images[3],
                                                         "label": "ANTS"})
    assert code == 409 and b"in case only" in body, body
    code, _, body = review.client.request("/api/label", {"path": "zz-broken.jpg",
                                                         "label": "ants"})
    assert code == 409 and b"not an image the daemon can read" in body, body
    code, _, _ = review.client.request("/api/thumb?path=zz-broken.jpg")
    assert code == 422


def test_requests_are_bounded_and_posts_come_from_the_page_only(review):
    client, name = review.client, review.images[3]
    big = json.dumps({"path": name, "label": "ants", "pad": "x" * 5000}).encode()
    assert client.request("/api/label", big)[0] == 413
    chunked = client.request("/api/label", b"{" * 10, headers={"Transfer-Encoding": "chunked"})
    assert chunked[0] == 400
    assert client.request("/api/label", b"[1, 2]")[0] == 400
    assert client.request("/api/label", b"not json")[0] == 400
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    assert client.request("/api/label", f"path={name}&label=ants".encode(), form)[0] == 415
    assert client.request("/api/label", {"path": name, "label": "ants"},
                          {"Origin": "http://evil.example"})[0] == 403
    assert client.request("/api/label", {"path": name, "label": "ants"},
                          {"Sec-Fetch-Site": "cross-site"})[0] == 403
    # DNS rebinding: a site whose name resolves to 127.0.0.1 reads nothing
    assert client.request("/api/status", headers={"Host": "evil.example:80"})[0] == 403
    assert client.request("/api/images", headers={"Host": f"localhost:{client.base[-5:]}"})[0] \
        == 200
    assert sidecar(review.inbox / name)["source"] == "model"
    code, headers, _ = client.request("/")
    assert code == 200 and "frame-ancestors 'none'" in headers["Content-Security-Policy"]


def test_a_token_guards_everything_and_is_never_logged(tmp_path, trained, photos):
    token = "Tok3n-" + os.urandom(12).hex()
    shutil.copytree(trained.save, tmp_path / "save")
    data = shutil.copytree(photos.data, tmp_path / "data")
    shutil.copytree(trained.folder / "inbox", tmp_path / "inbox")
    port = free_port()
    config = photo_config(tmp_path, data, web={"listen": f"127.0.0.1:{port}", "token": token})
    daemon = Daemon(config)
    try:
        daemon.wait_for_log(r"serving the review page", 120)
        client = Client(port)
        name = sorted(p.name for p in (tmp_path / "inbox").glob("*.jpg"))[0]
        for path in ("/", "/api/status", "/api/images", f"/api/thumb?path={name}"):
            assert client.request(path)[0] == 401, path
            assert client.request(path, headers={"Authorization": "Bearer wrong-token-0000"})[0] \
                == 401
        assert client.request("/api/label", {"path": name, "label": "ants"})[0] == 401
        assert client.request("/?token=wrong")[0] == 401
        code, headers, _ = client.request(f"/?token={token}")
        assert code == 303 and headers["Location"] == "/"
        cookie = headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie, cookie
        with_cookie = {"Cookie": cookie.split(";")[0]}
        assert client.request("/api/status", headers=with_cookie)[0] == 200
        bearer = {"Authorization": f"Bearer {token}"}
        wait_until(lambda: name in client.request("/api/images", headers=bearer)[2].decode(),
                   60, message="the inbox listed")
        assert client.request("/api/label", {"path": name, "label": "ants"}, bearer)[0] == 200
        # a token from a cookie: the page's own origin only
        assert client.request("/api/undo", {"path": name},
                              dict(with_cookie, Origin="http://evil.example"))[0] == 403
    finally:
        assert daemon.stop() == 0, daemon.log
    assert token not in daemon.log and "web.token=set" in daemon.log


def test_with_a_fashion_mnist_source_the_label_is_kept_and_training_needs_folders(
        tmp_path, small_data, one_epoch_save):
    from conftest import write_config

    shutil.copytree(one_epoch_save, tmp_path / "save")
    config = write_config(tmp_path, small_data, epochs=1)
    port = free_port()
    config.write_text(config.read_text() + f"web: {{listen: '127.0.0.1:{port}'}}\n")
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    crop = np.zeros((28, 28), np.uint8)
    crop[6:22, 8:20] = 200
    cv2.imwrite(str(inbox / "crop.png"), crop)
    daemon = Daemon(config)
    try:
        client = Client(port)
        wait_until(lambda: sidecar(inbox / "crop.png"), 120, message="a label")
        wait_until(lambda: client.json("/api/status")["review"]["listed"] == 1, 30)
        assert client.json("/api/status")["review"]["trains"] is False
        code, _, body = client.request("/api/label", {"path": "crop.png", "label": "wasps"})
        assert code == 400 and b"needs data.source folder" in body
        answer = client.json("/api/label", {"path": "crop.png", "label": "Bag"})
        assert (answer["label"], answer["copy"]) == ("Bag", None)
        assert sidecar(inbox / "crop.png")["source"] == "person"
    finally:
        assert daemon.stop() == 0, daemon.log
    assert not [p for p in tmp_path.rglob("Bag")]  # no training copy made anywhere


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_correction_on_a_full_disk_is_finished_once_there_is_room(tmp_path, trained, photos,
                                                                    daemons):
    """data.path on another file system (a byte copy, not a link), full: the correction is
    written down, answered 202, and finished by the daemon itself once space returns."""
    shutil.copytree(trained.save, tmp_path / "save")
    inbox = shutil.copytree(trained.folder / "inbox", tmp_path / "inbox")
    data = tmp_path / "data"
    data.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(data)], check=True)
    try:
        shutil.copytree(photos.data, data, dirs_exist_ok=True)
        port = free_port()
        config = photo_config(tmp_path, data, web={"listen": f"127.0.0.1:{port}"})
        daemon = daemons(config)  # killed at the end whatever happens
        client = Client(port)
        name = sorted(p.name for p in inbox.glob("*.jpg"))[0]
        daemon.wait_for_log(r"ready: model restored", 120)
        wait_until(lambda: client.json("/api/status")["review"]["listed"] >= 1, 60)
        filler = data / ".filler"
        with pytest.raises(OSError), open(filler, "wb") as file:  # to the last block
            while True:
                file.write(b"\0" * 65536)
                file.flush()
        code, _, body = client.request("/api/label", {"path": name, "label": "bees2"})
        assert code == 202 and json.loads(body)["pending"].startswith(
            "written down, to be finished when it can be: No space left"), body
        assert sidecar(inbox / name)["source"] == "model"
        # the next one waits for it
        code, _, body = client.request("/api/label", {"path": name, "label": "ants"})
        assert code == 503 and b"an earlier correction" in body, body
        filler.unlink()
        record = wait_until(lambda: (r := sidecar(inbox / name))["source"] == "person" and r,
                            60, 0.2, message="the correction finished by itself")
        copy = data / "bees2" / name
        assert record["label"] == "bees2" and record["copy_inode"] == copy.stat().st_ino
        assert copy.read_bytes() == (inbox / name).read_bytes()
        assert copy.stat().st_ino != (inbox / name).stat().st_ino  # a copy, not a link
        assert client.json("/api/undo", {"path": name})["source"] == "model"
        assert not copy.exists()
        assert daemon.stop() == 0, daemon.log
        assert "will retry" in daemon.log and "the unfinished correction is done" in daemon.log
    finally:
        subprocess.run(["umount", "-l", str(data)], check=False)


def test_thumbnails_beyond_the_limit_are_pruned_oldest_first(tmp_path, photos):
    from daemon.web.thumbs import Thumbs

    thumbs = Thumbs(tmp_path, str(photos.held[0].parent))
    for n, path in enumerate(photos.held[:4]):
        thumbs.get(str(path), path.name)
        made = list((tmp_path / "thumbs").rglob("*.jpg"))
        os.utime(made[-1] if len(made) == 1 else max(made, key=lambda p: p.stat().st_mtime_ns),
                 (1000 + n, 1000 + n))
    kept = sorted((tmp_path / "thumbs").rglob("*.jpg"), key=lambda p: p.stat().st_mtime)
    thumbs.prune(keep=2)
    assert sorted((tmp_path / "thumbs").rglob("*.jpg")) == sorted(kept[2:])


def test_a_replaced_image_is_the_models_again_and_its_training_copy_stays(review):
    name = review.images[4]
    image = review.inbox / name
    corrected(review, name, "bees" if sidecar(image)["label"] == "ants" else "ants")
    copy = review.data / sidecar(image)["copy"]
    staged = review.folder / "staged.jpg"
    shutil.copyfile(review.inbox / review.images[5], staged)
    os.rename(staged, image)  # another photo under the same name: a new inode
    record = wait_until(lambda: (r := sidecar(image))["source"] == "model" and r, 60, 0.2,
                        message="the new photo labelled by the model")
    assert record["file"]["inode"] == image.stat().st_ino
    assert copy.exists() and copy.stat().st_ino != image.stat().st_ino


def test_idle_and_half_sent_connections_are_dropped_and_never_take_the_page(review):
    """300 connections that send nothing or half a request (more than the server takes
    at once): the server closes them, and the page answers again; uvicorn's own records
    (an invalid request) are the daemon's log records."""
    host, port = "127.0.0.1", int(review.client.base.rsplit(":", 1)[1])
    idle = [socket.create_connection((host, port), timeout=60) for _ in range(300)]
    for number, connection in enumerate(idle[:50]):
        connection.sendall(b"POST /api/label HTTP/1.1\r\nHost: localhost\r\n"
                           b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
    with socket.create_connection((host, port), timeout=10) as garbage:
        garbage.sendall(b"GARBAGE\r\n\r\n")
        garbage.recv(1000)
    try:
        for connection in idle:  # closed by the server: the end of the stream
            # uvicorn's own 503 (beyond its connection limit), whose headers (a date or
            # not, their order) vary with its version and timing, or the end of the stream
            answer = connection.recv(1000)
            assert answer == b"" or (answer.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
                                     and b"\r\nconnection: close\r\n" in answer.lower()), answer
    finally:
        for connection in idle:
            connection.close()
    assert review.client.json("/api/status")["review"]["listed"] >= len(review.images)
    assert sidecar(review.inbox / review.images[3])["source"] == "model"  # the half POST
    lines = review.daemon.log.splitlines()
    assert any("Invalid HTTP request" in line for line in lines)
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) "
                        r"[\w.]+: ", line) or line.startswith((" ", "Traceback"))
               for line in lines), [line for line in lines if not line[:4].isdigit()][:5]


def test_an_image_is_opened_beneath_the_inbox_never_through_a_swapped_folder(tmp_path):
    """paths.image() looks at the path; the open that follows walks it again component by
    component: a folder swapped for a symbolic link in between leads nowhere outside."""
    from daemon.web.paths import open_beneath

    inbox, outside = tmp_path / "inbox", tmp_path / "outside"
    (inbox / "album").mkdir(parents=True)
    outside.mkdir()
    (inbox / "album" / "photo.jpg").write_bytes(b"inside")
    (outside / "photo.jpg").write_bytes(b"outside")
    fd = open_beneath(str(inbox), str(inbox / "album" / "photo.jpg"))
    assert os.read(fd, 100) == b"inside"
    os.close(fd)
    (inbox / "album").rename(inbox / "was-album")
    (inbox / "album").symlink_to(outside, target_is_directory=True)  # swapped meanwhile
    with pytest.raises(OSError):
        open_beneath(str(inbox), str(inbox / "album" / "photo.jpg"))
    (inbox / "link.jpg").symlink_to(outside / "photo.jpg")
    with pytest.raises(OSError):
        open_beneath(str(inbox), str(inbox / "link.jpg"))
    with pytest.raises(OSError):
        open_beneath(str(inbox), str(outside / "photo.jpg"))
