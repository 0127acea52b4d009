"""TensorFlow-style 'SAME' padding fixed at export against padding worked out at every call, in one run.

    python benchmarks/same_padding.py [--model efficientnet_lite0] [--weights bundled] [--batch-sizes 1,8,32]
                                      [--out benchmarks/results/cpu]

timm's tf_ models (EfficientNet-Lite among them) pad their strided convolutions as TensorFlow does,
which ``Conv2dSame`` works out from the input's shape on every call. ``featx.export`` swaps in timm's
``Conv2dSameExport``, whose padding is fixed for the model's one input size, so onnxruntime folds the
padding into the convolution. This script exports the model both ways (the old way with
``export_onnx(..., fixed_padding=False)``) and times both files with onnxruntime on the CPU, passes taking turns, beside plain PyTorch
(the timm model, eager fp32, normalisation included) in the same run; it also records the largest
difference between the two files' embeddings on the sample photos, and each file's node count.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--weights", default=None, help="as featx export --weights (default: the model's own)")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0, help="each timed pass")
    parser.add_argument("--out", default="benchmarks/results/cpu")
    args = parser.parse_args()

    from pathlib import Path

    import onnx
    import onnxruntime as ort
    import torch

    from featx.backbones import load_backbone
    from featx.bench import machine_description, scratch_folder, write_record
    from featx.export import check_images, embedding_model, export_onnx

    backbone = load_backbone(args.model, weights=args.weights)
    tmp = scratch_folder("featx-same-padding-")
    fixed_file, per_call_file = tmp / "fixed.onnx", tmp / "per-call.onnx"
    export_onnx(backbone, fixed_file)
    export_onnx(backbone, per_call_file, fixed_padding=False)  # the export as it was before
    plain = embedding_model(backbone, fixed_padding=False)  # plain PyTorch: timm's modules as they are

    threads = torch.get_num_threads()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    sessions = {name: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                for name, path in (("padding_fixed", fixed_file), ("padding_per_call", per_call_file))}
    photos = check_images(backbone.preprocess)
    embeddings = [s.run(["embedding"], {"images": photos})[0] for s in sessions.values()]
    record = {"machine": machine_description(), "model": args.model, "threads": threads,
              "largest_embedding_difference": float(np.abs(embeddings[0] - embeddings[1]).max()),
              "embedding_scale": float(np.abs(embeddings[1]).max()),
              "nodes_padding_fixed": len(onnx.load(str(fixed_file)).graph.node),
              "nodes_padding_per_call": len(onnx.load(str(per_call_file)).graph.node)}

    runs = {name: (lambda s: lambda x: s.run(["embedding"], {"images": x}))(s) for name, s in sessions.items()}

    def torch_eager(x):
        with torch.no_grad():
            plain(torch.from_numpy(x))

    runs["torch_eager_fp32"] = torch_eager
    for bs in (int(b) for b in args.batch_sizes.split(",")):
        batch = np.resize(photos, (bs, *photos.shape[1:]))
        rates: dict[str, list[float]] = {name: [] for name in runs}
        for run in runs.values():
            run(batch)
        for _ in range(args.repeats):
            for name, run in runs.items():  # taking turns: this host's speed wanders over a minute
                n, start = 0, time.perf_counter()
                while time.perf_counter() - start < args.seconds:
                    run(batch)
                    n += bs
                rates[name].append(n / (time.perf_counter() - start))
        for name, r in rates.items():
            record[f"{name}_batch{bs}_per_s"] = float(np.median(r))
        record[f"fixed_vs_per_call_batch{bs}"] = (record[f"padding_fixed_batch{bs}_per_s"]
                                                  / record[f"padding_per_call_batch{bs}_per_s"])
        record[f"fixed_vs_torch_eager_batch{bs}"] = (record[f"padding_fixed_batch{bs}_per_s"]
                                                     / record[f"torch_eager_fp32_batch{bs}_per_s"])
    name = args.model if args.weights in (None, "bundled") else f"{args.model}-weights-{Path(args.weights).stem}"
    write_record(record, args.out, f"same_padding-{name}", plot_rates=True)


if __name__ == "__main__":
    main()
