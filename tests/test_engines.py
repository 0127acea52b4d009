"""Engine choice and resilience: the calibrated and cached --engine auto, the TensorRT path, several
engines sharing one store, out-of-memory back-off. Real weights, real photos, real onnxruntime/torch."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import featx
from featx.calibration import MIN_COSINE, calibrate, featx_cache_dir
from featx.errors import ModelFileError
from featx.runtime import OnnxEngine, TorchEngine, load_model, tensorrt_problem


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FEATX_CACHE_DIR", str(tmp_path / "featx-cache"))
    return tmp_path / "featx-cache"


def test_auto_engine_is_measured_once_then_cached(lite0_onnx, cache_dir):
    first = calibrate(lite0_onnx, device="cpu", batch_size=8)
    assert not first.from_cache
    timed = {c.engine: c for c in first.candidates}
    assert set(timed) == {"onnx", "torch"}
    for c in timed.values():  # both ran on real photos, agree with fp32 torch, and were timed
        assert c.problem is None and c.images_per_second > 0 and c.cosine >= MIN_COSINE
    assert first.chosen == max(timed.values(), key=lambda c: c.images_per_second).engine
    assert (cache_dir / "calibration.json").is_file()

    again = calibrate(lite0_onnx, device="cpu", batch_size=8)
    assert again.from_cache and again.chosen == first.chosen
    assert again.candidates == first.candidates
    assert not calibrate(lite0_onnx, device="cpu", batch_size=8, force=True).from_cache
    assert "<- chosen" in again.text()


def test_an_engine_under_half_the_fastest_is_timed_on_two_batches_only():
    """What shortens a first run's calibration (torch on a CPU: 2 batches, not 6; 29 s -> 14 s at batch 64)."""
    import time

    from featx.bench import time_throughput

    calls = []

    def batch_of_8():  # at most 400 images/s
        calls.append(1)
        time.sleep(0.02)

    rate, _ = time_throughput(batch_of_8, 8, repeats=3, min_seconds=0.05, warmups=0, give_up_below=1000)
    assert len(calls) == 2 and rate < 400
    calls.clear()  # a contender within a factor of two is timed in full
    time_throughput(batch_of_8, 8, repeats=3, min_seconds=0.05, warmups=0, give_up_below=10)
    assert len(calls) >= 2 + 3


def test_auto_loads_the_cached_choice(lite0_onnx, cache_dir):
    calibration = calibrate(lite0_onnx, device="cpu", batch_size=4)
    assert isinstance(load_model(lite0_onnx, device="cpu", engine="auto", batch_size=4),
                      OnnxEngine if calibration.chosen == "onnx" else TorchEngine)
    # another machine, or another run, could have measured torch faster: auto follows the cache
    path = cache_dir / "calibration.json"
    entries = json.loads(path.read_text())
    for entry in entries.values():
        entry["chosen"] = "torch" if calibration.chosen == "onnx" else "onnx"
    path.write_text(json.dumps(entries))
    engine = load_model(lite0_onnx, device="cpu", engine="auto", batch_size=4)
    assert engine.name == ("torch" if calibration.chosen == "onnx" else "onnx")
    assert engine.calibration.from_cache


def test_a_file_that_pads_per_call_is_ranked_apart_from_todays_export(lite0_onnx, lite0_backbone,
                                                                      cache_dir, tmp_path):
    """Same weights, same fingerprint, but onnxruntime runs an earlier featx's per-call-padding export
    at 0.6x: the cached ranking of today's file must not be taken for it."""
    from featx.export import export_onnx

    per_call = tmp_path / "lite0-per-call.onnx"
    export_onnx(lite0_backbone, per_call, fixed_padding=False)
    assert featx.read_model_info(per_call).pads_per_call and not featx.read_model_info(lite0_onnx).pads_per_call
    assert featx.read_model_info(per_call).fingerprint == featx.read_model_info(lite0_onnx).fingerprint
    calibrate(lite0_onnx, device="cpu", batch_size=4)
    assert not calibrate(per_call, device="cpu", batch_size=4).from_cache
    assert calibrate(per_call, device="cpu", batch_size=4).from_cache
    assert calibrate(lite0_onnx, device="cpu", batch_size=4).from_cache
    assert len(json.loads((cache_dir / "calibration.json").read_text())) == 2


def test_unreadable_calibration_cache_is_measured_again(lite0_onnx, cache_dir):
    cache_dir.mkdir(parents=True)
    (cache_dir / "calibration.json").write_text("{not json")
    calibration = calibrate(lite0_onnx, device="cpu", batch_size=4)
    assert not calibration.from_cache
    assert json.loads((cache_dir / "calibration.json").read_text())  # rewritten, valid


def test_auto_refuses_an_engine_whose_embeddings_are_off(lite0_onnx, cache_dir, tmp_path):
    """An int8-quantized file is fast but its embeddings drift (cosine ~0.8): auto must take torch."""
    from featx.bench import quantize_int8

    int8 = quantize_int8(lite0_onnx, tmp_path / "lite0-int8.onnx")
    calibration = calibrate(int8, device="cpu", batch_size=4)
    onnx = next(c for c in calibration.candidates if c.engine == "onnx")
    assert onnx.cosine < MIN_COSINE and onnx.problem.startswith("refused")
    assert calibration.chosen == "torch"


def test_every_public_name_is_the_api_object_even_after_its_module_was_imported():
    """featx's names load lazily; importing a submodule binds it on the package, so a module named
    like a function (featx.calibrate, once embed_folder had imported it) made the function a module."""
    code = textwrap.dedent("""
        import importlib, pkgutil, types
        import featx
        for m in pkgutil.iter_modules(featx.__path__):
            if m.name != "__main__":
                importlib.import_module("featx." + m.name)
        bad = [n for n in featx.__all__ if isinstance(getattr(featx, n), types.ModuleType)]
        print(bad)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert callable(featx.calibrate)


def test_calibration_cache_lives_where_featx_cache_dir_says(cache_dir):
    assert featx_cache_dir() == cache_dir


@pytest.mark.skipif(tensorrt_problem() is None, reason="TensorRT is installed here")
def test_tensorrt_engine_without_tensorrt_is_one_clear_error(lite0_onnx):
    with pytest.raises(ModelFileError, match="--engine tensorrt: .*(TensorRT|GPU)"):
        load_model(lite0_onnx, engine="tensorrt")


@pytest.mark.gpu
@pytest.mark.skipif(tensorrt_problem() is not None, reason=f"TensorRT provider unavailable: {tensorrt_problem()}")
def test_tensorrt_engine_matches_fp32(lite0_onnx, tmp_path):
    from featx.export import cosine_agreement
    from featx.export import check_images

    engine = OnnxEngine(lite0_onnx, device="cuda", tensorrt=True, cache_dir=tmp_path)
    photos = check_images(engine.info.preprocess)
    reference = OnnxEngine(lite0_onnx, device="cpu").encode(photos).embedding
    assert cosine_agreement(engine.encode(photos).embedding, reference) >= MIN_COSINE


def _same_cache(a, b) -> None:
    x, y = featx.load_embeddings(a), featx.load_embeddings(b)
    assert list(x.keys) == list(y.keys)
    np.testing.assert_array_equal(x.labels, y.labels)
    np.testing.assert_allclose(x.embeddings, y.embeddings, atol=1e-5)
    assert sorted(x.failures) == sorted(y.failures)


@pytest.mark.slow
def test_several_engines_fill_one_store_like_one(small_digits, tmp_path, lite0_onnx):
    """Two engines (here two CPU sessions; on a server one per GPU) share the folder and the store:
    the cache equals a single engine's, in walk order, failures included; a re-run adds nothing."""
    (small_digits / "3" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    one = featx.embed_folder(small_digits, tmp_path / "one.h5", model=lite0_onnx, engine="onnx", batch_size=8,
                             workers=1)
    two = featx.embed_folder(small_digits, tmp_path / "two.h5", model=lite0_onnx, engine="onnx", batch_size=8,
                             workers=1, devices=["cpu", "cpu"])
    assert (two.n_embedded, two.n_failed) == (one.n_embedded, one.n_failed) == (60, 1)
    assert two.engine == "onnx (cpu), onnx (cpu)"
    _same_cache(tmp_path / "one.h5", tmp_path / "two.h5")
    again = featx.embed_folder(small_digits, tmp_path / "two.h5", model=lite0_onnx, engine="onnx", workers=1,
                               devices=["cpu", "cpu"])
    assert (again.n_embedded, again.n_cached, again.n_failed_before) == (0, 60, 1)
    # the walk (its own thread, reading the store for moved files) runs while both engines append:
    # a renamed file, copies of a file in this run, and new files give the cache one engine gives
    from featx.samples import write_digits_folder

    ones = sorted((small_digits / "1").iterdir())
    ones[0].rename(small_digits / "1" / "renamed.png")
    more = sorted(write_digits_folder(tmp_path / "more", size=40, limit=24).rglob("*.png"))  # new bytes
    for n in range(3):
        (small_digits / "5" / f"copy{n}.png").write_bytes(more[0].read_bytes())
    for path in more:
        path.rename(small_digits / path.parent.name / f"more-{path.name}")
    runs = [featx.embed_folder(small_digits, tmp_path / name, model=lite0_onnx, engine="onnx", batch_size=4,
                               workers=1, devices=devices) for name, devices in (("one.h5", None),
                                                                                 ("two.h5", ["cpu", "cpu"]))]
    assert [(r.n_embedded, r.n_moved, r.n_duplicates, r.n_cached) for r in runs] == [(24, 1, 3, 59)] * 2
    _same_cache(tmp_path / "one.h5", tmp_path / "two.h5")


def test_compiled_torch_engine_embeds_a_folder_as_onnxruntime_does(small_digits, tmp_path, lite0_onnx):
    """`featx embed --engine torch --compile` (torch.compile, inductor freezing, the last batch padded to
    the compiled shape and the padding dropped) runs here on the CPU, the same code the GPU runs with
    fp16: its cache has onnxruntime's keys in order and its embeddings (cosine >= 0.999), none made of
    padding. CI has no GPU, so this is where that path is checked every time."""
    import shutil

    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("torch.compile on the CPU builds C++: no compiler here")
    onnx = featx.embed_folder(small_digits, tmp_path / "onnx.h5", model=lite0_onnx, engine="onnx", batch_size=16,
                              workers=0)
    r = subprocess.run([sys.executable, "-m", "featx", "-q", "embed", str(small_digits), "-o", str(tmp_path / "torch.h5"),
                        "--model", str(lite0_onnx), "--engine", "torch", "--compile", "--batch-size", "16",
                        "--device", "cpu"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "60 embedded" in r.stdout and "torch compiled (cpu)" in r.stdout, r.stdout + r.stderr
    a, b = featx.load_embeddings(tmp_path / "onnx.h5"), featx.load_embeddings(tmp_path / "torch.h5")
    assert onnx.n_embedded == 60 and a.keys == b.keys and len(b.embeddings) == 60  # 16, 16, 16 and 12 padded to 16
    cosine = (a.embeddings * b.embeddings).sum(1) / np.linalg.norm(a.embeddings, axis=1) / np.linalg.norm(
        b.embeddings, axis=1)
    assert cosine.min() >= 0.999, cosine.min()


def test_auto_batch_size_on_cpu_is_the_cpu_default_with_room(lite0_onnx):
    """auto on the CPU is the default, 8 (larger batches measured slower: benchmarks/batch_sizes.py)."""
    from featx.runtime import _free_host_memory, auto_batch_size, default_batch_size

    assert _free_host_memory() > 2 * 2**30  # this test's premise: a machine with a few GiB free
    assert auto_batch_size(OnnxEngine(lite0_onnx, device="cpu")) == default_batch_size("cpu") == 8


def test_auto_batch_size_on_cpu_where_the_os_has_no_free_page_count(lite0_onnx, monkeypatch):
    """macOS has no SC_AVPHYS_PAGES: os.sysconf raises ValueError there, which ended `--batch-size auto`
    with a traceback; the CPU default is taken (the out-of-memory back-off still guards it)."""
    import os

    from featx.runtime import auto_batch_size

    def sysconf_without_avphys(name):
        if name == "SC_AVPHYS_PAGES":
            raise ValueError("unrecognized configuration name")
        return real(name)

    real = os.sysconf
    monkeypatch.setattr(os, "sysconf", sysconf_without_avphys)
    assert auto_batch_size(OnnxEngine(lite0_onnx, device="cpu")) == 8


@pytest.mark.slow
def test_cli_calibrate_devices_and_auto_batch(small_digits, tmp_path, lite0_onnx, cache_dir, capsys):
    from featx.cli import main

    assert main(["calibrate", "--model", str(lite0_onnx), "--device", "cpu", "--batch-size", "4"]) == 0
    said = capsys.readouterr().out
    assert "<- chosen" in said and "onnx" in said and "torch" in said
    assert (cache_dir / "calibration.json").is_file()

    out = tmp_path / "cli.h5"
    assert main(["-q", "embed", str(small_digits), "-o", str(out), "--model", str(lite0_onnx), "--devices", "cpu,cpu",
                 "--batch-size", "auto", "--workers", "0", "--engine", "onnx"]) == 0
    said = capsys.readouterr().out
    assert "60 embedded" in said and "onnx (cpu), onnx (cpu), batch 8]" in said  # auto on the CPU: 8
    assert len(featx.load_embeddings(out).keys) == 60

    with pytest.raises(SystemExit) as exit_:
        main(["embed", str(small_digits), "-o", str(out), "--device", "gpu0"])
    assert exit_.value.code == 2 and "device must be auto, cpu, cuda or cuda:N" in capsys.readouterr().err


_OOM_CHILD = textwrap.dedent("""
    import json, resource, sys
    import h5py, onnxruntime, PIL.Image  # mapped before the cap: libraries count as address space
    import featx, featx.pipeline, featx.store

    # address space = what is mapped now + a budget: a batch of 128 Lite0 images needs well over it
    mapped = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (mapped + int(sys.argv[4]) * 2**20, resource.RLIM_INFINITY))
    stats = featx.embed_folder(sys.argv[1], sys.argv[2], model=sys.argv[3], engine="onnx", batch_size=128,
                               workers=0, devices=["cpu"])
    print(json.dumps({"embedded": stats.n_embedded, "failed": stats.n_failed, "backoffs": stats.backoffs}))
""")


@pytest.mark.slow
def test_out_of_memory_backs_off_and_loses_no_image(digits_dir, tmp_path, lite0_onnx):
    """A real allocation failure (the process's address space capped), not a simulated one: the
    batch is halved until it fits and the same images are retried, none lost or stored twice."""
    import shutil

    folder = tmp_path / "digits"
    for cls in ("0", "1"):
        shutil.copytree(digits_dir / cls, folder / cls)
    n = sum(1 for _ in folder.rglob("*.png"))
    result = subprocess.run([sys.executable, "-c", _OOM_CHILD, str(folder), str(tmp_path / "oom.h5"),
                             str(lite0_onnx), "600"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["backoffs"] and report["backoffs"][-1] < 128
    assert (report["embedded"], report["failed"]) == (n, 0)
    assert "out of memory on cpu" in result.stderr and "batch size lowered to" in result.stderr
    featx.embed_folder(folder, tmp_path / "free.h5", model=lite0_onnx, engine="onnx", batch_size=32, workers=0)
    _same_cache(tmp_path / "oom.h5", tmp_path / "free.h5")


@pytest.mark.gpu
def test_auto_batch_size_on_cuda_fits_and_runs(lite0_onnx):
    from featx.runtime import auto_batch_size

    engine = TorchEngine(featx.read_model_info(lite0_onnx), device="cuda")
    size = auto_batch_size(engine)
    assert size >= 64 and size & (size - 1) == 0  # a power of two, large on a data-centre GPU
    h, w = engine.info.preprocess.input_size
    assert engine.encode(np.zeros((size, h, w, 3), dtype=np.uint8)).embedding.shape == (size, engine.info.embed_dim)
