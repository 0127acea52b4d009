"""The benchmark harness on a tiny model: it runs and records what a reader needs (not the speed)."""

import json
import runpy
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

import featx


def run_benchmark(script: str, out: Path, *args: str, record: str, models: Path | None = None) -> dict:
    """Run ``benchmarks/<script>`` with ``args`` and ``--out out`` as ``python script ...`` runs it (its
    ``__main__``, its own namespace, its folder first on the path), in this process: a fresh interpreter
    would import torch, timm and onnxruntime again, 4-7 s a script. Its JSON ``record`` from ``out``. What
    the script removes at its exit is removed when it returns, and nothing is left in the temporary folder.
    ``models``: the models folder it takes its export from (FEATX_MODELS: the session's Lite0, not
    exported again)."""
    import types

    import featx.bench

    path = Path(__file__).parents[1] / "benchmarks" / script
    scratch = out / "tmp"
    scratch.mkdir(parents=True)
    at_exit = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", [str(path), *args, "--out", str(out)])
        patch.syspath_prepend(str(path.parent))
        patch.setattr(tempfile, "tempdir", str(scratch))
        patch.setenv("TMPDIR", str(scratch))  # for the processes a script starts
        if models:
            patch.setenv("FEATX_MODELS", str(models))
        # featx.bench.scratch_folder's removal at exit, which is the end of the script here
        patch.setattr(featx.bench, "atexit", types.SimpleNamespace(register=lambda *call, **kw: at_exit.append(
            (call, kw))))
        try:
            runpy.run_path(str(path), run_name="__main__")
        finally:
            for (function, *call), kw in reversed(at_exit):
                function(*call, **kw)
    assert not left_in(scratch), f"{script} left {left_in(scratch)}"
    return json.loads((out / record).read_text())


def left_in(scratch: Path) -> list[str]:
    """What is left in a temporary folder, but what other libraries keep there on purpose, one each: torch's
    compile cache (torchinductor_USER) and the session-id file that importing onnxruntime 1.31 writes (.ses)."""
    return sorted(p.name for p in scratch.iterdir() if not p.name.startswith("torchinductor_") and p.name != ".ses")


def test_bench_writes_json_and_png_with_the_comparisons(tmp_path, monkeypatch):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    result = featx.bench_models(model="test_efficientnet", weights="none", device="cpu", batch_sizes=[1, 8, 16],
                                n_images=12, repeats=2, workers=1, out_dir=tmp_path / "out",
                                models_dir=tmp_path / "models")
    record = json.loads((tmp_path / "out" / "test_efficientnet-cpu.json").read_text())
    assert {"cpu", "cores", "torch", "onnxruntime", "featx"} <= set(record["machine"])
    names = {(t["name"], t["kind"], t["batch_size"]) for t in record["timings"]}
    assert ("featx onnxruntime fp32 (cpu)", "model", 16) in names and ("torch eager fp32", "model", 1) in names
    assert {t["kind"] for t in record["timings"]} == {"model", "end-to-end"}
    assert all(t["images_per_second"] > 0 for t in record["timings"])
    assert any(k.startswith("best featx") for k in record["ratios"])
    assert "end-to-end featx embed / plain PyTorch pipeline" in record["ratios"]
    # end to end at the batch size embed runs on the CPU (8), not the largest timed: what users get
    e2e_sizes = {t["batch_size"] for t in record["timings"] if t["kind"] == "end-to-end"}
    assert e2e_sizes == {8}
    assert "end-to-end featx embed / featx model-only (same batch)" in record["ratios"]
    assert (tmp_path / "out" / "test_efficientnet-cpu.png").stat().st_size > 10_000
    # the generated JPEGs and the end-to-end caches are gone: runs do not fill the temporary folder
    assert not left_in(scratch)
    table = result.table()
    assert "ratio" in table
    # a model row shows the spread of its repetitions; an end-to-end row is one whole run, shown as "-"
    rows = {line.split("  ")[0].strip(): line for line in table.splitlines()}
    assert "-" in rows["torch eager fp32"].split()[-1] and rows["torch eager fp32"].split()[-1] != "-"
    e2e = [line for line in table.splitlines() if " end-to-end " in line and not line.startswith("ratio")]
    assert e2e and all(line.split("  (")[0].split()[-1] == "-" for line in e2e)


# the script times torchvision's JPEG decoder beside torchcodec's on purpose
@pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning")
def test_decode_stages_script_records_every_stage_on_the_cpu(tmp_path, lite0_onnx):
    """The script a GPU session runs first (benchmarks/README.md) must not break unseen: on the CPU it
    times the same stages (both JPEG libraries, the decode stage with and without CPU workers) and
    writes the JSON and the PNG."""
    record = run_benchmark("decode_stages.py", tmp_path, "--device", "cpu", "--n-jpegs", "32", "--batch-size", "16",
                           record="decode_stages-cpu.json", models=lite0_onnx.parent)
    rates = {k: v for k, v in record.items() if k.endswith("_per_s")}
    assert {"torchcodec_decode_jpeg_batch16_per_s", "torchvision_decode_jpeg_batch16_per_s", "resize_crop_per_s",
            "cpu_pil_1_workers_per_s", "cpu_pil_1_threads_per_s", "decode_stage_0_cpu_workers_per_s",
            "decode_stage_1_cpu_workers_per_s"} <= set(rates)
    assert all(v > 0 for v in rates.values())
    assert record["header_check_marker_scan_us_per_image"] > 0 and record["jpeg_libraries"][0] == "torchcodec"
    assert (tmp_path / "decode_stages-cpu.png").stat().st_size > 10_000


def test_preprocess_script_records_both_resizes_and_how_far_apart_they_are(tmp_path, lite0_onnx):
    """The figures behind data.preprocess_image's crop-region resize: the script must keep running."""
    record = run_benchmark("preprocess.py", tmp_path, "--n-jpegs", "8", record="preprocess-cpu.json",
                           models=lite0_onnx.parent)
    for name in ("efficientnet_lite0", "resnet50"):
        assert record[f"{name}_featx_resize_crop_per_s"] > 0 and record[f"{name}_torchvision_resize_crop_per_s"] > 0
        assert record[f"{name}_most_levels_apart"] <= 4 and record[f"{name}_share_of_pixels_apart"] < 0.05
    assert record["efficientnet_lite0_embedding_cosine_min"] > 0.999
    assert (tmp_path / "preprocess-cpu.png").stat().st_size > 10_000


def test_batch_sizes_script_records_rates_and_memory_at_each_size(tmp_path, lite0_onnx):
    """Where the CPU's default batch size comes from: the script must keep running (tiny sizes here)."""
    record = run_benchmark("batch_sizes.py", tmp_path, "--sizes", "2,4", "--n-jpegs", "8", "--repeats", "1",
                           record="batch_sizes-efficientnet_lite0.json", models=lite0_onnx.parent)
    assert record["default_batch_size_cpu"] == featx.default_batch_size("cpu")
    for bs in (2, 4):
        assert record[f"model_only_batch{bs}_per_s"] > 0 and record[f"featx_embed_batch{bs}_per_s"] > 0
        # the embed process alone (about 200 MB here), not its parent's 2.5 GB peak that a fork carries over
        assert 50 < record[f"featx_embed_batch{bs}_peak_rss_mb"] < 1500
    assert (tmp_path / "batch_sizes-efficientnet_lite0.png").stat().st_size > 10_000


def test_similar_search_script_finds_what_plain_numpy_finds(tmp_path, lite0_onnx):
    """The figures behind the search's partial sort: the script must keep running, and featx's top k must
    be plain numpy's full sort's."""
    record = run_benchmark("similar_search.py", tmp_path, "--rows", "3000", "--queries", "40", "--digits", "200",
                           record="similar_search-3000.json", models=lite0_onnx.parent)
    assert record["same_top_k"] == 1.0 and record["featx_seconds"] > 0 and record["plain_numpy_seconds"] > 0


def test_look_alikes_script_groups_as_plain_numpy_does(tmp_path, lite0_onnx):
    """The figures behind the default look-alike cosine and the cost of --groups: featx's groups must be
    plain numpy's, and an edited photo closer to its photo than distinct photos come."""
    record = run_benchmark("look_alikes.py", tmp_path, "--rows", "300", "--digits", "30",
                           record="look_alikes-300.json", models=lite0_onnx.parent)
    assert record["grouping"]["same_groups"] and record["grouping"]["groups"] > 0
    assert record["edit_cosines"]["mirrored"]["min"] > record["distinct_photos_max_cosine"]


def test_int8_static_script_sets_each_calibration_beside_fp32(tmp_path, lite0_onnx):
    """The figures behind featx having no int8 export: the script must keep running (small sizes here)."""
    record = run_benchmark("int8_static.py", tmp_path, "--methods", "MinMax", "--n-calibration", "8",
                           "--n-digits", "150", "--repeats", "1", record="int8_static-cpu.json",
                           models=lite0_onnx.parent)
    assert record["calibration_images"] == 16 and record["head_test_digits"] == 50
    assert record["fp32_per_s"] > 0 and record["int8_MinMax_per_s"] > 0
    # ten classes: a head on either file's embeddings is far better than chance, and int8 is not fp32
    assert record["fp32_digits_head_accuracy"] > 0.5 and record["int8_MinMax_digits_head_accuracy"] > 0.3
    assert -1 <= record["int8_MinMax_cosine_to_fp32_min"] <= record["int8_MinMax_cosine_to_fp32_mean"] < 0.999


def test_same_padding_script_times_both_exports_beside_torch(tmp_path):
    """The figures behind export's fixed 'SAME' padding: the script must keep running (short passes here)."""
    record = run_benchmark("same_padding.py", tmp_path, "--batch-sizes", "2", "--repeats", "1", "--seconds", "0.2",
                           record="same_padding-efficientnet_lite0.json")
    assert record["largest_embedding_difference"] <= 1e-5 * record["embedding_scale"]
    assert record["nodes_padding_fixed"] < record["nodes_padding_per_call"]
    for name in ("padding_fixed", "padding_per_call", "torch_eager_fp32"):
        assert record[f"{name}_batch2_per_s"] > 0
    assert (tmp_path / "same_padding-efficientnet_lite0.png").stat().st_size > 10_000


def test_a_benchmark_of_a_timm_slash_name_writes_one_file(tmp_path, capsys):
    """`--model timm/pnasnet5large`: the record is one file in --out, not a missing timm/ folder."""
    from featx.bench import write_record

    path = write_record({"model": "timm/pnasnet5large", "x_per_s": 1.0}, tmp_path, "same_padding-timm/pnasnet5large",
                        plot_rates=True)
    assert path == tmp_path / "same_padding-timm_pnasnet5large.json" and json.loads(path.read_text())["x_per_s"] == 1.0
    assert (tmp_path / "same_padding-timm_pnasnet5large.png").is_file()


def test_bench_of_an_exported_file_times_its_weights_and_names_results_by_its_stem(lite0_onnx, tmp_path, caplog):
    """`featx bench --model models/x.onnx` said "unknown backbone" (the torch side loaded the path as a
    name); it times the file against torch on the weights it was made from, and its results are x-cpu.*,
    not a file named after the whole path. --half, which exports a name at fp16, does not relabel an fp32
    file as fp16: it is said and the file is timed as what it is."""
    result = featx.bench_models(model=str(lite0_onnx), device="cpu", batch_sizes=[1], repeats=1, end_to_end=False,
                                out_dir=tmp_path, half=True)
    assert f"{lite0_onnx} is fp32 and is timed as it is" in caplog.text
    assert result.model == "efficientnet_lite0"
    assert {t.name for t in result.timings} >= {"torch eager fp32", "featx onnxruntime fp32 (cpu)"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["efficientnet_lite0-cpu.json", "efficientnet_lite0-cpu.png"]


def test_bench_times_a_users_flat_photo_folder_end_to_end_on_the_files_embed_reads(photos_dir, tmp_path):
    """`featx bench --images photos/` on a folder without class subfolders ran the model timings and
    featx embed, then ended in a traceback from torchvision's ImageFolder ("Couldn't find any class
    folder"), and counted only *.jpg (2 of the 6 photos). Both sides now read the files embed reads, a
    damaged one left out of both; a folder that cannot serve, or --n-images beside --images (which
    would be left unused), is refused before minutes of model timings."""
    folder = tmp_path / "photos"
    shutil.copytree(photos_dir, folder)
    (folder / "cut-short.jpg").write_bytes((folder / "china.jpg").read_bytes()[:300])
    result = featx.bench_models(model="test_efficientnet", weights="none", device="cpu", batch_sizes=[8],
                                images=folder, repeats=1, workers=1, out_dir=tmp_path / "out",
                                models_dir=tmp_path / "models")
    e2e = {t.name.split(" (")[0]: t for t in result.timings if t.kind == "end-to-end"}
    assert set(e2e) == {"featx embed", "plain PyTorch DataLoader fp32"}
    # the rate of the 6 photos both sides read; featx's time includes trying the damaged file
    assert e2e["featx embed"].note.startswith("6 images (1 of the 7 files cannot be read: tried, not counted)")
    assert e2e["plain PyTorch DataLoader fp32"].note.startswith("6 images")
    assert "end-to-end featx embed / plain PyTorch pipeline" in result.ratios
    # the table's columns line up under their heads, the longest (end-to-end) names included
    lines = result.table().splitlines()
    kind_at = lines[1].index("kind")
    assert all(line[kind_at:].split()[0] in ("model", "end-to-end") for line in lines[2:2 + len(result.timings)])

    broken = tmp_path / "broken"  # images by name and first bytes, but none that decodes: said, not divided by 0
    broken.mkdir()
    (broken / "cut-short.jpg").write_bytes((folder / "cut-short.jpg").read_bytes())
    with pytest.raises(featx.FeatxError, match="none of the 1 image files under .*broken could be read, nothing to "
                                               "time end to end .e.g. cut-short.jpg: "):
        featx.bench_models(model="test_efficientnet", weights="none", device="cpu", batch_sizes=[8], images=broken,
                           repeats=1, workers=0, out_dir=tmp_path / "out", models_dir=tmp_path / "models")
    empty = tmp_path / "empty"
    empty.mkdir()
    for images, n_images, said in [(empty, None, "holds no image files"), (tmp_path / "typo", None, "does not exist"),
                                   (folder, 100, "--n-images sizes the folder bench generates")]:
        with pytest.raises(featx.FeatxError, match=said):
            featx.bench_models(model="test_efficientnet", weights="none", device="cpu", images=images,
                               n_images=n_images, out_dir=tmp_path / "out", models_dir=tmp_path / "models")


def test_weights_digest_script_times_the_check_of_a_real_model(tmp_path, lite0_onnx):
    """The figures behind the README's cost of the weights digest: the script must keep running."""
    record = run_benchmark("weights_digest.py", tmp_path, "--model", str(lite0_onnx), "--repeats", "1",
                           record="weights_digest-efficientnet_lite0.json")
    assert record["model"] == "efficientnet_lite0" and 15 < record["weights_mb"] < 25  # Lite0's 4.7 M floats
    assert all(record[key] > 0 for key in ("parse_s", "digest_s", "read_model_info_first_s", "onnx_engine_first_s",
                                           "read_model_info_later_s", "onnx_engine_later_s"))
