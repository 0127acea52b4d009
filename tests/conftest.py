"""Shared fixtures: real photos, the real EfficientNet-Lite0 weights exported once, image folders."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("TQDM_DISABLE", "1")
if "FEATX_CACHE_DIR" not in os.environ:  # engine="auto" calibrations: cached per test session, not in ~/.cache
    os.environ["FEATX_CACHE_DIR"] = tempfile.mkdtemp(prefix="featx-test-cache-")
    atexit.register(shutil.rmtree, os.environ["FEATX_CACHE_DIR"], ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    from featx.runtime import cuda_device_count

    if cuda_device_count() == 0:
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def photos_dir(tmp_path_factory) -> Path:
    from featx.samples import write_sample_photos

    folder = tmp_path_factory.mktemp("photos")
    write_sample_photos(folder)
    return folder


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def lite0_backbone():
    from featx import load_backbone

    return load_backbone("efficientnet_lite0")


@pytest.fixture(scope="session")
def lite0_onnx(models_dir, lite0_backbone) -> Path:
    from featx import export_onnx

    path = models_dir / "efficientnet_lite0.onnx"
    export_onnx(lite0_backbone, path)
    return path


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """All 1,797 scikit-learn digits as a class-per-folder tree of 32x32 PNGs."""
    from featx.samples import write_digits_folder

    return write_digits_folder(tmp_path_factory.mktemp("digits") / "digits", size=32)


@pytest.fixture
def small_digits(tmp_path) -> Path:
    """60 digits as a class-per-folder tree, a fresh copy per test (tests modify it)."""
    from featx.samples import write_digits_folder

    return write_digits_folder(tmp_path / "digits", size=32, limit=60)


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory, digits_dir, lite0_onnx) -> Path:
    """The full digits folder embedded once with the real default model."""
    from featx import embed_folder

    out = tmp_path_factory.mktemp("cache") / "digits.h5"
    # onnxruntime named: auto would calibrate at batch 64 first (14 s on a 2-core Xeon, half the
    # fixture's time) to choose the engine it chooses on a CPU anyway
    embed_folder(digits_dir, out, model=lite0_onnx, batch_size=64, workers=1, engine="onnx")
    return out


@pytest.fixture
def cache_from_digits(digits_cache, lite0_onnx):
    """``cache_from_digits(folder, out)``: the cache ``featx embed folder -o out`` makes of ``folder``, copies of
    some of the session's digits, made from the session's digits cache instead: copied, taken to stand for
    ``folder`` (--new-folder: rows reused by content) and the other digits' rows pruned. Its rows are those an
    embed of its own gives, bit for bit, in 0.1 s instead of 4 s for 500 digits."""
    from featx import embed_folder

    def make(folder: Path, out: Path):
        shutil.copy(digits_cache, out)
        report = embed_folder(folder, out, model=lite0_onnx, engine="onnx", workers=0, new_folder=True, prune=True)
        assert report.n_embedded == 0 and report.n_failed == 0, "a file of the folder is none of the session's digits"
        return report

    return make


@pytest.fixture(scope="session")
def overflowing_lite0(tmp_path_factory, lite0_onnx) -> tuple[Path, set[str]]:
    """A real ONNX file whose embedding is not finite on some images, as an fp16 engine's that overflows:
    the Lite0 graph with its embedding output (not its class scores) scaled past float32's range on the
    10 of the 60 ``small_digits`` with the largest features. Returns (file, the keys of those 10)."""
    import numpy as np
    import onnx

    from featx import embed_images
    from featx.export import save_model_file
    from featx.samples import write_digits_folder

    folder = write_digits_folder(tmp_path_factory.mktemp("digits60") / "digits", size=32, limit=60)
    keys = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.png"))
    largest = embed_images([folder / k for k in keys], model=lite0_onnx).max(axis=1)
    cut = np.mean(np.sort(largest)[49:51])
    graph = onnx.load(lite0_onnx)
    (cast,) = [n for n in graph.graph.node if "embedding" in n.output]
    cast.output[0] = "embedding_unscaled"
    (gemm,) = [n for n in graph.graph.node if "embedding" in n.input]
    gemm.input[list(gemm.input).index("embedding")] = "embedding_unscaled"
    graph.graph.initializer.append(onnx.numpy_helper.from_array(
        np.array(np.finfo(np.float32).max / cut, dtype=np.float32), "overflow_scale"))
    graph.graph.node.append(onnx.helper.make_node("Mul", ["embedding_unscaled", "overflow_scale"], ["embedding"]))
    path = tmp_path_factory.mktemp("overflowing") / lite0_onnx.name
    save_model_file(graph, path)  # a featx file whose weights are as written
    return path, {k for k, m in zip(keys, largest) if m > cut}


def _retry_failed_scenario(folder: Path, cache: Path, model, **kw) -> None:
    """A strip refused by --max-pixels is skipped on a re-run with the limit raised (unchanged, it
    failed before) until --retry-failed, which embeds it and drops its failure; a file still broken
    fails again, recorded once. The single-machine and Ray engines' tests run it."""
    from PIL import Image

    import featx

    Image.new("RGB", (4000, 30), (200, 10, 10)).save(folder / "3" / "strip.png")
    (folder / "3" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    first = featx.embed_folder(folder, cache, model=model, max_pixels=100_000, **kw)
    assert first.n_failed == 2 and "over the limit of 100,000 (--max-pixels)" in featx.load_failures(cache)["3/strip.png"]
    again = featx.embed_folder(folder, cache, model=model, **kw)
    assert (again.n_embedded, again.n_failed_before) == (0, 2)
    assert "(2 failed before, unchanged: --retry-failed tries them again)" in again.summary()
    retried = featx.embed_folder(folder, cache, model=model, retry_failed=True, **kw)
    assert (retried.n_embedded, retried.n_failed) == (1, 1)
    assert list(featx.load_failures(cache)) == ["3/broken.jpg"] and "3/strip.png" in featx.load_embeddings(cache).keys


@pytest.fixture
def retry_failed_scenario():
    return _retry_failed_scenario


def _change_a_stored_byte(cache: Path, row: int, column: int = 0) -> None:
    """One byte of a cache's stored embedding changed on disk, as a bad sector or a bad copy changes it: the
    lowest byte of (row, column) of the single model group's float32 embeddings, a change in its 7th digit
    that leaves a finite number, found in the file where HDF5 put that row's chunk."""
    import h5py

    with h5py.File(cache, "r") as f:
        (group,) = [g for g in f.values() if "fingerprint" in g.attrs]
        embeddings = group["embeddings"]
        first = row - row % embeddings.chunks[0]
        at = embeddings.id.get_chunk_info_by_coord((first, 0)).byte_offset
        at += embeddings.dtype.itemsize * ((row - first) * embeddings.shape[1] + column)
    with open(cache, "r+b") as f:
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0x01]))


@pytest.fixture
def change_a_stored_byte():
    return _change_a_stored_byte
