"""The benchmark harness on a tiny model: it runs and records what a reader needs (not the speed)."""

import json

import featx


def test_bench_writes_json_and_png_with_the_comparisons(tmp_path):
    result = featx.bench_models(model="test_efficientnet", weights="none", device="cpu", batch_sizes=[1, 4],
                                n_images=12, repeats=2, workers=1, out_dir=tmp_path / "out",
                                models_dir=tmp_path / "models")
    record = json.loads((tmp_path / "out" / "test_efficientnet-cpu.json").read_text())
    assert {"cpu", "cores", "torch", "onnxruntime", "featx"} <= set(record["machine"])
    names = {(t["name"], t["kind"], t["batch_size"]) for t in record["timings"]}
    assert ("featx onnxruntime fp32 (cpu)", "model", 4) in names and ("torch eager fp32", "model", 1) in names
    assert {t["kind"] for t in record["timings"]} == {"model", "end-to-end"}
    assert all(t["images_per_second"] > 0 for t in record["timings"])
    assert any(k.startswith("best featx") for k in record["ratios"])
    assert "end-to-end featx embed / plain PyTorch pipeline" in record["ratios"]
    assert (tmp_path / "out" / "test_efficientnet-cpu.png").stat().st_size > 10_000
    assert "ratio" in result.table()
