"""The ray engine on a local cluster: the same cache as the single-machine path, and a killed run resumes."""

import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

import featx

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_cluster():
    ray.init(num_cpus=2, log_to_driver=False, include_dashboard=False)
    yield
    ray.shutdown()


def assert_same_cache(a_path, b_path, *, rows_of_b: bool = False):
    """The same keys, labels, embeddings, failures and digests; ``rows_of_b``: ``a`` is a part of the
    folder ``b`` was embedded from, and equals b's rows of its files."""
    a, b = featx.load_embeddings(a_path), featx.load_embeddings(b_path)
    rows = [b.keys.index(key) for key in a.keys] if rows_of_b else list(range(len(b.keys)))
    assert rows == sorted(rows) and a.keys == [b.keys[i] for i in rows]  # in the walk's order
    assert np.array_equal(a.labels, b.labels[rows]) and a.class_names == b.class_names
    assert np.abs(a.embeddings - b.embeddings[rows]).max() < 1e-4
    assert a.failures == ({} if rows_of_b else b.failures)
    digests = []
    for path in (a_path, b_path):  # the same record of each file's bytes, by which a rename is recognised
        with h5py.File(path, "r") as f:
            digests.append(f["efficientnet_lite0/file_sha256"][:].tolist())
    assert digests[0] == [digests[1][i] for i in rows] and b"" not in digests[0]


@pytest.mark.slow
def test_ray_engine_gives_the_single_machine_cache(local_cluster, small_digits, tmp_path, lite0_onnx):
    (small_digits / "2" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut")
    (small_digits / "7" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut")  # copies: embedded once, fail once
    (small_digits / "7" / "copy.png").write_bytes(next((small_digits / "1").iterdir()).read_bytes())
    ray_stats = featx.embed_folder(small_digits, tmp_path / "ray.h5", model=lite0_onnx, engine="ray",
                                   batch_size=8, workers=2)
    one = featx.embed_folder(small_digits, tmp_path / "one.h5", model=lite0_onnx, batch_size=8, workers=0)
    assert (ray_stats.n_embedded, ray_stats.n_failed, ray_stats.n_duplicates) == \
        (one.n_embedded, one.n_failed, one.n_duplicates) == (60, 2, 1)
    assert_same_cache(tmp_path / "ray.h5", tmp_path / "one.h5")
    again = featx.embed_folder(small_digits, tmp_path / "ray.h5", model=lite0_onnx, engine="ray")
    assert (again.n_embedded, again.n_cached, again.n_failed_before) == (0, 61, 2)
    from PIL import Image

    digit = next((small_digits / "4").iterdir())
    Image.open(digit).convert("RGB").save(small_digits / "2" / "broken.jpg", "JPEG")  # fixed: new content
    (small_digits / "7" / "broken.jpg").write_bytes(digit.read_bytes())  # fixed: a stored file's bytes
    fixed = featx.embed_folder(small_digits, tmp_path / "ray.h5", model=lite0_onnx, engine="ray")
    assert (fixed.n_embedded, fixed.n_moved, fixed.n_failed) == (1, 1, 0)
    assert featx.load_failures(tmp_path / "ray.h5") == {}  # no stale failure records for files that have rows
    assert not list((tmp_path / "ray.h5.shards" / "efficientnet_lite0").iterdir())
    edited = next((small_digits / "5").iterdir())
    Image.open(edited).rotate(90).save(edited)  # an edited photo: its row is replaced, not added to
    featx.embed_folder(small_digits, tmp_path / "one.h5", model=lite0_onnx, batch_size=8, workers=0)
    changed = featx.embed_folder(small_digits, tmp_path / "ray.h5", model=lite0_onnx, engine="ray")
    assert (changed.n_embedded, changed.n_cached) == (1, 62)
    assert_same_cache(tmp_path / "ray.h5", tmp_path / "one.h5")
    edited.unlink()
    kept = featx.embed_folder(small_digits, tmp_path / "ray.h5", model=lite0_onnx, engine="ray")
    assert (kept.n_embedded, kept.deleted, len(featx.load_embeddings(tmp_path / "ray.h5").keys)) == \
        (0, [f"5/{edited.name}"], 63)  # told, not removed
    assert featx.load_embeddings(tmp_path / "ray.h5", present_only=True).gone == [f"5/{edited.name}"]  # recorded
    pruned = featx.embed_folder(small_digits, tmp_path / "ray.h5", model=lite0_onnx, engine="ray", prune=True)
    featx.embed_folder(small_digits, tmp_path / "one.h5", model=lite0_onnx, workers=0, prune=True)
    assert pruned.n_pruned == 1 and featx.load_embeddings(tmp_path / "ray.h5", present_only=True).gone == []
    assert_same_cache(tmp_path / "ray.h5", tmp_path / "one.h5")
    # rows from before the cache kept perceptual hashes: the next ray run gives them the single machine's
    with h5py.File(tmp_path / "ray.h5", "r+") as f:
        f["efficientnet_lite0/image_phash"][...] = 0
    rehashed = featx.embed_folder(small_digits, tmp_path / "ray.h5", model=lite0_onnx, engine="ray")
    ray_rows, one_rows = featx.load_embeddings(tmp_path / "ray.h5"), featx.load_embeddings(tmp_path / "one.h5")
    assert rehashed.n_embedded == 0 and rehashed.n_hashed == len(ray_rows.keys) == 62
    assert np.array_equal(ray_rows.phashes, one_rows.phashes) and ray_rows.phashes.all()


def test_ray_engine_refuses_options_it_would_ignore(small_digits, tmp_path, lite0_onnx):
    with pytest.raises(featx.FeatxError, match="the ray engine does not take half, devices, device cuda .*"
                                               "--num-gpus-per-worker"):
        featx.embed_folder(small_digits, tmp_path / "c.h5", model=lite0_onnx, engine="ray", half=True,
                           devices=["cpu", "cpu"], device="cuda")
    # and the other way round: the ray engine's options, or torch's --compile, given to another engine
    # (each was left unused without a word: no cluster joined, onnxruntime run uncompiled)
    with pytest.raises(featx.FeatxError, match="--address and --num-gpus-per-worker are the ray engine's: add "
                                               "--engine ray, or drop it"):
        featx.embed_folder(small_digits, tmp_path / "c.h5", model=lite0_onnx, address="auto", num_gpus_per_worker=1)
    with pytest.raises(featx.FeatxError, match="--compile is the torch engine's .*--engine onnx runs onnxruntime"):
        featx.embed_folder(small_digits, tmp_path / "c.h5", model=lite0_onnx, engine="onnx", compile=True)
    assert not (tmp_path / "c.h5").exists()


@pytest.mark.slow
def test_ray_run_killed_halfway_resumes_equal(local_cluster, digits_cache, tmp_path, lite0_onnx):
    """The first 480 digits: their rows in the single-machine cache of all 1,797 are the reference."""
    from featx.samples import write_digits_folder

    folder = write_digits_folder(tmp_path / "digits", size=32, limit=480)
    out = tmp_path / "ray.h5"
    shards = tmp_path / "ray.h5.shards" / "efficientnet_lite0"
    cmd = [sys.executable, "-m", "featx", "-q", "embed", str(folder), "-o", str(out), "--model", str(lite0_onnx),
           "--engine", "ray", "--batch-size", "32", "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(shards.glob("*.npz"))) < 3:
        time.sleep(0.05)
    # the driver and the local cluster it started; its actors, in process groups of their own, outlive it by
    # seconds and may still write a shard while the run below stitches (CI once caught a shard deleted half way)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(list(shards.glob("*.npz"))) >= 3
    stats = featx.embed_folder(folder, out, model=lite0_onnx, engine="ray", batch_size=32, workers=1)
    assert stats.n_embedded == 480  # the killed run's finished shards, stitched now, plus the rest
    assert_same_cache(out, digits_cache, rows_of_b=True)


@pytest.mark.slow
def test_ray_run_drops_shards_a_dead_run_left_unfinished(local_cluster, small_digits, tmp_path, lite0_onnx, caplog):
    shards = tmp_path / "ray.h5.shards" / "efficientnet_lite0"
    shards.mkdir(parents=True)
    (shards / "000000000000-0a0a0a0a.part").write_bytes(b"PK\x03\x04 an actor killed while writing")
    (shards / "000000000008-0b0b0b0b.npz").write_bytes(b"PK\x03\x04 cut short by an older featx")
    (shards / "000000000008-0b0b0b0b.done").touch()
    with caplog.at_level("WARNING", logger="featx.rayengine"):
        stats = featx.embed_folder(small_digits, tmp_path / "ray.h5", model=lite0_onnx, engine="ray", batch_size=8)
    assert "000000000008-0b0b0b0b.npz unreadable" in caplog.text
    assert (stats.n_embedded, stats.n_failed) == (60, 0)
    assert not list(shards.iterdir())


def test_a_killed_runs_late_shard_does_not_break_walk_order(small_digits, tmp_path, lite0_onnx):
    """An actor of a killed run may finish its batch after the next run started: that shard's files are
    the next run's too, and the store keeps the next run's walk order and rows."""
    from featx.data import walk_images
    from featx.rayengine import _decode, _Embedder, stitch_shards
    from featx.runtime import read_model_info
    from featx.store import EmbeddingStore

    info = read_model_info(lite0_onnx)
    entries = list(walk_images(small_digits))[:4]
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()

    def write_shard(run, first, mtime=0):
        batch = {"order": np.arange(first, first + 2), "path": np.array([e.path for e in entries[first:first + 2]]),
                 "key": np.array([e.key for e in entries[first:first + 2]]), "label": np.zeros(2, dtype=int),
                 "size": np.zeros(2, dtype=np.int64), "mtime": np.full(2, mtime, dtype=np.int64)}
        _Embedder(str(lite0_onnx), "cpu", str(shard_dir), run)(_decode(batch, cfg=info.preprocess, max_pixels=10**8))

    write_shard("0002", 0)
    write_shard("0002", 2)
    write_shard("0001", 2, mtime=1)  # the killed run's, named as an older run's: a version of the files before
    with EmbeddingStore(tmp_path / "c.h5", "efficientnet_lite0", info=info) as store:
        assert stitch_shards(shard_dir, store, run="0002") == (4, [])
        assert {mtime for _, _, mtime in store.done().values()} == {0}  # this run's rows, not replaced by it
    assert featx.load_embeddings(tmp_path / "c.h5").keys == [e.key for e in entries]
    assert not list(shard_dir.iterdir())


def test_a_killed_runs_shards_past_a_missing_batch_are_left_to_the_next_run(small_digits, tmp_path, lite0_onnx):
    """A killed run's actors finish batches out of order: its shards for the walk's positions 0 and 4, the
    batch at 2 never written. Only the first is stitched; the other is deleted, so the next run embeds
    files 2 to 5 in walk order and the cache is an uninterrupted run's (once a flaky resume test)."""
    from featx.data import walk_images
    from featx.rayengine import _decode, _Embedder, stitch_shards
    from featx.runtime import read_model_info
    from featx.store import EmbeddingStore

    info = read_model_info(lite0_onnx)
    entries = list(walk_images(small_digits))[:6]
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    for first in (0, 4):
        batch = {"order": np.arange(first, first + 2), "path": np.array([e.path for e in entries[first:first + 2]]),
                 "key": np.array([e.key for e in entries[first:first + 2]]), "label": np.zeros(2, dtype=int),
                 "size": np.zeros(2, dtype=np.int64), "mtime": np.zeros(2, dtype=np.int64)}
        _Embedder(str(lite0_onnx), "cpu", str(shard_dir), "0001")(_decode(batch, cfg=info.preprocess, max_pixels=10**8))
    with EmbeddingStore(tmp_path / "c.h5", "efficientnet_lite0", info=info) as store:
        assert stitch_shards(shard_dir, store) == (2, [])
    assert featx.load_embeddings(tmp_path / "c.h5").keys == [e.key for e in entries[:2]]
    assert not list(shard_dir.iterdir())


@pytest.mark.slow
def test_ray_actors_record_an_embedding_that_overflows_as_a_failure(local_cluster, small_digits, tmp_path,
                                                                   overflowing_lite0):
    """As on one machine: a file whose embedding is not finite numbers is a failure with the reason, in
    the same cache the single-machine path makes."""
    from featx.pipeline import NOT_FINITE_OUTPUT

    model, expected = overflowing_lite0
    stats = featx.embed_folder(small_digits, tmp_path / "ray.h5", model=model, engine="ray", batch_size=8, workers=2)
    featx.embed_folder(small_digits, tmp_path / "one.h5", model=model, batch_size=8, workers=0)
    assert (stats.n_embedded, stats.n_failed) == (50, 10)
    assert featx.load_failures(tmp_path / "ray.h5") == {k: NOT_FINITE_OUTPUT for k in expected}
    assert_same_cache(tmp_path / "ray.h5", tmp_path / "one.h5")


@pytest.mark.slow
def test_ray_engine_retries_what_failed_before_when_asked(local_cluster, small_digits, tmp_path, lite0_onnx,
                                                          retry_failed_scenario):
    retry_failed_scenario(small_digits, tmp_path / "ray.h5", lite0_onnx, engine="ray", batch_size=8, workers=1)
