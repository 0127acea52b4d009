"""Issue 4's figures: both heads on scikit-learn digits embedded with the default model, against
logistic regression on raw pixels, on the same stratified held-out 20%; and logistic-regression
training time on 20,000 x 1,280 embeddings.

    python benchmarks/heads_digits.py [--out benchmarks/results]

The 20,000-row set is the 1,797 real digit embeddings repeated with small Gaussian noise
(sigma = 5% of each feature's spread): real scale and correlations, the row count a user would have.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()

    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    import featx
    from featx.bench import machine_description, scratch_folder, write_record
    from featx.heads import LogRegHead, MLPHead
    from featx.samples import write_digits_folder

    tmp = scratch_folder("featx-heads-bench-")
    root = write_digits_folder(tmp / "digits", size=64)
    t0 = time.perf_counter()
    featx.embed_folder(root, tmp / "digits.h5", device="cpu", models_dir=tmp / "models")
    embed_seconds = time.perf_counter() - t0
    data = featx.load_embeddings(tmp / "digits.h5")
    y = np.array(data.class_names)[data.labels]
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=0.2, stratify=y, random_state=0)

    digits = load_digits()  # raw pixels, rows matched to the cache by the file index in each key
    order = [int(k.split("/")[1].split(".")[0]) for k in data.keys]
    pixels = digits.data[order]
    results = {"machine": machine_description(), "n_train": len(idx_train), "n_test": len(idx_test),
               "embed_seconds_1797_images": embed_seconds}
    contenders = {
        "logreg head (C by 5-fold CV)": (LogRegHead(), data.embeddings),
        "mlp head (1024 ReLU, dropout 0.5)": (MLPHead(), data.embeddings),
        "raw-pixel logistic regression baseline": (
            make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)), pixels),
    }
    for name, (model, X) in contenders.items():
        t0 = time.perf_counter()
        model.fit(X[idx_train], y[idx_train])
        seconds = time.perf_counter() - t0
        acc = float(np.mean(model.predict(X[idx_test]) == y[idx_test]))
        results[name] = {"accuracy": acc, "fit_seconds": seconds}
        print(f"{name:42s} accuracy {acc:.4f}  fit {seconds:.2f} s")

    rng = np.random.default_rng(0)
    reps = -(-20_000 // len(y))
    X20 = np.tile(data.embeddings, (reps, 1))[:20_000]
    X20 = X20 + rng.normal(0, 0.05, X20.shape) * data.embeddings.std(0)
    y20 = np.tile(y, reps)[:20_000]
    for label, head in (("fixed C=1", LogRegHead(C=1.0)), ("C by 5-fold CV", LogRegHead())):
        t0 = time.perf_counter()
        head.fit(X20, y20)
        seconds = time.perf_counter() - t0
        results[f"logreg 20000x1280 {label} fit_seconds"] = seconds
        print(f"logreg on 20,000 x 1,280 ({label}): {seconds:.1f} s")
    write_record(results, args.out, "heads_digits-cpu")


if __name__ == "__main__":
    main()
