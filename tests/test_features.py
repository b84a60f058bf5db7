"""Features, once: the feature store and the data versions of a backbone model (format 2),
without TensorFlow: real files in a real save/ folder."""

import hashlib
import json
import logging
import os

import numpy as np
import pytest

from daemon.data import features, versions
from daemon.data.versions import VersionStore

FEATURE_ID = "0123456789abcdef-fedcba9876543210"


@pytest.fixture(autouse=True)
def fresh_caches():
    """Every test starts with no store or version kept in memory from another test."""
    features._stores.clear()
    versions._versions.clear()
    versions._recent.clear()
    yield
    features._stores.clear()
    versions._versions.clear()
    versions._recent.clear()


def digest(i):
    return hashlib.sha256(f"image {i}".encode()).hexdigest()


def vector(i):
    return np.random.default_rng(i).random(1280, dtype=np.float32)


def entry(i, cls="ants"):
    return {"path": f"{cls}/{i:05d}.jpg", "class": cls, "size": 1000 + i, "mtime_ns": i,
            "ino": i, "sha256": digest(i)}


def disk_bytes(folder):
    return {path: os.path.getsize(path) for path in map(str, folder.rglob("*"))
            if os.path.isfile(path)}


def test_features_round_trip_once_per_content_in_self_checking_chunks(tmp_path):
    store = features.store(tmp_path, FEATURE_ID)
    assert store.add({digest(i): vector(i) for i in range(5)}) == 5
    assert store.add({digest(i): vector(i) for i in range(3, 7)}) == 2  # 3, 4 kept already
    chunks = sorted((tmp_path / "features" / FEATURE_ID).iterdir())
    assert len(chunks) == 2
    for chunk in chunks:  # a chunk's name is its checksum
        assert chunk.name == f"chunk-{hashlib.sha256(chunk.read_bytes()).hexdigest()}.npz"
    features._stores.clear()  # a restart: read from disk
    again = features.store(tmp_path, FEATURE_ID)
    got = again.get([digest(6), digest(0), digest(4)])
    assert got.dtype == np.float32
    assert np.array_equal(got, np.stack([vector(6), vector(0), vector(4)]))
    with pytest.raises(features.Missing) as missing:
        again.get([digest(0), digest(99)])
    assert missing.value.digests == [digest(99)]


def test_a_damaged_chunk_is_set_aside_and_its_images_count_as_missing(tmp_path, caplog):
    store = features.store(tmp_path, FEATURE_ID)
    store.add({digest(1): vector(1)})
    store.add({digest(2): vector(2)})
    folder = tmp_path / "features" / FEATURE_ID
    damaged = next(path for path in folder.iterdir() if digest(2).encode() in path.read_bytes())
    data = bytearray(damaged.read_bytes())
    data[-40] ^= 0xFF
    damaged.write_bytes(bytes(data))
    features._stores.clear()
    caplog.set_level(logging.WARNING)
    again = features.store(tmp_path, FEATURE_ID)
    assert again.has(digest(1)) and not again.has(digest(2))
    assert "is damaged" in caplog.text
    assert not damaged.exists() and damaged.with_name(damaged.name + ".damaged").exists()
    assert again.add({digest(2): vector(2)}) == 1  # featurized again, kept again
    assert np.array_equal(again.get([digest(2)])[0], vector(2))


def test_many_chunks_are_merged_keeping_only_what_versions_hold(tmp_path):
    store = features.store(tmp_path, FEATURE_ID)
    for i in range(features.MERGE_AT + 1):
        store.add({digest(i): vector(i)})
    held = {digest(i) for i in range(0, features.MERGE_AT + 1, 2)}
    store.merge(lambda: held)
    folder = tmp_path / "features" / FEATURE_ID
    assert len(list(folder.iterdir())) == 1
    features._stores.clear()
    again = features.store(tmp_path, FEATURE_ID)
    assert not again.has(digest(1))
    assert np.array_equal(again.get(sorted(held)), np.stack(
        [vector(int(i)) for i in sorted(range(0, features.MERGE_AT + 1, 2),
                                         key=lambda i: digest(i))]))


def test_a_new_version_writes_what_changed_not_the_whole_set(tmp_path):
    """Adding one photo to 10,000 writes kilobytes (its features and a small manifest),
    not every feature and every entry again."""
    store = VersionStore(tmp_path)
    count = 10_000
    entries = [entry(i, "ants" if i % 2 else "bees") for i in range(count)]
    first = store.write_features("folder", ["ants", "bees"], entries, [], FEATURE_ID,
                                 new_features={digest(i): vector(i) for i in range(count)})
    before = disk_bytes(tmp_path)
    second = store.write_features("folder", ["ants", "bees"], entries + [entry(count)], [],
                                  FEATURE_ID, base=first,
                                  new_features={digest(count): vector(count)})
    after = disk_bytes(tmp_path)
    written = sum(size for path, size in after.items() if before.get(path) != size)
    assert sum(before.values()) > 50_000_000  # the whole set: 10,000 x 1280 floats
    assert written < 16_000, f"{written} bytes written for one photo more"
    assert second["base"] == first.number and second["depth"] == 1
    assert len(second["added"]) == 1 and second["removed"] == []
    versions._versions.clear()  # read back from disk, along the chain
    again = store.get(second.number)
    assert again.entries() == {e["path"]: e for e in entries + [entry(count)]}
    arrays = again.arrays()
    ordered = sorted(entries + [entry(count)], key=lambda e: e["path"])  # rows: path order
    number_of = {digest(i): i for i in range(count + 1)}
    assert arrays["x"].shape == (count + 1, 1280)
    assert np.array_equal(arrays["x"][::500], np.stack(
        [vector(number_of[e["sha256"]]) for e in ordered[::500]]))
    assert arrays["y"].tolist() == [["ants", "bees"].index(e["class"]) for e in ordered]
    assert arrays["val"].tolist() == [versions.is_validation(e["sha256"]) for e in ordered]


def test_chains_stay_short_and_big_changes_write_a_full_list(tmp_path):
    store = VersionStore(tmp_path)
    entries = [entry(i) for i in range(20)]
    new = {digest(i): vector(i) for i in range(60)}
    version = store.write_features("folder", ["ants"], entries, [], FEATURE_ID,
                                   new_features=new)
    depths = []
    for i in range(20, 20 + versions.MAX_DEPTH + 1):
        entries = entries + [entry(i)]
        version = store.write_features("folder", ["ants"], entries, [], FEATURE_ID,
                                       base=version)
        depths.append(version["depth"])
    assert depths == list(range(1, versions.MAX_DEPTH + 1)) + [0]
    assert version["base"] is None and len(version["added"]) == len(entries)
    halved = store.write_features("folder", ["ants"], entries[: len(entries) // 3], [],
                                  FEATURE_ID, base=version)
    assert halved["base"] is None  # most removed: the full list is shorter


def test_prune_keeps_the_bases_of_kept_versions(tmp_path):
    store = VersionStore(tmp_path)
    entries = [entry(i) for i in range(10)]
    chain = [store.write_features("folder", ["ants"], entries, [], FEATURE_ID,
                                  new_features={digest(i): vector(i) for i in range(20)})]
    for i in range(10, 14):
        entries = entries + [entry(i)]
        chain.append(store.write_features("folder", ["ants"], entries, [], FEATURE_ID,
                                          base=chain[-1]))
    store.prune({chain[2].number})
    kept = set(store.numbers())
    assert kept == {chain[0].number, chain[1].number, chain[2].number, chain[3].number,
                    chain[4].number}  # the newest two, and chain[2] with its bases
    store.prune(set())
    assert set(store.numbers()) == {chain[0].number, chain[1].number, chain[2].number,
                                    chain[3].number, chain[4].number}  # bases of the newest
    versions._versions.clear()
    assert len(store.get(chain[4].number).entries()) == 14


def test_a_broken_chain_or_a_tampered_manifest_is_an_error_not_wrong_data(tmp_path):
    store = VersionStore(tmp_path)
    entries = [entry(i) for i in range(10)]
    first = store.write_features("folder", ["ants"], entries, [], FEATURE_ID,
                                 new_features={digest(i): vector(i) for i in range(11)})
    second = store.write_features("folder", ["ants"], entries + [entry(10)], [],
                                  FEATURE_ID, base=first)
    path = tmp_path / "data" / versions.manifest_name(second.number)
    manifest = json.loads(path.read_text())
    manifest["added"][0]["class"] = "bees"
    path.write_text(json.dumps(manifest))
    versions._versions.clear()
    with pytest.raises(OSError, match="does not match its checksum"):
        store.get(second.number).entries()
    (tmp_path / "data" / versions.manifest_name(first.number)).unlink()
    manifest["added"][0]["class"] = "ants"
    path.write_text(json.dumps(manifest))
    versions._versions.clear()
    with pytest.raises(OSError, match="missing or unreadable"):
        store.get(second.number).entries()
