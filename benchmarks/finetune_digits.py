"""Issue 5's figures: on scikit-learn digits as an image folder, fine-tuning the top blocks of the
default model against the frozen-features logistic-regression head, on the same held-out split
(the fine-tuning validation split), with the per-epoch log.

    python benchmarks/finetune_digits.py [--epochs 12] [--unfreeze 4] [--input-size 128]

Small images: training runs at --input-size instead of 224 so an epoch takes seconds on 2 cores;
the frozen baseline uses the model's own 224 px preprocessing (its best case).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--unfreeze", default="4")
    parser.add_argument("--input-size", type=int, default=128)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()

    import featx
    from featx.bench import machine_description, scratch_folder, write_record
    from featx.heads import LogRegHead
    from featx.samples import write_digits_folder

    tmp = scratch_folder("featx-ft-bench-")
    root = write_digits_folder(tmp / "digits", size=64)
    unfreeze = args.unfreeze if args.unfreeze == "all" else int(args.unfreeze)
    t0 = time.perf_counter()
    result = featx.fine_tune(root, tmp / "ft.safetensors", unfreeze=unfreeze, epochs=args.epochs,
                            input_size=args.input_size, hflip=False, patience=3, device="cpu")
    seconds = time.perf_counter() - t0
    print(f"fine-tuned top {args.unfreeze} blocks: best val_accuracy {result.best_val_accuracy:.4f} ({seconds:.0f} s)")

    # the frozen baseline on fine-tuning's own split (near-identical digits on one side of it)
    featx.embed_folder(root, tmp / "digits.h5", device="cpu", models_dir=tmp / "models")
    data = featx.load_embeddings(tmp / "digits.h5")
    validated = {Path(p).relative_to(root).as_posix() for p in result.val_files}
    in_val = np.array([key in validated for key in data.keys])
    X, y = data.embeddings, data.labels
    t0 = time.perf_counter()
    frozen = LogRegHead().fit(X[~in_val], y[~in_val])
    frozen_acc = float(np.mean(frozen.predict(X[in_val]) == y[in_val]))
    frozen_seconds = time.perf_counter() - t0
    print(f"frozen features + logreg head: val_accuracy {frozen_acc:.4f} ({frozen_seconds:.1f} s)")
    record = {
        "machine": machine_description(), "n_train": result.n_train, "n_val": result.n_val,
        "n_near_copies": result.n_near_copies,
        "frozen_logreg_val_accuracy": frozen_acc, "finetune_best_val_accuracy": result.best_val_accuracy,
        "finetune_seconds": seconds, "unfreeze": args.unfreeze, "trainable_blocks": result.trainable,
        "input_size": args.input_size, "epochs": [vars(h) for h in result.history],
    }
    write_record(record, args.out, f"finetune_digits-cpu-unfreeze{args.unfreeze}-{args.input_size}px")


if __name__ == "__main__":
    main()
