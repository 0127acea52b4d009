"""What checking an ONNX file's weights against the digest featx wrote into it costs a run: the SHA-256
of every initializer (``featx.export.tensors_digest``), the onnx parse it needs, and the first
``read_model_info`` and ``OnnxEngine`` of a file in a process (checked) against later ones (remembered).

    python benchmarks/weights_digest.py [--model resnet50] [--out benchmarks/results/cpu]

A backbone name is exported with random weights (the sizes are the model's); an .onnx path is used as it is.
Each figure is the median of ``--repeats`` runs, in seconds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="resnet50", help="backbone name (random weights) or exported .onnx file")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/cpu")
    args = parser.parse_args()

    import onnx

    import featx.runtime as runtime
    from featx.bench import machine_description, scratch_folder, write_record
    from featx.export import ensure_model_file, is_model_file, tensors_digest

    models = scratch_folder("featx-digest-bench-")
    model_file = Path(args.model) if is_model_file(args.model) else \
        ensure_model_file(args.model, weights="none", models_dir=models)

    def seconds(step) -> float:
        """Median time of ``step`` as a new process finds the file: not yet checked."""
        def unchecked() -> None:
            runtime._WEIGHTS_CHECKED.clear()
            runtime._INFO_READ.clear()
            step()

        return statistics.median(_timed(unchecked) for _ in range(args.repeats))

    proto = onnx.load(str(model_file), load_external_data=False)
    weight_bytes = sum(len(t.raw_data) for t in proto.graph.initializer)
    record = {
        "machine": machine_description(), "model": runtime.read_model_info(model_file).backbone,
        "weights_mb": weight_bytes / 1e6,
        "parse_s": seconds(lambda: onnx.load(str(model_file), load_external_data=False)),
        "digest_s": seconds(lambda: tensors_digest(proto)),
        "read_model_info_first_s": seconds(lambda: runtime.read_model_info(model_file)),
        "onnx_engine_first_s": seconds(lambda: runtime.OnnxEngine(model_file, device="cpu")),
    }
    runtime.read_model_info(model_file)  # checked and read once: later reads in the process only stat the file
    record["read_model_info_later_s"] = statistics.median(
        _timed(lambda: runtime.read_model_info(model_file)) for _ in range(args.repeats))
    record["onnx_engine_later_s"] = statistics.median(
        _timed(lambda: runtime.OnnxEngine(model_file, device="cpu")) for _ in range(args.repeats))
    write_record(record, args.out, f"weights_digest-{record['model']}")


def _timed(step) -> float:
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
