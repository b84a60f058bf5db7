"""The cost of a checkpoint with the backbone (issue 14): a generation of the
efficientnet_lite0 preset writes the state file (the head and its optimizer) and the
tutorial's pair of the whole model (model.json + model.h5, backbone + head, ~14 MB) at
every epoch end. Timed in process, `Checkpoint.save` exactly as the trainer sets it up
(exported = the whole model), one training batch between saves so that model.h5 changes,
against writing and fsyncing the same bytes (the files that generation wrote) with plain
file writes -- the disk's own limit -- in alternating rounds of the same run. Where the
time goes: the state file's npz, the exports (model.json kept, model.h5's trainable layers
written into the HDF5 file kept in memory, and the block digests of what changed), and
the store's writes and fsyncs, each timed alone on the same model.

    PYTHONPATH=. .venv/bin/python bench/checkpoint_backbone.py [--quick] [--rounds 10]

Results: docs/bench-checkpoint-backbone.json. Goal: Checkpoint.save <= 1.5x the plain copy.
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import photobench
from daemonproc import REPO
from report import OtherLoad, code_version, machine

sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

OUT = REPO / "docs" / "bench-checkpoint-backbone.json"
GOAL = 1.5


def plain_copy(files, folder):
    """Write and fsync each of `files` ({name: bytes}) as a new file in `folder`, then fsync
    the folder: seconds."""
    started = time.perf_counter()
    for name, data in files.items():
        fd = os.open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
    fd = os.open(folder, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    return time.perf_counter() - started


def timed(function):
    started = time.perf_counter()
    result = function()
    return time.perf_counter() - started, result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--folder", type=Path, default=None,
                        help="where to write (default: a temporary folder under /tmp)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    rounds = args.rounds or (3 if args.quick else 10)
    load = OtherLoad()
    from daemon.backbone import efficientnet, runtime
    from daemon.training import checkpoints, models
    from daemon.training.store import manifest_name

    backbone = efficientnet.build()
    efficientnet.assign(backbone, runtime.locate().state())
    head = models.build("efficientnet_lite0", num_classes=2)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, efficientnet.FEATURES)).astype(np.float32)
    y = rng.integers(0, 2, 64)
    head.fit(x, y, batch_size=32, epochs=1, verbose=0)  # the optimizer's variables exist
    whole = models.whole(backbone, head)
    root = Path(tempfile.mkdtemp(prefix="wardrobe-bench-ckpt-", dir=args.folder))
    save, copies = root / "save", root / "copy"
    copies.mkdir()
    checkpoint = checkpoints.Checkpoint(save)
    checkpoint.set_model(head)
    checkpoint.set_params({"epochs": rounds + 1})
    checkpoint.exported = lambda model: whole
    checkpoint.history = [{"epoch": 1, "loss": 0.5, "accuracy": 0.5, "seconds": 1.0}]
    checkpoint.save(1, 0)  # the first generation (and whatever is done once)
    saves, plains, parts = [], [], {"state_npz": [], "exports_and_digests": []}
    sizes = {}
    try:
        for round_ in range(rounds):
            head.train_on_batch(x[:32], y[:32])  # new weights: model.h5 must be written
            seconds, generation = timed(lambda: checkpoint.save(round_ + 2, 0))
            saves.append(seconds)
            written = {name: (save / name).read_bytes() for name in
                       (*generation["files"], "model.json", "model.h5",
                        manifest_name(generation.number))
                       if (save / name).exists()}
            sizes = {name: len(data) for name, data in written.items()}
            os.sync()  # nothing of the save's pending when the copy starts
            plains.append(plain_copy(written, copies))
            parts["state_npz"].append(timed(checkpoint._state_bytes)[0])
            parts["exports_and_digests"].append(timed(checkpoint._exports)[0])
            print(f"round {round_}: save {1000 * seconds:.0f} ms, plain copy "
                  f"{1000 * plains[-1]:.0f} ms", flush=True)
            os.sync()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if len(sizes) < 3:
        print(f"note: the generation's files found: {sorted(sizes)}", flush=True)
    save_ms, plain_ms = 1000 * statistics.median(saves), 1000 * statistics.median(plains)
    ratio = save_ms / plain_ms
    breakdown = {name: round(1000 * statistics.median(values), 1)
                 for name, values in parts.items()}
    # the parts are timed apart from the saves: the rest is an estimate
    breakdown["rest_writes_and_fsyncs_estimate"] = round(save_ms - sum(breakdown.values()), 1)
    results = {"rounds": rounds, "bytes": sizes, "total_mb": round(sum(sizes.values()) / 1e6, 2),
               "checkpoint_save_ms": round(save_ms, 1), "plain_copy_ms": round(plain_ms, 1),
               "ratio": round(ratio, 2), "all_save_ms": [round(1000 * s, 1) for s in saves],
               "all_plain_ms": [round(1000 * s, 1) for s in plains],
               "breakdown_ms_median": breakdown,
               "goal": f"Checkpoint.save <= {GOAL}x a plain write+fsync of the same bytes",
               "met": ratio <= GOAL, "quick": args.quick, "machine": machine(),
               "code": code_version(),
               "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **load.measure()}
    photobench.store(args.out, "checkpoint_backbone", results)
    rows = [("Checkpoint.save (median), ms", results["checkpoint_save_ms"],
             results["plain_copy_ms"], results["ratio"], f"<= {GOAL}", results["met"]),
            ("bytes written, MB", results["total_mb"], "", "", "", "")]
    rows += [(f"  of which {name}, ms", value, "", "", "", "") for name, value in
             breakdown.items()]
    rows.append(("other load on the machine, cores", results["other_load_cores"], "", "", "",
                 ""))
    print("\n" + photobench.table(rows) + f"\n\nresults in {args.out}", flush=True)


if __name__ == "__main__":
    main()
