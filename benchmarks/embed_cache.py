"""Issue 3's figures, in one run on this machine:

1. end-to-end `embed_folder` images/s on realistic JPEGs (500x375, quality 90) next to the model-only
   images/s of the same model file, batch size and thread count;
2. files/s of a re-run on the finished folder (walk, stat, skip: nothing decoded); of a re-run on a copy
   of it with new mtimes (every file hashed and found unchanged: nothing decoded); of a re-run after every
   file was renamed (each new name hashed and given its stored row); of a first run on a folder that holds
   every photo twice (two albums: each content embedded once); next to embedding them again;
3. peak memory of `featx embed` on 1,000 and on 50,000 small files (a tiny timm model, so the
   run is about the bookkeeping, not the network).

    python benchmarks/embed_cache.py [--n-jpegs 2000] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def model_only(model_file: Path, batch_size: int, *, spin: bool) -> float:
    from featx.bench import time_throughput
    from featx.runtime import OnnxEngine

    engine = OnnxEngine(model_file, device="cpu", spin=spin)
    h, w = engine.info.preprocess.input_size
    batch = np.random.default_rng(0).integers(0, 256, (batch_size, h, w, 3), dtype=np.uint8)
    rate, _ = time_throughput(lambda: engine.encode(batch), batch_size, repeats=5, min_seconds=2.0)
    return rate


def peak_rss_mb(cmd: list[str]) -> tuple[float, str]:
    """Peak resident memory of a child process (MB), and its output."""
    code = (
        "import resource, subprocess, sys\n"
        "r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)\n"
        "print(r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr[-500:])\n"
    )
    out = subprocess.run([sys.executable, "-c", code, *cmd], capture_output=True, text=True).stdout.splitlines()
    return float(out[0]), out[1]


def small_files(root: Path, n: int) -> Path:
    """n tiny PNGs in 10 class folders: 10 real digit images, each file given 8 bytes of its own after
    the PNG's end (fast to make; every file distinct, as featx embeds identical files once)."""
    from featx.samples import write_digits_folder

    seeds = write_digits_folder(root.parent / f"seed-{n}", size=32, limit=10)
    sources = [p.read_bytes() for p in sorted(seeds.rglob("*.png"))]
    for i in range(n):
        dst = root / f"c{i % 10}" / f"{i:06d}.png"
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(sources[i % 10] + i.to_bytes(8, "little"))
    return root


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n-jpegs", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=None, help="default: embed's own on the CPU")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()

    import featx
    from featx.bench import bench_workspace, machine_description, write_record
    from featx.pipeline import default_workers
    from featx.runtime import default_batch_size

    args.batch_size = args.batch_size or default_batch_size("cpu")
    tmp, model_file, root = bench_workspace("featx-embed-bench-", args.n_jpegs)
    results: dict = {"machine": machine_description(), "model": model_file.stem, "batch_size": args.batch_size,
                     "n_jpegs": args.n_jpegs, "workers": default_workers()}

    # model-only twice: with onnxruntime's spinning threads (its fastest alone, as featx bench runs it)
    # and without (as embed_folder runs it beside decode workers)
    results["model_only_images_per_s"] = model_only(model_file, args.batch_size, spin=True)
    results["model_only_images_per_s_no_spin"] = model_only(model_file, args.batch_size, spin=False)
    stats = featx.embed_folder(root, tmp / "cache.h5", model=model_file, batch_size=args.batch_size, device="cpu")
    results["end_to_end_images_per_s"] = stats.steady_images_per_second
    results["end_to_end_over_best_model_only"] = stats.steady_images_per_second / results["model_only_images_per_s"]
    results["end_to_end_over_same_session_model_only"] = (
        stats.steady_images_per_second / results["model_only_images_per_s_no_spin"])
    rerun = featx.embed_folder(root, tmp / "cache.h5", model=model_file, device="cpu")
    results["rerun_files_per_s"] = rerun.n_cached / (rerun.seconds - rerun.load_seconds)
    copied = shutil.copytree(root, tmp / "copied", copy_function=shutil.copy)  # cp -r: new mtimes, same bytes
    again = featx.embed_folder(copied, tmp / "cache.h5", model=model_file, device="cpu", new_folder=True)
    assert again.n_cached == args.n_jpegs and again.n_embedded == 0, again.summary()
    results["copied_folder_rerun_files_per_s"] = again.n_cached / (again.seconds - again.load_seconds)
    # a photo manager's rename: new names, same bytes and mtimes (the copy's, which the cache now holds)
    for path in sorted(copied.rglob("*.jpg")):
        path.rename(path.with_name("renamed-" + path.name))
    renamed = featx.embed_folder(copied, tmp / "cache.h5", model=model_file, device="cpu")
    assert renamed.n_moved == args.n_jpegs and renamed.n_embedded == 0, renamed.summary()
    results["renamed_rerun_files_per_s"] = renamed.n_moved / (renamed.seconds - renamed.load_seconds)
    # the same photos in two albums, first run: each content embedded once, the second path given its row
    albums = tmp / "albums"
    shutil.copytree(root, albums / "a", copy_function=os.link)
    shutil.copytree(root, albums / "b", copy_function=shutil.copy)
    twice = featx.embed_folder(albums, tmp / "albums.h5", model=model_file, batch_size=args.batch_size, device="cpu")
    assert twice.n_embedded == twice.n_duplicates == args.n_jpegs, twice.summary()
    results["two_albums_first_run_files_per_s"] = 2 * args.n_jpegs / (twice.seconds - twice.load_seconds)
    for key in ("copied_folder_rerun_files_per_s", "renamed_rerun_files_per_s", "two_albums_first_run_files_per_s"):
        results[key.replace("_files_per_s", "_over_embedding_again")] = results[key] / results["end_to_end_images_per_s"]

    tiny = featx.ensure_model_file("test_efficientnet", weights="none", models_dir=tmp / "models")
    # --engine auto's one-time measurement (torch loaded beside onnxruntime) would otherwise land in the
    # first run's peak memory; measured here, both runs read its cached choice, as every later run does
    featx.calibrate(tiny, device="cpu", batch_size=256, spin=True)
    for n in (1_000, 50_000):
        folder = small_files(tmp / f"small-{n}", n)
        cmd = [sys.executable, "-m", "featx", "-q", "embed", str(folder), "-o", str(tmp / f"small-{n}.h5"),
               "--model", str(tiny), "--workers", "0", "--batch-size", "256", "--device", "cpu"]
        t0 = time.perf_counter()
        results[f"peak_rss_mb_{n}_files"], results[f"summary_{n}_files"] = peak_rss_mb(cmd)
        results[f"seconds_{n}_files"] = time.perf_counter() - t0
        if n == 50_000:
            again = featx.embed_folder(folder, tmp / f"small-{n}.h5", model=tiny, device="cpu")
            results["rerun_files_per_s_50000"] = again.n_cached / (again.seconds - again.load_seconds)
    results["peak_rss_growth_mb"] = results["peak_rss_mb_50000_files"] - results["peak_rss_mb_1000_files"]

    write_record(results, args.out, "embed_cache-cpu")


if __name__ == "__main__":
    main()
