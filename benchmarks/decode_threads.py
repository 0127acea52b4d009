"""How many decode threads to run beside onnxruntime on the CPU, for small JPEGs and for camera photos, in one run.

    python benchmarks/decode_threads.py [--n-small 1000] [--n-camera 60] [--repeats 2] [--out benchmarks/results/cpu]

Two folders: ``--n-small`` 500x375 JPEGs (the model sets the pace) and ``--n-camera`` 4032x3024
camera-sized JPEGs (``featx.samples.camera_sized_photo``; decode sets the pace even at reduced scale).
On each, at every thread count from 1 to the number of cores (``featx.pipeline.default_workers`` is the
default):

- ``featx embed`` end to end (``embed_folder``, images/s after the model is loaded);
- the path of ``classify``, ``predict`` on files, ``similar`` and ``advise`` (``encode_files``): batches
  decoded ahead in the threads, against decoding each batch in the engine's thread between its calls
  (what these commands did before; onnxruntime's threads spinning, its fastest alone).

Runs alternate between settings for ``--repeats`` rounds, so a slow moment of the machine does not land
on one of them; each figure is the median of its rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n-small", type=int, default=1000)
    parser.add_argument("--n-camera", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/cpu")
    args = parser.parse_args()

    import featx
    from featx.bench import bench_workspace, machine_description, write_record
    from featx.pipeline import default_workers, encode_files
    from featx.samples import camera_sized_photo

    tmp, model_file, small = bench_workspace("featx-decode-threads-", args.n_small)
    camera = tmp / "camera"
    for i in range(args.n_camera):
        path = camera / f"c{i % 3}" / f"photo_{i:03d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        camera_sized_photo((4032, 3024), seed=i).save(path, quality=92)
    cores = os.cpu_count() or 1
    record = {"machine": machine_description(), "model": model_file.stem, "n_small_500x375": args.n_small,
              "n_camera_4032x3024": args.n_camera, "cores": cores, "default_workers": default_workers()}

    # (name, run) -> images/s; each run starts with the model loaded, as embed's steady rate does
    def embed(folder: Path, workers: int, out: Path) -> float:
        stats = featx.embed_folder(folder, out, model=model_file, workers=workers, device="cpu", engine="onnx")
        return stats.steady_images_per_second

    def encode(folder: Path, workers: int) -> float:
        engine = featx.load_model(model_file, device="cpu", engine="onnx", spin=workers == 0)
        paths = [str(p) for p in sorted(folder.rglob("*.jpg"))]
        t0 = time.perf_counter()
        n = sum(1 for _, _, _, error, _ in encode_files(engine, paths, workers=workers) if error is None)
        return n / (time.perf_counter() - t0)

    runs = {}
    for folder_name, folder in (("small", small), ("camera", camera)):
        for workers in range(1, cores + 1):
            runs[f"{folder_name}_embed_{workers}_threads_per_s"] = (embed, folder, workers)
        runs[f"{folder_name}_classify_path_in_engine_thread_per_s"] = (encode, folder, 0)
        for workers in range(1, cores + 1):
            runs[f"{folder_name}_classify_path_{workers}_threads_per_s"] = (encode, folder, workers)
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(args.repeats):
        for name, (fn, folder, workers) in runs.items():
            extra = (tmp / f"{name}-{r}.h5",) if fn is embed else ()
            rates[name].append(fn(folder, workers, *extra))
    record.update({name: statistics.median(values) for name, values in rates.items()})
    write_record(record, args.out, "decode_threads-cpu", plot_rates=True)


if __name__ == "__main__":
    main()
