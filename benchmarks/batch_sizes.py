"""Which batch size to run on the CPU: onnxruntime alone and `featx embed` end to end, at each size, in one run.

    python benchmarks/batch_sizes.py [--model efficientnet_lite0] [--weights none] [--sizes 4,8,16,32,64]
                                     [--n-jpegs 400] [--repeats 3] [--out benchmarks/results/cpu]

The default batch size on the CPU comes from here. Larger batches do not help a CPU the way they help
a GPU: the cores are kept busy inside each layer already, and past a few images the activations
outgrow the caches. The end-to-end runs alternate between sizes (``--repeats`` rounds), so a slow
moment of the machine does not land on one size; each figure is the median of its rounds. The peak
memory of a whole `featx embed` process at each size is taken from one more run per size. Timing does
not depend on the weights' values: ``--weights none`` times architectures whose weights are not here.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--weights", default=None, help="as featx embed's --weights (none: random, for timing)")
    parser.add_argument("--sizes", default="4,8,16,32,64")
    parser.add_argument("--n-jpegs", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/cpu")
    args = parser.parse_args()

    import featx
    from featx.bench import machine_description, scratch_folder, write_record
    from featx.samples import write_jpeg_folder

    sizes = [int(s) for s in args.sizes.split(",")]
    tmp = scratch_folder("featx-batch-sizes-")
    # the models folder of the user's choosing where set (the tests' session export), else one of its own
    model_file = featx.ensure_model_file(args.model, weights=args.weights,
                                         models_dir=os.environ.get("FEATX_MODELS") or tmp / "models")
    root = write_jpeg_folder(tmp / "jpegs", args.n_jpegs)
    record = {"machine": machine_description(), "model": args.model, "n_jpegs": args.n_jpegs,
              "default_batch_size_cpu": featx.default_batch_size("cpu")}

    record.update(_model_only_rates(model_file, sizes, args.repeats))  # its session gone before the runs below

    rounds = {bs: [] for bs in sizes}
    for r in range(args.repeats):
        for bs in sizes:
            stats = featx.embed_folder(root, tmp / f"b{bs}-{r}.h5", model=model_file, batch_size=bs, device="cpu",
                                       engine="onnx")
            rounds[bs].append(stats.n_embedded / stats.seconds)
    for bs in sizes:
        record[f"featx_embed_batch{bs}_per_s"] = statistics.median(rounds[bs])
    for bs in sizes:
        record[f"featx_embed_batch{bs}_peak_rss_mb"] = _peak_rss_mb(
            [sys.executable, "-m", "featx", "-q", "embed", str(root), "-o", str(tmp / f"rss{bs}.h5"),
             "--model", str(model_file), "--batch-size", str(bs), "--device", "cpu", "--engine", "onnx"])
    name = "batch_sizes-" + args.model + ("" if args.weights is None else f"-weights-{args.weights}")
    write_record(record, args.out, name, plot_rates=True)


def _model_only_rates(model_file, sizes: list[int], repeats: int) -> dict[str, float]:
    import featx
    from featx.bench import time_throughput
    from featx.export import check_images

    engine = featx.load_model(model_file, device="cpu", engine="onnx")
    photos = check_images(engine.info.preprocess)  # real photos, preprocessed as embed does
    rates = {}
    for bs in sizes:
        batch = photos[[i % len(photos) for i in range(bs)]]
        rates[f"model_only_batch{bs}_per_s"] = time_throughput(lambda: engine.encode(batch), bs, repeats=repeats,
                                                                min_seconds=2.0)[0]
    return rates


def _peak_rss_mb(cmd: list[str]) -> float:
    """Peak resident memory of the process ``cmd`` runs. Started from a small Python of its own: a child
    begins with its parent's peak (fork copies it), and this script's parent holds torch and a session."""
    probe = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True); "
             "sys.stderr.write(r.stderr.decode()[-500:]); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
    run = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed: {run.stderr}")
    return int(run.stdout.split()[-1]) / 1024  # KiB on Linux

if __name__ == "__main__":
    main()
