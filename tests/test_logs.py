"""Every line the daemon leaves on stderr is one of its log records: the libraries' own
lines (TensorFlow's start-up, libpng's warnings in the decode workers, multiprocessing's
resource tracker after a kill -9) included."""

import os
import re
import struct
import subprocess
import sys
import zlib

import cv2
import numpy as np
import pytest

from conftest import sidecar, wait_until, write_config
from daemon.data import images

PLAIN = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) "
                   r"[\w.]+: ")
JOURNAL = re.compile(r"<[0-7]>[\w.]+: ")


def png_libpng_warns_about(path):
    """A gray PNG with an iCCP chunk too short to be a colour profile: it decodes, and
    libpng writes "libpng warning: iCCP: too short" to stderr."""
    png = cv2.imencode(".png", np.full((40, 40), 200, np.uint8))[1].tobytes()
    data = b"junk\0\0" + zlib.compress(b"not a profile")
    chunk = (struct.pack(">I", len(data)) + b"iCCP" + data
             + struct.pack(">I", zlib.crc32(b"iCCP" + data)))
    path.write_bytes(png[:33] + chunk + png[33:])  # right after IHDR
    decoded = subprocess.run([sys.executable, "-c", f"import cv2; cv2.imread({str(path)!r})"],
                             capture_output=True, text=True, timeout=60)
    assert "libpng warning" in decoded.stderr  # the premise of the test


def what_opencv_says_decoding(path):
    """What a fresh process's OpenCV writes to stderr decoding `path`."""
    decoded = subprocess.run([sys.executable, "-c", f"import cv2; cv2.imread({str(path)!r})"],
                             capture_output=True, text=True, timeout=60)
    return decoded.stderr.strip()


def test_what_the_decoder_says_about_a_file_is_a_record_naming_it(tmp_path, caplog, capfd):
    warns, truncated = tmp_path / "warns.png", tmp_path / "truncated.png"
    png_libpng_warns_about(warns)
    truncated.write_bytes(warns.read_bytes()[:-30])
    caplog.set_level("DEBUG", logger="daemon.images")
    assert images.load(warns).shape == (28, 28)
    with pytest.raises(images.BadImage):
        images.load(truncated)
    assert capfd.readouterr().err == ""
    said = [(record.levelname, record.getMessage()) for record in caplog.records]
    assert ("DEBUG", f"{warns}: libpng warning: iCCP: too short") in said
    # OpenCV 5.0 warns that the buffer is incomplete, 5.1 says nothing: whatever it says
    # (beside the warning the file carries, said before) is a record about the file
    about_truncation = [line for line in what_opencv_says_decoding(truncated).splitlines()
                        if "iCCP" not in line]
    if about_truncation:
        assert any(level == "DEBUG" and text.startswith(f"{truncated}: ")
                   and "iCCP" not in text for level, text in said)


def descendants(pid):
    """The pids of the processes below `pid` (decode workers, the resource tracker)."""
    children = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as stat:
                parent = int(stat.read().rsplit(")", 1)[1].split()[1])
        except OSError:  # it has gone meanwhile
            continue
        children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.parametrize("journal", [False, True], ids=["plain", "journal"])
def test_every_line_on_stderr_is_a_log_record(tmp_path, small_data, daemons, journal):
    config = write_config(tmp_path, small_data, epochs=1)
    png = tmp_path / "warns.png"
    png_libpng_warns_about(png)
    daemon = daemons(config, journal=journal)
    daemon.wait_for_log(r"training complete", 120)
    image = tmp_path / "inbox" / "warns.png"
    os.rename(png, image)
    assert wait_until(lambda: sidecar(image), 60, message="the sidecar")["label"]
    below = descendants(daemon.pid)
    assert below  # the decode workers and the resource tracker
    daemon.kill()
    # what outlives the daemon (the tracker) says its last words before it exits
    wait_until(lambda: all(gone(pid) for pid in below), 30, message="the daemon's children")
    pattern = JOURNAL if journal else PLAIN
    strangers = [line for line in daemon.log.splitlines() if line.strip()
                 and not pattern.match(line)]
    assert not strangers, daemon.log
