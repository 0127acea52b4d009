"""What `--engine auto` measures and picks, at several batch sizes, on this machine.

    python benchmarks/calibrate_engines.py [--model efficientnet_lite0] [--device auto] [--batch-sizes 1,8,32]

Each calibration times every engine that starts here on real photos after a warm-up, after checking
its embeddings against fp32 torch (featx.calibration); `--force` semantics: always measured afresh.
An engine under half the fastest before it is timed on two batches only, as `--engine auto` does.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()

    import featx
    from featx.bench import bench_workspace, machine_description, write_record

    _, model_file, _ = bench_workspace("featx-calibrate-", model=args.model)
    record: dict = {"machine": machine_description(), "model": args.model}
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        calibration = featx.calibrate(model_file, device=args.device, batch_size=batch_size, force=True)
        print(calibration.text())
        record[f"batch {batch_size} chosen"] = calibration.chosen
        for c in calibration.candidates:
            if c.images_per_second is not None:
                record[f"batch {batch_size} {c.engine} images/s"] = c.images_per_second
                record[f"batch {batch_size} {c.engine} min cosine vs fp32 torch"] = c.cosine
            else:
                record[f"batch {batch_size} {c.engine}"] = c.problem
        record["device"] = calibration.device
    write_record(record, Path(args.out) / record["device"].split(":")[0], f"calibrate_engines-{args.model}")


if __name__ == "__main__":
    main()
