"""Issue 8's figure: the ray engine's images/s on this machine next to the single-machine path's,
same folder, model and batch size, in one run.

    python benchmarks/ray_vs_single.py [--n-jpegs 600] [--out benchmarks/results]

On one 2-core machine Ray can only add overhead (scheduling, the object store, shard files); the
figure says how much. Its point is many machines, which this machine cannot show.
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n-jpegs", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()

    import ray

    import featx
    from featx.bench import bench_workspace, machine_description, write_record

    tmp, model_file, root = bench_workspace("featx-ray-bench-", args.n_jpegs)
    results = {"machine": machine_description(), "n_jpegs": args.n_jpegs, "batch_size": args.batch_size}
    single = featx.embed_folder(root, tmp / "single.h5", model=model_file, batch_size=args.batch_size, device="cpu",
                                engine="onnx")  # what the ray actors run; auto would time a first calibration too
    results["single_machine_images_per_s"] = single.n_embedded / single.seconds
    t0 = time.perf_counter()
    ray.init(num_cpus=2, log_to_driver=False, include_dashboard=False)
    results["ray_init_seconds"] = time.perf_counter() - t0
    on_ray = featx.embed_folder(root, tmp / "ray.h5", model=model_file, batch_size=args.batch_size, engine="ray",
                                workers=1)
    results["ray_images_per_s"] = on_ray.n_embedded / on_ray.seconds
    results["ray_over_single"] = results["ray_images_per_s"] / results["single_machine_images_per_s"]
    ray.shutdown()
    write_record(results, args.out, "ray_vs_single-cpu")


if __name__ == "__main__":
    main()
