"""How well `featx train-head --cv 5 --mistakes` finds files filed under the wrong class: scikit-learn's
1,797 digits as class folders, 20 of them (chosen at random, seeded) moved into another digit's folder,
embedded with the default model, then every image scored by the fold that left it out.

    python benchmarks/misfiled_digits.py [--out benchmarks/results/cpu] [--n-misfiled 20]

Recorded: how many images the mistakes list holds, how many of the misfiled are in it, and their ranks
(1 = the most confident mistake): what a person reviewing the list from the top would meet.
"""

from __future__ import annotations

import argparse
import csv

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results/cpu")
    parser.add_argument("--n-misfiled", type=int, default=20)
    parser.add_argument("--cv", type=int, default=5)
    args = parser.parse_args()

    import featx
    from featx.bench import machine_description, scratch_folder, write_record
    from featx.samples import write_digits_folder

    tmp = scratch_folder("featx-misfiled-bench-")
    root = write_digits_folder(tmp / "digits", size=32)
    rng = np.random.default_rng(0)
    files = sorted(root.rglob("*.png"))
    misfiled = []
    for i in rng.choice(len(files), args.n_misfiled, replace=False):
        path = files[i]
        wrong = str(rng.choice([d for d in range(10) if str(d) != path.parent.name]))
        path.rename(root / wrong / path.name)
        misfiled.append(f"{wrong}/{path.name}")
    featx.embed_folder(root, tmp / "digits.h5", device="cpu", models_dir=tmp / "models")
    report = featx.train_head(tmp / "digits.h5", tmp / "head.safetensors", C=1.0, cv=args.cv,
                              mistakes_csv=tmp / "mistakes.csv")
    with open(tmp / "mistakes.csv") as f:
        listed = [row["key"] for row in csv.DictReader(f)]
    ranks = sorted(listed.index(key) + 1 for key in misfiled if key in listed)
    write_record({
        "machine": machine_description(),
        "command": f"python benchmarks/misfiled_digits.py --n-misfiled {args.n_misfiled} --cv {args.cv}",
        "n_images": len(files),
        "n_misfiled": args.n_misfiled,
        "cv_accuracy_mean": float(np.mean(report.cv_accuracy)),
        "n_listed": len(listed),
        "n_misfiled_listed": len(ranks),
        "misfiled_ranks": ranks,
        "n_misfiled_in_first_n_listed": sum(r <= args.n_misfiled for r in ranks),
    }, args.out, "misfiled_digits-cpu")


if __name__ == "__main__":
    main()
