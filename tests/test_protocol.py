"""The write protocol as the kernel sees it, traced with strace."""

import re
import shutil

import pytest

from conftest import write_config

STRACE = shutil.which("strace")
CALL = re.compile(r'^(\w+)\((.*)\)\s+= 0$')
UNFINISHED = " <unfinished ...>"


def syscalls(trace):
    """(name, arguments) of each call that succeeded in an `strace -f` log, in the order
    they returned. A call in one thread that another thread's call interrupted is written
    on two lines ("<unfinished ...>", then "<... NAME resumed>"): joined here."""
    started = {}
    for line in trace.read_text().splitlines():
        pid, _, call = line.partition(" ")
        call = call.lstrip()
        if call.endswith(UNFINISHED):
            started[pid] = call[:-len(UNFINISHED)]
            continue
        if call.startswith("<... ") and " resumed>" in call:
            call = started.pop(pid, "") + call.split(" resumed>", 1)[1]
        if match := CALL.match(call):
            yield match.group(1), match.group(2)


def traced_writes(trace, save):
    """[("fsync", path) or ("rename", source, target)] of an strace log, in order: every
    fsync, and the renames into `save`. Not live.json (the running daemon's status for
    `status`: losing it in a power cut loses nothing) nor tmp/ (scratch)."""
    events = []
    for name, arguments in syscalls(trace):
        if name == "fsync":
            events.append(("fsync", re.search(r"<(.*)>", arguments).group(1)))
        elif name == "rename":
            source, target = re.findall(r'"([^"]*)"', arguments)
            if target.startswith(save + "/") and not target.endswith("/live.json") and \
                    not target.startswith(save + "/tmp/"):
                events.append(("rename", source, target))
    return events


@pytest.mark.skipif(STRACE is None, reason="strace is not installed (.ci/run installs it)")
def test_each_file_is_fsynced_before_its_rename_and_the_folder_after(tmp_path, small_data,
                                                                    daemons):
    trace = tmp_path / "strace.txt"
    config = write_config(tmp_path, small_data, epochs=1)
    daemon = daemons(config, wrapper=[STRACE, "-f", "-qq", "-y", "-o", str(trace),
                                      "-e", "trace=fsync,rename"])
    daemon.wait_for_log(r"training complete", 120)
    assert daemon.stop() == 0, daemon.log
    events = traced_writes(trace, str(tmp_path / "save"))
    renames = [i for i, event in enumerate(events) if event[0] == "rename"]
    commits = [i for i in renames if re.search(r"/ckpt-\d+\.json$", events[i][2])]
    # 58 batches (the 90% of 1,024 images that do not validate, 16 a batch): 11 inside, 1 end
    assert len(commits) >= 12, f"expected a generation every 5 batches, saw {len(commits)}"
    # the TensorBoard event files of the epoch, after its commit (checked below as well)
    curves = [i for i in renames if "/tensorboard/" in events[i][2]]
    assert len(curves) == 2 and min(curves) > commits[-1], curves
    for i in renames:
        _, source, target = events[i]
        assert ("fsync", source) in events[:i], f"{source} renamed without an fsync first"
        # the rename is made durable by an fsync of the folder before the next commit
        next_commit = next((c for c in commits if c > i), len(events))
        if i in commits:
            next_commit = next((r for r in renames if r > i), len(events))
        folder = target.rsplit("/", 1)[0]  # save/, or save/data/ for a data version
        assert ("fsync", folder) in events[i + 1:next_commit], f"no folder fsync after {target}"
